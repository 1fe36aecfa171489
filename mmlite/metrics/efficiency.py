"""Efficiency: parameter counts, analytic and measured FLOPs, latency and peak memory (chapter 8 onward).

FLOPs count a multiply and an add as 2: a matmul (m, k) @ (k, n) costs 2mkn, the convention of
torch.utils.flop_counter.FlopCounterMode, which counts matmul (mm, addmm, bmm, baddbmm), convolution and
fused attention kernels, forward and backward, and nothing else: bias adds, softmax, LayerNorm,
BatchNorm, GELU/ReLU, dropout, residual adds and embeddings are free. The analytic functions below follow
the same convention, so analytic == measured exactly for the library's modules. On a CPU PyTorch's fused
attention runs a kernel FlopCounterMode does not know (aten._scaled_dot_product_flash_attention_for_cpu);
measured_flops registers it with the same formula, so impl="scratch" and impl="fused" count alike forward.
Backward, the fused kernel recomputes the scores (5 attention matmuls instead of 4): the usual "training =
3 x forward" rule is exact for matmuls whose input needs a gradient, is lower for a first layer whose input
does not (no input gradient), and the fused attention matmuls cost 3.5 x.
"""

from __future__ import annotations

import math
import resource
import statistics
import sys
import time
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

# ----------------------------------------------------------------------------------- parameters


def parameter_count(module: nn.Module) -> dict[str, int]:
    """{"total": every parameter (shared ones once), "trainable": those with requires_grad}."""
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    params = list(module.parameters())
    return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}


# ----------------------------------------------------------------------------------- analytic FLOPs
def _sizes(*sizes: int) -> None:
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
        raise ValueError(f"sizes must be positive integers, got {sizes}")


def linear_flops(b: int, t: int, d_in: int, d_out: int) -> int:
    """nn.Linear on (b, t, d_in): 2 b t d_in d_out (the bias add is not counted)."""
    _sizes(b, t, d_in, d_out)
    return 2 * b * t * d_in * d_out


def attention_flops(b: int, t_q: int, t_k: int, d_model: int, d_context: int | None = None) -> int:
    """MultiHeadAttention: q, k, v, out projections + Q K^T and A V (2 b t_q t_k d_model each, whatever the heads)."""
    d_context = d_model if d_context is None else d_context
    proj = linear_flops(b, t_q, d_model, d_model) * 2 + linear_flops(b, t_k, d_context, d_model) * 2
    return proj + 2 * (2 * b * t_q * t_k * d_model)


def feed_forward_flops(b: int, t: int, d_model: int, hidden: int) -> int:
    """FeedForward: two linears, d_model -> hidden -> d_model."""
    return linear_flops(b, t, d_model, hidden) + linear_flops(b, t, hidden, d_model)


def encoder_block_flops(b: int, t: int, d_model: int, ff_hidden: int | None = None) -> int:
    """EncoderBlock: self-attention over t tokens + feed-forward (hidden 4 d_model by default)."""
    return attention_flops(b, t, t, d_model) + feed_forward_flops(b, t, d_model, ff_hidden or 4 * d_model)


def decoder_block_flops(b: int, t: int, t_context: int, d_model: int, d_context: int | None = None,
                        ff_hidden: int | None = None) -> int:
    """DecoderBlock: causal self-attention (the masked half is still computed) + cross-attention + feed-forward."""
    return (attention_flops(b, t, t, d_model) + attention_flops(b, t, t_context, d_model, d_context)
            + feed_forward_flops(b, t, d_model, ff_hidden or 4 * d_model))


def conv2d_flops(b: int, c_in: int, c_out: int, h_out: int, w_out: int, kernel: int) -> int:
    """nn.Conv2d (groups=1): 2 b c_out h_out w_out c_in kernel^2 (padding positions are counted, as computed)."""
    _sizes(b, c_in, c_out, h_out, w_out, kernel)
    return 2 * b * c_out * h_out * w_out * c_in * kernel * kernel


def cnn_encoder_flops(encoder: nn.Module, b: int, image_size: int) -> int:
    """CNNEncoder on (b, C, S, S): per stage a 3x3 stride-2 and a 3x3 conv at side S / 2^(i+1), then a 1x1 conv."""
    total, c_in = 0, encoder.in_channels
    for i, c_out in enumerate(encoder.level_channels):
        side = image_size // 2 ** (i + 1)
        total += conv2d_flops(b, c_in, c_out, side, side, 3) + conv2d_flops(b, c_out, c_out, side, side, 3)
        c_in = c_out
    side = encoder.grid_size(image_size)
    return total + conv2d_flops(b, c_in, encoder.d_model, side, side, 1)


