"""Corpus BLEU and CIDEr-D: hand-checked values, and sacrebleu / pycocoevalcap as oracles on random corpora
and on the true captions of the shapes world."""

import math
import random
import warnings

import numpy as np
import pytest

from mmlite.data import load
from mmlite.metrics.captioning import bleu, bleu_statistics, cider_d

TOL = 1e-6  # the definitions agree exactly; the oracles differ from us only by float rounding (~1e-15)
WORDS = "a b c d e f".split()  # a small vocabulary, so that random sentences share many n-grams


def random_corpus(rng: random.Random, min_images: int = 1) -> tuple[list[str], list[list[str]]]:
    """1-8 images; hypotheses of 0-12 words (sometimes empty), 1-5 references of 1-12 words each."""
    n = rng.randint(min_images, 8)
    sentence = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    hyps = [sentence(0, 12) if rng.random() < 0.9 else "" for _ in range(n)]
    refs = [[sentence(1, 12) for _ in range(rng.randint(1, 5))] for _ in range(n)]
    return hyps, refs


@pytest.fixture(scope="module")
def world_corpora():
    """Real captions of the tiny test split: (hypotheses, references) in four arrangements."""
    test = load("tiny", seed=0)["test"]
    caps = test.captions
    n = len(caps)
    perm = np.random.default_rng(0).permutation(n)
    rng = random.Random(0)
    return {
        "caption 0 vs 1-4": ([c[0] for c in caps], [c[1:] for c in caps]),
        "caption 2 vs 0,1,3,4": ([c[2] for c in caps], [c[:2] + c[3:] for c in caps]),
        "mismatched images": ([caps[p][0] for p in perm], [c[1:] for c in caps]),
        "1-4 references": ([c[0] for c in caps], [c[1:1 + rng.randint(1, 4)] for c in caps]),
    }


# ------------------------------------------------------------------ BLEU by hand
def test_bleu_identical_is_one():
    out = bleu(["a b c d e"], [["a b c d e"]])
    assert [out[f"bleu_{n}"] for n in range(1, 5)] == [1.0] * 4
    assert out["brevity_penalty"] == 1.0


def test_bleu_clipping_by_hand():
    # "the" four times, the reference has it twice: p1 = 2/4; no bigram matches, so BLEU-2.. are 0
    out = bleu(["the the the the"], [["the cat the"]])
    assert out["precision_1"] == 0.5 and out["bleu_1"] == 0.5
    assert out["precision_2"] == 0.0 and out["bleu_2"] == 0.0 and out["bleu_4"] == 0.0


def test_bleu_short_hypothesis_by_hand():
    # shorter than every reference: BP = exp(1 - 4/2); no trigrams at all, so BLEU-3 and BLEU-4 are 0
    out = bleu(["a b"], [["a b c d", "a b c d e"]])
    assert out["bleu_1"] == pytest.approx(math.exp(-1), abs=1e-15)
    assert out["bleu_2"] == pytest.approx(math.exp(-1), abs=1e-15)
    assert out["bleu_3"] == 0.0 and out["precision_3"] == 0.0
    assert out["ref_len"] == 4


def test_bleu_long_hypothesis_by_hand():
    # longer than every reference: BP = 1; p1 = 3/6, p2 = 2/5
    out = bleu(["a b c x y z"], [["a b c", "a b"]])
    assert out["brevity_penalty"] == 1.0 and out["ref_len"] == 3
    assert out["bleu_2"] == pytest.approx(math.sqrt(3 / 6 * 2 / 5), abs=1e-15)


def test_bleu_closest_length_ties_to_shorter():
    # hypothesis of 3 words, references of 2 and 4: the tie goes to 2, so BP = 1 (with 4 it would be exp(-1/3))
    stats = bleu_statistics(["a b c"], [["a b c d", "a b"]])
    assert stats["ref_len"] == 2
    assert bleu(["a b c"], [["a b c d", "a b"]])["bleu_2"] == 1.0


def test_closest_length_ties_in_the_references():
    # both oracles also break the tie towards the shorter reference
    pytest.importorskip("sacrebleu")
    pytest.importorskip("pycocoevalcap")
    hyps, refs = ["a b c"], [["a b c d", "a b"]]
    assert sacre(hyps, refs, 2).ref_len == 2 and sacre(hyps, refs, 2).bp == 1.0
    assert coco_bleu(hyps, refs)[1] == pytest.approx(1.0, abs=1e-8)


