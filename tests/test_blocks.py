"""Tests for mmlite.blocks: feed-forward and pre-norm encoder/decoder blocks against PyTorch's layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmlite.attention import set_attention_impl
from mmlite.blocks import DecoderBlock, EncoderBlock, FeedForward, TransformerStack
from mmlite.utils import count_parameters

# float32 oracle tolerance: a block is ~10 ops (2 LayerNorms, 4-8 matmuls, softmax, GELU) computed in a different
# order than PyTorch's fused kernels; measured differences are <= 1e-6 on O(1) activations, so 1e-5 leaves margin.
F32 = dict(atol=1e-5, rtol=1e-5)
IMPLS = ["scratch", "fused"]


def _key_mask(t, lengths):
    return torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]  # (B, T), True = real


def test_feedforward_formula_and_default_width():
    torch.manual_seed(0)
    ff = FeedForward(8, activation="relu")
    assert ff.linear1.out_features == 32  # 4 * d_model
    x = torch.randn(2, 3, 8)
    expected = ff.linear2(F.relu(ff.linear1(x)))
    torch.testing.assert_close(ff(x), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="activation"):
        FeedForward(8, activation="swish")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_encoder_block_matches_torch(impl, activation):
    torch.manual_seed(0)
    ref = torch.nn.TransformerEncoderLayer(16, 4, dim_feedforward=24, dropout=0.0, activation=activation,
                                           norm_first=True, batch_first=True).eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters so that copying them is tested
        ref.norm1.weight.uniform_(0.5, 1.5)
        ref.norm2.bias.normal_()
    blk = EncoderBlock(16, 4, ff_hidden=24, impl=impl, activation=activation).copy_from_torch(ref).eval()
    assert count_parameters(blk) == count_parameters(ref)
    x = torch.randn(3, 6, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    mask = _key_mask(6, [6, 3, 5])
    out = blk(x, mask=mask)
    ref_out = ref(x_ref, src_key_padding_mask=~mask)
    torch.testing.assert_close(out, ref_out, **F32)
    out.square().sum().backward()
    ref_out.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **F32)


@pytest.mark.parametrize("impl", IMPLS)
def test_decoder_block_matches_torch(impl):
    torch.manual_seed(0)
    ref = torch.nn.TransformerDecoderLayer(16, 2, dim_feedforward=32, dropout=0.0, activation="gelu",
                                           norm_first=True, batch_first=True).eval()
    blk = DecoderBlock(16, 2, ff_hidden=32, impl=impl).copy_from_torch(ref).eval()
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 5, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    mask, cmask = _key_mask(5, [5, 4]), _key_mask(7, [3, 7])
    causal = torch.nn.Transformer.generate_square_subsequent_mask(5)
    # torch warns that a float causal mask and a bool padding mask are mixed; the result is the same
    causal_bool = ~torch.ones(5, 5, dtype=torch.bool).tril()  # True = blocked (torch's convention)
    ref_out = ref(x, ctx, tgt_mask=causal_bool, tgt_key_padding_mask=~mask, memory_key_padding_mask=~cmask)
    torch.testing.assert_close(blk(x, ctx, mask=mask, context_mask=cmask), ref_out, **F32)
    ref_nomask = ref(x, ctx, tgt_mask=causal, tgt_is_causal=True)
    torch.testing.assert_close(blk(x, ctx), ref_nomask, **F32)


def test_decoder_block_is_causal_and_takes_other_context_width():
    torch.manual_seed(0)
    blk = DecoderBlock(8, 2, d_context=12).eval()
    x, ctx = torch.randn(2, 6, 8), torch.randn(2, 4, 12)
    y = x.clone()
    y[:, 3:] = torch.randn(2, 3, 8)  # change the future
    a, b = blk(x, ctx), blk(y, ctx)
    assert a.shape == (2, 6, 8)
    torch.testing.assert_close(a[:, :3], b[:, :3], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_encoder_block_padding_does_not_leak():
    torch.manual_seed(0)
    blk = EncoderBlock(8, 2).eval()
    x = torch.randn(2, 5, 8)
    mask = _key_mask(5, [3, 5])
    y = x.clone()
    y[0, 3:] = 100 * torch.randn(2, 8)
    torch.testing.assert_close(blk(x, mask)[0, :3], blk(y, mask)[0, :3], rtol=0, atol=1e-6)


def test_dropout_eval_deterministic_train_random():
    torch.manual_seed(0)
    blk = EncoderBlock(8, 2, dropout=0.3)
    x = torch.randn(2, 4, 8)
    blk.train()
    assert not torch.allclose(blk(x), blk(x))
    blk.eval()
    torch.testing.assert_close(blk(x), blk(x), rtol=0, atol=0)


def test_impl_switch_and_copy_errors():
    blk = DecoderBlock(8, 2)
    assert set_attention_impl(blk, "fused") == 2  # the one call that switches a whole module tree
    assert blk.self_attn.impl == blk.cross_attn.impl == "fused"
    assert "impl" not in vars(blk) and not hasattr(type(blk), "impl")  # no forwarding property to drift
    post_norm = torch.nn.TransformerEncoderLayer(8, 2, 32, norm_first=False, batch_first=True)
    with pytest.raises(ValueError, match="norm_first=False"):
        EncoderBlock(8, 2).copy_from_torch(post_norm)
    relu = torch.nn.TransformerEncoderLayer(8, 2, 32, norm_first=True, batch_first=True)  # relu by default
    with pytest.raises(ValueError, match="activation is relu"):
        EncoderBlock(8, 2).copy_from_torch(relu)
    with pytest.raises(ValueError, match="dim_feedforward=16 but ff_hidden=32"):
        EncoderBlock(8, 2, activation="relu").copy_from_torch(
            torch.nn.TransformerEncoderLayer(8, 2, 16, norm_first=True, batch_first=True))
    with pytest.raises(ValueError, match="x last dim is 6 but the block was built for d_model=8"):
        EncoderBlock(8, 2)(torch.randn(1, 3, 6))
    with pytest.raises(ValueError, match="context last dim is 8 but the block was built for d_context=4"):
        DecoderBlock(8, 2, d_context=4)(torch.randn(1, 3, 8), torch.randn(1, 2, 8))


# --------------------------------------------------------------------------- the one stack
def _torch_stack(depth, with_context):
    layer = (torch.nn.TransformerDecoderLayer if with_context else torch.nn.TransformerEncoderLayer)(
        16, 4, dim_feedforward=32, dropout=0.0, activation="gelu", norm_first=True, batch_first=True)
    kind = torch.nn.TransformerDecoder if with_context else torch.nn.TransformerEncoder
    extra = {} if with_context else {"enable_nested_tensor": False}
    ref = kind(layer, depth, norm=torch.nn.LayerNorm(16), **extra).eval()
    with torch.no_grad():  # layers start as copies of one another: make them differ, and the final norm visible
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ref


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [False, True])
def test_stack_without_context_matches_torch_encoder(impl, causal):
    torch.manual_seed(0)
    ref = _torch_stack(3, with_context=False)
    stack = TransformerStack(16, 3, 4, ff_hidden=32, causal=causal, impl=impl).copy_from_torch(ref).eval()
    assert count_parameters(stack) == count_parameters(ref)
    x = torch.randn(2, 6, 16)
    mask = _key_mask(6, [6, 4])
    blocked = ~torch.ones(6, 6, dtype=torch.bool).tril() if causal else None  # True = blocked (torch's convention)
    expected = ref(x, mask=blocked, src_key_padding_mask=~mask)
    out = stack(x, mask=mask)
    torch.testing.assert_close(out[mask], expected[mask], **F32)  # padded rows are meaningless in both


@pytest.mark.parametrize("causal", [False, True])
def test_stack_with_context_matches_torch_decoder(causal):
    torch.manual_seed(0)
    ref = _torch_stack(2, with_context=True)
    stack = TransformerStack(16, 2, 4, ff_hidden=32, causal=causal, d_context=16).copy_from_torch(ref).eval()
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 5, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    mask, cmask = _key_mask(5, [5, 3]), _key_mask(7, [7, 2])
    blocked = ~torch.ones(5, 5, dtype=torch.bool).tril() if causal else None
    expected = ref(x, ctx, tgt_mask=blocked, tgt_key_padding_mask=~mask, memory_key_padding_mask=~cmask)
    out = stack(x, mask=mask, context=ctx, context_mask=cmask)
    torch.testing.assert_close(out[mask], expected[mask], **F32)


def test_stack_checks_its_context_and_depth():
    with_ctx, without = TransformerStack(8, 1, 2, d_context=12), TransformerStack(8, 1, 2)
    x = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="d_context=12"):
        with_ctx(x)
    with pytest.raises(ValueError, match="takes no context"):
        without(x, context=torch.randn(1, 2, 8))
    with pytest.raises(ValueError, match="d_context"):
        with_ctx(x, context=torch.randn(1, 2, 8))  # context of the wrong width
    for depth in (0, 1.5, True):
        with pytest.raises(ValueError, match="depth"):
            TransformerStack(8, depth, 2)
    with pytest.raises(TypeError, match="TransformerDecoder"):
        with_ctx.copy_from_torch(_torch_stack(1, with_context=False))