def vit_encoder_flops(encoder: nn.Module, b: int) -> int:
    """ViTEncoder: patch embedding (a P x P stride-P conv) + its blocks over 1 + N tokens."""
    pe = encoder.patch_embed
    g, d = pe.grid_size, encoder.d_model
    total = conv2d_flops(b, pe.in_channels, d, g, g, pe.patch_size)
    return total + sum(encoder_block_flops(b, 1 + pe.num_patches, d, blk.ff.linear1.out_features)
                       for blk in encoder.stack.blocks)


def transformer_text_encoder_flops(encoder: nn.Module, b: int, t: int) -> int:
    """TransformerTextEncoder on (b, t) ids: its blocks over t tokens (+1 with pool="cls"); embeddings are free."""
    t = t + (encoder.cls_token is not None)
    return sum(encoder_block_flops(b, t, encoder.d_model, blk.ff.linear1.out_features)
               for blk in encoder.stack.blocks)


def gru_flops(b: int, t: int, input_size: int, hidden: int, num_layers: int = 1) -> int:
    """GRU: per layer one input projection over all steps (d_in -> 3H) and one recurrent matmul per step (H -> 3H)."""
    total = 0
    for layer in range(num_layers):
        d_in = input_size if layer == 0 else hidden
        total += linear_flops(b, t, d_in, 3 * hidden) + linear_flops(b, t, hidden, 3 * hidden)
    return total


# ----------------------------------------------------------------------------------- measured FLOPs
class FlopCount(NamedTuple):
    """FLOPs measured by FlopCounterMode."""

    forward: int
    backward: int  # 0 unless measured with backward=True
    by_op: dict[str, int]  # forward + backward FLOPs per aten op

    @property
    def total(self) -> int:
        return self.forward + self.backward