def test_bleu_empty_hypothesis_scores_zero():
    out = bleu([""], [["a b"]])
    assert out["bleu_1"] == 0.0 and out["brevity_penalty"] == 0.0
    # in a corpus it only adds its reference length to r
    mixed = bleu(["a b c", ""], [["a b c"], ["a b c"]])
    assert mixed["ref_len"] == 6 and mixed["bleu_1"] == pytest.approx(math.exp(1 - 6 / 3), abs=1e-15)


def test_bleu_is_a_corpus_statistic_not_a_mean():
    # clipped counts are summed first: (1/1 + 0/3 unigrams) = 1/4, not the mean of 1.0 and 0.0
    out = bleu(["a", "x y z"], [["a"], ["b c d"]])
    assert out["precision_1"] == 0.25


# ------------------------------------------------------------------ BLEU against sacrebleu and pycocoevalcap
def sacre(hyps, refs, n):
    from sacrebleu.metrics import BLEU
    width = max(len(r) for r in refs)
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(width)]  # None: fewer references
    return BLEU(tokenize="none", smooth_method="none", effective_order=False, max_ngram_order=n).corpus_score(
        hyps, streams)


def coco_bleu(hyps, refs):
    from pycocoevalcap.bleu.bleu import Bleu
    score, _ = Bleu(4).compute_score({i: r for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)},
                                     verbose=0)
    return score


def with_coco_epsilons(stats, n):
    """pycocoevalcap's formula on our statistics: (m + 1e-15) / (t + 1e-9) and ratio (c + 1e-15) / (r + 1e-9)."""
    prod = 1.0
    for k in range(n):
        prod *= (stats["matches"][k] + 1e-15) / (stats["totals"][k] + 1e-9)
    score = prod ** (1 / n)
    ratio = (stats["hyp_len"] + 1e-15) / (stats["ref_len"] + 1e-9)
    return score * math.exp(1 - 1 / ratio) if ratio < 1 else score


def test_bleu_matches_sacrebleu_on_random_corpora():
    pytest.importorskip("sacrebleu")
    rng, worst, zeros = random.Random(1), 0.0, 0
    for _ in range(300):
        hyps, refs = random_corpus(rng)
        ours = bleu(hyps, refs)
        for n in range(1, 5):
            ref = sacre(hyps, refs, n)
            worst = max(worst, abs(ours[f"bleu_{n}"] - ref.score / 100), abs(ours["brevity_penalty"] - ref.bp))
            zeros += ours[f"bleu_{n}"] == 0.0
        assert ours["hyp_len"] == ref.sys_len and ours["ref_len"] == ref.ref_len
    assert worst < TOL, worst
    assert zeros > 20  # the random corpora do reach the zero-precision cases


def test_bleu_matches_pycocoevalcap_where_every_precision_is_positive():
    pytest.importorskip("pycocoevalcap")
    rng, worst, worst_eps, compared, differ = random.Random(2), 0.0, 0.0, 0, 0
    for _ in range(300):
        hyps, refs = random_corpus(rng)
        ours, stats, coco = bleu(hyps, refs), bleu_statistics(hyps, refs), coco_bleu(hyps, refs)
        for n in range(1, 5):
            worst_eps = max(worst_eps, abs(with_coco_epsilons(stats, n) - coco[n - 1]))
            if all(stats["matches"][k] > 0 for k in range(n)):
                worst = max(worst, abs(ours[f"bleu_{n}"] - coco[n - 1]))
                compared += 1
            else:  # a zero precision: 0 for us and sacrebleu; pycocoevalcap's epsilons leave a small number, up to
                # (1e-15 / 1e-9) ** (1/4) = 0.03 when no hypothesis has 4 words (totals_4 = 0)
                assert ours[f"bleu_{n}"] == 0.0 and 0.0 <= coco[n - 1] < 1e-6 ** (1 / n)
                differ += 1
    assert worst < TOL, worst
    assert worst_eps < 1e-12, worst_eps  # the whole difference is their epsilons
    assert compared > 600 and differ > 20


def test_bleu_on_world_captions(world_corpora):
    pytest.importorskip("sacrebleu")
    pytest.importorskip("pycocoevalcap")
    for name, (hyps, refs) in world_corpora.items():
        ours, coco = bleu(hyps, refs), coco_bleu(hyps, refs)
        for n in range(1, 5):
            assert abs(ours[f"bleu_{n}"] - sacre(hyps, refs, n).score / 100) < TOL, (name, n)
            assert abs(ours[f"bleu_{n}"] - coco[n - 1]) < TOL, (name, n)
    true, wrong = bleu(*world_corpora["caption 0 vs 1-4"]), bleu(*world_corpora["mismatched images"])
    assert true["bleu_4"] > wrong["bleu_4"] + 0.05  # the right image's captions share more 4-grams


