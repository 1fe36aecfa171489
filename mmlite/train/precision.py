"""Mixed precision for the training loop: autocast per device and, for float16, a gradient scaler (chapter 5).

bf16 keeps float32's exponent range, so it needs no loss scaling and runs the same code on the CPU and on a
GPU: that is how the book tests the mixed-precision path without a GPU. fp16 has a narrow exponent range:
small gradients underflow to zero unless the loss is multiplied by a large factor before backward and the
gradients divided by it before the optimizer step (torch.amp.GradScaler, which also skips steps whose
gradients overflowed and adjusts the factor). Only CUDA runs fp16 here.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import torch

from mmlite.train.config import PRECISIONS

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_BF16_DEVICES = ("cpu", "cuda")  # where torch.autocast runs bfloat16 (elsewhere it may disable itself with a warning)


def autocast_for(precision: str, device: torch.device | str) -> tuple[Callable[[], AbstractContextManager], object]:
    """(a factory of the autocast context for the loss computation, a GradScaler or None) for `precision`.

    "fp32": no autocast, no scaler (the plain float32 loop, bit for bit). "bf16": torch.autocast on the
    device's type with bfloat16, no scaler; CPU or CUDA. "fp16": torch.autocast("cuda", float16) and a
    torch.amp.GradScaler; CUDA only. Raises ValueError for any other combination, naming the device.
    """
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return nullcontext, None
    if precision == "bf16":
        if device.type not in _BF16_DEVICES:
            raise ValueError(f"FitConfig precision='bf16' runs on {' or '.join(_BF16_DEVICES)}, but the model is on "
                             f"{device}: use precision='fp32' there")
        return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), None
    if device.type != "cuda":
        raise ValueError(f"FitConfig precision='fp16' needs a CUDA device (float16 autocast with a GradScaler), but "
                         f"the model is on {device}: use precision='bf16', which runs on the CPU too, or 'fp32'")
    return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")
