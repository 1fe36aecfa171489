"""Where a model and its batches live: unwrapping DDP and torch.compile, moving batches, a model's device (chapter 5)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn


class LossModule(nn.Module):
    """A model and its loss function as one module whose forward(batch) is loss_fn(model, batch).

    DistributedDataParallel synchronises gradients only for a forward through the wrapper, so a loss that calls
    the model's methods (model.encode_image(...), model.logit_scale) cannot run on a DDP-wrapped model. Wrap
    this module instead and give fit the loss `lambda m, b: m(b)`: `unwrap` strips it, so hooks, validation
    and checkpoints still see (and store) the bare model.
    """

    def __init__(self, module: nn.Module, loss_fn: Callable[[nn.Module, object], object]) -> None:
        super().__init__()
        self.module = module  # the model the loss is computed with
        self.loss_fn = loss_fn  # loss_fn(module, batch): a scalar tensor or a dict with "loss"

    def forward(self, batch: object) -> object:
        return self.loss_fn(self.module, batch)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / LossModule (.module) and torch.compile (._orig_mod)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel, LossModule)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def to_device(batch: object, device: torch.device | str) -> object:
    """Move every tensor of a batch (a tensor, or dicts, lists and tuples of them) to `device`; the rest stays."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a NamedTuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (the CPU for a model without parameters)."""
    first = next(iter(model.parameters()), None)
    return torch.device("cpu") if first is None else first.device
