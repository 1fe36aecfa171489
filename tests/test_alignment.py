"""Tests for mmlite.alignment: L2 normalisation against F.normalize, projections, alignment head."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmlite.alignment import (
    AlignmentHead,
    LinearProjection,
    MLPProjection,
    cosine_similarity_matrix,
    l2_normalize,
    project_and_normalize,
)

# l2_normalize divides by sqrt(sum x^2) where F.normalize divides by torch's norm kernel: the two
# differ by float32 round-off of one sqrt and one division (~1e-7 relative); 1e-6 is the margin.
TOL = dict(atol=1e-6, rtol=1e-6)


def test_l2_normalize_matches_f_normalize():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, generator=g)
    for dim in (-1, 0, 1):
        torch.testing.assert_close(l2_normalize(x, dim=dim), F.normalize(x, dim=dim, eps=1e-6), **TOL)
    tiny = torch.full((2, 4), 1e-8)  # norm below eps: divided by eps, as F.normalize does
    torch.testing.assert_close(l2_normalize(tiny), F.normalize(tiny, eps=1e-6), **TOL)
    assert torch.allclose(l2_normalize(x).norm(dim=-1), torch.ones(4, 3))


def test_l2_normalize_is_safe_on_zero_vectors():
    x = torch.zeros(3, 5, requires_grad=True)
    y = l2_normalize(x)
    y.sum().backward()
    assert torch.equal(y, torch.zeros(3, 5)) and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="eps"):
        l2_normalize(x, eps=0.0)


def test_l2_normalize_gradcheck_float64():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True, generator=torch.Generator().manual_seed(1))
    assert torch.autograd.gradcheck(l2_normalize, (x,))


def test_projections_shapes_and_validation():
    torch.manual_seed(0)
    lin = LinearProjection(8, 4)
    mlp = MLPProjection(8, 4, hidden=16, dropout=0.1)
    x = torch.randn(2, 5, 8)
    assert lin(x).shape == (2, 5, 4) and mlp(x).shape == (2, 5, 4)
    assert lin.linear.bias is None  # CLIP-style projection without bias
    torch.testing.assert_close(lin(x), x @ lin.linear.weight.T)
    for module in (lin, mlp):
        with pytest.raises(ValueError, match="last dim is 7 but the module was built for d_in=8"):
            module(torch.randn(2, 7))


def test_alignment_head_outputs_unit_vectors_and_cosine_matrix():
    torch.manual_seed(0)
    for kind in ("linear", "mlp"):
        head = AlignmentHead(8, 4, kind=kind)
        x = torch.randn(6, 8)
        z = head(x)
        torch.testing.assert_close(z.norm(dim=-1), torch.ones(6))
        torch.testing.assert_close(z, project_and_normalize(x, head.proj))
        torch.testing.assert_close(project_and_normalize(z, None), z)  # normalising twice changes nothing
    with pytest.raises(ValueError, match="kind"):
        AlignmentHead(8, 4, kind="conv")
    a, b = torch.randn(3, 4), torch.randn(5, 4)
    torch.testing.assert_close(cosine_similarity_matrix(a, b), F.cosine_similarity(a[:, None], b[None], dim=-1), **TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_l2_normalize_low_precision_computes_the_norm_in_float32(dtype):
    # In float16, 300^2 overflows to inf (features of 300 became zeros), eps^2 = 1e-12 rounds to 0 (a zero
    # vector became NaN) and tiny squares underflow (tiny features became inf).
    x = torch.tensor([[300.0, 300.0, -300.0, 300.0], [1e-4, -1e-4, 1e-4, 1e-4], [0.0, 0.0, 0.0, 0.0],
                      [3.0, 4.0, 0.0, 0.0]], dtype=dtype)
    y = l2_normalize(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    expected = torch.tensor([[0.5, 0.5, -0.5, 0.5], [0.5, -0.5, 0.5, 0.5], [0.0] * 4, [0.6, 0.8, 0.0, 0.0]])
    # one rounding to float16 / bfloat16 at the end: half an ulp of values <= 1 is <= 2^-11 / 2^-8
    tol = 1e-3 if dtype == torch.float16 else 4e-3
    torch.testing.assert_close(y.float(), expected, rtol=0, atol=tol)
    assert torch.equal(y[2], torch.zeros(4, dtype=dtype)), "the zero vector maps to zero, as documented"


def test_contrastive_loss_of_float16_features_near_300_matches_float32():
    from mmlite.objectives import contrastive_loss

    g = torch.Generator().manual_seed(0)
    feats = 300.0 * torch.randn(8, 16, generator=g).sign()  # distinct directions, entries of +-300: ||x||^2 > 65504
    loss16 = contrastive_loss(feats.half(), feats.half(), 10.0)
    loss32 = contrastive_loss(feats.half().float(), feats.half().float(), 10.0)
    assert abs(loss16.item() - math.log(8)) > 0.5, "normalised fp16 features are no longer all zero"
    # float16 logits of magnitude <= 10 carry ~5e-3 absolute error; the loss averages 16 of them
    assert loss16.item() == pytest.approx(loss32.item(), abs=2e-2)


def test_l2_normalize_and_projections_reject_non_tensors():
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        l2_normalize([[1.0, 2.0]])
    with pytest.raises(TypeError, match="floating-point"):
        l2_normalize(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="eps must be positive and finite"):
        l2_normalize(torch.ones(2, 3), eps=float("nan"))
    with pytest.raises(TypeError, match="a must be a torch.Tensor"):
        cosine_similarity_matrix([[1.0]], torch.ones(1, 1))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        MLPProjection(2, 2)([[1.0, 2.0]])


def test_mlp_projection_is_linear_exact_gelu_linear():
    torch.manual_seed(0)
    mlp = MLPProjection(6, 4, hidden=10).eval()
    x = 2.0 * torch.randn(5, 6)
    h = x @ mlp.fc1.weight.T + mlp.fc1.bias  # (5, 10), with negative entries where GELU and ReLU differ
    assert (h < -0.5).any()
    gelu = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))  # exact GELU, Phi(h) h
    expected = gelu @ mlp.fc2.weight.T + mlp.fc2.bias
    # float32: two small matmuls in another order; 1e-6 is a few ulps of O(1) values
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6)
