"""Cross-attention in NumPy with a hand-derived backward pass (derived in chapter 4.2).

One head, queries from X1 (..., n1, d1), keys and values from X2 (..., n2, d2):

    Q = X1 W^Q,  K = X2 W^K,  V = X2 W^V,  S = Q K^T / sqrt(d_k),  A = softmax_rows(S),  O = A V

Given dO = dL/dO (..., n1, d_v), the chain rule, one step at a time, gives

    dV = A^T dO                          dA = dO V^T
    dS = A * (dA - rowsum(dA * A))       (the softmax Jacobian diag(a) - a a^T applied to each row)
    dQ = dS K / sqrt(d_k)                dK = dS^T Q / sqrt(d_k)
    dX1 = dQ W^Q^T                       dX2 = dK W^K^T + dV W^V^T
    dW^Q = X1^T dQ,   dW^K = X2^T dK,   dW^V = X2^T dV   (summed over the leading batch axes)

A mask (bool, broadcastable to (..., n1, n2), True = may attend) removes keys; a query row with no allowed key
gets zero weights and a zero output (and so zero gradients), as mmlite.attention.scaled_dot_product_attention does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np


def softmax(scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax: exp(s - max s) / sum exp(s - max s) along `axis`."""
    shifted = scores - scores.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)


def softmax_backward(weights: np.ndarray, d_weights: np.ndarray) -> np.ndarray:
    """dS = A * (dA - sum_j dA_j A_j) for A = softmax(S) along the last axis, i.e. (diag(a) - a a^T) da per row."""
    return weights * (d_weights - (d_weights * weights).sum(axis=-1, keepdims=True))


@dataclass
class AttentionCache:
    """What the forward pass keeps for the backward pass."""

    x1: np.ndarray  # (..., n1, d1) query-side input
    x2: np.ndarray  # (..., n2, d2) key/value-side input
    w_q: np.ndarray  # (d1, d_k)
    w_k: np.ndarray  # (d2, d_k)
    w_v: np.ndarray  # (d2, d_v)
    q: np.ndarray  # (..., n1, d_k) = X1 W^Q
    k: np.ndarray  # (..., n2, d_k) = X2 W^K
    v: np.ndarray  # (..., n2, d_v) = X2 W^V
    weights: np.ndarray  # (..., n1, n2) attention weights A (rows sum to 1, or 0 where fully masked)
    scale: float  # 1 / sqrt(d_k)


class AttentionGrads(NamedTuple):
    """Gradients of a scalar loss with respect to every input of cross_attention_forward."""

    x1: np.ndarray  # (..., n1, d1)
    x2: np.ndarray  # (..., n2, d2)
    w_q: np.ndarray  # (d1, d_k)
    w_k: np.ndarray  # (d2, d_k)
    w_v: np.ndarray  # (d2, d_v)


def _check_float_array(name: str, a: object) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {a.dtype}")
    return a


def _check_inputs(x1: np.ndarray, x2: np.ndarray, w_q: np.ndarray, w_k: np.ndarray, w_v: np.ndarray) -> None:
    """Raise with the argument and the dimension that do not fit."""
    for name, a in (("x1", x1), ("x2", x2), ("w_q", w_q), ("w_k", w_k), ("w_v", w_v)):
        _check_float_array(name, a)
    for name, a in (("x1", x1), ("x2", x2)):
        if a.ndim < 2:
            raise ValueError(f"{name} must be (..., n, d) with at least 2 dims, got shape {a.shape}")
    for name, a in (("w_q", w_q), ("w_k", w_k), ("w_v", w_v)):
        if a.ndim != 2:
            raise ValueError(f"{name} must be a 2-D (d_in, d_out) matrix, got shape {a.shape}")
    if x1.shape[:-2] != x2.shape[:-2]:
        raise ValueError(f"x1 leading (batch) dims {x1.shape[:-2]} differ from x2 leading dims {x2.shape[:-2]}")
    if w_q.shape[0] != x1.shape[-1]:
        raise ValueError(f"w_q first dim is {w_q.shape[0]} but x1 last dim is {x1.shape[-1]}")
    for name, w in (("w_k", w_k), ("w_v", w_v)):
        if w.shape[0] != x2.shape[-1]:
            raise ValueError(f"{name} first dim is {w.shape[0]} but x2 last dim is {x2.shape[-1]}")
    if w_k.shape[1] != w_q.shape[1]:
        raise ValueError(f"w_k last dim (d_k) is {w_k.shape[1]} but w_q last dim is {w_q.shape[1]}")


