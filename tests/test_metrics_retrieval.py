"""Tests for mmlite.metrics.retrieval: recall@K against torchmetrics, tie rules, re-ranking, the recall ceiling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.retrieval import RetrievalHitRate

from mmlite.metrics.retrieval import (as_fraction_of_ceiling, recall_ceiling, rerank_topk, retrieval_per_query,
                                      retrieval_recall, truth_matrix)

# Recall is a mean of 0/1 hits over <= 250 queries, computed in float64 here and in torchmetrics (on float64
# input): both are exact sums of integers divided by Q, so they agree to ~1e-16; 1e-6 is the stated bound.
TOL = 1e-6


def _world(n_images: int, per_image: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A tie-free random similarity [images, texts] and text_to_image with `per_image` captions per image."""
    rng = np.random.default_rng(seed)
    t2i = rng.permutation(np.repeat(np.arange(n_images), per_image))
    return rng.standard_normal((n_images, n_images * per_image)), t2i


def _torchmetrics_hit_rate(scores: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """Rows are queries: torchmetrics' RetrievalHitRate over flattened (query, item) pairs."""
    q, g = scores.shape
    metric = RetrievalHitRate(top_k=k)
    return float(metric(torch.from_numpy(scores).flatten(), torch.from_numpy(relevant).flatten(),
                        indexes=torch.arange(q).repeat_interleave(g)))


# --------------------------------------------------------------------------- against torchmetrics
def test_recall_matches_torchmetrics_hit_rate():
    # torchmetrics orders tied scores by its sort (no stated rule), so the cross-check uses tie-free floats;
    # the tie rules are tested on their own below
    worst = 0.0
    for seed, (n_images, per_image) in enumerate([(10, 5), (23, 5), (50, 5), (12, 1), (8, 3)] * 8):
        s, t2i = _world(n_images, per_image, seed)
        ours = retrieval_recall(s, t2i, ks=(1, 2, 5))
        relevant = t2i[None, :] == np.arange(n_images)[:, None]  # (I, T)
        for k in (1, 2, 5):
            worst = max(worst, abs(ours[f"i2t_r{k}"] - _torchmetrics_hit_rate(s, relevant, k)),
                        abs(ours[f"t2i_r{k}"] - _torchmetrics_hit_rate(s.T.copy(), relevant.T.copy(), k)))
    assert worst <= TOL


def test_hand_checked_example():
    # 3 images, 2 captions each; captions 0,1 -> image 0, 2,3 -> image 1, 4,5 -> image 2
    s = np.array([[0.9, 0.1, 0.8, 0.0, 0.2, 0.3],
                  [0.5, 0.4, 0.3, 0.2, 0.6, 0.1],
                  [0.1, 0.2, 0.3, 0.4, 0.5, 0.0]])
    t2i = np.array([0, 0, 1, 1, 2, 2])
    per = retrieval_per_query(s, t2i, ks=(1, 2, 3))
    # image 0: own 0.9 first -> 1; image 1: order .6 .5 .4 .3(own) .2(own) -> 4; image 2: .5(own) first -> 1
    assert per["i2t_rank"].tolist() == [1, 4, 1]
    # text columns: 0 -> image 0 (.9 best) 1; 1 -> image 0 .1 vs .4 .2 -> 3; 2 -> image 1 .3 vs .8 .3 (tie) -> 3
    # (pessimistic); 3 -> image 1 .2 vs 0 .4 -> 2; 4 -> image 2 .5 vs .2 .6 -> 2; 5 -> image 2 0 vs .3 .1 -> 3
    assert per["t2i_rank"].tolist() == [1, 3, 3, 2, 2, 3]
    r = retrieval_recall(s, t2i, ks=(1, 2, 3))
    assert r["i2t_r1"] == pytest.approx(2 / 3) and r["i2t_r3"] == pytest.approx(2 / 3)
    assert r["t2i_r1"] == pytest.approx(1 / 6) and r["t2i_r2"] == pytest.approx(3 / 6) and r["t2i_r3"] == 1.0
    assert r["t2i_median_rank"] == 2.5 and r["i2t_mean_rank"] == pytest.approx(2.0)


def test_torch_and_numpy_inputs_agree():
    s, t2i = _world(15, 5, 1)
    a = retrieval_recall(s, t2i)
    b = retrieval_recall(torch.from_numpy(s).float().requires_grad_(), torch.from_numpy(t2i))
    assert a == pytest.approx(b, abs=TOL)
    q = np.argsort(np.argsort(s, axis=None)).reshape(s.shape) % 256  # unsigned ints: order kept within 0..255
    assert retrieval_recall(q.astype(np.uint8), t2i) == retrieval_recall(q.astype(np.float64), t2i)


# --------------------------------------------------------------------------- ties
def test_pessimistic_tie_rule():
    s = np.zeros((4, 4))  # a constant scorer: every wrong item tied with the right one
    t2i = np.arange(4)
    r = retrieval_recall(s, t2i, ks=(1, 2, 4))
    assert r["t2i_r1"] == 0.0 and r["i2t_r2"] == 0.0 and r["t2i_r4"] == 1.0 and r["t2i_mean_rank"] == 4.0
    s2 = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 2.0, 0.5]])
    per = retrieval_per_query(s2, np.array([0, 1, 2]), ks=(1,))
    # t2i: text 1 -> image 1 scores 0, below image 0's 1.0 and image 2's 2.0 -> 3; text 2: 0.5 below 1.0 -> 2
    # i2t: image 0's own text 0 (1.0) tied with text 1 -> 2; image 1's own 0 tied with text 0, below text 2 -> 3
    assert per["t2i_rank"].tolist() == [1, 3, 2] and per["i2t_rank"].tolist() == [2, 3, 2]


