"""Captioning metrics: corpus BLEU and CIDEr-D on whitespace-tokenised text (chapter 5 onward).

No tokeniser is applied: a sentence is `text.split()`, so the text must already be lower-cased and
free of punctuation, as every caption of the shapes world is. (The COCO caption toolkit runs the
Stanford PTB tokeniser first; on the world's captions it would change nothing.)

hypotheses: one generated caption per image; references: for each image a non-empty list of true
captions (the number may differ between images). An empty hypothesis is allowed and scores 0; an
empty reference is an error (it has no n-grams and no length to compare with).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from typing import Sequence

import numpy as np

NGram = tuple[str, ...]


def _check_corpus(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list[list[str]],
                                                                                            list[list[list[str]]]]:
    """Validate a corpus and split it into words: (hypothesis words, reference words per image)."""
    if isinstance(hypotheses, str) or not isinstance(hypotheses, Sequence):
        raise ValueError(f"hypotheses must be a list of strings, got {type(hypotheses).__name__}")
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise ValueError(f"references must be a list of lists of strings, got {type(references).__name__}")
    if len(hypotheses) == 0:
        raise ValueError("hypotheses is empty: a corpus needs at least one image")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but references for {len(references)} images")
    hyps, refs = [], []
    for i, (h, rs) in enumerate(zip(hypotheses, references)):
        if not isinstance(h, str):
            raise ValueError(f"hypotheses[{i}] must be a string, got {type(h).__name__}")
        if isinstance(rs, str) or not isinstance(rs, Sequence):
            raise ValueError(f"references[{i}] must be a list of strings, got {type(rs).__name__}")
        if len(rs) == 0:
            raise ValueError(f"references[{i}] is empty: every image needs at least one reference")
        words = []
        for j, r in enumerate(rs):
            if not isinstance(r, str):
                raise ValueError(f"references[{i}][{j}] must be a string, got {type(r).__name__}")
            if not r.split():
                raise ValueError(f"references[{i}][{j}] is an empty caption")
            words.append(r.split())
        hyps.append(h.split())
        refs.append(words)
    return hyps, refs


def ngrams(words: Sequence[str], n: int) -> Counter[NGram]:
    """Counts of the n-grams (tuples of n consecutive words) of a sentence."""
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _closest_length(hyp_len: int, ref_lens: list[int]) -> int:
    """The reference length closest to the hypothesis length; a tie goes to the shorter reference."""
    return min(ref_lens, key=lambda r: (abs(r - hyp_len), r))


def bleu_statistics(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                    max_n: int = 4) -> dict[str, object]:
    """The sufficient statistics of corpus BLEU, summed over the corpus.

    matches[k-1] = sum over images of sum over k-grams g of the hypothesis of
                   min(count_hyp(g), max over references of count_ref(g))     (clipped counts)
    totals[k-1]  = sum over images of the number of k-grams of the hypothesis
    hyp_len = sum of hypothesis lengths c; ref_len = sum of closest reference lengths r (ties to the shorter).
    """
    if not isinstance(max_n, int) or isinstance(max_n, bool) or max_n < 1:
        raise ValueError(f"max_n must be a positive integer, got {max_n!r}")
    hyps, refs = _check_corpus(hypotheses, references)
    matches, totals, hyp_len, ref_len = [0] * max_n, [0] * max_n, 0, 0
    for h, rs in zip(hyps, refs):
        hyp_len += len(h)
        ref_len += _closest_length(len(h), [len(r) for r in rs])
        for k in range(1, max_n + 1):
            counts = ngrams(h, k)
            ref_max: Counter[NGram] = Counter()
            for r in rs:
                ref_max |= ngrams(r, k)  # elementwise max of counts
            totals[k - 1] += sum(counts.values())
            matches[k - 1] += sum(min(c, ref_max[g]) for g, c in counts.items())
    return {"matches": matches, "totals": totals, "hyp_len": hyp_len, "ref_len": ref_len}


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> dict[str, float]:
    """Corpus BLEU-1 .. BLEU-max_n (Papineni et al., ACL 2002), on a 0-1 scale (papers and sacrebleu print x100).

    p_k  = matches_k / totals_k (see `bleu_statistics`: clipped n-gram counts summed over the corpus)
    BP   = 1 if c > r else exp(1 - r / c)   (c, r: corpus hypothesis and closest-reference lengths; 0 if c = 0)
    BLEU-n = BP * exp((1/n) * sum_{k<=n} log p_k), and 0 when some p_k (k <= n) is 0 or has no k-grams at all.

    The same definition as sacrebleu's corpus BLEU with tokenize="none", smooth_method="none",
    effective_order=False (which also takes the closest reference length with ties to the shorter).
    pycocoevalcap's Bleu adds epsilons, (matches + 1e-15) / (totals + 1e-9) and (c + 1e-15) / (r + 1e-9):
    the same number to ~1e-9 where every p_k > 0, but a small positive score where ours is 0: p_k becomes
    1e-15 / totals_k for a k-gram precision of 0, and 1e-6 when no hypothesis has k words (totals_k = 0),
    so BLEU-4 can reach (1e-6) ** (1/4) = 0.03 there.
    Returns bleu_1 .. bleu_n, precision_1 .. precision_n, brevity_penalty, hyp_len, ref_len.
    """
    stats = bleu_statistics(hypotheses, references, max_n)
    return bleu_from_statistics(stats["matches"], stats["totals"], stats["hyp_len"], stats["ref_len"])


def bleu_from_statistics(matches: Sequence[int], totals: Sequence[int], c: int, r: int) -> dict[str, float]:
    """Corpus BLEU (the formula of `bleu`) from summed statistics: clipped matches and totals per order
    1..n, hypothesis length c and reference length r. Summing per-sentence statistics of a resample
    gives that resample's corpus BLEU without recounting n-grams (a fast bootstrap)."""
    max_n = len(matches)
    if len(totals) != max_n or max_n < 1:
        raise ValueError(f"matches and totals need one count per n-gram order, got {len(matches)} and {len(totals)}")
    bp = 1.0 if c > r else (math.exp(1.0 - r / c) if c > 0 else 0.0)
    precisions = [m / t if t > 0 else 0.0 for m, t in zip(matches, totals)]
    out: dict[str, float] = {}
    log_sum = 0.0
    for n in range(1, max_n + 1):
        if precisions[n - 1] == 0.0 or math.isinf(log_sum):
            log_sum = -math.inf
            out[f"bleu_{n}"] = 0.0
        else:
            log_sum += math.log(precisions[n - 1])
            out[f"bleu_{n}"] = bp * math.exp(log_sum / n)
    for n in range(1, max_n + 1):
        out[f"precision_{n}"] = precisions[n - 1]
    out.update(brevity_penalty=bp, hyp_len=float(c), ref_len=float(r))
    return out