def cross_attention_forward(x1: np.ndarray, x2: np.ndarray, w_q: np.ndarray, w_k: np.ndarray, w_v: np.ndarray,
                            mask: np.ndarray | None = None) -> tuple[np.ndarray, AttentionCache]:
    """O = softmax(X1 W^Q (X2 W^K)^T / sqrt(d_k)) X2 W^V, shape (..., n1, d_v); returns (O, cache)."""
    _check_inputs(x1, x2, w_q, w_k, w_v)
    scores_shape = (*x1.shape[:-1], x2.shape[-2])  # (..., n1, n2)
    if mask is not None:
        if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
            got = getattr(mask, "dtype", type(mask).__name__)
            raise TypeError(f"mask must be a bool numpy array (True = may attend), got {got}")
        try:
            ok = mask.ndim <= len(scores_shape) and np.broadcast_shapes(mask.shape, scores_shape) == scores_shape
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"mask shape {mask.shape} does not broadcast to the scores shape (..., n1, n2) = "
                             f"{scores_shape}")
    scale = 1.0 / float(np.sqrt(w_q.shape[1]))
    q = x1 @ w_q  # (..., n1, d_k)
    k = x2 @ w_k  # (..., n2, d_k)
    v = x2 @ w_v  # (..., n2, d_v)
    scores = (q @ np.swapaxes(k, -1, -2)) * scale  # (..., n1, n2)
    if mask is None:
        weights = softmax(scores)
    else:
        allowed = np.broadcast_to(mask, scores_shape)  # (..., n1, n2)
        scores = np.where(allowed, scores, np.finfo(scores.dtype).min)
        row_ok = allowed.any(axis=-1, keepdims=True)  # (..., n1, 1)
        weights = np.where(allowed & row_ok, softmax(scores), 0.0).astype(scores.dtype)
    out = weights @ v  # (..., n1, d_v)
    return out, AttentionCache(x1, x2, w_q, w_k, w_v, q, k, v, weights, scale)


def _sum_outer(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum over every leading axis of a^T b: a (..., n, p), b (..., n, r) -> (p, r)."""
    a2 = a.reshape(-1, a.shape[-1])  # (batch * n, p)
    b2 = b.reshape(-1, b.shape[-1])  # (batch * n, r)
    return a2.T @ b2


def cross_attention_backward(d_out: np.ndarray, cache: AttentionCache) -> AttentionGrads:
    """Gradients of a loss L with respect to X1, X2, W^Q, W^K, W^V, given d_out = dL/dO (..., n1, d_v)."""
    _check_float_array("d_out", d_out)
    expected = (*cache.q.shape[:-1], cache.v.shape[-1])  # (..., n1, d_v)
    if d_out.shape != expected:
        raise ValueError(f"d_out shape {d_out.shape} must equal the output shape (..., n1, d_v) = {expected}")
    a = cache.weights  # (..., n1, n2)
    d_v = np.swapaxes(a, -1, -2) @ d_out  # (..., n2, d_v) = A^T dO
    d_a = d_out @ np.swapaxes(cache.v, -1, -2)  # (..., n1, n2) = dO V^T
    d_s = softmax_backward(a, d_a)  # (..., n1, n2)
    d_q = (d_s @ cache.k) * cache.scale  # (..., n1, d_k)
    d_k = (np.swapaxes(d_s, -1, -2) @ cache.q) * cache.scale  # (..., n2, d_k)
    d_x1 = d_q @ cache.w_q.T  # (..., n1, d1)
    d_x2 = d_k @ cache.w_k.T + d_v @ cache.w_v.T  # (..., n2, d2)
    return AttentionGrads(
        x1=d_x1,
        x2=d_x2,
        w_q=_sum_outer(cache.x1, d_q),  # (d1, d_k)
        w_k=_sum_outer(cache.x2, d_k),  # (d2, d_k)
        w_v=_sum_outer(cache.x2, d_v),  # (d2, d_v)
    )


def finite_difference(fn: Callable[[np.ndarray], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences (fn(x + eps e_i) - fn(x - eps e_i)) / (2 eps) for every entry i of x (x is not changed).

    The error is O(eps^2) from truncation plus O(machine eps / eps) from rounding: with float64 and eps = 1e-6,
    about 1e-10 relative for smooth functions of O(1) values.
    """
    x = _check_float_array("x", x)
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    probe = x.astype(np.float64).copy()
    grad = np.zeros_like(probe)
    flat, g = probe.reshape(-1), grad.reshape(-1)  # views onto probe and grad
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        plus = float(fn(probe))
        flat[i] = old - eps
        minus = float(fn(probe))
        flat[i] = old
        g[i] = (plus - minus) / (2 * eps)
    return grad
