"""A small, explicit training loop: AdamW, warm-up + cosine schedule, gradient clipping, accumulation, mixed
precision, validation and a JSONL log, on one process or many (chapters 3, 4 and 5).

The loop owns the device: it moves every batch to the model's device, so loss functions never do. Hooks see
the unwrapped model (`unwrap` strips DistributedDataParallel and torch.compile), so `m.logit_scale.clamp_()`
works however the model is wrapped. On an accelerator it reads the loss back only every `check_every` steps
(one host-device sync per check instead of one per step) and always at the end. With the new options at
their defaults (accumulate 1, fp32, no compile) it computes exactly what the plain loop computes, bit for bit.
"""

from __future__ import annotations

import math
import numbers
import time
from contextlib import nullcontext
from typing import Any, Callable, Iterable, Iterator, Mapping, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mmlite.train.checkpoint import CheckpointError, restore, save_checkpoint
from mmlite.train.config import Checkpointing, FitConfig, History
from mmlite.train.devices import LossModule, model_device, to_device, unwrap
from mmlite.train.distributed import is_main, rank_and_world
from mmlite.train.groups import param_groups
from mmlite.train.modes import evaluating
from mmlite.train.precision import autocast_for
from mmlite.train.runlog import RESERVED, JsonlLog, batch_size

__all__ = ["FitConfig", "History", "Checkpointing", "fit", "cycle", "warmup_cosine"]

LossOutput = Union[Tensor, Mapping[str, Tensor]]  # a scalar loss, or {"loss": total, <term>: scalar, ...}


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


def _check_scalar(value: object, step: int, name: str = "loss") -> Tensor:
    what = "loss" if name == "loss" else f"loss term {name!r}"
    if not isinstance(value, Tensor):
        raise TypeError(f"loss_fn must return a tensor, got {type(value).__name__} for its {what} at step {step} "
                        "(or a dict of scalar tensors with a 'loss' entry)")
    if value.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar loss, got shape {tuple(value.shape)} for its {what} at step "
                         f"{step} (reduce it, e.g. with .mean())")
    return value


def _split_loss(out: object, step: int, names: set[str] | None) -> tuple[Tensor, dict[str, Tensor]]:
    """(total loss, the other named terms) of what loss_fn returned; the terms' names must not change."""
    if isinstance(out, Mapping):
        if "loss" not in out:
            raise ValueError(f"loss_fn returned a dict without 'loss' (the total to back-propagate) at step {step}: "
                             f"keys {sorted(map(str, out))}")
        for name in out:
            if not isinstance(name, str):
                raise TypeError(f"loss_fn's dict keys must be strings, got {name!r} at step {step}")
        clash = sorted(set(out) & (set(RESERVED) - {"loss"}))
        if clash:
            raise ValueError(f"loss_fn's terms {clash} clash with the log's own keys {list(RESERVED)}: rename them")
        terms = {k: _check_scalar(v, step, k) for k, v in out.items() if k != "loss"}
        loss = _check_scalar(out["loss"], step)
    else:
        loss, terms = _check_scalar(out, step), {}
    if names is not None and set(terms) != names:
        raise ValueError(f"loss_fn returned the terms {sorted(terms)} at step {step}, but {sorted(names)} before: "
                         "every step must log the same terms")
    return loss, terms


