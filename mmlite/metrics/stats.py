"""Uncertainty of a metric: percentile bootstrap intervals, clustered resampling, paired tests (chapter 5 onward).

A metric is a function of per-example arrays (hits, per-example scores, predictions and targets) that returns
one number: metric_fn(*arrays) -> float. Resampling draws example indices and applies the same ones to every
array. With `clusters` (e.g. each caption's image index) whole clusters are drawn, so the five captions of an
image move together and the interval reflects that they are not independent. Reference: Efron and
Tibshirani, "An introduction to the bootstrap" (1993), chapters 13 and 15; clustered resampling: Field and
Welsh, "Bootstrapping clustered data" (2007).
"""

from __future__ import annotations

import math
from itertools import product
from typing import Callable, NamedTuple

import numpy as np


class Interval(NamedTuple):
    """A metric's value on the data and its bootstrap interval."""

    estimate: float
    low: float
    high: float


class PairedResult(NamedTuple):
    """metric(a) - metric(b), its paired bootstrap interval and a two-sided permutation p-value."""

    difference: float
    low: float
    high: float
    p_value: float


def _arrays(arrays: tuple, names: str = "array") -> list[np.ndarray]:
    out = []
    for i, a in enumerate(arrays):
        if hasattr(a, "detach"):  # torch.Tensor
            a = a.detach().cpu().numpy()
        a = np.asarray(a)
        if a.ndim == 0:
            raise ValueError(f"{names} {i} is a scalar; pass one value per example")
        if np.issubdtype(a.dtype, np.floating) and np.isnan(a).any():
            raise ValueError(f"{names} {i} holds NaN values")
        out.append(a)
    if not out:
        raise ValueError("pass at least one per-example array")
    n = len(out[0])
    if any(len(a) != n for a in out):
        raise ValueError(f"per-example arrays have different lengths: {[len(a) for a in out]}")
    if n < 2:
        raise ValueError(f"the bootstrap needs at least 2 examples, got {n}")
    return out


class _Units(NamedTuple):
    """The resampling units: examples, or clusters of examples."""

    n: int  # number of units
    members: list[np.ndarray] | None  # example indices of each cluster; None when every example is a unit
    unit_of: np.ndarray  # (N,) the unit of each example
    order: np.ndarray | None = None  # (N,) examples grouped by cluster: members[u] = order[starts[u]:][:sizes[u]]
    starts: np.ndarray | None = None  # (n,) where each cluster's members begin in `order`
    sizes: np.ndarray | None = None  # (n,) members per cluster


def _units(clusters: object | None, n: int) -> _Units:
    if clusters is None:
        return _Units(n, None, np.arange(n))
    c = np.asarray(clusters.detach().cpu().numpy() if hasattr(clusters, "detach") else clusters)
    if c.ndim != 1 or len(c) != n:
        raise ValueError(f"clusters must give one cluster id per example ({n}), got shape {c.shape}")
    _, inverse = np.unique(c, return_inverse=True)
    sizes = np.bincount(inverse)
    if len(sizes) < 2:
        raise ValueError("clusters holds a single cluster; resampling needs at least 2")
    order = np.argsort(inverse, kind="stable")  # examples grouped by cluster
    starts = np.cumsum(sizes) - sizes
    return _Units(len(sizes), np.split(order, np.cumsum(sizes)[:-1]), inverse.ravel(), order, starts, sizes)


def _draw(units: _Units, rng: np.random.Generator) -> np.ndarray:
    """Indices of one bootstrap sample: units.n units drawn with replacement, their members concatenated."""
    picked = rng.integers(0, units.n, units.n)
    if units.members is None:
        return picked
    # the concatenation of units.members[u] for u in picked, without a Python loop
    sizes = units.sizes[picked]  # (n,)
    ends = np.cumsum(sizes)
    within = np.arange(ends[-1]) - np.repeat(ends - sizes, sizes)  # position inside each drawn cluster
    return units.order[np.repeat(units.starts[picked], sizes) + within]


