"""Side-by-side timings of the from-scratch components against PyTorch's own (used in chapters 3, 5 and 7).

`python -m mmlite bench [--quick] [--device cpu] [--out runs/bench.json]` times forward + backward of:
multi-head attention (scratch path, fused path, torch.nn.MultiheadAttention), the encoder block (scratch,
fused, torch.nn.TransformerEncoderLayer) and the GRU (mmlite.encoders.GRU, torch.nn.GRU), prints a table of
median milliseconds and mmlite / torch ratios, and writes the figures with the machine's description to JSON.
Targets (reported, never asserted): fused path within 1.10x of torch, scratch path within 2x at the book's sizes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from mmlite.attention import MultiHeadAttention
from mmlite.blocks import EncoderBlock
from mmlite.utils import check_output_path
from mmlite.utils import get_device

FUSED_TARGET = 1.10  # fused path / torch, at every size
SCRATCH_TARGET = 2.0  # scratch path / torch, at the book's sizes


@dataclass(frozen=True)
class BenchSize:
    """One problem size."""

    batch: int  # B
    seq: int  # T, tokens (or GRU steps) per example
    d_model: int  # token width (GRU input and hidden size)
    heads: int  # attention heads
    book: bool = True  # one of the sizes the chapters use (the 2x scratch target applies)

    def label(self) -> str:
        """Short text for the table, e.g. 'B32 T16 d64 h4'."""
        return f"B{self.batch} T{self.seq} d{self.d_model} h{self.heads}"


BOOK_SIZES = [BenchSize(32, 16, 64, 4), BenchSize(64, 32, 128, 4), BenchSize(32, 64, 128, 4)]
LARGE_SIZES = [BenchSize(16, 128, 256, 4, book=False), BenchSize(8, 256, 512, 8, book=False)]
QUICK_SIZES = [BenchSize(32, 16, 64, 4), BenchSize(64, 32, 128, 4), BenchSize(16, 128, 256, 4, book=False)]
CASES = ("attention", "encoder_block", "gru")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _step_fn(model: nn.Module, call: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """One training-like step: forward, sum, backward (gradients reset each time)."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        call().sum().backward()

    return step


def _time_side_by_side(steps: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int,
                       min_time_s: float) -> tuple[dict[str, float], dict[str, float]]:
    """(median, minimum) milliseconds per step of each function; they take turns so machine noise hits all."""
    per_call: dict[str, int] = {}
    for name, step in steps.items():
        for _ in range(warmup):
            step()
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        once = max(time.perf_counter() - t0, 1e-6)
        per_call[name] = max(1, math.ceil(min_time_s / once))  # calls per measurement
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            n = per_call[name]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) / n * 1e3)
    return ({name: statistics.median(vals) for name, vals in samples.items()},
            {name: min(vals) for name, vals in samples.items()})


def _attention_steps(s: BenchSize, device: torch.device, gen: torch.Generator) -> dict[str, Callable[[], None]]:
    ref = nn.MultiheadAttention(s.d_model, s.heads, batch_first=True).to(device)
    scratch = MultiHeadAttention(s.d_model, s.heads).to(device).copy_from_torch(ref)
    fused = MultiHeadAttention(s.d_model, s.heads, impl="fused").to(device).copy_from_torch(ref)
    x = torch.randn(s.batch, s.seq, s.d_model, generator=gen).to(device)
    return {
        "mmlite_scratch": _step_fn(scratch, lambda: scratch(x)),
        "mmlite_fused": _step_fn(fused, lambda: fused(x)),
        "torch": _step_fn(ref, lambda: ref(x, x, x, need_weights=False)[0]),
    }


def _encoder_steps(s: BenchSize, device: torch.device, gen: torch.Generator) -> dict[str, Callable[[], None]]:
    ref = nn.TransformerEncoderLayer(s.d_model, s.heads, 4 * s.d_model, dropout=0.0, activation="gelu",
                                     norm_first=True, batch_first=True).to(device)
    scratch = EncoderBlock(s.d_model, s.heads).to(device).copy_from_torch(ref)
    fused = EncoderBlock(s.d_model, s.heads, impl="fused").to(device).copy_from_torch(ref)
    x = torch.randn(s.batch, s.seq, s.d_model, generator=gen).to(device)
    return {
        "mmlite_scratch": _step_fn(scratch, lambda: scratch(x)),
        "mmlite_fused": _step_fn(fused, lambda: fused(x)),
        "torch": _step_fn(ref, lambda: ref(x)),
    }


def _gru_steps(s: BenchSize, device: torch.device, gen: torch.Generator) -> dict[str, Callable[[], None]]:
    try:
        from mmlite.encoders import GRU
    except ImportError as err:
        raise LookupError(f"mmlite.encoders.GRU is not available ({err})") from None
    ref = nn.GRU(s.d_model, s.d_model, batch_first=True).to(device)
    mine = GRU(s.d_model, s.d_model, batch_first=True).to(device).copy_from_torch(ref)
    x = torch.randn(s.batch, s.seq, s.d_model, generator=gen).to(device)
    return {
        "mmlite_scratch": _step_fn(mine, lambda: mine(x)[0]),
        "torch": _step_fn(ref, lambda: ref(x)[0]),
    }


_BUILDERS = {"attention": _attention_steps, "encoder_block": _encoder_steps, "gru": _gru_steps}


