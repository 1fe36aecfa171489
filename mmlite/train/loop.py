"""A small, explicit training loop: AdamW, warm-up + cosine schedule, gradient clipping (chapters 3 and 4)."""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from mmlite.train.groups import param_groups


@dataclass
class FitConfig:
    steps: int = 300  # optimizer steps
    lr: float = 2e-3  # peak learning rate
    weight_decay: float = 0.01  # AdamW decay (not on biases, norms, embeddings: see mmlite.train.param_groups)
    warmup: int = 20  # linear warm-up steps before the cosine decay
    min_lr_ratio: float = 0.05  # the cosine ends at lr * min_lr_ratio
    grad_clip: float | None = 1.0  # max global gradient norm (None = no clipping)
    log_every: int = 0  # print the running loss every this many steps (0 = silent)

    def __post_init__(self) -> None:
        for name in ("steps", "warmup", "log_every"):
            _check_number(name, getattr(self, name), integer=True)
        for name in ("lr", "weight_decay", "min_lr_ratio"):
            _check_number(name, getattr(self, name))
        if self.steps < 1 or self.warmup < 0 or self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"bad FitConfig: steps={self.steps}, warmup={self.warmup}, lr={self.lr}, "
                             f"min_lr_ratio={self.min_lr_ratio} (need steps >= 1, warmup >= 0, lr > 0, ratio in [0, 1])")
        if self.weight_decay < 0:
            raise ValueError(f"FitConfig weight_decay must be >= 0, got {self.weight_decay} (it would grow the weights)")
        if self.grad_clip is not None:
            _check_number("grad_clip", self.grad_clip, allow_inf=True)
            if self.grad_clip <= 0:
                raise ValueError(f"FitConfig grad_clip must be positive or None, got {self.grad_clip} "
                                 "(0 zeroes every gradient and a negative norm flips it)")
        if self.log_every < 0:
            raise ValueError(f"FitConfig log_every must be >= 0, got {self.log_every}")


def _check_number(name: str, value: object, integer: bool = False, allow_inf: bool = False) -> None:
    """Raise unless `value` is a finite real number (an integer if asked, +inf if allowed); bools are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"FitConfig {name} must be a number, got {type(value).__name__} {value!r}")
    if integer and not isinstance(value, numbers.Integral):
        raise ValueError(f"FitConfig {name} must be a whole number (an int), got {value!r}")
    if math.isnan(value) or (math.isinf(value) and not (allow_inf and value > 0)):
        raise ValueError(f"FitConfig {name} must be finite, got {value!r}")


@dataclass
class History:
    losses: list[float] = field(default_factory=list)  # loss of every step
    lrs: list[float] = field(default_factory=list)  # learning rate of every step
    seconds: float = 0.0  # wall time of the whole run


def warmup_cosine(step: int, cfg: FitConfig) -> float:
    """Learning-rate multiplier at `step` (0-based): linear warm-up, then cosine down to min_lr_ratio."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def cycle(loader: Iterable) -> Iterator:
    """Iterate over a loader forever (each pass is a new epoch of its sampler)."""
    while True:
        yield from loader


def fit(model: nn.Module, batches: Iterable, loss_fn: Callable[[nn.Module, object], Tensor], cfg: FitConfig,
        after_step: Callable[[nn.Module], None] | None = None) -> History:
    """Run cfg.steps optimizer steps of loss_fn(model, batch) over `batches`; returns the History.

    `batches` should be endless (wrap a DataLoader in `cycle`); `after_step` runs after every optimizer
    step (e.g. clamping a learnable logit scale). loss_fn must return a scalar tensor. Raises
    FloatingPointError when a loss, or a parameter after the last step, is not finite. The last step's
    gradients are cleared (set to None) before returning.
    """
    groups = param_groups(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, cfg))
    history = History()
    model.train()
    start = time.perf_counter()
    iterator = iter(batches)
    for step in range(cfg.steps):
        try:
            batch = next(iterator)
        except StopIteration:
            raise ValueError(f"batches ran out after {step} steps of {cfg.steps}: wrap the loader in cycle()") from None
        loss = loss_fn(model, batch)
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__} at step {step}")
        if loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar loss, got shape {tuple(loss.shape)} at step {step} "
                             "(reduce it, e.g. with .mean())")
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step(model)
        history.losses.append(loss.item())
        history.lrs.append(optimizer.param_groups[0]["lr"])
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            recent = history.losses[-cfg.log_every:]
            print(f"step {step + 1:5d}  loss {sum(recent) / len(recent):.4f}  "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
    optimizer.zero_grad(set_to_none=True)  # keep no gradients of the last step around
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise FloatingPointError(f"parameters {bad[:5]}{' ...' if len(bad) > 5 else ''} are not finite "
                                 f"after the last step ({cfg.steps})")
    history.seconds = time.perf_counter() - start
    return history
