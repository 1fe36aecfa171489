"""Small sympy helpers for checking derivations: symbol matrices, softmax, gradients, equality (chapter 4)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import sympy as sp


def matrix(name: str, rows: int, cols: int, **assumptions: bool) -> sp.Matrix:
    """A rows x cols matrix of real symbols name_{ij} (1-based), e.g. matrix("q", 2, 3)[0, 1] is q_{12}.

    Immutable, so it can be a key of the `values` mapping of `evaluate`.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string, got {name!r}")
    if rows < 1 or cols < 1:
        raise ValueError(f"rows and cols must be positive, got rows={rows}, cols={cols}")
    assumptions.setdefault("real", True)
    sep = "," if max(rows, cols) > 9 else ""  # q_{1,10} stays readable
    return sp.ImmutableMatrix(rows, cols, lambda i, j: sp.Symbol(f"{name}_{{{i + 1}{sep}{j + 1}}}", **assumptions))


def vector(name: str, n: int, **assumptions: bool) -> sp.Matrix:
    """A column vector (n x 1, immutable) of real symbols name_1 .. name_n."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    assumptions.setdefault("real", True)
    return sp.ImmutableMatrix([sp.Symbol(f"{name}_{i + 1}", **assumptions) for i in range(n)])


def softmax(z: sp.Matrix) -> sp.Matrix:
    """softmax of a column or row vector: p_i = exp(z_i) / sum_j exp(z_j), same shape as z."""
    if not isinstance(z, sp.MatrixBase) or 1 not in z.shape:
        raise ValueError(f"z must be a sympy row or column vector, got {getattr(z, 'shape', type(z).__name__)}")
    e = z.applyfunc(sp.exp)
    return e / sum(e)


def softmax_rows(s: sp.Matrix) -> sp.Matrix:
    """Row-wise softmax of a matrix, A_ij = exp(s_ij) / sum_k exp(s_ik) (as attention weights are)."""
    if not isinstance(s, sp.MatrixBase):
        raise TypeError(f"s must be a sympy Matrix, got {type(s).__name__}")
    e = s.applyfunc(sp.exp)
    return sp.Matrix.vstack(*[e[i, :] / sum(e[i, :]) for i in range(s.rows)])


def gradient(f: sp.Expr, wrt: sp.Matrix) -> sp.Matrix:
    """The matrix of partial derivatives df / dwrt_ij, with the shape of `wrt` (the denominator layout)."""
    if not isinstance(wrt, sp.MatrixBase):
        raise TypeError(f"wrt must be a sympy Matrix of symbols, got {type(wrt).__name__}")
    if isinstance(f, sp.MatrixBase):
        raise ValueError(f"f must be a scalar expression, got a matrix of shape {f.shape}")
    return wrt.applyfunc(lambda x: sp.diff(f, x))


def is_zero(expr: sp.Expr | sp.Matrix) -> bool:
    """True when an expression (or every entry of a matrix) simplifies to 0.

    Tries sympy.cancel first (exact and fast for rational functions of exp(.) terms, which every softmax
    derivation is), then sympy.simplify.
    """
    entries = list(expr) if isinstance(expr, sp.MatrixBase) else [sp.sympify(expr)]
    for e in entries:
        if sp.cancel(e) != 0 and sp.simplify(e) != 0:
            return False
    return True


def equal(a: sp.Expr | sp.Matrix, b: sp.Expr | sp.Matrix) -> bool:
    """True when a - b simplifies to zero (shapes must match for matrices)."""
    a_is, b_is = isinstance(a, sp.MatrixBase), isinstance(b, sp.MatrixBase)
    if a_is != b_is:
        raise ValueError("cannot compare a matrix with a scalar expression")
    if a_is and a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return is_zero(a - b)


def evaluate(expr: sp.Expr | sp.Matrix,
             values: Mapping[sp.Basic, object] | Sequence[tuple[sp.Basic, object]]) -> np.ndarray:
    """Substitute numbers for symbols and return a float64 array (a 0-d array for a scalar expression).

    values maps (or pairs) a Symbol with a number, or a symbol matrix with an array of its shape.
    """
    subs: dict[sp.Symbol, sp.Float] = {}
    pairs = values.items() if isinstance(values, Mapping) else values
    for key, val in pairs:
        if isinstance(key, sp.MatrixBase):
            arr = np.asarray(val, dtype=np.float64)
            if arr.shape != key.shape and arr.size == len(key) and 1 in key.shape:
                arr = arr.reshape(key.shape)  # a flat array for a vector
            if arr.shape != key.shape:
                raise ValueError(f"value of shape {arr.shape} given for a symbol matrix of shape {key.shape}")
            subs.update({s: sp.Float(float(x)) for s, x in zip(key, arr.reshape(-1))})
        elif isinstance(key, sp.Symbol):
            subs[key] = sp.Float(float(val))
        else:
            raise TypeError(f"keys must be sympy Symbols or symbol matrices, got {type(key).__name__}")
    # xreplace swaps the symbols for floats without subs' pattern matching (tens of times faster on big trees)
    result = sp.sympify(expr).xreplace(subs).evalf()
    free = result.free_symbols
    if free:
        raise ValueError(f"no value given for {sorted(map(str, free))}")
    return np.array(result.tolist() if isinstance(result, sp.MatrixBase) else result, dtype=np.float64)
