"""Checkpoints that lose nothing: atomic writes, `weights_only` loads, errors that name the file (chapter 5).

A checkpoint holds everything a run needs to continue as if it had never stopped: the model's weights, the
optimizer, scheduler and grad-scaler states, the random states (Python, NumPy, torch, CUDA), the data
order (the sampler's position), the step and the resolved config. It is written to a temporary file in the
same folder, flushed to disk and renamed over the old one, so a kill while saving leaves the previous
checkpoint whole. It is read with torch.load(weights_only=True): only tensors and plain containers, never
arbitrary pickled objects, so loading a file from elsewhere cannot run code.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmlite.train.devices import unwrap

FORMAT = "mmlite-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, not mmlite's, or made for another configuration."""


# --------------------------------------------------------------------------- random states
def rng_state() -> dict[str, Any]:
    """Python's, NumPy's global, torch's and (if present) every CUDA device's random state, as plain data."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- save
def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a folder; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | Path, model: nn.Module, step: int, config: dict[str, Any] | None = None,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None, scaler: Any = None,
                    sampler: dict[str, int] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically (temporary file, fsync, rename); returns its path.

    model may be wrapped (DDP, torch.compile): the unwrapped module's weights are stored, so the file loads into
    a bare model. config must be plain data (numbers, strings, lists, dicts): it is what load_checkpoint compares.
    sampler is the data order's state_dict (mmlite.data.EpochSampler, or mmlite.train.ShardedEpochSampler, whose
    state is the same on every rank); scaler a torch.amp.GradScaler (fp16 runs); extra any other plain data.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is a folder; give a file name")
    state = {
        "format": FORMAT, "version": VERSION, "step": int(step), "config": dict(config or {}),
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "sampler": dict(sampler) if sampler is not None else None,
        "rng": rng_state(),
        "extra": dict(extra or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows: readers see the old file or the new, never half
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


# --------------------------------------------------------------------------- load
def load_checkpoint(path: str | Path, config: dict[str, Any] | None = None,
                    map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a checkpoint with torch.load(weights_only=True) and check it; returns its state dict.

    Raises FileNotFoundError for a missing file and CheckpointError, naming the file, for a truncated or
    corrupt one, for a file that is not an mmlite checkpoint, and, when `config` is given, for one whose
    stored config differs from it in any key (the differing keys and both values are listed).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated, corrupt, or holding objects "
                              f"other than tensors and plain data): {first}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an mmlite checkpoint (no format tag {FORMAT!r})")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')!r}, this code reads {VERSION}")
    missing = [k for k in ("step", "config", "model", "rng") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}")
    if config is not None:
        stored = state["config"]
        differ = sorted(k for k in set(stored) | set(config) if stored.get(k, "<absent>") != config.get(k, "<absent>"))
        if differ:
            detail = "; ".join(f"{k}: checkpoint {stored.get(k, '<absent>')!r}, now {config.get(k, '<absent>')!r}"
                               for k in differ[:6])
            raise CheckpointError(f"{path}: made with another configuration ({detail}"
                                  f"{' ...' if len(differ) > 6 else ''})")
    return state


def restore(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
            scheduler: Any = None, scaler: Any = None, rng: bool = True) -> int:
    """Load a checkpoint's states into the given objects (strictly: every weight must fit); returns its step."""
    try:
        unwrap(model).load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit this model: {str(e).splitlines()[0]}") from e
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None:
            if state.get(name) is None:
                raise CheckpointError(f"checkpoint holds no {name} state to restore")
            obj.load_state_dict(state[name])
    if rng:
        set_rng_state(state["rng"])
    return int(state["step"])
