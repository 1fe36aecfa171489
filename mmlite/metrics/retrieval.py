"""Retrieval metrics: recall@K and ranks, ALBEF's top-k re-ranking, the recall ceiling of a world (chapter 5 onward).

`similarity` is an [images, texts] matrix (higher = closer); `text_to_image[j]` is the image caption j was
written for (five captions per image, as in COCO and the shapes world). The protocol is ALBEF's and
CLIP_benchmark's:
  text -> image (t2i): one query per text, the gallery is every image, one right answer;
  image -> text (i2t): one query per image, the gallery is every text, and a hit at K when ANY of the image's
                       captions is in its top K (torchmetrics' RetrievalHitRate, not RetrievalRecall, which
                       would divide by the five captions).
A query's rank is the 1-based rank of its best-placed right answer. Ties between a right and wrong item:
  ties="pessimistic" (default): the tied wrong item ranks above, rank = 1 + #{wrong: s >= s_best}, so a
      constant scorer gets the worst rank and never a lucky one;
  ties="expected": ties are broken uniformly at random and the expectation is reported. With a wrong items
      strictly above the best right score and t wrong, o right items tied with it,
      P(hit@K) = 1 - C(t, K-a) / C(t+o, K-a) (0 if K <= a),   E[rank] = a + (t+o+1) / (o+1).
Both rules agree when there are no ties. K larger than the gallery is a ValueError (recall would be 1 by
construction), as are NaN or infinite scores, a single image or text, and an image without a caption.
"""

from __future__ import annotations

import math
from itertools import permutations
from typing import Callable, NamedTuple, Sequence

import numpy as np

TIES = ("pessimistic", "expected")
_CHUNK = 1024  # query rows compared at once (bounds the memory of the boolean masks)


def _array(x: object, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        x = x.float() if str(x.dtype) == "torch.bfloat16" else x
        x = x.numpy()
    return np.asarray(x)


def _check_similarity(similarity: object, name: str = "similarity") -> np.ndarray:
    s = _array(similarity, name)
    if s.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [images, texts] matrix, got shape {s.shape}")
    if s.shape[0] < 2 or s.shape[1] < 2:
        raise ValueError(f"{name} needs at least 2 images and 2 texts, got shape {s.shape}")
    if s.dtype != bool and (not np.issubdtype(s.dtype, np.number) or np.iscomplexobj(s)):
        raise ValueError(f"{name} must hold real numbers, got dtype {s.dtype}")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)  # bool and (unsigned) integers: negation and -inf need a float
    if not np.isfinite(s).all():
        raise ValueError(f"{name} holds {int((~np.isfinite(s)).sum())} NaN or infinite values")
    return s


def _check_assignment(text_to_image: object, n_images: int, n_texts: int) -> np.ndarray:
    t2i = _array(text_to_image, "text_to_image")
    if t2i.ndim != 1 or not np.issubdtype(t2i.dtype, np.integer):
        raise ValueError(f"text_to_image must be a 1-D integer array, got shape {t2i.shape} dtype {t2i.dtype}")
    if len(t2i) != n_texts:
        raise ValueError(f"text_to_image has {len(t2i)} entries but there are {n_texts} texts")
    if t2i.min() < 0 or t2i.max() >= n_images:
        raise ValueError(f"text_to_image values must lie in [0, {n_images}), got {t2i.min()}..{t2i.max()}")
    missing = np.flatnonzero(np.bincount(t2i, minlength=n_images) == 0)
    if len(missing):
        raise ValueError(f"{len(missing)} images have no caption (first: {missing[:5].tolist()}); "
                         f"image-to-text recall is undefined for them")
    return t2i.astype(np.int64)


def _check_ks(ks: Sequence[int], n_images: int, n_texts: int) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks has repeated values: {ks!r}")
    if max(ks) > n_images:
        raise ValueError(f"K={max(ks)} exceeds the text-to-image gallery of {n_images} images")
    if max(ks) > n_texts:
        raise ValueError(f"K={max(ks)} exceeds the image-to-text gallery of {n_texts} texts")
    return tuple(int(k) for k in ks)