# ------------------------------------------------------------------ CIDEr-D
def coco_cider(hyps, refs):
    from pycocoevalcap.cider.cider import Cider
    return Cider().compute_score({i: r for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)})


def test_cider_by_hand():
    # two images, disjoint words: every n-gram has df = 1, weight log 2. A perfect 2-word caption has
    # cosine 1 for unigrams and bigrams and no 3- or 4-grams: 10 * (1 + 1 + 0 + 0) / 4 = 5
    score, per = cider_d(["a b", "c d"], [["a b"], ["c d"]])
    assert per.tolist() == pytest.approx([5.0, 5.0], abs=1e-12) and score == pytest.approx(5.0, abs=1e-12)
    # perfect 4-word captions score 10
    score, _ = cider_d(["a b c d", "e f g h"], [["a b c d"], ["e f g h"]])
    assert score == pytest.approx(10.0, abs=1e-12)
    # one word more than the reference: length penalty exp(-1 / 72) on each order's cosine
    _, per = cider_d(["a b c d e", "w x y z"], [["a b c d"], ["w x y z"]])
    assert per[0] < 10.0 and per[1] == pytest.approx(10.0, abs=1e-12)


def test_cider_one_image_is_zero():
    # N = 1: the IDF weight log N - log max(1, df) is log 1 - log 1 = 0 for every n-gram
    with pytest.warns(RuntimeWarning, match="one image"):
        score, per = cider_d(["a b c d"], [["a b c d", "a b c"]])
    assert score == 0.0 and per.tolist() == [0.0]
    pytest.importorskip("pycocoevalcap")
    assert coco_cider(["a b c d"], [["a b c d", "a b c"]])[0] == 0.0


def test_cider_ngram_in_every_image_has_no_weight():
    # "a" occurs in both images' references: df = N = 2, weight 0; only "b"/"c" carry weight
    _, per_with = cider_d(["a b", "a c"], [["a b"], ["a c"]])
    _, per_without = cider_d(["b", "c"], [["b"], ["c"]])
    assert per_with[0] > 0 and per_without[0] > 0


def test_cider_empty_hypothesis_is_zero():
    _, per = cider_d(["", "a b"], [["a b"], ["c d"]])
    assert per[0] == 0.0


def test_cider_matches_pycocoevalcap_on_random_corpora():
    pytest.importorskip("pycocoevalcap")
    rng, worst = random.Random(3), 0.0
    for _ in range(300):
        hyps, refs = random_corpus(rng, min_images=2)
        score, per = cider_d(hyps, refs)
        ref_score, ref_per = coco_cider(hyps, refs)
        worst = max(worst, abs(score - ref_score), float(np.abs(per - ref_per).max()))
    assert worst < TOL, worst


def test_cider_on_world_captions(world_corpora):
    pytest.importorskip("pycocoevalcap")
    scores = {}
    for name, (hyps, refs) in world_corpora.items():
        score, per = cider_d(hyps, refs)
        ref_score, ref_per = coco_cider(hyps, refs)
        assert abs(score - ref_score) < TOL and np.abs(per - ref_per).max() < TOL, name
        scores[name] = score
    assert scores["caption 0 vs 1-4"] > 2 * scores["mismatched images"]


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("metric", [bleu, cider_d])
@pytest.mark.parametrize("hyps, refs, message", [
    ([], [], "empty"),
    (["a"], [["a"], ["b"]], "2 images"),
    (["a"], [[]], r"references\[0\] is empty"),
    (["a"], [[""]], "empty caption"),
    (["a"], ["a"], "list of strings"),
    ("a", [["a"]], "list of strings"),
    ([["a"]], [["a"]], "must be a string"),
    (["a"], [[None]], "must be a string"),
])
def test_bad_input(metric, hyps, refs, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match=message):
            metric(hyps, refs)


def test_bad_orders():
    with pytest.raises(ValueError, match="max_n"):
        bleu(["a"], [["a"]], max_n=0)
    with pytest.raises(ValueError, match="n must"):
        cider_d(["a", "b"], [["a"], ["b"]], n=0)
    with pytest.raises(ValueError, match="sigma"):
        cider_d(["a", "b"], [["a"], ["b"]], sigma=0.0)
