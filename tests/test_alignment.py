"""Tests for mmlite.alignment: L2 normalisation against F.normalize, projections, alignment head."""

from __future__ import annotations

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
