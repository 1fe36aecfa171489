"""Side-by-side timings of the from-scratch components against PyTorch's own, and of the complete model's training
(used in chapters 3, 5, 7 and 8).

`python -m mmlite bench [--quick] [--device cpu] [--presets tiny small] [--out runs/bench.json]` times
forward + backward of: multi-head attention (scratch path, fused path, torch.nn.MultiheadAttention), the encoder
block (scratch, fused, torch.nn.TransformerEncoderLayer) and the GRU (mmlite.encoders.GRU, torch.nn.GRU), prints
a table of median milliseconds and mmlite / torch ratios, and writes the figures with the machine's description
to JSON. Targets (reported, never asserted): fused path within 1.10x of torch, scratch path within 2x at the
book's sizes.

Its "training" section (training_benchmark) measures, in the same run:
  - the machine's matmul rates: float32 and bfloat16 GFLOP/s of a square n x n matmul (2 n^3 FLOPs, the fastest
    of a few calls) on the bench's thread count, and the CPU's bf16 flags (avx512_bf16, amx_bf16);
  - training throughput of each preset (tiny, small): the preset's task (mmlite.experiment.run.build) on a few
    batches of the preset's batch size from a small world of its image size, timing the optimiser steps `fit`
    runs (forward + backward under the preset's autocast, gradient clipping, AdamW, after_step) after warm-up
    steps: ms/step and samples/s (data loading is timed apart, as data_ms_per_batch);
  - model FLOP utilisation (MFU): the FLOPs of one training step counted by torch.utils.flop_counter.FlopCounterMode
    (mmlite.metrics.efficiency.measured_flops over forward + backward of the task on one batch: the matmuls,
    convolutions and attention kernels it really runs), per sample, times samples/s, over the float32 matmul
    rate (the faster of a measurement before and one after the training steps: a shared machine's neighbours
    slow one or the other); goal >= 50 % for the small preset, and a torch.profiler summary of one step (top
    ops, the share of the step outside matmuls and convolutions) says what limits it;
  - bf16 autocast: where the bf16 matmul runs > 1.2x the float32 one, the tiny preset trained under
    autocast_for("bf16") against fp32, steps taking turns; elsewhere the ratio and a note that CPU bf16 autocast
    is not a speed-up on this machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

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


# ----------------------------------------------------------------------------------- training section
MATMUL_N = 1024  # side of the square matmul whose float32 rate is the MFU denominator
MFU_GOAL = 0.50  # the goal, for the small preset
MFU_GOAL_PRESET = "small"
BF16_SPEEDUP = 1.2  # the bf16 matmul must beat float32 by this before bf16 training is timed (bf16="auto")
BF16_PRESET = "tiny"  # the preset timed under bf16 autocast against fp32
TRAINING_PRESETS = ("tiny", "small")  # default of --presets
BF16_MODES = ("auto", "always", "never")
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
# aten ops whose self time is matmul or convolution arithmetic (composites such as aten::linear, aten::matmul and
# aten::convolution only dispatch to these; their own time is overhead)
MATMUL_OPS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::mkldnn_convolution",
    "aten::convolution_backward", "aten::cudnn_convolution", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward"})
FLOPS_SOURCE = ("torch.utils.flop_counter.FlopCounterMode over one forward + backward of the task on one batch "
                "(mmlite.metrics.efficiency.measured_flops: matmuls, convolutions and attention kernels as run; "
                "element-wise ops, norms and the AdamW update count 0)")


def _count(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _bench_device(device: str | torch.device) -> torch.device:
    try:
        return get_device(device)
    except RuntimeError:  # torch.device("tpu") and other unknown names
        raise ValueError(f"device must be cpu, cuda or mps (optionally with an index, e.g. cuda:0), "
                         f"got {device!r}") from None


def cpu_features() -> dict[str, object]:
    """The CPU's vector capability as PyTorch dispatches it, and its bf16-related flags (None where unknown)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = None
    return {"capability": capability, "flags": {f: f in flags for f in CPU_FLAGS} if flags else None,
            "flags_source": "/proc/cpuinfo" if flags else None}


