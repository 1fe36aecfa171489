"""Input checks shared by every layer: tensors, token sequences and their masks, dropout, activations (chapter 3).

This module sits below everything else in mmlite (it imports only torch), so any layer can use it.
"""

from __future__ import annotations

import torch
from torch import Tensor

ACTIVATION_NAMES = ("gelu", "relu")  # the non-linearities a feed-forward or fusion layer may use


def check_tensor(name: str, x: object) -> Tensor:
    """Raise TypeError naming `name` unless `x` is a torch.Tensor; returns it."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_tensors(**tensors: object) -> None:
    """check_tensor for each keyword argument, in order: check_tensors(logits=logits, labels=labels)."""
    for name, x in tensors.items():
        check_tensor(name, x)


def check_features(name: str, x: object, d: int | None = None, what: str = "D", owner: str = "module",
                   rank: int | None = 3) -> Tensor:
    """Raise unless `x` is a tensor of rank `rank` ((B, T, what) for 3; any rank >= 1 for None) whose last dim is d.

    Errors name the argument, the expected layout and, for the last dim, the width the `owner` was built for:
    "x last dim is 6 but the block was built for d_model=8". Returns x.
    """
    x = check_tensor(name, x)
    if rank is not None and x.dim() != rank:
        layout = "(B, T, " + what + ")" if rank == 3 else f"rank {rank}"
        raise ValueError(f"{name} must be {layout}, got shape {tuple(x.shape)} (rank {x.dim()})")
    if d is not None and (x.dim() < 1 or x.shape[-1] != d):
        got = x.shape[-1] if x.dim() else "a scalar"
        raise ValueError(f"{name} last dim is {got} but the {owner} was built for {what}={d}")
    return x


def check_mask(name: str, mask: object, shape: tuple[int, ...] | torch.Size) -> Tensor | None:
    """Raise unless `mask` is None or a bool tensor (True = real token) of exactly `shape`; returns it."""
    if mask is None:
        return None
    mask = check_tensor(name, mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = real token), got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} shape {tuple(mask.shape)} does not match (B, T) = {tuple(shape)}")
    return mask


def check_dropout(p: float, name: str = "dropout") -> float:
    """Raise ValueError unless 0 <= p < 1; returns p."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return p


def check_activation(activation: str) -> str:
    """Raise ValueError unless `activation` is one of ACTIVATION_NAMES; returns it."""
    if activation not in ACTIVATION_NAMES:
        raise ValueError(f"activation must be one of {list(ACTIVATION_NAMES)}, got {activation!r}")
    return activation
