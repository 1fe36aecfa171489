"""A small, explicit training loop: AdamW, warm-up + cosine schedule, gradient clipping (chapters 3 and 4).

The loop owns the device: it moves every batch to the model's device, so loss functions never do. Hooks see
the unwrapped model (`unwrap` strips DistributedDataParallel and torch.compile), so `m.logit_scale.clamp_()`
works however the model is wrapped. On an accelerator it reads the loss back only every `check_every` steps
(one host-device sync per check instead of one per step) and always at the end.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
from torch import Tensor, nn

from mmlite.train.checkpoint import restore, save_checkpoint
from mmlite.train.devices import model_device, to_device, unwrap
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
    check_every: int | None = None  # read losses back and check them finite every this many steps (None: 1 on
    #                                 the CPU, where it costs nothing, 50 on an accelerator, where it syncs)

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
        if self.check_every is not None:
            _check_number("check_every", self.check_every, integer=True)
            if self.check_every < 1:
                raise ValueError(f"FitConfig check_every must be >= 1 or None, got {self.check_every}")


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


class _Stateful(Protocol):
    def state_dict(self) -> dict[str, int]: ...


@dataclass
class Checkpointing:
    """Where and how often fit writes a checkpoint (mmlite.train.checkpoint), and what goes in beside the weights."""

    path: str | Path  # the checkpoint file, overwritten atomically each time
    every: int  # steps between checkpoints (one is always written after the last step)
    config: dict[str, Any] = field(default_factory=dict)  # the run's resolved config, plain data
    sampler: _Stateful | None = None  # the loader's sampler, whose position is stored for an exact resume

    def __post_init__(self) -> None:
        _check_number("Checkpointing every", self.every, integer=True)
        if self.every < 1:
            raise ValueError(f"Checkpointing every must be >= 1, got {self.every}")


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


def _check_loss(loss: object, step: int) -> Tensor:
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__} at step {step}")
    if loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar loss, got shape {tuple(loss.shape)} at step {step} "
                         "(reduce it, e.g. with .mean())")
    return loss


def fit(model: nn.Module, batches: Iterable, loss_fn: Callable[[nn.Module, object], Tensor], cfg: FitConfig,
        after_step: Callable[[nn.Module], None] | None = None, device: torch.device | str | None = None,
        checkpointing: Checkpointing | None = None, resume: dict[str, Any] | None = None) -> History:
    """Run cfg.steps optimizer steps of loss_fn(model, batch) over `batches`; returns the History.

    `batches` should be endless (wrap a DataLoader in `cycle`); each batch is moved to `device` (default: the
    model's) before loss_fn sees it. `after_step` runs after every optimizer step on the unwrapped model (e.g.
    clamping a learnable logit scale). loss_fn must return a scalar tensor. Raises FloatingPointError when a
    loss, or a parameter after the last step, is not finite; losses are checked every cfg.check_every steps
    (every step on the CPU), so on an accelerator up to that many steps may run past a first NaN. The last
    step's gradients are cleared (set to None) before returning.

    checkpointing writes a checkpoint every `every` steps and after the last. resume, a state from
    mmlite.train.load_checkpoint, restores weights, optimizer, schedule, random states and history and carries
    on from its step; give it `batches` whose sampler was loaded with state["sampler"], and the run ends with
    the weights an uninterrupted run would have, bit for bit. (Give the DataLoader a generator of its own:
    without one, each pass draws its worker seed from torch's global RNG, at a moment the resume moves.)
    """
    device = model_device(model) if device is None else torch.device(device)
    check_every = cfg.check_every or (1 if device.type == "cpu" else 50)
    groups = param_groups(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, cfg))
    history = History()
    first_step = 0
    if resume is not None:
        first_step = restore(resume, model, optimizer, scheduler)
        history.losses = list(resume.get("extra", {}).get("losses", []))
        history.lrs = list(resume.get("extra", {}).get("lrs", []))
        if not 0 <= first_step <= cfg.steps:
            raise ValueError(f"the checkpoint is at step {first_step}, outside this run's 0..{cfg.steps}")
    pending: list[Tensor] = []  # losses not yet read back from the device
    inner = unwrap(model)
    model.train()
    start = time.perf_counter()
    iterator = iter(batches)

    def read_back(step: int) -> None:  # one sync: the pending losses to the host, then check them
        values = torch.stack(pending).float().cpu().tolist()
        first = step + 1 - len(values)
        for k, v in enumerate(values):
            if not math.isfinite(v):
                raise FloatingPointError(f"loss is {v} at step {first + k}")
        history.losses.extend(values)
        pending.clear()

    for step in range(first_step, cfg.steps):
        try:
            batch = next(iterator)
        except StopIteration:
            raise ValueError(f"batches ran out after {step} steps of {cfg.steps}: wrap the loader in cycle()") from None
        loss = _check_loss(loss_fn(model, to_device(batch, device)), step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step(inner)
        pending.append(loss.detach().reshape(()))
        history.lrs.append(optimizer.param_groups[0]["lr"])
        logging = cfg.log_every and (step + 1) % cfg.log_every == 0
        saving = checkpointing is not None and ((step + 1) % checkpointing.every == 0 or step + 1 == cfg.steps)
        if (step + 1) % check_every == 0 or logging or saving or step + 1 == cfg.steps:
            read_back(step)
        if saving:
            sampler = checkpointing.sampler.state_dict() if checkpointing.sampler is not None else None
            save_checkpoint(checkpointing.path, model, step + 1, checkpointing.config, optimizer, scheduler,
                            sampler=sampler, extra={"losses": history.losses, "lrs": history.lrs})
        if logging:
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
