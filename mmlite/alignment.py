"""Alignment projections into a shared embedding space, and L2 normalisation (derived in chapter 2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmlite.checks import check_dropout, check_features, check_tensor


def l2_normalize(x: Tensor, dim: int = -1, eps: float = 1e-6) -> Tensor:
    """x / max(||x||_2, eps) along `dim` (the same value as F.normalize(x, dim=dim, eps=eps)).

    The norm is computed as sqrt(max(sum x^2, eps^2)), so a zero vector maps to zero with a zero
    (not NaN) gradient. float16 / bfloat16 input is normalised in float32 and cast back (squares
    of 300 overflow float16 and eps^2 = 1e-12 rounds to 0 there); float32 and float64 stay as they are.
    """
    check_tensor("x", x)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be positive and finite, got {eps}")
    xc = x.to(torch.promote_types(x.dtype, torch.float32))  # the same tensor for float32 / float64
    sq = xc.pow(2).sum(dim=dim, keepdim=True)  # (..., 1, ...) along dim
    return (xc / sq.clamp_min(eps * eps).sqrt()).to(x.dtype)


class LinearProjection(nn.Module):
    """A linear map from an encoder's width to the shared space (CLIP's projection: no bias by default)."""

    def __init__(self, d_in: int, d_out: int, bias: bool = False) -> None:
        super().__init__()
        self.d_in = d_in
        self.d_out = d_out
        self.linear = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """(..., d_in) -> (..., d_out)."""
        check_features("x", x, self.d_in, "d_in", rank=None)
        return self.linear(x)


class MLPProjection(nn.Module):
    """Linear -> GELU -> dropout -> Linear; hidden width defaults to max(d_in, d_out)."""

    def __init__(self, d_in: int, d_out: int, hidden: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        check_dropout(dropout)
        self.d_in = d_in
        self.d_out = d_out
        hidden = hidden if hidden is not None else max(d_in, d_out)
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(..., d_in) -> (..., d_out)."""
        check_features("x", x, self.d_in, "d_in", rank=None)
        return self.fc2(self.dropout(F.gelu(self.fc1(x))))


class AlignmentHead(nn.Module):
    """Project then L2-normalise: the unit-sphere embedding a contrastive loss compares."""

    def __init__(
        self, d_in: int, d_out: int, kind: str = "linear", hidden: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if kind == "linear":
            if hidden is not None or dropout != 0.0:
                raise ValueError("hidden and dropout only apply to kind='mlp'")
            self.proj: nn.Module = LinearProjection(d_in, d_out)
        elif kind == "mlp":
            self.proj = MLPProjection(d_in, d_out, hidden=hidden, dropout=dropout)
        else:
            raise ValueError(f"kind must be 'linear' or 'mlp', got {kind!r}")

    def forward(self, x: Tensor) -> Tensor:
        """(..., d_in) -> unit vectors (..., d_out)."""
        return l2_normalize(self.proj(x))


def project_and_normalize(x: Tensor, projection: nn.Module | None = None) -> Tensor:
    """l2_normalize(projection(x)), or just l2_normalize(x) without a projection."""
    return l2_normalize(x if projection is None else projection(x))


def cosine_similarity_matrix(a: Tensor, b: Tensor) -> Tensor:
    """All pairwise cosine similarities: (N, D), (M, D) -> (N, M)."""
    check_tensor("a", a)
    check_tensor("b", b)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"a and b must be (N, D) and (M, D) with the same D, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return l2_normalize(a) @ l2_normalize(b).T


__all__ = [
    "AlignmentHead",
    "LinearProjection",
    "MLPProjection",
    "cosine_similarity_matrix",
    "l2_normalize",
    "project_and_normalize",
]
