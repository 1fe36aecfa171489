"""Classification metrics: accuracy, per-class accuracy, confusion matrix, ROC AUC and calibration (chapter 5 onward).

Predictions are class ids (N,) or a score matrix (N, C), read as its row-wise argmax (ties: the lowest
class id). Targets are class ids. Inputs may be numpy arrays, torch tensors or lists; results are Python
floats or numpy arrays. Calibration follows Guo et al., "On calibration of modern neural networks" (2017),
with the bin edges of torchmetrics' CalibrationError (see calibration_bins).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def _array(x: object) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        x = x.float() if str(x.dtype) == "torch.bfloat16" else x
        x = x.numpy()
    return np.asarray(x)


def _labels(x: object, name: str, n_classes: int | None = None) -> np.ndarray:
    a = _array(x)
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if a.dtype == bool:
        a = a.astype(np.int64)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D array of integer class ids, got shape {a.shape} dtype {a.dtype}")
    if a.min() < 0 or (n_classes is not None and a.max() >= n_classes):
        raise ValueError(f"{name} holds class ids outside [0, {n_classes}): {a.min()}..{a.max()}")
    return a.astype(np.int64)


def _predictions(pred: object, n: int) -> np.ndarray:
    p = _array(pred)
    if p.ndim == 2:  # (N, C) scores -> argmax
        if not np.isfinite(p).all():
            raise ValueError("pred scores hold NaN or infinite values")
        p = p.argmax(axis=1)  # (N,)
    p = _labels(p, "pred")
    if len(p) != n:
        raise ValueError(f"pred has {len(p)} examples but target has {n}")
    return p


def _check_n_classes(n_classes: int) -> int:
    if not isinstance(n_classes, (int, np.integer)) or isinstance(n_classes, bool) or n_classes < 2:
        raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}")
    return int(n_classes)


def accuracy(pred: object, target: object) -> float:
    """Fraction of examples whose predicted class is the target: (1/N) sum_i [pred_i == target_i]."""
    t = _labels(target, "target")
    return float((_predictions(pred, len(t)) == t).mean())


def confusion_matrix(pred: object, target: object, n_classes: int) -> np.ndarray:
    """C[i, j] = number of examples of target class i predicted as class j: int64 (n_classes, n_classes)."""
    n_classes = _check_n_classes(n_classes)
    t = _labels(target, "target", n_classes)
    p = _predictions(pred, len(t))
    if p.max() >= n_classes:
        raise ValueError(f"pred holds class ids outside [0, {n_classes}): max {p.max()}")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)  # (C, C)


def per_class_accuracy(pred: object, target: object, n_classes: int, absent: str = "raise") -> np.ndarray:
    """Accuracy within each target class (the recall of each class): C[i, i] / sum_j C[i, j], shape (n_classes,).

    A class with no example is undefined: absent="raise" (default) raises a ValueError naming it, absent="nan"
    returns NaN there (torchmetrics' MulticlassAccuracy(average=None) silently returns 0).
    """
    if absent not in ("raise", "nan"):
        raise ValueError(f"absent must be 'raise' or 'nan', got {absent!r}")
    c = confusion_matrix(pred, target, n_classes)
    support = c.sum(axis=1)
    missing = np.flatnonzero(support == 0)
    if len(missing) and absent == "raise":
        raise ValueError(f"classes {missing.tolist()} have no example in target; their accuracy is undefined "
                         f"(pass absent='nan' to get NaN for them)")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(c) / np.maximum(support, 1), np.nan)


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])  # first index of each run of equal values
    ends = np.r_[starts[1:], len(x)]  # one past the last
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # mean of ranks start+1 .. end
    return ranks


def roc_auc(scores: object, labels: object) -> float:
    """Area under the ROC curve of binary scores: P(score of a positive > score of a negative), ties count 1/2.

    The Mann-Whitney form: AUC = (R_+ - n_+ (n_+ + 1) / 2) / (n_+ n_-), R_+ = sum of the positives' mid-ranks;
    it equals the trapezoidal area under the exact ROC curve. Scores are any real numbers (only their order
    matters); labels are 0/1 or bool. Reference: Hanley and McNeil (1982).
    """
    s = _array(scores).astype(np.float64)
    y = _labels(labels, "labels")
    if s.ndim != 1 or len(s) != len(y):
        raise ValueError(f"scores must be 1-D with one score per label, got shape {s.shape} for {len(y)} labels")
    if not np.isfinite(s).all():
        raise ValueError("scores hold NaN or infinite values")
    if y.max() > 1:
        raise ValueError(f"labels must be 0/1, got values up to {y.max()}")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes, but labels hold only class {int(y[0])} ({len(y)} examples)")
    r_pos = _midranks(s)[y == 1].sum()
    return float((r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


class CalibrationBins(NamedTuple):
    """The bins of a reliability diagram (n_bins + 1 of them, see calibration_bins)."""

    lower: np.ndarray  # lower edge of each bin (inclusive)
    upper: np.ndarray  # upper edge (exclusive; the last bin is the single point 1.0)
    count: np.ndarray  # examples in each bin (int64)
    confidence: np.ndarray  # mean confidence in each bin (0 where empty)
    accuracy: np.ndarray  # fraction correct in each bin (0 where empty)


def _confidence_and_correct(probs: object, labels: object) -> tuple[np.ndarray, np.ndarray]:
    """Binary (N,) P(class 1): (p, label). Multiclass (N, C): (max prob, argmax == label)."""
    p = _array(probs)
    if not np.issubdtype(p.dtype, np.floating):
        raise ValueError(f"probs must be floating point, got dtype {p.dtype}")
    if p.ndim not in (1, 2) or len(p) == 0:
        raise ValueError(f"probs must be (N,) binary or (N, C) multiclass with N >= 1, got shape {p.shape}")
    if np.isnan(p).any():
        raise ValueError("probs hold NaN values")
    if p.min() < 0 or p.max() > 1:
        raise ValueError(f"probs must lie in [0, 1] (got {p.min():.4g}..{p.max():.4g}); pass probabilities, not logits")
    y = _labels(labels, "labels", 2 if p.ndim == 1 else p.shape[1])
    if len(y) != len(p):
        raise ValueError(f"probs has {len(p)} examples but labels has {len(y)}")
    if p.ndim == 1:
        return p, y.astype(p.dtype)
    sums = p.sum(axis=1, dtype=np.float64)
    if np.abs(sums - 1).max() > 1e-4:
        raise ValueError(f"each row of probs must sum to 1 (within 1e-4); worst row sums to "
                         f"{sums[np.abs(sums - 1).argmax()]:.6g}")
    return p.max(axis=1), (p.argmax(axis=1) == y).astype(p.dtype)


def calibration_bins(probs: object, labels: object, n_bins: int = 15) -> CalibrationBins:
    """Reliability-diagram bins: per bin, the count, mean confidence and accuracy.

    Binary probs (N,) are P(class 1): the confidence is p and the "accuracy" the fraction of positives (the
    reliability of the stated probability; torchmetrics' BinaryCalibrationError). Multiclass probs (N, C):
    confidence = max_c p_c, correct = [argmax_c p_c == label] (top-label). Edges b_k = k / n_bins (computed as
    torch.linspace in the input's float type); bin k holds b_k <= confidence < b_{k+1}, and a confidence of
    exactly 1.0 falls in an extra bin [1, 1]: torchmetrics' binning, so n_bins + 1 bins are returned.
    """
    import torch

    if not isinstance(n_bins, (int, np.integer)) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    conf, correct = _confidence_and_correct(probs, labels)
    edges = torch.linspace(0, 1, int(n_bins) + 1, dtype=getattr(torch, conf.dtype.name)).numpy()  # (n_bins + 1,)
    index = np.searchsorted(edges, conf, side="right") - 1  # b_k <= conf < b_{k+1}; conf == 1 -> n_bins
    count = np.bincount(index, minlength=n_bins + 1)
    total_conf = np.bincount(index, weights=conf.astype(np.float64), minlength=n_bins + 1)
    total_correct = np.bincount(index, weights=correct.astype(np.float64), minlength=n_bins + 1)
    safe = np.maximum(count, 1)
    upper = np.r_[edges[1:], 1.0].astype(np.float64)
    return CalibrationBins(edges.astype(np.float64), upper, count, total_conf / safe, total_correct / safe)


def expected_calibration_error(probs: object, labels: object, n_bins: int = 15) -> float:
    """ECE = sum_k (n_k / N) |accuracy_k - confidence_k| over the bins of calibration_bins (binary or multiclass).

    Reference: Naeini et al. (2015); Guo et al. (2017). Equals torchmetrics' Binary/MulticlassCalibrationError
    with norm="l1" and the same n_bins.
    """
    bins = calibration_bins(probs, labels, n_bins)
    return float((bins.count / bins.count.sum() * np.abs(bins.accuracy - bins.confidence)).sum())