def _check_common(metric_fn: Callable, n: int, level: float) -> None:
    if not callable(metric_fn):
        raise ValueError(f"metric_fn must be callable, got {type(metric_fn).__name__}")
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n (resamples) must be a positive integer, got {n!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")


def _value(metric_fn: Callable, arrays: list[np.ndarray]) -> float:
    v = float(metric_fn(*arrays))
    if not math.isfinite(v):
        raise ValueError(f"metric_fn returned {v} on a resample; it must return a finite number")
    return v


def bootstrap_ci(metric_fn: Callable[..., float], *per_example: object, n: int = 1000, level: float = 0.95,
                 seed: int = 0, clusters: object | None = None) -> Interval:
    """Percentile bootstrap: estimate = metric_fn(*per_example) and the (1-level)/2, (1+level)/2 quantiles of
    metric_fn over n resamples of the examples (or of `clusters`, one id per example) drawn with replacement.

    Deterministic for a seed. Example: bootstrap_ci(np.mean, hits, clusters=text_to_image).
    """
    _check_common(metric_fn, n, level)
    arrays = _arrays(per_example)
    units = _units(clusters, len(arrays[0]))
    rng = np.random.default_rng(seed)
    stats = np.empty(n)
    for r in range(n):
        idx = _draw(units, rng)
        stats[r] = _value(metric_fn, [a[idx] for a in arrays])
    low, high = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return Interval(_value(metric_fn, arrays), float(low), float(high))


def _swap(a: np.ndarray, b: np.ndarray, flip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = flip.reshape((-1,) + (1,) * (a.ndim - 1))  # (N, 1, ...): broadcast over the per-example dims
    return np.where(f, b, a), np.where(f, a, b)


def paired_test(metric_fn: Callable[[np.ndarray], float], a: object, b: object, n: int = 1000, seed: int = 0,
                clusters: object | None = None, level: float = 0.95) -> PairedResult:
    """Compare two models scored on the same examples: d = metric_fn(a) - metric_fn(b).

    Interval: paired percentile bootstrap (the same resampled examples, or clusters, for both models).
    p-value: two-sided sign-flip permutation test. Under H0 (the two models are exchangeable on every example)
    swapping a_i and b_i (whole clusters with `clusters`) leaves the distribution unchanged; with d* the
    difference after random swaps, p = (1 + #{|d*| >= |d|}) / (1 + n). When 2^units <= n every swap pattern
    is enumerated instead and p = #{|d*| >= |d|} / 2^units, the exact test (scipy.stats.permutation_test with
    permutation_type="samples"). A 1e-12 relative slack counts float ties as ties.
    """
    _check_common(metric_fn, n, level)
    a_arr, b_arr = _arrays((a, b), "model")
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"a and b must have the same shape (the same examples), got {a_arr.shape} and {b_arr.shape}")
    units = _units(clusters, len(a_arr))
    diff = _value(metric_fn, [a_arr]) - _value(metric_fn, [b_arr])
    rng = np.random.default_rng(seed)
    boot = np.empty(n)
    for r in range(n):
        idx = _draw(units, rng)
        boot[r] = _value(metric_fn, [a_arr[idx]]) - _value(metric_fn, [b_arr[idx]])
    low, high = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    exact = units.n < 63 and 2 ** units.n <= n
    patterns = (np.array(p, bool) for p in product((False, True), repeat=units.n)) if exact else \
        (rng.random(units.n) < 0.5 for _ in range(n))
    null = []
    for flip_units in patterns:
        a2, b2 = _swap(a_arr, b_arr, flip_units[units.unit_of])
        null.append(_value(metric_fn, [a2]) - _value(metric_fn, [b2]))
    extreme = int((np.abs(null) >= abs(diff) * (1 - 1e-12)).sum())
    p = extreme / len(null) if exact else (1 + extreme) / (1 + n)
    return PairedResult(diff, float(low), float(high), float(min(p, 1.0)))


def format_ci(estimate: float, low: float, high: float, digits: int = 3) -> str:
    """'0.732 [0.705, 0.758]': an estimate and its interval, rounded to `digits` decimals."""
    if not isinstance(digits, int) or isinstance(digits, bool) or digits < 0:
        raise ValueError(f"digits must be a non-negative integer, got {digits!r}")
    values = [float(v) for v in (estimate, low, high)]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"estimate and interval must be finite, got {values}")
    if values[1] > values[2]:
        raise ValueError(f"low ({values[1]}) is above high ({values[2]})")
    return f"{values[0]:.{digits}f} [{values[1]:.{digits}f}, {values[2]:.{digits}f}]"