def _counts(scores: np.ndarray, own: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query row: (a, t, o) = wrong items above the best right score, wrong and right items tied with it."""
    best = np.where(own, scores, -np.inf).max(axis=1, keepdims=True)  # (Q, 1)
    wrong = ~own
    tied = scores == best  # (Q, G)
    return ((wrong & (scores > best)).sum(1), (wrong & tied).sum(1), (own & tied).sum(1))


def _direction(scores: np.ndarray, owner_of_column: np.ndarray | None, owned_row: np.ndarray | None,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, t, o) for every query row of scores (Q, G), in chunks: i2t gives owner_of_column, t2i owned_row."""
    parts = []
    for start in range(0, scores.shape[0], _CHUNK):
        rows = np.arange(start, min(start + _CHUNK, scores.shape[0]))
        if owner_of_column is not None:  # i2t: rows are images, columns texts
            own = owner_of_column[None, :] == rows[:, None]  # (q, T)
        else:  # t2i: rows are texts, columns images
            own = np.arange(scores.shape[1])[None, :] == owned_row[rows][:, None]  # (q, I)
        parts.append(_counts(scores[rows], own))
    return tuple(np.concatenate(p) for p in zip(*parts))


def _hits(a: np.ndarray, t: np.ndarray, o: np.ndarray, k: int, ties: str) -> np.ndarray:
    if ties == "pessimistic":
        return (a + t + 1 <= k).astype(np.float64)
    room = k - a  # places left in the top K once the a wrong items above are placed
    miss = np.ones(len(a))  # P(no right item in the first `room` of the t + o tied ones), a product
    for i in range(max(int(room.max()), 0)):
        active = (i < room) & (room <= t)  # room > t: a right item is surely in; room <= 0: surely not
        miss *= np.where(active, (t - i) / np.maximum(t + o - i, 1), 1.0)
    return np.where(room <= 0, 0.0, np.where(room > t, 1.0, 1.0 - miss))


def _rank(a: np.ndarray, t: np.ndarray, o: np.ndarray, ties: str) -> np.ndarray:
    return (a + t + 1.0) if ties == "pessimistic" else a + (t + o + 1.0) / (o + 1.0)


def retrieval_per_query(similarity: object, text_to_image: object, ks: Sequence[int] = (1, 5, 10),
                        ties: str = "pessimistic", t2i_similarity: object | None = None) -> dict[str, np.ndarray]:
    """Per-query hits and ranks, for recall and for a bootstrap over queries.

    Returns {"i2t_r{K}": (images,) hit (0/1, or its probability with ties="expected"), "t2i_r{K}": (texts,),
    "i2t_rank": (images,), "t2i_rank": (texts,)} as float64. `t2i_similarity` (same shape) scores the
    text-to-image direction when it differs from `similarity` (a re-ranked matrix, see rerank_topk).
    """
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    s_i2t = _check_similarity(similarity)
    s_t2i = s_i2t if t2i_similarity is None else _check_similarity(t2i_similarity, "t2i_similarity")
    if s_t2i.shape != s_i2t.shape:
        raise ValueError(f"t2i_similarity has shape {s_t2i.shape} but similarity has {s_i2t.shape}")
    n_images, n_texts = s_i2t.shape
    t2i = _check_assignment(text_to_image, n_images, n_texts)
    ks = _check_ks(ks, n_images, n_texts)
    i2t_counts = _direction(s_i2t, t2i, None)
    t2i_counts = _direction(s_t2i.T, None, t2i)  # rows are texts: (T, I)
    out = {f"i2t_r{k}": _hits(*i2t_counts, k, ties) for k in ks}
    out.update({f"t2i_r{k}": _hits(*t2i_counts, k, ties) for k in ks})
    out["i2t_rank"], out["t2i_rank"] = _rank(*i2t_counts, ties), _rank(*t2i_counts, ties)
    return out


def _summary(per_query: dict[str, np.ndarray], ks: Sequence[int]) -> dict[str, float]:
    out = {f"{d}_r{k}": float(per_query[f"{d}_r{k}"].mean()) for d in ("i2t", "t2i") for k in ks}
    for d in ("i2t", "t2i"):
        out[f"{d}_median_rank"] = float(np.median(per_query[f"{d}_rank"]))
        out[f"{d}_mean_rank"] = float(per_query[f"{d}_rank"].mean())
    return out


def retrieval_recall(similarity: object, text_to_image: object, ks: Sequence[int] = (1, 5, 10),
                     ties: str = "pessimistic", t2i_similarity: object | None = None) -> dict[str, float]:
    """Recall@K both ways and the median / mean rank: the means and medians of retrieval_per_query.

    Keys i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10 (for the default ks), i2t_median_rank,
    i2t_mean_rank, t2i_median_rank, t2i_mean_rank. Recall@K = (1/Q) sum_q [rank_q <= K].
    """
    return _summary(retrieval_per_query(similarity, text_to_image, ks, ties, t2i_similarity), ks)


class Reranked(NamedTuple):
    """Re-ranked score matrices, both [images, texts]; only their order within a query is meaningful."""

    i2t: np.ndarray  # row i orders the texts for image query i
    t2i: np.ndarray  # column j orders the images for text query j


def _dense_rank(values: np.ndarray) -> np.ndarray:
    """Integer ranks 0, 1, ... that keep the order and the ties of `values`."""
    return np.unique(values, return_inverse=True)[1].reshape(values.shape).astype(np.float64)


def rerank_topk(similarity: object, pair_scorer: Callable[[np.ndarray, np.ndarray], object], k: int,
                batch_size: int = 4096) -> Reranked:
    """ALBEF's k_test protocol: per query, the k most similar items are re-scored by a pair scorer.

    For every image, its k most similar texts, and for every text, its k most similar images (ties at the
    k-th place broken by the lower index) are scored by `pair_scorer(image_idx, text_idx)` (int64 arrays of P
    pairs -> P scores, e.g. an ITM head's P(match)); each pair is scored once, in batches of `batch_size`.
    The shortlist goes above every other item, in the pair scorer's order (its ties stay ties); the rest keep
    their contrastive order. So recall@K for K <= k measures the pair scorer on the shortlist, and an item
    outside the shortlist cannot be recovered. Pass the result as
    retrieval_recall(r.i2t, text_to_image, t2i_similarity=r.t2i). Reference: Li et al., ALBEF (2021), section 5.
    """
    s = _check_similarity(similarity)
    n_images, n_texts = s.shape
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= min(n_images, n_texts):
        raise ValueError(f"k must be an integer in 1..{min(n_images, n_texts)} (the smaller gallery), got {k!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    top_texts = np.argsort(-s, axis=1, kind="stable")[:, :k]  # (I, k) texts shortlisted per image
    top_images = np.argsort(-s.T, axis=1, kind="stable")[:, :k]  # (T, k) images shortlisted per text
    img = np.concatenate([np.repeat(np.arange(n_images), k), top_images.ravel()])
    txt = np.concatenate([top_texts.ravel(), np.repeat(np.arange(n_texts), k)])
    codes, inverse = np.unique(img * n_texts + txt, return_inverse=True)  # each distinct pair once
    scores = np.empty(len(codes))
    for start in range(0, len(codes), batch_size):
        c = codes[start:start + batch_size]
        got = _array(pair_scorer(c // n_texts, c % n_texts), "pair_scorer output").astype(np.float64).ravel()
        if got.shape != c.shape:
            raise ValueError(f"pair_scorer returned {got.size} scores for {len(c)} pairs")
        if not np.isfinite(got).all():
            raise ValueError("pair_scorer returned NaN or infinite scores")
        scores[start:start + batch_size] = got
    rest = _dense_rank(s)  # contrastive order, ties kept, values < s.size
    pair_rank = s.size + _dense_rank(scores)  # above every contrastive value
    i2t, t2i = rest.copy(), rest.copy()
    n_i2t = n_images * k
    i2t[img[:n_i2t], txt[:n_i2t]] = pair_rank[inverse[:n_i2t]]
    t2i[img[n_i2t:], txt[n_i2t:]] = pair_rank[inverse[n_i2t:]]
    return Reranked(i2t, t2i)


def recall_ceiling(text_to_image: object, truth: object, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Expected recall of a perfect truth judge: every true item ranked above every false one, ties at random.

    truth[i, j] (bool [images, texts]) says caption j is true of image i; a caption's own image must be true.
    Text j true of m images: P(hit@K) = min(1, K/m). Image i with m true texts, o of them its own:
    P(hit@K) = 1 - C(m-o, K) / C(m, K) (1 for K >= m). Ranks are expected ranks, (m+1)/2 and (m+1)/(o+1).
    Returns the keys of retrieval_recall. A scorer that also learns which true captions the generator tends to
    write for which images could beat it; the ceiling bounds scorers that judge truth only.
    """
    tr = _array(truth, "truth")
    if tr.ndim != 2 or tr.dtype != bool:
        raise ValueError(f"truth must be a 2-D bool [images, texts] matrix, got shape {tr.shape} dtype {tr.dtype}")
    if tr.shape[0] < 2 or tr.shape[1] < 2:
        raise ValueError(f"truth needs at least 2 images and 2 texts, got shape {tr.shape}")
    n_images, n_texts = tr.shape
    t2i = _check_assignment(text_to_image, n_images, n_texts)
    ks = _check_ks(ks, n_images, n_texts)
    false_own = np.flatnonzero(~tr[t2i, np.arange(n_texts)])
    if len(false_own):
        raise ValueError(f"{len(false_own)} captions are not true of their own image (first: "
                         f"{false_own[:5].tolist()}); truth[text_to_image[j], j] must be True")
    m_text = tr.sum(0)  # (T,) images each caption is true of
    m_image, o_image = tr.sum(1), np.bincount(t2i, minlength=n_images)  # (I,), (I,)
    per_query = {f"t2i_r{k}": np.minimum(1.0, k / m_text) for k in ks}
    for k in ks:
        per_query[f"i2t_r{k}"] = np.array([1.0 if k >= m else 1.0 - math.comb(m - o, k) / math.comb(m, k)
                                           for m, o in zip(m_image.tolist(), o_image.tolist())])
    per_query["t2i_rank"], per_query["i2t_rank"] = (m_text + 1) / 2, (m_image + 1) / (o_image + 1)
    return _summary(per_query, ks)


def as_fraction_of_ceiling(recall: dict[str, float], ceiling: dict[str, float]) -> dict[str, float]:
    """{"<key>/ceiling": recall[key] / ceiling[key]} for every recall@K key (ranks are left out)."""
    out = {}
    for key, value in recall.items():
        if "_rank" in key:
            continue
        if key not in ceiling:
            raise ValueError(f"ceiling has no {key!r}; compute both with the same ks")
        out[f"{key}/ceiling"] = value / ceiling[key]
    return out


# --------------------------------------------------------------- which captions are true of which scenes
def _truth_of_claims(claims: list, objects: np.ndarray, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """(is True, is False) of a conjunction of claims for every scene (N,), as semantics.truth, vectorised."""
    shape, color, size, x, y, valid = (objects[..., c] for c in range(6))  # each (N, 4)
    valid = valid == 1

    def match(f: tuple) -> np.ndarray:  # (N, slots)
        m = valid.copy()
        for column, want in zip((shape, color, size), f):
            if want is not None:
                m &= column == want
        return m

    true, false = np.ones(len(objects), bool), np.zeros(len(objects), bool)
    for claim in claims:
        if claim[0] == "count":
            t = match(claim[1]).sum(1) == claim[2]
            f = ~t
        elif claim[0] == "all":
            ms = [match(fi) for fi in claim[1]]
            t = np.zeros(len(objects), bool)
            for slots in permutations(range(objects.shape[1]), len(ms)):  # one filter per object slot
                t |= np.logical_and.reduce([m[:, s] for m, s in zip(ms, slots)])
            t &= valid.sum(1) == len(ms)
            f = ~t
        else:  # ("rel", fa, def_a, r, fb, def_b)
            _, fa, def_a, rel, fb, def_b = claim
            ma, mb = match(fa), match(fb)
            na, nb = ma.sum(1), mb.sum(1)
            no_referent = (def_a & (na == 0)) | (def_b & (nb == 0))
            unclear = ~no_referent & ((def_a & (na > 1)) | (def_b & (nb > 1)))
            coord = x if rel < 2 else y
            d = coord[:, None, :] - coord[:, :, None]  # (N, a, b): coord_b - coord_a
            d = d if rel in (0, 2) else -d
            pairs = ma[:, :, None] & mb[:, None, :] & ~np.eye(objects.shape[1], dtype=bool)  # (N, a, b)
            some_true = (pairs & (d >= margin)).any((1, 2))
            all_false = (~pairs | (d <= 0)).all((1, 2))
            t = ~no_referent & ~unclear & some_true
            f = no_referent | (~unclear & ~some_true & all_false)
        true &= t
        false |= f
    return true, false


def truth_matrix(objects: object, texts: Sequence[str], margin: int = 15, undecidable: bool = False) -> np.ndarray:
    """truth[i, j] = caption texts[j] is true of scene objects[i] (N, MAX_OBJECTS, 6): bool [images, texts].

    Same truth as mmlite.data.semantics (parse_caption, then claim by claim), vectorised over scenes and
    computed once per distinct caption. `margin` is the world's DataConfig.relation_margin. An undecidable
    caption (a relation inside the margin, "the circle" with two circles) becomes `undecidable`. For a
    ceiling the default False is right: own captions are always clearly true, so a truth judge can rank
    undecidable ones below them; True would give a lower bound that a good scorer could exceed.
    """
    from mmlite.data.semantics import parse_caption

    objs = _array(objects, "objects")
    if objs.ndim != 3 or objs.shape[2] != 6 or not np.issubdtype(objs.dtype, np.integer):
        raise ValueError(f"objects must be an integer (N, MAX_OBJECTS, 6) array, got shape {objs.shape}")
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty sequence of strings")
    out = np.empty((len(objs), len(texts)), bool)
    cache: dict[str, np.ndarray] = {}
    for j, text in enumerate(texts):
        if text not in cache:
            claims = parse_caption(text)
            if claims is None:
                raise ValueError(f"caption {j} is not a sentence of the world's grammar: {text!r}")
            true, false = _truth_of_claims(claims, objs, margin)
            cache[text] = ~false if undecidable else true
        out[:, j] = cache[text]
    return out
