"""Reproducibility and device helpers shared by every chapter (introduced in chapter 1)."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


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
    """What every chapter runs first: seed everything, fix the thread count, pick the device.

    Chapters run on the CPU so that their stored outputs are the same on every machine;
    set MMLITE_DEVICE=cuda (or mps) to run them on an accelerator instead.
    """
    seed_everything(seed)
    set_threads(threads)
    return get_device(os.environ.get("MMLITE_DEVICE", "cpu"))


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in `module` (only those with requires_grad if asked)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
