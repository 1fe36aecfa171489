"""Tests for mmlite.metrics.efficiency: parameter counts, analytic FLOPs == FlopCounterMode, latency and memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmlite.attention import MultiHeadAttention, set_attention_impl
from mmlite.blocks import DecoderBlock, EncoderBlock, FeedForward
from mmlite.encoders import GRU, CNNEncoder, TransformerTextEncoder, ViTEncoder
from mmlite.metrics.efficiency import (Latency, PeakMemory, attention_flops, cnn_encoder_flops, decoder_block_flops,
                                       encoder_block_flops, feed_forward_flops, gru_flops, latency, linear_flops,
                                       measured_flops,
                                       parameter_count, peak_memory, training_flops_rule,
                                       transformer_text_encoder_flops, vit_encoder_flops)

# FLOP counts are integers computed from shapes: analytic and measured must agree exactly.
IMPLS = ("scratch", "fused")


def test_parameter_count():
    lin = nn.Linear(4, 3)
    assert parameter_count(lin) == {"total": 15, "trainable": 15}
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    assert parameter_count(model) == {"total": 15 + 8, "trainable": 3 + 8}
    shared = nn.Sequential(lin, lin)  # a shared module counts once
    assert parameter_count(shared)["total"] == 15
    block = EncoderBlock(32, 4)  # 4 (d^2 + d) attention + 2 LayerNorms (2d each) + FFN (d*4d + 4d + 4d*d + d)
    d = 32
    assert parameter_count(block)["total"] == 4 * (d * d + d) + 2 * 2 * d + (8 * d * d + 5 * d)
    with pytest.raises(ValueError, match="nn.Module"):
        parameter_count(lin.weight)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("b,t,d,heads", [(2, 5, 16, 2), (3, 17, 32, 4), (1, 9, 48, 3)])
def test_attention_and_blocks_analytic_equals_measured(impl, b, t, d, heads):
    torch.manual_seed(0)
    x = torch.randn(b, t, d)
    mha = MultiHeadAttention(d, heads, impl=impl)
    assert measured_flops(mha, x).forward == attention_flops(b, t, t, d)
    cross = MultiHeadAttention(d, heads, d_context=24, impl=impl)
    ctx = torch.randn(b, 7, 24)
    assert measured_flops(lambda q, c: cross(q, context=c), x, ctx).forward == attention_flops(b, t, 7, d, 24)
    assert measured_flops(FeedForward(d, 3 * d), x).forward == feed_forward_flops(b, t, d, 3 * d)
    assert measured_flops(EncoderBlock(d, heads, impl=impl), x).forward == encoder_block_flops(b, t, d)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, -2:] = False  # a key mask changes no matmul size
    assert measured_flops(lambda y: EncoderBlock(d, heads, impl=impl)(y, mask=mask), x).forward == \
        encoder_block_flops(b, t, d)
    dec = DecoderBlock(d, heads, d_context=24, ff_hidden=2 * d, impl=impl)
    assert measured_flops(dec, x, ctx).forward == decoder_block_flops(b, t, 7, d, 24, 2 * d)


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
@pytest.mark.parametrize("b,size,width,depth", [(2, 32, 8, 3), (1, 64, 16, 2), (3, 16, 4, 1)])
def test_cnn_encoder_analytic_equals_measured(norm, b, size, width, depth):
    enc = CNNEncoder(width=width, d_model=24, depth=depth, norm=norm).eval()
    assert measured_flops(enc, torch.rand(b, 3, size, size)).forward == cnn_encoder_flops(enc, b, size)


@pytest.mark.parametrize("impl", IMPLS)
def test_vit_text_encoder_and_gru_analytic_equals_measured(impl):
    vit = ViTEncoder(image_size=32, patch_size=8, d_model=32, depth=2, n_heads=4, impl=impl)
    assert measured_flops(vit, torch.rand(3, 3, 32, 32)).forward == vit_encoder_flops(vit, 3)
    for pool in ("cls", "mean"):
        txt = TransformerTextEncoder(50, d_model=32, depth=2, n_heads=4, pool=pool, impl=impl)
        ids = torch.randint(1, 50, (4, 11))
        assert measured_flops(txt, ids).forward == transformer_text_encoder_flops(txt, 4, 11)
    gru = GRU(12, 20, num_layers=2)
    assert measured_flops(gru, torch.randn(3, 6, 12)).forward == gru_flops(3, 6, 12, 20, 2)


def test_both_attention_paths_count_alike_forward():
    model = EncoderBlock(32, 4)
    x = torch.randn(2, 10, 32)
    counts = {}
    for impl in IMPLS:
        set_attention_impl(model, impl)
        counts[impl] = measured_flops(model, x).forward
    assert counts["scratch"] == counts["fused"] == encoder_block_flops(2, 10, 32)


def test_training_flops_against_the_three_times_rule():
    x = torch.randn(2, 10, 32, requires_grad=True)  # input needs a gradient: every matmul has 2 backward matmuls
    block = EncoderBlock(32, 4, impl="scratch")
    f = measured_flops(block, x, backward=True)
    assert f.total == training_flops_rule(f.forward) == 3 * encoder_block_flops(2, 10, 32)
    # fused: the attention kernel's backward recomputes Q K^T: 5 attention matmuls instead of 4
    fused = measured_flops(EncoderBlock(32, 4, impl="fused"), x, backward=True)
    attn_matmuls = 2 * (2 * 2 * 10 * 10 * 32)
    assert fused.total == 3 * f.forward + attn_matmuls // 2
    # an image encoder: the first conv computes no input gradient, so training < 3x forward
    enc = CNNEncoder(width=8, d_model=16, depth=2, norm="batch")
    img = torch.rand(2, 3, 32, 32)
    c = measured_flops(enc, img, backward=True)
    first_conv = 2 * 2 * 8 * 16 * 16 * 3 * 9
    assert c.total == 3 * c.forward - first_conv
    assert 2.85 < c.total / c.forward < 2.9  # 2.87: the first conv is 12.6 % of this small encoder's forward
    assert all(p.grad is None for p in enc.parameters())  # measuring leaves no gradients behind
    assert "aten.convolution_backward" in c.by_op


def test_flops_bad_input():
    with pytest.raises(ValueError, match="requires a gradient"):
        measured_flops(lambda y: y.detach() * 2, torch.randn(3), backward=True)
    with pytest.raises(ValueError, match="positive integers"):
        linear_flops(2, 0, 4, 4)
    with pytest.raises(ValueError, match="positive integers"):
        attention_flops(2, 3, 3, 16, d_context=-1)


def test_latency_structure_and_validation():
    lin = nn.Linear(8, 4)
    res = latency(lin, lambda n: (torch.randn(n, 8),), batch_sizes=[1, 4], repeats=3, warmup=1)
    assert [r.batch_size for r in res] == [1, 4] and all(isinstance(r, Latency) for r in res)
    assert all(len(r.times_s) == 3 and r.median_s >= 0 and r.throughput > 0 for r in res)
    seen = []
    latency(lambda x: seen.append(torch.is_grad_enabled()), lambda n: (torch.randn(n),), [2], repeats=2, warmup=1)
    assert seen == [False, False, False]  # warm-up + repeats, under no_grad by default
    with pytest.raises(ValueError, match="batch_sizes"):
        latency(lin, lambda n: (torch.randn(n, 8),), batch_sizes=[0])
    with pytest.raises(ValueError, match="repeats"):
        latency(lin, lambda n: (torch.randn(n, 8),), batch_sizes=[1], repeats=0)
    with pytest.raises(ValueError, match="device must be one of"):
        latency(lin, lambda n: (torch.randn(n, 8),), batch_sizes=[1], device="tpu")
    with pytest.raises(ValueError, match="callable"):
        latency(lin, (torch.randn(1, 8),), batch_sizes=[1])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            latency(lin, lambda n: (torch.randn(n, 8),), batch_sizes=[1], device="cuda")


def test_peak_memory_cpu():
    def work() -> None:
        big = torch.ones(16 * 2**20)  # 64 MiB, every page written
        big.sum()

    m = peak_memory(work)
    assert isinstance(m, PeakMemory) and m.peak_bytes > 0
    if "peak of this call" in m.source:  # the peak could be reset: this call's growth is visible
        assert m.delta_bytes >= 0.8 * 64 * 2**20
    with pytest.raises(ValueError, match="device must be one of"):
        peak_memory(work, device="xla")


def test_model_flops_utilisation():
    from mmlite.metrics.efficiency import model_flops_utilisation

    # 6 B in out FLOPs per step of B samples: 6 in out per sample; 100 samples/s against a 1 GFLOP/s peak
    per_sample = 6 * 64 * 32
    assert model_flops_utilisation(per_sample, 100.0, 1e9) == pytest.approx(per_sample * 100 / 1e9)
    assert model_flops_utilisation(2e9, 10.0, 4e10) == pytest.approx(0.5)
    assert model_flops_utilisation(0, 10.0, 1e9) == 0.0
    for bad in [(-1, 1.0, 1.0), (1.0, float("nan"), 1.0), (1.0, 1.0, 0), (1.0, 1.0, float("inf")), (True, 1.0, 1.0),
                ("1", 1.0, 1.0)]:
        with pytest.raises(ValueError):
            model_flops_utilisation(*bad)
