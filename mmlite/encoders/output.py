"""The one output type of every encoder: tokens, their mask and a pooled vector (chapters 3, 4.3)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class EncoderOutput(NamedTuple):
    """What an image or text encoder returns.

    tokens  (B, T, D)  one vector per region, patch or word; a ViT's class token is not among them;
    mask    (B, T)     bool, True = a real token (all True for images, False at text padding);
    pooled  (B, D)     one vector per input (the encoder's own pooling), or None for a text
                       encoder built with pool="none".
    A NamedTuple, so `tokens, mask, pooled = encoder(x)` unpacks it, and DDP and torch.compile pass it through.
    """

    tokens: Tensor
    mask: Tensor
    pooled: Tensor | None


def all_real(tokens: Tensor) -> Tensor:
    """The mask of a sequence without padding: all True, (B, T)."""
    return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