def test_expected_tie_rule_hand_and_monte_carlo():
    s = np.zeros((4, 4))
    r = retrieval_recall(s, np.arange(4), ks=(1, 2, 3), ties="expected")
    assert r["t2i_r1"] == pytest.approx(0.25) and r["t2i_r3"] == pytest.approx(0.75)
    assert r["t2i_mean_rank"] == pytest.approx(2.5)
    # random integer scores (many ties), several own captions: expectation of random tie-breaking
    rng = np.random.default_rng(3)
    s = rng.integers(0, 3, (6, 18)).astype(float)
    t2i = rng.permutation(np.repeat(np.arange(6), 3))
    exp = retrieval_recall(s, t2i, ks=(1, 2, 5), ties="expected")
    trials = [retrieval_recall(s + 1e-3 * rng.random(s.shape), t2i, ks=(1, 2, 5)) for _ in range(3000)]
    for key in exp:
        mc = np.array([t[key] for t in trials])
        if "median" in key:
            continue  # the median of expected ranks is not the expected median
        assert abs(mc.mean() - exp[key]) <= 4 * mc.std() / math.sqrt(len(mc)) + 1e-12, key


def test_rules_agree_without_ties():
    s, t2i = _world(20, 5, 7)
    assert retrieval_recall(s, t2i, ties="expected") == pytest.approx(retrieval_recall(s, t2i), abs=1e-12)


# --------------------------------------------------------------------------- validation
def test_bad_inputs_raise():
    s, t2i = _world(6, 5, 0)
    with pytest.raises(ValueError, match="gallery of 6 images"):
        retrieval_recall(s, t2i, ks=(1, 10))
    with pytest.raises(ValueError, match="NaN or infinite"):
        bad = s.copy()
        bad[2, 3] = np.nan
        retrieval_recall(bad, t2i, ks=(1,))
    with pytest.raises(ValueError, match="entries but there are"):
        retrieval_recall(s, t2i[:-1], ks=(1,))
    with pytest.raises(ValueError, match="no caption"):
        retrieval_recall(s, np.zeros(30, dtype=int), ks=(1,))
    with pytest.raises(ValueError, match="at least 2 images"):
        retrieval_recall(s[:1], np.zeros(30, dtype=int), ks=(1,))
    with pytest.raises(ValueError, match="integer"):
        retrieval_recall(s, t2i.astype(float), ks=(1,))
    with pytest.raises(ValueError, match="ties"):
        retrieval_recall(s, t2i, ks=(1,), ties="optimistic")
    with pytest.raises(ValueError, match="positive integers"):
        retrieval_recall(s, t2i, ks=(0,))


