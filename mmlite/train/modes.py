"""Switching a model into evaluation for a block of code, and back, even after an exception (chapters 3, 4)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with `model` in eval mode under torch.inference_mode; restore its previous mode on exit.

    The mode is restored also when the block raises. Tensors made inside are inference tensors: use them as
    data (metrics, plots, numpy); they cannot take part in a later backward pass.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(was_training)
