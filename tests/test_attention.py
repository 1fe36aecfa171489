"""Tests for mmlite.attention: oracles against PyTorch's attention, gradcheck, and masking properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmlite.attention import (
    CoAttention,
    CrossAttention,
    MultiHeadAttention,
    scaled_dot_product_attention,
    set_attention_impl,
)
from mmlite.utils import count_parameters

# float32 oracle tolerance: both sides do the same O(d + Tk) multiply-adds in a different order, so results
# differ by a few ulps of O(1) values (measured <= 1e-6); 1e-5 absolute / 1e-5 relative is ~80 ulps of margin.
F32 = dict(atol=1e-5, rtol=1e-5)
IMPLS = ["scratch", "fused"]


def _qkv(b=2, h=3, tq=5, tk=7, d=8, dv=6, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=g, dtype=dtype)
    k = torch.randn(b, h, tk, d, generator=g, dtype=dtype)
    v = torch.randn(b, h, tk, dv, generator=g, dtype=dtype)
    return q, k, v


def _key_mask(b, t, lengths):
    return torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]  # (B, T), True = real


# ---------------------------------------------------------------- scaled dot-product attention


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("use_mask,causal", [(False, False), (True, False), (False, True), (True, True)])
def test_sdpa_matches_torch(impl, use_mask, causal):
    q, k, v = _qkv()
    mask = None
    if use_mask:  # random pattern with key 0 always allowed, so no row is fully masked (torch would be NaN-free too)
        mask = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(1)) > 0.4
        mask[..., 0] = True
    out, w = scaled_dot_product_attention(q, k, v, mask=mask, causal=causal, impl=impl)
    if mask is not None and causal:
        ref_mask = mask & torch.ones(5, 7, dtype=torch.bool).tril()
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=ref_mask)
    else:
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    torch.testing.assert_close(out, ref, **F32)
    if impl == "fused":
        assert w is None
    else:  # weights against the textbook formula in float64
        s = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(8)
        allowed = torch.ones(5, 7, dtype=torch.bool) if mask is None else mask
        if causal:
            allowed = allowed & torch.ones(5, 7, dtype=torch.bool).tril()
        ref_w = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
        torch.testing.assert_close(w.double(), ref_w, **F32)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 5), **F32)


@pytest.mark.parametrize("impl", IMPLS)
def test_sdpa_fully_masked_rows_give_zeros_and_finite_grads(impl):
    q, k, v = _qkv()
    q.requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    mask[0, :, 2, :] = False  # one query row sees nothing
    mask[1] = False  # a whole example fully padded
    out, w = scaled_dot_product_attention(q, k, v, mask=mask, impl=impl)
    assert torch.isfinite(out).all()
    assert (out[0, :, 2] == 0).all() and (out[1] == 0).all()
    assert (out[0, :, [0, 1, 3, 4]].abs() > 0).any()
    if w is not None:
        assert (w[0, :, 2] == 0).all() and (w[1] == 0).all()
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[1] == 0).all()  # no gradient into the fully padded example


@pytest.mark.parametrize("impl", IMPLS)
def test_sdpa_large_logits_finite_and_one_hot(impl):
    q, k, v = _qkv(tq=4, tk=6)
    q = q * 1e4
    k = k * 1e4  # scores ~1e8: softmax must still be stable
    mask = torch.ones(2, 1, 4, 6, dtype=torch.bool)
    mask[..., -2:] = False
    out, _ = scaled_dot_product_attention(q, k, v, mask=mask, impl=impl)
    assert torch.isfinite(out).all()
    # at this scale softmax is one-hot on the best allowed key
    scores = (q @ k.transpose(-2, -1)).masked_fill(~mask, float("-inf"))
    best = scores.argmax(-1)  # (B, H, Tq)
    expected = torch.gather(v, 2, best[..., None].expand(-1, -1, -1, v.shape[-1]))
    torch.testing.assert_close(out, expected, **F32)


def test_sdpa_bf16_close_to_float32():
    q, k, v = _qkv(dtype=torch.bfloat16)
    out, w = scaled_dot_product_attention(q, k, v, causal=True)
    assert out.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
    ref, _ = scaled_dot_product_attention(q.float(), k.float(), v.float(), causal=True)
    # same (bf16-representable) inputs: the scores and softmax run in float32, so the only loss is the final
    # rounding of the output to bf16, a relative error <= 2**-8 (bf16 unit roundoff)
    torch.testing.assert_close(out.float(), ref, atol=1e-6, rtol=2**-8)
    # the fused path may compute in bf16 internally: ~8 roundings of 2**-8 each on O(1) values
    fused, _ = scaled_dot_product_attention(q, k, v, causal=True, impl="fused")
    assert fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), ref, atol=3e-2, rtol=3e-2)


def test_sdpa_gradcheck_float64():
    q, k, v = _qkv(b=1, h=2, tq=3, tk=4, d=3, dv=2, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, True]])[:, None, None, :].expand(1, 1, 3, 4)  # (1, 1, 3, 4)
    for t in (q, k, v):
        t.requires_grad_(True)

    def f(q_, k_, v_):
        return scaled_dot_product_attention(q_, k_, v_, mask=mask, causal=True)[0]

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_sdpa_dropout_uses_generator():
    q, k, v = _qkv()
    a, wa = scaled_dot_product_attention(q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(3))
    b, wb = scaled_dot_product_attention(q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(3))
    c, _ = scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    kept = wa[wa > 0]
    assert 0.3 < kept.numel() / wa.numel() < 0.7  # about half the weights survive p=0.5
    with pytest.raises(ValueError, match="generator"):
        scaled_dot_product_attention(q, k, v, dropout_p=0.5, impl="fused", generator=torch.Generator())


@pytest.mark.parametrize("p", [0.25, 0.5])
def test_sdpa_dropout_rescales_the_kept_weights_by_one_over_one_minus_p(p):
    q, k, v = _qkv()
    _, w = scaled_dot_product_attention(q, k, v)
    out, wd = scaled_dot_product_attention(q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(4))
    kept = wd > 0
    assert 0 < kept.sum() < kept.numel()
    # inverted dropout: each kept weight is divided by (1 - p), so E[weights] is the softmax itself
    torch.testing.assert_close(wd[kept], w[kept] / (1 - p), **F32)
    torch.testing.assert_close(out, wd @ v, **F32)  # the output uses the weights returned


def test_sdpa_errors_name_the_dimension():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="key last dim is 5 but query last dim is 8"):
        scaled_dot_product_attention(q, k[..., :5], v)
    with pytest.raises(ValueError, match="value length .* is 6 but key length is 7"):
        scaled_dot_product_attention(q, k, v[..., :6, :])
    with pytest.raises(ValueError, match=r"mask shape \(2, 1, 5, 6\)"):
        scaled_dot_product_attention(q, k, v, mask=torch.ones(2, 1, 5, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        scaled_dot_product_attention(q, k, v, mask=torch.ones(2, 1, 5, 7))
    with pytest.raises(ValueError, match="at least 2 dims"):
        scaled_dot_product_attention(torch.randn(8), k, v)
    with pytest.raises(ValueError, match="impl"):
        scaled_dot_product_attention(q, k, v, impl="flash")


# ---------------------------------------------------------------- multi-head attention vs torch


def _torch_mha(d_model, n_heads, d_context=None, bias=True, seed=0):
    torch.manual_seed(seed)
    kw = {} if d_context is None else dict(kdim=d_context, vdim=d_context)
    return torch.nn.MultiheadAttention(d_model, n_heads, bias=bias, batch_first=True, **kw).eval()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bias", [True, False])
def test_mha_self_attention_matches_torch(impl, bias):
    ref = _torch_mha(16, 4, bias=bias)
    mha = MultiHeadAttention(16, 4, bias=bias, impl=impl).copy_from_torch(ref).eval()
    x = torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(0))
    mask = _key_mask(3, 6, [6, 4, 1])
    out = mha(x, mask=mask)
    ref_out, ref_w = ref(x, x, x, key_padding_mask=~mask, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(out, ref_out, **F32)
    out2, w = mha(x, mask=mask, need_weights=True)
    assert w.shape == (3, 4, 6, 6)
    torch.testing.assert_close(out2, ref_out, **F32)
    torch.testing.assert_close(w, ref_w, **F32)
    assert count_parameters(mha) == count_parameters(ref)


@pytest.mark.parametrize("impl", IMPLS)
def test_mha_cross_attention_matches_torch(impl):
    ref = _torch_mha(16, 2, d_context=10)
    mha = CrossAttention(16, 2, d_context=10, impl=impl).copy_from_torch(ref).eval()
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 16, generator=g), torch.randn(2, 9, 10, generator=g)
    cmask = _key_mask(2, 9, [9, 3])
    out, w = mha(x, ctx, context_mask=cmask, need_weights=True)
    ref_out, ref_w = ref(x, ctx, ctx, key_padding_mask=~cmask, average_attn_weights=False)
    torch.testing.assert_close(out, ref_out, **F32)
    torch.testing.assert_close(w, ref_w, **F32)
    torch.testing.assert_close(mha(x, ctx, context_mask=cmask), ref_out, **F32)


def test_mha_causal_matches_torch_and_impls_agree():
    ref = _torch_mha(12, 3)
    mha = MultiHeadAttention(12, 3).copy_from_torch(ref).eval()
    x = torch.randn(2, 5, 12)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(5)
    ref_out, _ = ref(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
    scratch = mha(x, causal=True)
    mha.impl = "fused"  # same weights, other path
    fused = mha(x, causal=True)
    torch.testing.assert_close(scratch, ref_out, **F32)
    torch.testing.assert_close(fused, scratch, **F32)


def test_mha_gradcheck_float64():
    torch.manual_seed(0)
    mha = MultiHeadAttention(4, 2, d_context=3).double()
    x = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(1, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c: mha(a, context=c), (x, ctx))


@pytest.mark.parametrize("impl", IMPLS)
def test_mha_padded_values_do_not_leak(impl):
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2, impl=impl).eval()
    x = torch.randn(2, 6, 8)
    mask = _key_mask(2, 6, [4, 6])
    y = x.clone()
    y[0, 4:] = 1e3 * torch.randn(2, 8)  # change only the padded positions
    a, b = mha(x, mask=mask), mha(y, mask=mask)
    torch.testing.assert_close(a[0, :4], b[0, :4], rtol=0, atol=1e-6)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    assert not torch.allclose(a[0, 4:], b[0, 4:])  # the padded queries themselves did change


def test_mha_dropout_off_in_eval_is_deterministic():
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2, dropout=0.5)
    x = torch.randn(2, 5, 8)
    mha.train()
    assert not torch.allclose(mha(x), mha(x))  # dropout active
    mha.eval()
    torch.testing.assert_close(mha(x), mha(x), rtol=0, atol=0)


def test_mha_errors_name_the_dimension():
    with pytest.raises(ValueError, match="d_model=10 is not divisible by n_heads=4"):
        MultiHeadAttention(10, 4)
    mha = MultiHeadAttention(64, 4, d_context=32)
    with pytest.raises(ValueError, match="x last dim is 48 but the module was built for d_model=64"):
        mha(torch.randn(2, 3, 48))
    with pytest.raises(ValueError, match=r"rank 2"):
        mha(torch.randn(3, 64))
    with pytest.raises(ValueError, match="context last dim is 64 but the module was built for d_context=32"):
        mha(torch.randn(2, 3, 64), context=torch.randn(2, 5, 64))
    with pytest.raises(ValueError, match=r"context_mask shape \(2, 4\) does not match .* \(2, 5\)"):
        mha(torch.randn(2, 3, 64), context=torch.randn(2, 5, 32), context_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="context batch size is 1 but x batch size is 2"):
        mha(torch.randn(2, 3, 64), context=torch.randn(1, 5, 32))
    with pytest.raises(ValueError, match="impl"):
        mha.impl = "flash"
    with pytest.raises(ValueError, match="kdim=64"):
        mha.copy_from_torch(torch.nn.MultiheadAttention(64, 4))


# ---------------------------------------------------------------- co-attention


def test_coattention_is_two_cross_attentions():
    torch.manual_seed(0)
    co = CoAttention(16, 4, d_other=8).eval()
    g = torch.Generator().manual_seed(2)
    x1, x2 = torch.randn(2, 5, 16, generator=g), torch.randn(2, 3, 8, generator=g)
    m1, m2 = _key_mask(2, 5, [5, 2]), _key_mask(2, 3, [1, 3])
    o1, o2, w12, w21 = co(x1, x2, m1, m2, need_weights=True)
    assert o1.shape == (2, 5, 16) and o2.shape == (2, 3, 8)
    assert w12.shape == (2, 4, 5, 3) and w21.shape == (2, 4, 3, 5)
    torch.testing.assert_close(o1, co.attn_1to2(x1, x2, context_mask=m2), **F32)
    torch.testing.assert_close(o2, co.attn_2to1(x2, x1, context_mask=m1), **F32)
    assert (w12[0, :, :, 1:] == 0).all() and (w21[1, :, :, 2:] == 0).all()  # masked keys get no weight
    assert set_attention_impl(co, "fused") == 2  # both directions
    f1, f2 = co(x1, x2, m1, m2)
    torch.testing.assert_close(f1, o1, **F32)
    torch.testing.assert_close(f2, o2, **F32)


@pytest.mark.parametrize("args", [(8, 0), (8, -2), (0, 2), (8, 2, 0)])
def test_coattention_rejects_non_positive_sizes(args):
    with pytest.raises(ValueError, match="must be positive"):
        CoAttention(*args)


def test_set_attention_impl_switches_every_module():
    model = torch.nn.Sequential(MultiHeadAttention(8, 2), CoAttention(8, 2))
    assert set_attention_impl(model, "fused") == 3
    assert all(m.impl == "fused" for m in model.modules() if isinstance(m, MultiHeadAttention))


def test_masked_scratch_attention_runs_under_cpu_bf16_autocast():
    """Under autocast the scores come out in bfloat16: the mask fill value must fit that dtype (it once overflowed)."""
    from mmlite.attention import MultiHeadAttention

    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 2)
    x = torch.randn(3, 5, 16)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False], [True] + [False] * 4])
    expected = attn(x, mask=mask, causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attn(x, mask=mask, causal=True)
    assert got.dtype == torch.bfloat16 and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.float(), expected, atol=0.05, rtol=0.05)  # bf16 keeps ~3 significant digits
