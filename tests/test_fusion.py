"""Tests for mmlite.fusion: shapes, masking, gates, gradients and the by-name factory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmlite.attention import set_attention_impl
from mmlite.fusion import (
    ConcatFusion,
    CrossAttentionFusion,
    GatedFusion,
    HierarchicalFusion,
    make_fusion,
)
from mmlite.utils import count_parameters

B, TI, TT, DI, DT, DOUT = 3, 6, 5, 12, 10, 8
# float32: a few small matmuls and means in a different order; 1e-6 is ~10 ulps of O(1) values
EXACT_ISH = dict(rtol=1e-6, atol=1e-6)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(B, TI, DI, generator=g)
    text = torch.randn(B, TT, DT, generator=g)
    image_mask = torch.ones(B, TI, dtype=torch.bool)
    image_mask[1, 4:] = False
    text_mask = torch.arange(TT)[None, :] < torch.tensor([5, 2, 3])[:, None]  # (B, TT), True = real
    return image, text, image_mask, text_mask


def _flat_fusions():
    torch.manual_seed(0)
    return {
        "concat": make_fusion("concat", d_image=DI, d_text=DT, d_out=DOUT),
        "gated": make_fusion("gated", d_image=DI, d_text=DT, d_out=DOUT),
        "gated_gelu": make_fusion("gated", d_image=DI, d_text=DT, d_out=DOUT, gate="gelu"),
        "cross_attention": make_fusion("cross_attention", d_image=DI, d_text=DT, d_model=8, n_heads=2, layers=2),
    }


class _AsHierarchical(torch.nn.Module):
    """Feeds one (image, text) pair as two levels, so hierarchical fusion runs the shared tests."""

    def __init__(self, **kw):
        super().__init__()
        self.inner = HierarchicalFusion([DI, DI], [DT, DT], DOUT, **kw)
        self.d_out = self.inner.d_out

    def forward(self, image, text, image_mask=None, text_mask=None):
        return self.inner([image, image.flip(-1)], [text, 2 * text], image_mask, text_mask)


def _all_fusions():
    fusions = _flat_fusions()
    fusions["hier_softmax"] = _AsHierarchical()
    fusions["hier_gated_concat"] = _AsHierarchical(level="gated", combine="concat")
    return fusions


@pytest.mark.parametrize("name", list(_all_fusions()))
def test_shape_masking_and_gradients(name):
    fusion = _all_fusions()[name].eval()
    image, text, image_mask, text_mask = _inputs()
    out = fusion(image, text, image_mask, text_mask)
    assert out.shape == (B, fusion.d_out)
    assert count_parameters(fusion) > 0
    # padding changes nothing
    image2, text2 = image.clone(), text.clone()
    image2[~image_mask] = 50 * torch.randn(int((~image_mask).sum()), DI)
    text2[~text_mask] = 50 * torch.randn(int((~text_mask).sum()), DT)
    torch.testing.assert_close(fusion(image2, text2, image_mask, text_mask), out, **EXACT_ISH)
    # ... while a real token does change the result of its own example only
    image3 = image.clone()
    image3[2, 0] += 1.0
    out3 = fusion(image3, text, image_mask, text_mask)
    assert not torch.allclose(out3[2], out[2])
    torch.testing.assert_close(out3[:2], out[:2], **EXACT_ISH)
    # gradients reach both modalities' real tokens and never the padding
    image.requires_grad_(True)
    text.requires_grad_(True)
    fusion(image, text, image_mask, text_mask).square().sum().backward()
    for x, m in ((image, image_mask), (text, text_mask)):
        assert torch.isfinite(x.grad).all()
        assert x.grad[m].abs().sum() > 0
        assert (x.grad[~m] == 0).all()


def test_concat_fusion_formula():
    torch.manual_seed(0)
    fusion = ConcatFusion(DI, DT, DOUT)
    image, text, image_mask, text_mask = _inputs()
    m_i, m_t = image_mask[..., None].float(), text_mask[..., None].float()  # (B, T, 1)
    pooled = torch.cat([(image * m_i).sum(1) / m_i.sum(1), (text * m_t).sum(1) / m_t.sum(1)], dim=-1)
    expected = F.gelu(pooled @ fusion.proj.weight.T + fusion.proj.bias)
    torch.testing.assert_close(fusion(image, text, image_mask, text_mask), expected, **EXACT_ISH)
    assert count_parameters(fusion) == (DI + DT) * DOUT + DOUT


@pytest.mark.parametrize("gate", ["sigmoid", "gelu"])
def test_gates_in_unit_interval_and_mix_convexly(gate):
    torch.manual_seed(0)
    fusion = GatedFusion(DI, DT, DOUT, gate=gate)
    with torch.no_grad():
        fusion.gate_proj.weight.mul_(5.0)  # push the gate towards its extremes
    image, text, image_mask, text_mask = _inputs()
    fused, g = fusion(image, text, image_mask, text_mask, return_gate=True)
    assert g.shape == (B, DOUT)
    assert ((g > 0) & (g < 1)).all()
    h_i = fusion.image_proj(torch.stack([image[b][image_mask[b]].mean(0) for b in range(B)]))
    h_t = fusion.text_proj(torch.stack([text[b][text_mask[b]].mean(0) for b in range(B)]))
    torch.testing.assert_close(fused, g * h_i + (1 - g) * h_t, **EXACT_ISH)
    z = fusion.gate_proj(torch.cat([h_i, h_t], -1))
    ref_g = torch.sigmoid(z) if gate == "sigmoid" else torch.distributions.Normal(0.0, 1.0).cdf(z)
    torch.testing.assert_close(g, ref_g, **EXACT_ISH)


@pytest.mark.parametrize("level", ["concat", "gated"])
def test_hierarchical_levels_of_different_shapes(level):
    torch.manual_seed(0)
    dims_image, dims_text = [4, 8, 16], [10, 10, 10]
    fusion = HierarchicalFusion(dims_image, dims_text, DOUT, level=level)
    g = torch.Generator().manual_seed(1)
    image_levels = [torch.randn(B, n, d, generator=g) for n, d in zip([16, 4, 1], dims_image)]  # finest first
    text_levels = [torch.randn(B, TT, d, generator=g) for d in dims_text]
    _, _, _, text_mask = _inputs()
    out = fusion(image_levels, text_levels, None, text_mask)
    assert out.shape == (B, DOUT)
    # at initialisation the softmax weights are uniform: the result is the mean of the per-level fusions
    torch.testing.assert_close(fusion.level_weights(), torch.full((3,), 1 / 3), **EXACT_ISH)
    per_level = [f(xi, xt, None, text_mask) for f, xi, xt in zip(fusion.levels, image_levels, text_levels)]
    torch.testing.assert_close(out, torch.stack(per_level).mean(0), **EXACT_ISH)
    # a per-level list of masks is accepted too
    torch.testing.assert_close(fusion(image_levels, text_levels, [None] * 3, [text_mask] * 3), out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="got 2 image levels and 3 text levels but the fusion was built for 3"):
        fusion(image_levels[:2], text_levels)
    with pytest.raises(ValueError, match="dims_image has 2 levels and dims_text 3"):
        HierarchicalFusion([4, 8], [10, 10, 10], DOUT)


def test_cross_attention_fusion_impls_agree():
    torch.manual_seed(0)
    fusion = CrossAttentionFusion(DI, DT, 8, 2, layers=2).eval()
    image, text, image_mask, text_mask = _inputs()
    scratch = fusion(image, text, image_mask, text_mask)
    assert set_attention_impl(fusion, "fused") == 4  # 2 layers x 2 directions
    # float32 attention, two paths: same tolerance as the attention oracle tests
    torch.testing.assert_close(fusion(image, text, image_mask, text_mask), scratch, atol=1e-5, rtol=1e-5)
    assert fusion.d_out == 16


def test_make_fusion_and_input_errors():
    with pytest.raises(ValueError, match=r"unknown fusion 'sum'.*'concat'.*'cross_attention'.*'gated'.*'hierarchical'"):
        make_fusion("sum")
    with pytest.raises(ValueError, match="gate must be"):
        make_fusion("gated", d_image=4, d_text=4, d_out=4, gate="tanh")
    fusion = ConcatFusion(DI, DT, DOUT)
    image, text, image_mask, text_mask = _inputs()
    with pytest.raises(ValueError, match=f"text_tokens last dim is {DT + 1} but the fusion was built for d_text={DT}"):
        fusion(image, torch.randn(B, TT, DT + 1))
    with pytest.raises(ValueError, match="image_tokens batch size is 3 but text_tokens batch size is 2"):
        fusion(image, text[:2])
    with pytest.raises(ValueError, match=r"text_mask shape \(3, 4\) does not match"):
        fusion(image, text, image_mask, text_mask[:, :4])
    with pytest.raises(TypeError, match="bool"):
        fusion(image, text, image_mask.float(), text_mask)


def test_cross_attention_fusion_returns_weights_that_sum_to_one_over_real_keys():
    torch.manual_seed(0)
    fusion = CrossAttentionFusion(d_image=8, d_text=6, d_model=16, n_heads=2, layers=2)
    image, text = torch.randn(3, 5, 8), torch.randn(3, 4, 6)
    text_mask = torch.tensor([[True] * 4, [True, True, False, False], [True] * 3 + [False]])
    fused, weights = fusion(image, text, text_mask=text_mask, return_weights=True)
    torch.testing.assert_close(fused, fusion(image, text, text_mask=text_mask))
    assert len(weights) == 2
    i2t, t2i = weights[0]
    assert i2t.shape == (3, 2, 5, 4) and t2i.shape == (3, 2, 4, 5)
    torch.testing.assert_close(t2i.sum(-1), torch.ones(3, 2, 4))
    assert torch.all(i2t[1, :, :, 2:] == 0), "padded words receive no attention"


def _torch_attention(ours) -> torch.nn.MultiheadAttention:
    """A torch.nn.MultiheadAttention holding a copy of one of our attention modules' weights."""
    mha = torch.nn.MultiheadAttention(ours.d_model, ours.n_heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        mha.out_proj.weight.copy_(ours.out_proj.weight)
        mha.out_proj.bias.copy_(ours.out_proj.bias)
    return mha.eval()


def test_cross_attention_fusion_matches_its_formula_with_copied_weights():
    """Per layer, O = CoAttention(LN(X_i), LN(X_t)), X = X + O, H = X + FFN(LN(X)); then LN, masked mean, concat."""
    torch.manual_seed(0)
    fusion = CrossAttentionFusion(DI, DT, 8, 2, layers=2).eval()
    image, text, image_mask, text_mask = _inputs()

    def ffn(ff, h):  # W2 gelu(W1 h + b1) + b2, exact (erf) GELU
        z = h @ ff.linear1.weight.T + ff.linear1.bias
        return (0.5 * z * (1 + torch.erf(z / 2**0.5))) @ ff.linear2.weight.T + ff.linear2.bias

    def mean(x, m):
        return (x * m[..., None]).sum(1) / m.sum(1, keepdim=True)

    xi = image @ fusion.image_proj.weight.T + fusion.image_proj.bias  # (B, Ti, 8)
    xt = text @ fusion.text_proj.weight.T + fusion.text_proj.bias  # (B, Tt, 8)
    for layer in fusion.layers:
        a_i, a_t = layer.norm_i(xi), layer.norm_t(xt)
        o_i = _torch_attention(layer.co_attn.attn_1to2)(a_i, a_t, a_t, key_padding_mask=~text_mask)[0]
        o_t = _torch_attention(layer.co_attn.attn_2to1)(a_t, a_i, a_i, key_padding_mask=~image_mask)[0]
        xi, xt = xi + o_i, xt + o_t  # the seed's X + O
        xi, xt = xi + ffn(layer.ff_i, layer.ff_norm_i(xi)), xt + ffn(layer.ff_t, layer.ff_norm_t(xt))
    expected = torch.cat([mean(fusion.norm_i(xi), image_mask), mean(fusion.norm_t(xt), text_mask)], dim=-1)
    # float32, two layers of attention against torch's kernel: the attention oracle's tolerance
    torch.testing.assert_close(fusion(image, text, image_mask, text_mask), expected, atol=1e-5, rtol=1e-5)
