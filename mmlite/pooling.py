"""Pooling a token sequence into one vector: masked mean, class token, last real token (derived in chapter 3).

Used by the encoders and the fusions alike, so it sits below both.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmlite.checks import check_features, check_mask


def _check_tokens_and_mask(x: Tensor, mask: Tensor | None) -> None:
    """Raise if `x` is not (B, T, D) or `mask` is not a bool (B, T) tensor matching it."""
    check_features("x", x)
    check_mask("mask", mask, x.shape[:2])


def masked_mean(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over the real tokens: sum_t m_t x_t / max(sum_t m_t, 1); a row with no real token gives zeros.

    x: (B, T, D); mask: (B, T) bool, True = real token, or None (all real). Returns (B, D); with T = 0, zeros.
    """
    _check_tokens_and_mask(x, mask)
    if mask is None:
        if x.shape[1] == 0:  # no token at all: zeros, as for a fully masked row (x.mean would give 0/0 = NaN)
            return x.sum(dim=1)  # (B, D) zeros, still attached to the graph
        return x.mean(dim=1)
    m = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
    count = m.sum(dim=1).clamp_min(1.0)  # (B, 1): clamping keeps all-padding rows at 0/1 = 0, not NaN
    return (x * m).sum(dim=1) / count


def cls_pool(x: Tensor) -> Tensor:
    """The class token's output: x[:, 0]. x: (B, T, D) with T >= 1 -> (B, D)."""
    _check_tokens_and_mask(x, None)
    if x.shape[1] == 0:
        raise ValueError(f"x has no tokens (shape {tuple(x.shape)}), so there is no class token at position 0")
    return x[:, 0]


def last_token_pool(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """The output at each row's last real token (right padding); CLIP's text pooling. (B, T, D) -> (B, D).

    A row with no real token (and every row of an empty sequence, T = 0) gives zeros.
    """
    _check_tokens_and_mask(x, mask)
    if x.shape[1] == 0:
        return x.sum(dim=1)  # (B, D) zeros: a sum over no token, still attached to the graph
    if mask is None:
        return x[:, -1]
    t = x.shape[1]
    positions = torch.arange(t, device=x.device).expand_as(mask)  # (B, T)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).amax(dim=1)  # (B,), -1 if empty
    out = x[torch.arange(x.shape[0], device=x.device), last.clamp_min(0)]  # (B, D)
    return out * (last >= 0).unsqueeze(-1).to(x.dtype)