def _cpu_sdpa_forward(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    b, h, t_q, d = q
    return 2 * b * h * t_q * k[2] * d + 2 * b * h * t_q * k[2] * v[3]  # Q K^T and A V


def _cpu_sdpa_backward(grad_out: Any, q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None,
                       **kwargs: Any) -> int:
    b, h, t_q, d = q
    t_k, d_v = k[2], v[3]
    # recompute Q K^T; dA = dO V^T; dV = A^T dO; dQ = dS K; dK = dS^T Q
    return 2 * b * h * t_q * t_k * (d + d_v + d_v + d + d)


def _custom_mapping() -> dict:
    ops = torch.ops.aten
    mapping = {}
    if hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[ops._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_forward
    if hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[ops._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward
    return mapping


def _tensors(x: Any) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _tensors(item)]
    if isinstance(x, dict):
        return [t for item in x.values() for t in _tensors(item)]
    if hasattr(x, "__dataclass_fields__"):
        return [t for name in x.__dataclass_fields__ for t in _tensors(getattr(x, name))]
    return []


def measured_flops(module: Callable[..., Any], *inputs: Any, backward: bool = False) -> FlopCount:
    """Run module(*inputs) under FlopCounterMode; with backward=True also backpropagate the sum of its outputs.

    `module` is an nn.Module or any callable; an nn.Module's .grad fields are restored afterwards, so
    measuring leaves it as it was.
    """
    from torch.utils.flop_counter import FlopCounterMode

    params = list(module.parameters()) if isinstance(module, nn.Module) else []
    saved = [p.grad for p in params]
    try:
        with FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
            with torch.set_grad_enabled(backward or torch.is_grad_enabled()):
                out = module(*inputs)
            forward = counter.get_total_flops()
            if backward:
                loss = sum(t.sum() for t in _tensors(out) if t.requires_grad)
                if not isinstance(loss, Tensor):
                    raise ValueError("backward=True but no output requires a gradient")
                loss.backward()
        by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
        total = counter.get_total_flops()
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    return FlopCount(int(forward), int(total - forward), by_op)


def training_flops_rule(forward_flops: int) -> int:
    """The usual estimate of one training step's FLOPs: 3 x forward (backward = 2 x forward). Kaplan et al. (2020)."""
    return 3 * forward_flops


def model_flops_utilisation(flops_per_sample: float, samples_per_s: float, peak_flops_per_s: float) -> float:
    """Model FLOP utilisation (MFU): the FLOPs per second the model's own arithmetic achieves, as a share of a peak.

    flops_per_sample * samples_per_s / peak_flops_per_s, where flops_per_sample counts one training step's
    forward + backward (e.g. measured_flops(..., backward=True).total / batch size) and the peak is a rate the
    machine reaches, e.g. a large float32 matmul measured on it. Work the model does not need (recomputation,
    the optimizer's element-wise update) is not in the numerator, so the result is <= 1 on an honest peak.
    """
    for name, value in (("flops_per_sample", flops_per_sample), ("samples_per_s", samples_per_s),
                        ("peak_flops_per_s", peak_flops_per_s)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if peak_flops_per_s == 0:
        raise ValueError("peak_flops_per_s must be > 0")
    return flops_per_sample * samples_per_s / peak_flops_per_s


# ----------------------------------------------------------------------------------- time and memory
DEVICES = ("cpu", "cuda", "mps")


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}") from None
    if dev.type not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' requested but torch.backends.mps.is_available() is False")
    return dev


def _synchronize(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()


def _to(x: Any, dev: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(dev)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(item, dev) for item in x)
    if isinstance(x, dict):
        return {k: _to(v, dev) for k, v in x.items()}
    return x


class Latency(NamedTuple):
    """Timings of one batch size."""

    batch_size: int
    median_s: float  # median seconds per call
    throughput: float  # examples per second, batch_size / median_s
    times_s: tuple[float, ...]  # every timed call


def latency(fn: Callable[..., Any], inputs: Callable[[int], Sequence[Any]], batch_sizes: Sequence[int],
            repeats: int = 20, warmup: int = 3, device: str | torch.device = "cpu", grad: bool = False,
            ) -> list[Latency]:
    """Median wall time of fn(*inputs(batch_size)) per batch size, after `warmup` untimed calls.

    `inputs(batch_size)` builds the arguments (tensors are moved to `device` before timing). Each call is
    timed with time.perf_counter between device synchronisations (CUDA, MPS), so queued kernels are included.
    Without grad the calls run under torch.no_grad(). The median resists the outliers of a shared machine.
    """
    dev = _device(device)
    if not callable(inputs):
        raise ValueError("inputs must be a callable: batch_size -> the arguments of fn")
    sizes = list(batch_sizes)
    if not sizes or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
        raise ValueError(f"batch_sizes must be a non-empty sequence of positive integers, got {batch_sizes!r}")
    if not isinstance(repeats, int) or repeats < 1 or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0 (integers), got {repeats!r} and {warmup!r}")
    results = []
    for size in sizes:
        args = _to(tuple(inputs(size)), dev)
        times = []
        with torch.set_grad_enabled(grad):
            for i in range(warmup + repeats):
                _synchronize(dev)
                start = time.perf_counter()
                fn(*args)
                _synchronize(dev)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
        median = statistics.median(times)
        results.append(Latency(size, median, size / median if median > 0 else math.inf, tuple(times)))
    return results


class PeakMemory(NamedTuple):
    """Peak memory of one call."""

    peak_bytes: int  # CUDA: max allocated during the call; CPU: the process's peak resident set size
    delta_bytes: int  # peak minus what was in use before the call
    source: str  # where the number comes from (see peak_memory)


def _proc_status(field: str) -> int | None:
    """A memory field of /proc/self/status (Linux) in bytes, or None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # the file gives kB
    except OSError:
        pass
    return None


def _reset_cpu_peak() -> bool:
    try:  # Linux >= 4.0: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], Any], device: str | torch.device = "cpu") -> PeakMemory:
    """Peak memory while running fn().

    cuda: torch.cuda.max_memory_allocated after reset_peak_memory_stats, tensors allocated by PyTorch only
    (not the CUDA context, not other processes). cpu: the process-wide peak resident set size (VmHWM in
    /proc/self/status, reset before the call where /proc/self/clear_refs allows, else ru_maxrss, the peak since
    the process started, so an earlier larger peak hides this call's); it counts every allocation of the
    process, Python and other threads included, so read it as an upper bound. mps: no peak counter exists;
    the memory allocated after the call is reported.
    """
    dev = _device(device)
    if dev.type == "cuda":
        _synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        _synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        return PeakMemory(int(peak), int(peak - before), "torch.cuda.max_memory_allocated")
    if dev.type == "mps":
        before = torch.mps.current_allocated_memory()
        fn()
        _synchronize(dev)
        after = torch.mps.current_allocated_memory()
        return PeakMemory(int(after), int(after - before), "torch.mps.current_allocated_memory (after, not a peak)")
    before = _proc_status("VmRSS")
    was_reset = _reset_cpu_peak()
    fn()
    peak, source = _proc_status("VmHWM"), "VmHWM"
    if peak is None:  # no /proc: ru_maxrss is in bytes on macOS, KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        source = "ru_maxrss"
    source += " (peak of this call)" if was_reset and source == "VmHWM" else " (peak since the process started)"
    return PeakMemory(int(peak), int(peak - before) if before is not None else 0, source)