# --------------------------------------------------------------------------- re-ranking
def test_rerank_recovers_inside_shortlist_only():
    for seed in range(6):
        s, t2i = _world(30, 5, seed)
        oracle = lambda img, txt: (t2i[txt] == img).astype(float)  # noqa: E731  a pair scorer that knows the truth
        k = 4
        r = rerank_topk(s, oracle, k, batch_size=100)
        before = retrieval_per_query(s, t2i, ks=(1, k))
        after = retrieval_per_query(r.i2t, t2i, ks=(1, k), t2i_similarity=r.t2i)
        for d in ("i2t", "t2i"):
            inside = before[f"{d}_rank"] <= k
            assert (after[f"{d}_rank"][inside] == 1).all()  # recovered: first place
            assert (after[f"{d}_rank"][~inside] == before[f"{d}_rank"][~inside]).all()  # not recovered, unmoved
            assert after[f"{d}_r1"].mean() == before[f"{d}_r{k}"].mean()


def test_rerank_orders_shortlist_by_pair_score():
    s = np.array([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.4]])
    pair = lambda img, txt: -txt.astype(float) + 10 * img  # noqa: E731  prefers low text indices
    r = rerank_topk(s, pair, 2)
    # image 0 shortlist {0, 1}: pair order 0 > 1, above 2 > 3; image 1 shortlist {3, 2}: 2 > 3, then 1 > 0
    assert np.argsort(-r.i2t[0]).tolist() == [0, 1, 2, 3]
    assert np.argsort(-r.i2t[1]).tolist() == [2, 3, 1, 0]
    calls = []
    rerank_topk(s, lambda i, t: calls.append(len(i)) or np.zeros(len(i)), 2, batch_size=3)
    # i2t shortlists: 4 pairs; t2i shortlists (k=2 of 2 images): all 8 pairs; each distinct pair scored once
    assert sum(calls) == 8 and max(calls) <= 3
    with pytest.raises(ValueError, match="k must be"):
        rerank_topk(s, pair, 3)
    with pytest.raises(ValueError, match="NaN"):
        rerank_topk(s, lambda i, t: np.full(len(i), np.nan), 2)
    with pytest.raises(ValueError, match="scores for"):
        rerank_topk(s, lambda i, t: np.zeros(1), 2)


