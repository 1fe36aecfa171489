"""What a training run is told and what it gives back: FitConfig, Checkpointing and History (chapters 3, 4 and 5)."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

PRECISIONS = ("fp32", "bf16", "fp16")


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
    accumulate: int = 1  # micro-batches per optimizer step, one batch drawn for each; each loss is divided by
    #                      this, so the step's gradient is their mean (the schedule counts optimizer steps)
    precision: str = "fp32"  # "fp32"; "bf16" autocast (CPU or CUDA); "fp16" autocast + GradScaler (CUDA only)
    compile: bool = False  # compute the loss through torch.compile(model) (hooks still get the plain module)
    progress: bool = False  # show a tqdm bar with the loss and samples/s (on rank 0)
    log_path: str | None = None  # JSONL file: one line per optimizer step and one per validation (rank 0)
    val_every: int = 0  # call fit's `validate` every this many steps and after the last (0 = never)

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
        _check_number("accumulate", self.accumulate, integer=True)
        if self.accumulate < 1:
            raise ValueError(f"FitConfig accumulate must be >= 1 (micro-batches per optimizer step), "
                             f"got {self.accumulate}")
        if not isinstance(self.precision, str):
            raise TypeError(f"FitConfig precision must be a string, one of {PRECISIONS}, "
                            f"got {type(self.precision).__name__} {self.precision!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"FitConfig precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("compile", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"FitConfig {name} must be True or False, got {getattr(self, name)!r}")
        if self.log_path is not None:
            if not isinstance(self.log_path, (str, os.PathLike)):
                raise TypeError(f"FitConfig log_path must be a path (str) or None, "
                                f"got {type(self.log_path).__name__} {self.log_path!r}")
            if str(self.log_path) == "" or Path(self.log_path).is_dir():
                raise ValueError(f"FitConfig log_path must name a file, got {str(self.log_path)!r}")
        _check_number("val_every", self.val_every, integer=True)
        if self.val_every < 0:
            raise ValueError(f"FitConfig val_every must be >= 0 (0 = no validation), got {self.val_every}")


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
    losses: list[float] = field(default_factory=list)  # loss of every step (the mean of its micro-batches')
    lrs: list[float] = field(default_factory=list)  # learning rate after every step's schedule update
    #                                                 (lrs[k] is the rate step k + 1 uses)
    seconds: float = 0.0  # wall time of this call of fit (a resumed run counts from its resume)
    terms: dict[str, list[float]] = field(default_factory=dict)  # each named loss term of every step
    #                                                              (when loss_fn returns a dict)
    validation: list[dict[str, float]] = field(default_factory=list)  # validate's metrics, each with its "step"


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