def _ddp_of(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The DistributedDataParallel wrapper in model's chain of wrappers, if there is one."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model
        if isinstance(model, (nn.DataParallel, LossModule)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return None


def _validation(validate: Callable[[nn.Module], dict[str, float]], inner: nn.Module, step: int) -> dict[str, float]:
    """{"step": step, **validate(inner)}, run in eval mode under inference_mode; the metrics checked finite numbers."""
    with evaluating(inner):
        metrics = validate(inner)
    if not isinstance(metrics, Mapping):
        raise TypeError(f"validate must return a dict of metric names to numbers, got {type(metrics).__name__}")
    record: dict[str, float] = {"step": step}
    for name, value in metrics.items():
        if not isinstance(name, str) or name in ("step", "split"):
            raise ValueError(f"validate's metric names must be strings other than 'step' and 'split', got {name!r}")
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"validate's metric {name!r} must be a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise FloatingPointError(f"validate's metric {name!r} is {value} after step {step}")
        record[name] = float(value)
    return record


def fit(model: nn.Module, batches: Iterable, loss_fn: Callable[[nn.Module, object], LossOutput], cfg: FitConfig,
        after_step: Callable[[nn.Module], None] | None = None, device: torch.device | str | None = None,
        checkpointing: Checkpointing | None = None, resume: dict[str, Any] | None = None,
        validate: Callable[[nn.Module], dict[str, float]] | None = None) -> History:
    """Run cfg.steps optimizer steps of loss_fn(model, batch) over `batches`; returns the History.

    `batches` should be endless (wrap a DataLoader in `cycle`); each batch is moved to `device` (default: the
    model's) before loss_fn sees it. loss_fn returns a scalar tensor, or a dict of scalar tensors whose "loss"
    is back-propagated and whose other entries (e.g. "itc", "itm") are logged in History.terms. Each optimizer
    step draws cfg.accumulate batches and back-propagates loss / accumulate for each (History.losses holds
    their mean). With cfg.precision "bf16" or "fp16" the loss is computed under torch.autocast (see
    mmlite.train.precision). `after_step` runs after every optimizer step on the unwrapped model (e.g.
    clamping a learnable logit scale). Raises FloatingPointError when a loss or term, or a parameter after the
    last step, is not finite; losses are checked every cfg.check_every steps (every step on the CPU), so on an
    accelerator up to that many steps may run past a first NaN. The last step's gradients are cleared.

    validate(model) is called every cfg.val_every steps and after the last, on every rank, with the unwrapped
    model in eval mode under torch.inference_mode (back in train mode after); it returns {metric: number},
    kept in History.validation with the step. cfg.log_path receives a JSONL line per step and per validation
    (mmlite.train.runlog); samples/s counts each batch's size as its first tensor's leading dimension.

    checkpointing writes a checkpoint every `every` steps and after the last. resume, a state from
    mmlite.train.load_checkpoint, restores weights, optimizer, schedule, grad scaler, random states and
    history and carries on from its step; give it `batches` whose sampler was loaded with state["sampler"],
    and the run ends with the weights an uninterrupted run would have, bit for bit. (Give the DataLoader a
    generator of its own: without one, each pass draws its worker seed from torch's global RNG, at a moment
    the resume moves.)

    Many processes: give a DistributedDataParallel model (mmlite.train.distributed.wrap_ddp) and each rank its
    shard of the data (ShardedEpochSampler). loss_fn must call the model itself (DDP syncs gradients for a
    forward through the wrapper): for a loss that calls its methods, wrap a LossModule. The losses and terms are averaged over the ranks at each read-back, so
    every rank's History is the same; only rank 0 writes checkpoints and the log, prints and shows progress.
    """
    device = model_device(model) if device is None else torch.device(device)
    if (cfg.val_every > 0) != (validate is not None):
        raise ValueError(f"FitConfig val_every is {cfg.val_every} but validate is "
                         f"{'given' if validate is not None else 'None'}: give both (val_every > 0) or neither")
    autocast, scaler = autocast_for(cfg.precision, device)
    check_every = cfg.check_every or (1 if device.type == "cpu" else 50)
    groups = param_groups(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, cfg))
    history = History()
    first_step, seconds_before, names = 0, 0.0, None
    if resume is not None:
        if scaler is None and resume.get("scaler") is not None:
            raise CheckpointError(f"the checkpoint holds a grad-scaler state (an fp16 run), but this run's "
                                  f"precision is {cfg.precision!r}")
        first_step = restore(resume, model, optimizer, scheduler, scaler)
        extra = resume.get("extra", {})
        history.losses, history.lrs = list(extra.get("losses", [])), list(extra.get("lrs", []))
        history.terms = {k: list(v) for k, v in extra.get("terms", {}).items()}
        history.validation = [dict(r) for r in extra.get("validation", [])]
        seconds_before = float(extra.get("seconds", 0.0))
        names = set(history.terms) if first_step > 0 else None
        if not 0 <= first_step <= cfg.steps:
            raise ValueError(f"the checkpoint is at step {first_step}, outside this run's 0..{cfg.steps}")
    ddp = _ddp_of(model)
    world = rank_and_world()[1] if ddp is not None else 1  # ranks whose losses are averaged
    main = is_main()
    counting = bool(cfg.log_path or cfg.progress)  # samples/s needs each batch's size
    forward = torch.compile(model) if cfg.compile else model
    inner = unwrap(model)
    model.train()
    log = JsonlLog(cfg.log_path, first_step if resume is not None else None) if cfg.log_path and main else None
    bar = None
    if cfg.progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=first_step, desc="fit", unit="step", dynamic_ncols=True)
    pending: list[tuple[Tensor, float, int]] = []  # per step not yet read back: (loss and terms, lr used, samples)
    start = time.perf_counter()
    mark = start  # end of the last read-back's bookkeeping: throughput is measured from there
    iterator = iter(batches)

    def read_back(step: int) -> None:  # one sync: the pending losses to the host, then check and record them
        rows = torch.stack([p[0] for p in pending])  # (n, 1 + terms)
        if world > 1:
            dist.all_reduce(rows)  # sum over the ranks (gloo has no average)
            rows = rows / world
        values = rows.float().cpu().tolist()
        now, first, n = time.perf_counter(), step + 1 - len(values), len(values)
        for k, row in enumerate(values):
            for name, v in zip(["loss", *history.terms], row):
                if not math.isfinite(v):
                    raise FloatingPointError(f"{'loss' if name == 'loss' else f'loss term {name!r}'} is {v} "
                                             f"at step {first + k}")
        rate = sum(p[2] for p in pending) / max(now - mark, 1e-9)
        for k, (row, (_, lr, _)) in enumerate(zip(values, pending)):
            history.losses.append(row[0])
            for name, v in zip(history.terms, row[1:]):
                history.terms[name].append(v)
            if log is not None:
                seconds = seconds_before + (mark - start) + (k + 1) * (now - mark) / n
                log.write({"step": first + k + 1, "loss": row[0], **dict(zip(history.terms, row[1:])), "lr": lr,
                           "samples_per_s": rate, "seconds": seconds})
        if bar is not None:
            bar.update(n)
            bar.set_postfix(loss=f"{values[-1][0]:.4f}", samples_per_s=f"{rate:.1f}", refresh=False)
        pending.clear()

    try:
        for step in range(first_step, cfg.steps):
            optimizer.zero_grad(set_to_none=True)
            micro, samples = [], 0
            for k in range(cfg.accumulate):
                try:
                    batch = next(iterator)
                except StopIteration:
                    raise ValueError(f"batches ran out after {step} steps of {cfg.steps}: wrap the loader in "
                                     "cycle()") from None
                if counting:
                    size = batch_size(batch)
                    if size is None:
                        raise ValueError("samples/s (FitConfig log_path or progress) counts a batch's first tensor's "
                                         f"leading dimension, but the batch of step {step} holds no such tensor")
                    samples += size * world
                syncing = ddp is None or k == cfg.accumulate - 1  # DDP all-reduces only in the last backward
                with nullcontext() if syncing else ddp.no_sync():
                    with autocast():
                        loss, terms = _split_loss(loss_fn(forward, to_device(batch, device)), step, names)
                    if names is None:
                        names = set(terms)
                        history.terms = {name: [] for name in terms}
                    part = loss / cfg.accumulate if cfg.accumulate > 1 else loss
                    (scaler.scale(part) if scaler is not None else part).backward()
                micro.append(torch.stack([v.detach().float().reshape(()) for v in
                                          (loss, *(terms[name] for name in history.terms))]))  # (1 + terms,)
            if scaler is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)  # skipped when a gradient overflowed
                scaler.update()
            else:
                optimizer.step()
            lr_used = optimizer.param_groups[0]["lr"]
            scheduler.step()
            if after_step is not None:
                after_step(inner)
            pending.append((micro[0] if len(micro) == 1 else torch.stack(micro).mean(0), lr_used, samples))
            history.lrs.append(optimizer.param_groups[0]["lr"])
            done = step + 1
            logging = cfg.log_every and done % cfg.log_every == 0
            saving = checkpointing is not None and (done % checkpointing.every == 0 or done == cfg.steps)
            validating = validate is not None and (done % cfg.val_every == 0 or done == cfg.steps)
            if done % check_every == 0 or logging or saving or validating or done == cfg.steps:
                read_back(step)
            if validating:
                record = _validation(validate, inner, done)
                history.validation.append(record)
                if log is not None:
                    log.write({"step": done, "split": "val", **{k: v for k, v in record.items() if k != "step"}})
            if saving and main:
                sampler = checkpointing.sampler.state_dict() if checkpointing.sampler is not None else None
                seconds = seconds_before + time.perf_counter() - start
                save_checkpoint(checkpointing.path, model, done, checkpointing.config, optimizer, scheduler,
                                scaler=scaler, sampler=sampler,
                                extra={"losses": history.losses, "lrs": history.lrs, "terms": history.terms,
                                       "validation": history.validation, "seconds": seconds})
            if logging and main:
                recent = history.losses[-cfg.log_every:]
                message = (f"step {done:5d}  loss {sum(recent) / len(recent):.4f}  "
                           f"({time.perf_counter() - start:.1f} s)")
                if bar is not None:
                    bar.write(message)
                else:
                    print(message, flush=True)
            if not pending:
                mark = time.perf_counter()  # leave validation, checkpoints and prints out of samples/s
    finally:
        if log is not None:
            log.close()
        if bar is not None:
            bar.close()
    optimizer.zero_grad(set_to_none=True)  # keep no gradients of the last step around
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise FloatingPointError(f"parameters {bad[:5]}{' ...' if len(bad) > 5 else ''} are not finite "
                                 f"after the last step ({cfg.steps})")
    history.seconds = time.perf_counter() - start
    return history