def matmul_rate(dtype: torch.dtype = torch.float32, n: int = MATMUL_N, repeats: int = 5, warmup: int = 1,
                device: str | torch.device = "cpu", seed: int = 0) -> dict[str, object]:
    """GFLOP/s of an (n, n) @ (n, n) matmul in `dtype` (2 n^3 FLOPs), from the fastest and the median of `repeats`."""
    _count("n", n, 1)
    _count("repeats", repeats, 1)
    _count("warmup", warmup, 0)
    dev = _bench_device(device)
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen).to(dev, dtype)
    b = torch.randn(n, n, generator=gen).to(dev, dtype)
    out = torch.empty(n, n, dtype=dtype, device=dev)
    for _ in range(warmup):
        torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(dev)
        times.append(max(time.perf_counter() - t0, 1e-9))
    flops = 2 * n ** 3
    best, median = min(times), statistics.median(times)
    return {"dtype": str(dtype).removeprefix("torch."), "n": n, "flops": flops, "repeats": repeats,
            "threads": torch.get_num_threads(), "ms_min": best * 1e3, "ms_median": median * 1e3,
            "gflops": flops / best / 1e9, "gflops_median": flops / median / 1e9}


def matmul_rates(n: int = MATMUL_N, repeats: int = 5, device: str | torch.device = "cpu",
                 max_call_s: float = 0.2) -> dict[str, object]:
    """float32 and bfloat16 matmul rates and their ratio at the same size.

    float32 runs at n x n. A machine without bf16 arithmetic runs bf16 matmuls tens of times slower, so a probe
    (at most 256 x 256) first sizes the bf16 matmul to take about max_call_s a call (a multiple of 64, at most
    n); float32 is then timed at that size too, and bf16_vs_fp32 compares the two at the same size.
    """
    _count("n", n, 1)
    fp32 = matmul_rate(torch.float32, n, repeats, device=device)
    out: dict[str, object] = {"float32": fp32, "bfloat16": None, "float32_same_n": fp32, "bf16_vs_fp32": None,
                              "gflops": "2 n^3 FLOPs over the fastest call (gflops_median: over the median)"}
    probe_n = min(n, 256)
    try:
        probe = matmul_rate(torch.bfloat16, probe_n, 1, warmup=1, device=device)
    except (RuntimeError, TypeError) as err:  # a device without bfloat16 matmuls
        out["bf16_note"] = f"bfloat16 matmul failed: {err}"
        return out
    fit_n = int((probe["gflops"] * 1e9 * max_call_s / 2) ** (1 / 3))
    bf16_n = max(probe_n, min(n, fit_n // 64 * 64))
    bf16 = matmul_rate(torch.bfloat16, bf16_n, repeats, device=device)
    same = fp32 if bf16_n == n else matmul_rate(torch.float32, bf16_n, repeats, device=device)
    out.update({"bfloat16": bf16, "float32_same_n": same, "bf16_vs_fp32": bf16["gflops"] / same["gflops"]})
    return out


def _check_presets(presets: Sequence[str], device: torch.device, jobs: Mapping[str, Any] | None) -> list[str]:
    from mmlite.experiment.config import PRESETS

    if isinstance(presets, str):
        presets = [presets]
    names = list(presets)
    known = set(PRESETS) | set(jobs or {})
    unknown = [p for p in names if p not in known]
    if unknown:
        raise ValueError(f"unknown presets {unknown}; presets are {sorted(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"presets repeat: {names}")
    if device.type == "cpu" and "base" in names and "base" not in (jobs or {}):
        raise ValueError("the base preset is sized for a GPU (64x64 images, a 384-wide ViT, batches of 256): "
                         "time tiny and small on the CPU, or base with --device cuda")
    return names


def _job(name: str, jobs: Mapping[str, Any] | None) -> Any:
    from mmlite.experiment.config import preset

    return jobs[name] if jobs and name in jobs else preset(name)


def profile_step(step: Callable[[], object], top: int = 8) -> dict[str, object]:
    """torch.profiler's self CPU time of one call of step(): the top ops and the share in matmuls/convolutions."""
    from torch.profiler import ProfilerActivity, profile

    _count("top", top, 1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = list(prof.key_averages())
    total = sum(e.self_cpu_time_total for e in events) or 1e-9  # microseconds
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"profiled_ms": total / 1e3, "matmul_share": matmul / total, "outside_matmul_share": 1 - matmul / total,
            "top_ops": [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3,
                         "share": e.self_cpu_time_total / total, "calls": e.count, "matmul": e.key in MATMUL_OPS}
                        for e in rows],
            "note": "self CPU time of one step under torch.profiler, whose per-call overhead inflates the many "
                    "small ops; matmul = " + ", ".join(sorted(MATMUL_OPS))}


def training_step_flops(module: nn.Module, batch: Any, batch_size: int) -> dict[str, object]:
    """FLOPs of one training step of module(batch), counted by FlopCounterMode over its forward and backward.

    The backward runs from the sum of the outputs that need a gradient (the task's "loss"); the module's .grad
    fields are left as they were. For an nn.Linear(d_in, d_out) on (B, d_in) that is 2 B d_in d_out forward and
    2 B d_in d_out for the weight's gradient, plus 2 B d_in d_out more when the input needs a gradient too: the
    "3 x forward" rule (rule_3x_forward) is exact only for layers whose input needs one.
    """
    from mmlite.metrics.efficiency import measured_flops, training_flops_rule

    _count("batch_size", batch_size, 1)
    count = measured_flops(module, batch, backward=True)
    return {"forward": count.forward, "backward": count.backward, "per_step": count.total,
            "per_sample": count.total / batch_size, "rule_3x_forward": training_flops_rule(count.forward),
            "by_op": count.by_op}


def _set_mfu(results: dict[str, dict[str, object]], flops_per_sample: float,
             rates: Mapping[str, float] | None) -> None:
    """Fill each precision's mfu (median step) and mfu_best (fastest step) against rates[precision] GFLOP/s."""
    from mmlite.metrics.efficiency import model_flops_utilisation

    for p, row in results.items():
        rate = (rates or {}).get(p)
        row["mfu"] = row["mfu_best"] = row["mfu_against_gflops"] = None
        if rate:
            row["mfu"] = model_flops_utilisation(flops_per_sample, row["samples_per_s"], rate * 1e9)
            row["mfu_best"] = model_flops_utilisation(flops_per_sample, row["samples_per_s_best"], rate * 1e9)
            row["mfu_against_gflops"] = rate


def training_throughput(job: Any, name: str = "custom", precisions: Sequence[str] | None = None, warmup: int = 3,
                        steps: int = 10, n_batches: int = 2, device: str | torch.device = "cpu", seed: int = 0,
                        rates: Mapping[str, float] | None = None, profile: bool = True,
                        top: int = 8) -> dict[str, object]:
    """Time the optimiser steps of a TrainJob's task, and count one step's FLOPs.

    The task is mmlite.experiment.run.build(job, ...) on a world of n_batches x the job's batch size images (of
    the job's image size; the other splits empty), its batches drawn once by the job's loader (with the ITM truth
    matrix where the objectives use it; that time is data_ms_per_batch) and reused in turn. Each step is what
    `fit` does: zero the gradients, forward under the precision's autocast, backward, clip at fit.grad_clip,
    AdamW over param_groups (fit's lr and weight decay, no schedule), after_step; the loss is read back and
    checked finite. With several precisions the steps take turns, so the machine's noise hits all alike.
    `rates` maps a precision to the matmul GFLOP/s its MFU is measured against (none: no MFU).
    """
    from mmlite.data import build_tokenizer
    from mmlite.data.splits import generate
    from mmlite.experiment.run import _loader, build
    from mmlite.tasks.albef import add_truth
    from mmlite.train import param_groups, to_device
    from mmlite.train.precision import autocast_for

    _count("warmup", warmup, 0)
    _count("steps", steps, 1)
    _count("n_batches", n_batches, 1)
    dev = _bench_device(device)
    precisions = tuple(precisions) if precisions is not None else (job.fit.precision,)
    if not precisions or len(set(precisions)) != len(precisions):
        raise ValueError(f"precisions must be distinct and at least one, got {precisions!r}")
    contexts = {p: autocast_for(p, dev) for p in precisions}  # ValueError for a bad precision or device
    batch = job.job.batch_size
    data = dataclasses.replace(job.data, n_train=batch * n_batches, n_val=0, n_test=0, n_comp=0)
    world = generate(data, job.job.data_seed, workers=1)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    task = build(job, world, tokenizer).to(dev)
    task.train()
    truth = task.objectives.false_negatives == "truth" and task.objectives.itm > 0
    t0 = time.perf_counter()
    batches = [add_truth(b, tokenizer, data.relation_margin) if truth else b
               for b in _loader(world["train"], tokenizer, job, shuffle=False)]
    data_ms = (time.perf_counter() - t0) / len(batches) * 1e3
    batches = [to_device(b, dev) for b in batches]

    torch.manual_seed(seed)  # the MLM masks and ITM negatives of the counted step
    flops = training_step_flops(task, batches[0], batch)

    optimizer = torch.optim.AdamW(param_groups(task, lr=job.fit.lr, weight_decay=job.fit.weight_decay),
                                  lr=job.fit.lr)

    def step(b: dict, precision: str) -> None:
        autocast, scaler = contexts[precision]
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = task(b)["loss"]
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)
        if job.fit.grad_clip is not None:
            nn.utils.clip_grad_norm_(task.parameters(), job.fit.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        task.after_step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"the {name} task's loss is {value} under {precision}")

    for k in range(warmup):
        for p in precisions:
            step(batches[k % len(batches)], p)
    times: dict[str, list[float]] = {p: [] for p in precisions}
    for k in range(steps):
        for p in precisions:
            _sync(dev)
            t0 = time.perf_counter()
            step(batches[(warmup + k) % len(batches)], p)
            _sync(dev)
            times[p].append(max(time.perf_counter() - t0, 1e-9))
    results: dict[str, dict[str, object]] = {}
    for p, ts in times.items():
        median, best = statistics.median(ts), min(ts)
        results[p] = {"ms_per_step": median * 1e3, "ms_per_step_min": best * 1e3, "samples_per_s": batch / median,
                      "samples_per_s_best": batch / best}
    _set_mfu(results, flops["per_sample"], rates)
    report: dict[str, object] = {
        "preset": name, "batch_size": batch, "image_size": data.image_size,
        "parameters": sum(p.numel() for p in task.parameters()), "objectives": list(task.objectives.active()),
        "warmup": warmup, "steps": steps, "n_batches": len(batches), "data_ms_per_batch": data_ms,
        "flops": flops, "precisions": results, "profile": None}
    if profile:
        if dev.type == "cpu":
            first = precisions[0]
            report["profile"] = {"precision": first,
                                 **profile_step(lambda: step(batches[0], first), top=top)}
        else:
            report["profile_note"] = "the profile summary times CPU ops only; run it with --device cpu"
    optimizer.zero_grad(set_to_none=True)
    return report


def training_benchmark(presets: Sequence[str] = TRAINING_PRESETS, quick: bool = False,
                       device: str | torch.device = "cpu", warmup: int | None = None, steps: int | None = None,
                       n_batches: int = 2, matmul_n: int = MATMUL_N, matmul_repeats: int | None = None,
                       bf16: str = "auto", profile: bool = True, seed: int = 0,
                       jobs: Mapping[str, Any] | None = None) -> dict[str, object]:
    """The report's "training" section: matmul rates, each preset's throughput and MFU, and the bf16 comparison.

    presets: names of mmlite.experiment presets (base only off the CPU); `jobs` maps names to TrainJobs that
    replace the presets of those names (a smaller configuration). bf16: "auto" times the BF16_PRESET job under
    bf16 autocast against fp32 only where the bf16 matmul runs > BF16_SPEEDUP x float32, "always" and "never"
    decide regardless.
    """
    dev = _bench_device(device)
    names = _check_presets(presets, dev, jobs)
    if bf16 not in BF16_MODES:
        raise ValueError(f"bf16 must be one of {BF16_MODES}, got {bf16!r}")
    warmup = warmup if warmup is not None else (1 if quick else 3)
    steps = steps if steps is not None else (3 if quick else 10)
    matmul_repeats = matmul_repeats if matmul_repeats is not None else (10 if quick else 20)
    for label, value, low in (("warmup", warmup, 0), ("steps", steps, 1), ("n_batches", n_batches, 1),
                              ("matmul_n", matmul_n, 1), ("matmul_repeats", matmul_repeats, 1)):
        _count(label, value, low)
    load_before = _load_average()
    matmul = matmul_rates(matmul_n, matmul_repeats, device=dev)
    rows = [training_throughput(_job(name, jobs), name, warmup=warmup, steps=steps, n_batches=n_batches, device=dev,
                                seed=seed, profile=profile) for name in names]
    # the float32 rate again after the training steps: on a shared machine one measurement may be caught by a
    # neighbour's burst, and MFU is against the faster of the two (the rate the machine reaches)
    matmul["float32_after"] = matmul_rate(torch.float32, matmul_n, matmul_repeats, device=dev)
    fp32_rate = max(matmul["float32"]["gflops"], matmul["float32_after"]["gflops"])
    matmul["mfu_gflops"] = fp32_rate
    bf16_rate = matmul["bfloat16"]["gflops"] if matmul["bfloat16"] else None
    rates = {"fp32": fp32_rate, **({"bf16": bf16_rate} if bf16_rate else {})}
    for r in rows:
        _set_mfu(r["precisions"], r["flops"]["per_sample"], rates)
    cpu = cpu_features() if dev.type == "cpu" else None
    ratio = matmul["bf16_vs_fp32"]
    faster = ratio is not None and ratio > BF16_SPEEDUP
    section: dict[str, object] = {"mode": bf16, "matmul_ratio": ratio, "threshold": BF16_SPEEDUP, "faster": faster,
                                  "training": None}
    where = "this machine" if dev.type == "cpu" else f"this {dev.type} device"
    if bf16 == "always" or (bf16 == "auto" and faster):
        try:
            r = training_throughput(_job(BF16_PRESET, jobs), BF16_PRESET, precisions=("fp32", "bf16"), warmup=warmup,
                                    steps=steps, n_batches=n_batches, device=dev, seed=seed, rates=rates,
                                    profile=False)
        except ValueError as err:  # no bf16 autocast on this device
            section["note"] = str(err)
        except RuntimeError as err:  # an op of the model that fails under bf16 autocast: report it, keep the rest
            section["error"] = f"{type(err).__name__}: {err}"
            section["note"] = f"bf16 training of {BF16_PRESET} failed under autocast ({section['error']})"
        else:
            fp, bf = r["precisions"]["fp32"], r["precisions"]["bf16"]
            section["training"] = {"preset": BF16_PRESET, "batch_size": r["batch_size"], "steps": steps,
                                   "fp32": fp, "bf16": bf, "speedup": fp["ms_per_step"] / bf["ms_per_step"]}
            section["note"] = (f"bf16 autocast trains {BF16_PRESET} at {section['training']['speedup']:.2f}x "
                               f"the fp32 speed on {where}")
    if "note" not in section:
        if ratio is None:
            section["note"] = matmul.get("bf16_note", "no bf16 matmul was measured")
        elif not faster:
            flags = (cpu or {}).get("flags") or {}
            have = ", ".join(f"{f}: {'yes' if flags[f] else 'no'}" for f in ("avx512_bf16", "amx_bf16")
                             if f in flags)
            section["note"] = f"the bf16 matmul runs at {ratio:.2f}x float32" + (f" ({have})" if have else "")
            section["note"] += (f": CPU bf16 autocast is not offered as a speed-up on {where}" if dev.type == "cpu"
                                else f": bf16 autocast is no speed-up on {where}")
        else:
            section["note"] = f"the bf16 matmul runs at {ratio:.2f}x float32 (bf16 training not timed: bf16='never')"
    load = {"before": load_before, "after": _load_average(), "cpu_count": os.cpu_count(),
            "note": "1-minute load averages of the whole machine: above the CPU count, other processes shared the "
                    "cores and every figure here is pessimistic (many small multi-threaded ops suffer most)"}
    return {"settings": {"quick": quick, "warmup": warmup, "steps": steps, "n_batches": n_batches, "seed": seed,
                         "timed": "optimiser steps (forward + backward + clipping + AdamW); ms_per_step = median, "
                                  "ms_per_step_min = fastest; data loading apart (data_ms_per_batch)"},
            "threads": torch.get_num_threads(), "load_average": load, "cpu": cpu, "matmul": matmul,
            "flops_source": FLOPS_SOURCE,
            "mfu": "flops.per_sample x samples_per_s / the float32 matmul rate (matmul.mfu_gflops, the faster of "
                   "matmul.float32, before the training steps, and matmul.float32_after); mfu_best from the fastest "
                   "step; a bf16 row's against the bf16 rate",
            "goal": {"preset": MFU_GOAL_PRESET, "mfu": MFU_GOAL}, "presets": rows, "bf16": section}


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def format_training_table(training: Mapping[str, Any]) -> str:
    """The training section as text: the matmul rates, then one row per preset (median ms/step)."""
    mm = training["matmul"]
    f32 = mm["float32"]
    line = f"matmul {f32['n']}x{f32['n']} on {training['threads']} threads: float32 {f32['gflops']:.1f} GFLOP/s"
    if mm.get("float32_after"):
        line += f" (after the steps {mm['float32_after']['gflops']:.1f}; MFU against {mm['mfu_gflops']:.1f})"
    if mm["bfloat16"]:
        b = mm["bfloat16"]
        line += (f" | bfloat16 {b['gflops']:.2f} GFLOP/s at {b['n']}x{b['n']} "
                 f"({mm['bf16_vs_fp32']:.2f}x float32 at that size)")
    head = (f"{'preset':<8}{'batch':>6}{'params':>9}{'GFLOP/step':>12}{'ms/step':>10}{'min ms':>9}"
            f"{'samples/s':>11}{'MFU':>7}{'MFU best':>10}{'matmul share':>14}")
    lines = [line, head, "-" * len(head)]
    for r in training["presets"]:
        for p, row in r["precisions"].items():
            share = r["profile"]["matmul_share"] if r.get("profile") else None
            label = r["preset"] if p == "fp32" else f"{r['preset']} {p}"
            lines.append(f"{label:<8}{r['batch_size']:>6}{r['parameters'] / 1e6:>8.2f}M"
                         f"{r['flops']['per_step'] / 1e9:>12.2f}{row['ms_per_step']:>10.1f}"
                         f"{row['ms_per_step_min']:>9.1f}{row['samples_per_s']:>11.1f}{_pct(row['mfu']):>7}"
                         f"{_pct(row['mfu_best']):>10}{_pct(share):>14}")
    bt = training["bf16"]["training"]
    if bt:
        fp, bf = bt["fp32"], bt["bf16"]
        lines.append(f"bf16 autocast vs fp32, {bt['preset']}, steps in turn: fp32 {fp['ms_per_step']:.1f} ms/step "
                     f"({fp['samples_per_s']:.1f} samples/s), bf16 {bf['ms_per_step']:.1f} ms/step "
                     f"({bf['samples_per_s']:.1f} samples/s): {bt['speedup']:.2f}x")
    return "\n".join(lines)


def training_summary(training: Mapping[str, Any]) -> list[str]:
    """One line per preset's MFU (with the goal), what limits it, and the bf16 verdict."""
    goal = training["goal"]
    lines = []
    for r in training["presets"]:
        row = r["precisions"].get("fp32") or next(iter(r["precisions"].values()))
        text = f"MFU {r['preset']} preset: {_pct(row['mfu'])}"
        if r["preset"] == goal["preset"]:
            text += f" (goal >= {_pct(goal['mfu'])})"
        lines.append(text + f"; {row['samples_per_s']:.0f} samples/s, {row['ms_per_step']:.0f} ms/step")
        prof = r.get("profile")
        if prof and row["mfu"] is not None and row["mfu"] < goal["mfu"]:
            top = ", ".join(f"{o['op']} {100 * o['share']:.0f} %" for o in prof["top_ops"][:4])
            lines.append(f"  {r['preset']}: {_pct(prof['outside_matmul_share'])} of a profiled step outside "
                         f"matmuls/convolutions; top ops: {top}")
    lines.append("bf16: " + training["bf16"]["note"])
    load = training.get("load_average") or {}
    busiest = max((v for v in (load.get("before"), load.get("after")) if v is not None), default=None)
    if busiest is not None and load.get("cpu_count") and busiest > load["cpu_count"]:
        lines.append(f"load average up to {busiest:.1f} on {load['cpu_count']} CPUs: other processes shared the cores, "
                     "so these throughputs and MFUs are pessimistic")
    return lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `python -m mmlite bench`."""
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (under a minute)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or mps (default: cpu)")
    p.add_argument("--out", default="runs/bench.json", help="where to write the figures (JSON)")
    p.add_argument("--presets", nargs="+", default=list(TRAINING_PRESETS), metavar="PRESET",
                   help="presets whose training throughput and MFU are measured (default: tiny small; "
                        "'none' skips the training section)")


def _presets_option(value: object) -> list[str]:
    if value is None:
        return list(TRAINING_PRESETS)
    names = [value] if isinstance(value, str) else list(value)
    if names == ["none"]:
        return []
    if "none" in names:
        raise ValueError(f"--presets none cannot be combined with presets, got {names}")
    return names


def run(args: argparse.Namespace) -> int:
    """Entry point of `python -m mmlite bench`: time, print the tables, write the JSON."""
    out = check_output_path(args.out, "--out", folder=False)  # before timing anything
    try:
        dev = get_device(args.device)  # a ValueError here already names the device
    except RuntimeError:  # torch.device("tpu") and other unknown names
        raise ValueError(f"--device must be cpu, cuda or mps, got {args.device!r}") from None
    presets = _check_presets(_presets_option(getattr(args, "presets", None)), dev, None)
    report = benchmark(quick=args.quick, device=dev)
    m = report["machine"]
    print(f"torch {m['torch']} | device {m['device']} | threads {m['threads']} | cpus {m['cpu_count']}")
    print(format_table(report))
    for line in target_summary(report):
        print(line)
    if presets:
        report["training"] = training_benchmark(presets, quick=args.quick, device=dev)
        print(format_training_table(report["training"]))
        for line in training_summary(report["training"]):
            print(line)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    except OSError as err:
        raise ValueError(f"--out {out}: could not write the figures: {err}") from None
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m mmlite.bench [options]`: the bench with every option of add_arguments."""
    parser = argparse.ArgumentParser(prog="python -m mmlite.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
