"""Input checks of the image and text encoders: images, token ids (chapter 3); the generic ones are mmlite.checks."""

from __future__ import annotations

import torch
from torch import Tensor

from mmlite.checks import check_mask, check_tensor


def check_images(images: Tensor, in_channels: int, name: str = "images") -> None:
    """Raise unless `images` is a float (B, C, H, W) tensor with C == in_channels."""
    check_tensor(name, images)
    if images.dim() != 4:
        raise ValueError(f"{name} must be (B, C, H, W), got {images.dim()} dims with shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a float tensor with values in [0, 1], got dtype {images.dtype}")
    if images.shape[1] != in_channels:
        raise ValueError(
            f"{name} channel dim is {images.shape[1]} but the module was built for in_channels={in_channels}"
        )


def check_ids_and_mask(ids: Tensor, mask: Tensor | None, vocab_size: int, pad_id: int) -> Tensor:
    """Validate token ids (B, T) long in [0, vocab_size) and the mask; return the mask (ids != pad_id if None)."""
    check_tensor("ids", ids)
    if ids.dim() != 2:
        raise ValueError(f"ids must be (B, T), got {ids.dim()} dims with shape {tuple(ids.shape)}")
    if ids.dtype != torch.long:
        raise TypeError(f"ids must be a long tensor, got dtype {ids.dtype}")
    if ids.numel() > 0:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"ids contain token id {bad}, outside [0, vocab_size={vocab_size})")
    if mask is None:
        return ids != pad_id
    return check_mask("mask", mask, ids.shape)