def _tfidf(counts: Counter[NGram], df: Counter[NGram], log_images: float, n: int
           ) -> tuple[list[dict[NGram, float]], list[float]]:
    """TF-IDF vectors per n-gram order, g -> tf(g) * (log(#images) - log(max(1, df(g)))), and their L2 norms."""
    vec: list[dict[NGram, float]] = [{} for _ in range(n)]
    for g, tf in counts.items():
        vec[len(g) - 1][g] = tf * (log_images - math.log(max(1.0, df[g])))
    norms = [math.sqrt(sum(v * v for v in vk.values())) for vk in vec]
    return vec, norms


def cider_d(hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
            sigma: float = 6.0) -> tuple[float, np.ndarray]:
    """CIDEr-D (Vedantam et al., CVPR 2015), as coco-caption's pycocoevalcap/cider/cider_scorer.py computes it.

    For image i with hypothesis h and references r_1 .. r_m, and n-gram orders k = 1..n:
      g_k(s)[w] = tf_s(w) * (log N - log max(1, df(w)))   TF-IDF of k-gram w in sentence s; N = #images,
                  df(w) = number of images with w in at least one reference (the corpus evaluated)
      sim_k(h, r) = sum_w min(g_k(h)[w], g_k(r)[w]) * g_k(r)[w] / (|g_k(h)| |g_k(r)|)   (clipped; 0 if a norm is 0)
                    * exp(-(len(h) - len(r))^2 / (2 sigma^2))                            (length penalty, sigma 6)
      CIDEr-D_i = 10 * (1/n) sum_k (1/m) sum_j sim_k(h, r_j);  the corpus score is the mean over images.
    Papers print 100 x this corpus score (0.9 here is "CIDEr 90"). The reference code measures length in
    bigrams (len - 1); with non-empty references this gives the same difference as words whenever the
    hypothesis has a word, and an empty hypothesis scores 0 either way.

    The IDF comes from the references being evaluated, so the score of an image depends on the corpus.
    A corpus of ONE image always scores 0: every reference n-gram has df = 1 = N, so its weight is
    log 1 - log 1 = 0, and an n-gram outside the references has log N - log max(1, 0) = 0 too (a warning
    is raised). Likewise an n-gram found in every image's references carries no weight.
    Returns (corpus score, per-image scores as a float64 array).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    hyps, refs = _check_corpus(hypotheses, references)
    if len(hyps) == 1:
        warnings.warn("CIDEr-D of a corpus of one image is 0 by definition (every IDF weight is log 1 = 0)",
                      RuntimeWarning, stacklevel=2)

    def all_ngrams(words: list[str]) -> Counter[NGram]:
        out: Counter[NGram] = Counter()
        for k in range(1, n + 1):
            out.update(ngrams(words, k))
        return out

    hyp_counts = [all_ngrams(h) for h in hyps]
    ref_counts = [[all_ngrams(r) for r in rs] for rs in refs]
    df: Counter[NGram] = Counter()
    for rs in ref_counts:
        df.update(set().union(*rs))  # each image counts once per n-gram
    log_images = math.log(len(hyps))
    scores = np.zeros(len(hyps))
    for i, (h, hc, rs, rcs) in enumerate(zip(hyps, hyp_counts, refs, ref_counts)):
        vh, nh = _tfidf(hc, df, log_images, n)
        total = 0.0
        for r, rc in zip(rs, rcs):
            vr, nr = _tfidf(rc, df, log_images, n)
            penalty = math.exp(-((len(h) - len(r)) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                num = sum(min(v, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, v in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    num /= nh[k] * nr[k]
                total += num * penalty
        scores[i] = 10.0 * total / (n * len(rs))
    return float(scores.mean()), scores