# --------------------------------------------------------------------------- the recall ceiling
def test_ceiling_hand_cases():
    # 3 images, 1 caption each; caption 0 true of images 0 and 1; caption 2 true of all three
    truth = np.array([[1, 0, 1], [1, 1, 1], [0, 0, 1]], bool)
    c = recall_ceiling(np.array([0, 1, 2]), truth, ks=(1, 2))
    assert c["t2i_r1"] == pytest.approx((1 / 2 + 1 + 1 / 3) / 3) and c["t2i_r2"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    # image 0: m=2 true texts, o=1 -> 1/2; image 1: m=3 -> 1/3; image 2: m=1 -> 1 (K=1)
    assert c["i2t_r1"] == pytest.approx((1 / 2 + 1 / 3 + 1) / 3)
    assert c["i2t_r2"] == pytest.approx((1 + (1 - math.comb(2, 2) / math.comb(3, 2)) + 1) / 3)
    perfect = recall_ceiling(np.arange(4), np.eye(4, dtype=bool), ks=(1, 2))
    assert all(v == 1.0 for v in perfect.values())
    with pytest.raises(ValueError, match="not true of their own image"):
        recall_ceiling(np.array([0, 1, 2]), ~np.eye(3, dtype=bool), ks=(1,))


def test_ceiling_monte_carlo_and_expected_ties():
    rng = np.random.default_rng(11)
    n_images, per_image = 8, 3
    t2i = np.repeat(np.arange(n_images), per_image)
    truth = rng.random((n_images, n_images * per_image)) < 0.3
    truth[t2i, np.arange(len(t2i))] = True
    ceiling = recall_ceiling(t2i, truth, ks=(1, 3, 5))
    # two independent computations: the formula, and random tie-breaking of the truth itself
    assert ceiling == pytest.approx(retrieval_recall(truth, t2i, ks=(1, 3, 5), ties="expected"), abs=1e-12)
    trials = [retrieval_recall(truth + 0.5 * rng.random(truth.shape), t2i, ks=(1, 3, 5)) for _ in range(4000)]
    for key, value in ceiling.items():
        if "rank" in key:
            continue
        mc = np.array([t[key] for t in trials])
        assert abs(mc.mean() - value) <= 4 * mc.std() / math.sqrt(len(mc)) + 1e-12, key
    frac = as_fraction_of_ceiling(retrieval_recall(truth + 0.5 * rng.random(truth.shape), t2i, ks=(1, 3, 5)), ceiling)
    assert set(frac) == {f"{d}_r{k}/ceiling" for d in ("i2t", "t2i") for k in (1, 3, 5)}
    with pytest.raises(ValueError, match="has no"):
        as_fraction_of_ceiling({"t2i_r2": 0.5}, ceiling)


# --------------------------------------------------------------------------- truth of captions in the data world
@pytest.fixture(scope="module")
def test_split():
    from mmlite.data import load
    return load("tiny", seed=0)["test"]


def test_truth_matrix_matches_semantics(test_split):
    from mmlite.data.semantics import parse_caption, scene_list, truth
    rng = np.random.default_rng(0)
    captions = [c for cs in test_split.captions for c in cs]
    negatives = [n for ns in test_split.negatives for n, _ in ns]
    texts = list(rng.choice(captions, 60)) + list(rng.choice(negatives, 60))
    rows = rng.choice(len(test_split), 150, replace=False)
    objects = test_split.objects[rows]
    fast_true, fast_maybe = truth_matrix(objects, texts), truth_matrix(objects, texts, undecidable=True)
    slow = np.array([[truth(parse_caption(t), scene_list(r), 15) for t in texts] for r in objects], dtype=object)
    assert (fast_true == (slow == True)).all() and (fast_maybe == (slow != False)).all()  # noqa: E712
    assert (slow == None).sum() > 0 and (slow == True).sum() > 0  # noqa: E711,E712  all three values occur
    with pytest.raises(ValueError, match="not a sentence"):
        truth_matrix(objects, ["a purple elephant"])


def test_ceiling_on_tiny_world(test_split):
    import time
    texts = [c for cs in test_split.captions for c in cs]
    t2i = np.repeat(np.arange(len(test_split)), len(test_split.captions[0]))
    start = time.perf_counter()
    truth = truth_matrix(test_split.objects, texts)  # 500 images x 2500 captions
    assert time.perf_counter() - start < 30  # seconds, not minutes (about 0.5 s here)
    assert truth[t2i, np.arange(len(texts))].all()  # own captions are always true
    c = recall_ceiling(t2i, truth)
    # measured: t2i R@1 0.459, R@5 0.682, R@10 0.729; i2t R@1 0.026, R@5 0.125, R@10 0.236
    assert 0.3 < c["t2i_r1"] < 0.6 and c["t2i_r1"] < c["t2i_r5"] < c["t2i_r10"] < 1
    assert c["i2t_r1"] < 0.1  # generic count captions ("one large shape") are true of a third of the images
    loose = recall_ceiling(t2i, truth_matrix(test_split.objects, texts, undecidable=True))
    assert all(loose[k] <= c[k] + 1e-12 for k in c if "rank" not in k)
