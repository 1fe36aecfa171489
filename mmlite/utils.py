"""Reproducibility, device and output-path helpers shared by every chapter and command (introduced in chapter 1)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


SEED_OFFSET_VAR = "MMLITE_SEED_OFFSET"


def seed_offset() -> int:
    """The shift $MMLITE_SEED_OFFSET adds to every training seed (0 when unset).

    A trained number is a property of one seed on one machine, not of the book. Rerunning a chapter with
    MMLITE_SEED_OFFSET=7 trains every model from other initial weights, batches and negatives while the data
    world, derivations and shapes stay exactly the same; CI does so to check that the chapters' asserted bounds
    hold for any seed, as they must on any reader's machine.
    """
    text = os.environ.get(SEED_OFFSET_VAR, "").strip()
    if not text:
        return 0
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{SEED_OFFSET_VAR} must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise ValueError(f"{SEED_OFFSET_VAR} must be a non-negative integer, got {value}")
    return value


def run_seed(seed: int) -> int:
    """A seed that shapes a training run (initial weights, batch order, sampled negatives), shifted by seed_offset().

    Chapters pass every such seed through this; seeds of the data world and of derivation checks are not.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return seed + 1000 * seed_offset()


def inline_figures() -> bool:
    """Inside a Jupyter kernel, draw figures inline whatever $MPLBACKEND says; returns whether it did.

    With MPLBACKEND=Agg (common on headless CI runners) a kernel otherwise has no inline backend and every
    figure cell produces no output, so a stored figure no longer matches.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None or type(shell).__name__ != "ZMQInteractiveShell":
        return False
    import matplotlib

    matplotlib.use("module://matplotlib_inline.backend_inline")
    return True


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices) with one integer."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(n: int) -> None:
    """Fix PyTorch's intra-op thread count.

    With the same thread count CPU results are bit-identical run to run; across thread
    counts some reductions drift in the 4th decimal after ~100 training steps, so every
    chapter fixes it rather than inheriting OMP_NUM_THREADS from the machine.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"thread count must be a positive integer, got {n!r}")
    torch.set_num_threads(n)


def get_device(device: str | torch.device | None = None) -> torch.device:
    """Return `device` if given, else the best available: cuda, then mps, then cpu."""
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but torch.cuda.is_available() is False")
        if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError("device 'mps' was asked for but torch.backends.mps.is_available() is False")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def setup(seed: int = 0, threads: int = 2) -> torch.device:
    """What every chapter runs first: seed everything, fix the thread count, draw figures inline, pick the device.

    The global seed is run_seed(seed), so $MMLITE_SEED_OFFSET moves it. Chapters run on the CPU; set
    MMLITE_DEVICE=cuda (or mps) to run them on an accelerator instead.
    """
    seed_everything(run_seed(seed))
    inline_figures()
    set_threads(threads)
    return get_device(os.environ.get("MMLITE_DEVICE", "cpu"))


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in `module` (only those with requires_grad if asked)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def check_output_path(path: str | Path, option: str, folder: bool) -> Path:
    """Raise ValueError (naming `option`) before any work when `path` cannot be written: empty, below a file,
    in a folder we may not write, or a folder where a file is wanted (folder=False) or vice versa."""
    if not str(path).strip():
        raise ValueError(f"{option} is empty; give a {'folder' if folder else 'file'} path")
    out = Path(path)
    if out.name in ("", ".", ".."):
        raise ValueError(f"{option} {str(path)!r} must end in a {'folder' if folder else 'file'} name")
    if folder and out.is_file():
        raise ValueError(f"{option} {out} is an existing file, not a folder")
    if not folder and out.is_dir():
        raise ValueError(f"{option} {out} is an existing folder, not a file")
    for parent in out.absolute().parents:  # the nearest existing ancestor must be a folder we can write in
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{option} {out}: {parent} is a file, so nothing can be created below it")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"{option} {out}: no permission to create anything in {parent}")
            break
    return out