def machine_info(device: torch.device) -> dict[str, object]:
    """What the figures depend on: library versions, threads, device, CPU count."""
    info: dict[str, object] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def benchmark(quick: bool = False, device: str | torch.device = "cpu", sizes: list[BenchSize] | None = None,
              cases: tuple[str, ...] = CASES, warmup: int | None = None, repeats: int | None = None,
              min_time_s: float | None = None, seed: int = 0) -> dict[str, object]:
    """Time every case at every size; returns {"machine", "settings", "targets", "results", "skipped"}."""
    try:
        dev = get_device(device)
    except RuntimeError:  # torch.device("tpu") and other unknown names
        raise ValueError(f"device must be cpu, cuda or mps (optionally with an index, e.g. cuda:0), "
                         f"got {device!r}") from None
    unknown = [c for c in cases if c not in _BUILDERS]
    if unknown:
        raise ValueError(f"unknown benchmark cases {unknown}; valid cases are {list(CASES)}")
    sizes = sizes if sizes is not None else (QUICK_SIZES if quick else BOOK_SIZES + LARGE_SIZES)
    warmup = warmup if warmup is not None else (2 if quick else 3)
    repeats = repeats if repeats is not None else (7 if quick else 9)
    min_time_s = min_time_s if min_time_s is not None else (0.02 if quick else 0.05)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    gen = torch.Generator().manual_seed(seed)
    results: list[dict[str, object]] = []
    skipped: list[dict[str, str]] = []
    for case in cases:
        for s in sizes:
            torch.manual_seed(seed)  # same initial weights run to run
            try:
                steps = _BUILDERS[case](s, dev, gen)
            except LookupError as err:
                skipped.append({"case": case, "note": str(err)})
                break
            ms, ms_min = _time_side_by_side(steps, dev, warmup, repeats, min_time_s)
            ratio = {name.removeprefix("mmlite_"): ms[name] / ms["torch"] for name in ms if name != "torch"}
            results.append({"case": case, "size": asdict(s), "label": s.label(), "ms": ms, "ratio": ratio,
                            "ms_min": ms_min})
    return {
        "machine": machine_info(dev),
        "settings": {"quick": quick, "warmup": warmup, "repeats": repeats, "min_time_s": min_time_s,
                     "dtype": "float32", "seed": seed,
                     "timed": "forward + backward; ms = median over repeats, ms_min = fastest repeat"},
        "targets": {"fused_vs_torch": FUSED_TARGET, "scratch_vs_torch_at_book_sizes": SCRATCH_TARGET},
        "results": results,
        "skipped": skipped,
    }


def format_table(report: dict[str, object]) -> str:
    """The results as a fixed-width text table (ms = median milliseconds per forward + backward)."""
    head = (f"{'case':<14}{'size':<20}{'scratch ms':>11}{'fused ms':>10}{'torch ms':>10}"
            f"{'scratch/torch':>15}{'fused/torch':>13}")
    lines = [head, "-" * len(head)]
    for r in report["results"]:
        ms, ratio = r["ms"], r["ratio"]
        fused_ms = f"{ms['mmlite_fused']:.3f}" if "mmlite_fused" in ms else "-"
        fused_ratio = f"{ratio['fused']:.2f}x" if "fused" in ratio else "-"
        lines.append(f"{r['case']:<14}{r['label']:<20}{ms['mmlite_scratch']:>11.3f}{fused_ms:>10}"
                     f"{ms['torch']:>10.3f}{ratio['scratch']:>14.2f}x{fused_ratio:>13}")
    for s in report["skipped"]:
        lines.append(f"{s['case']:<14}skipped: {s['note']}")
    return "\n".join(lines)


def target_summary(report: dict[str, object]) -> list[str]:
    """One line per target: how many rows meet it (attention and encoder block rows)."""
    rows = [r for r in report["results"] if r["case"] in ("attention", "encoder_block")]
    fused = [r for r in rows if "fused" in r["ratio"]]
    book = [r for r in rows if r["size"]["book"]]
    ok_f = sum(r["ratio"]["fused"] <= FUSED_TARGET for r in fused)
    ok_s = sum(r["ratio"]["scratch"] <= SCRATCH_TARGET for r in book)
    return [f"fused within {FUSED_TARGET:.2f}x of torch: {ok_f}/{len(fused)} rows",
            f"scratch within {SCRATCH_TARGET:.1f}x of torch at the book's sizes: {ok_s}/{len(book)} rows"]


def run(args: argparse.Namespace) -> int:
    """Entry point of `python -m mmlite bench`: time, print the table, write the JSON."""
    out = check_output_path(args.out, "--out", folder=False)  # before timing anything
    try:
        dev = get_device(args.device)  # a ValueError here already names the device
    except RuntimeError:  # torch.device("tpu") and other unknown names
        raise ValueError(f"--device must be cpu, cuda or mps, got {args.device!r}") from None
    report = benchmark(quick=args.quick, device=dev)
    m = report["machine"]
    print(f"torch {m['torch']} | device {m['device']} | threads {m['threads']} | cpus {m['cpu_count']}")
    print(format_table(report))
    for line in target_summary(report):
        print(line)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    except OSError as err:
        raise ValueError(f"--out {out}: could not write the figures: {err}") from None
    print(f"wrote {out}")
    return 0
