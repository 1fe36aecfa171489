"""NumPy cross-attention with a hand-derived backward pass, against PyTorch autograd and finite differences."""

import numpy as np
import pytest
import torch

from mmlite.attention import CrossAttention, scaled_dot_product_attention
from mmlite.numpy_attention import (AttentionGrads, cross_attention_backward, cross_attention_forward,
                                    finite_difference, softmax, softmax_backward)

# float64 throughout the oracle tests: the NumPy and PyTorch paths do the same float64 products in a different
# order, so they differ by a few ulps of the O(1) values (~1e-15). rtol 1e-10 / atol 1e-12 leave four orders of
# magnitude of margin, while any real mistake (a wrong transpose, a missing 1/sqrt(d_k)) is off by O(1).
RTOL, ATOL = 1e-10, 1e-12


def _inputs(rng: np.random.Generator, lead=(2,), n1=3, n2=5, d1=4, d2=6, dk=8, dv=7):
    x1 = rng.standard_normal((*lead, n1, d1))
    x2 = rng.standard_normal((*lead, n2, d2))
    w_q = rng.standard_normal((d1, dk)) / np.sqrt(d1)
    w_k = rng.standard_normal((d2, dk)) / np.sqrt(d2)
    w_v = rng.standard_normal((d2, dv)) / np.sqrt(d2)
    return x1, x2, w_q, w_k, w_v


def _torch_grads(x1, x2, w_q, w_k, w_v, d_out, mask=None):
    """Output and gradients of sum(d_out * O) by autograd, O from mmlite's scaled_dot_product_attention."""
    ts = [torch.tensor(a, requires_grad=True) for a in (x1, x2, w_q, w_k, w_v)]
    tx1, tx2, tq, tk, tv = ts
    m = None if mask is None else torch.from_numpy(mask)
    out, _ = scaled_dot_product_attention(tx1 @ tq, tx2 @ tk, tx2 @ tv, mask=m)
    (out * torch.from_numpy(d_out)).sum().backward()
    return out.detach().numpy(), [t.grad.numpy() for t in ts]


@pytest.mark.parametrize("lead", [(), (2,), (2, 3)], ids=["unbatched", "batch", "batch-heads"])
def test_forward_and_backward_match_autograd(lead):
    rng = np.random.default_rng(0)
    x1, x2, w_q, w_k, w_v = _inputs(rng, lead)
    out, cache = cross_attention_forward(x1, x2, w_q, w_k, w_v)
    d_out = rng.standard_normal(out.shape)
    grads = cross_attention_backward(d_out, cache)
    ref_out, ref_grads = _torch_grads(x1, x2, w_q, w_k, w_v, d_out)
    np.testing.assert_allclose(out, ref_out, rtol=RTOL, atol=ATOL)
    assert isinstance(grads, AttentionGrads)
    for name, g, ref in zip(AttentionGrads._fields, grads, ref_grads):
        assert g.shape == ref.shape, name
        np.testing.assert_allclose(g, ref, rtol=RTOL, atol=ATOL, err_msg=name)
    np.testing.assert_allclose(cache.weights.sum(-1), 1.0, rtol=0, atol=1e-12)


def test_forward_matches_the_cross_attention_module():
    """One head, no bias, W^O = I: mmlite's CrossAttention computes exactly softmax(Q K^T / sqrt(d_k)) V."""
    rng = np.random.default_rng(1)
    d = 8
    x1, x2, w_q, w_k, w_v = _inputs(rng, (2,), d1=d, d2=d, dk=d, dv=d)
    mod = CrossAttention(d, n_heads=1, bias=False).double()
    with torch.no_grad():  # nn.Linear computes x W^T, so its weight is our W transposed
        mod.q_proj.weight.copy_(torch.from_numpy(w_q.T))
        mod.k_proj.weight.copy_(torch.from_numpy(w_k.T))
        mod.v_proj.weight.copy_(torch.from_numpy(w_v.T))
        mod.out_proj.weight.copy_(torch.eye(d, dtype=torch.float64))
        ref = mod(torch.from_numpy(x1), torch.from_numpy(x2)).numpy()
    out, _ = cross_attention_forward(x1, x2, w_q, w_k, w_v)
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)


def test_backward_matches_finite_differences():
    """Central differences with eps=1e-6 in float64: truncation O(eps^2) + rounding O(1e-16/eps) ~ 1e-10 for O(1)
    values, so 1e-7 relative (plus 1e-8 absolute for entries near zero) is a safe bound."""
    rng = np.random.default_rng(2)
    inputs = list(_inputs(rng, (2,), n1=2, n2=3, d1=3, d2=3, dk=4, dv=2))
    out, cache = cross_attention_forward(*inputs)
    d_out = rng.standard_normal(out.shape)
    grads = cross_attention_backward(d_out, cache)
    for i, name in enumerate(AttentionGrads._fields):
        def loss(value, i=i):
            args = list(inputs)
            args[i] = value
            return float((cross_attention_forward(*args)[0] * d_out).sum())
        fd = finite_difference(loss, inputs[i])
        np.testing.assert_allclose(grads[i], fd, rtol=1e-7, atol=1e-8, err_msg=name)


def test_masked_keys_get_no_weight_and_no_gradient():
    rng = np.random.default_rng(3)
    x1, x2, w_q, w_k, w_v = _inputs(rng, (2,))
    mask = np.ones((2, 5), dtype=bool)
    mask[0, 3:] = False  # image 0 has two padding keys
    key_mask = mask[:, None, :]  # (B, 1, n2) broadcasts over the queries
    out, cache = cross_attention_forward(x1, x2, w_q, w_k, w_v, mask=key_mask)
    assert np.all(cache.weights[0, :, 3:] == 0.0)
    d_out = rng.standard_normal(out.shape)
    grads = cross_attention_backward(d_out, cache)
    assert np.all(grads.x2[0, 3:] == 0.0), "a padding key must receive no gradient"
    ref_out, ref_grads = _torch_grads(x1, x2, w_q, w_k, w_v, d_out, mask=key_mask)
    np.testing.assert_allclose(out, ref_out, rtol=RTOL, atol=ATOL)
    for name, g, ref in zip(AttentionGrads._fields, grads, ref_grads):
        np.testing.assert_allclose(g, ref, rtol=RTOL, atol=ATOL, err_msg=name)
    x2_changed = x2.copy()
    x2_changed[0, 3:] = 100.0  # whatever sits in the padding does not change the output
    np.testing.assert_array_equal(cross_attention_forward(x1, x2_changed, w_q, w_k, w_v, mask=key_mask)[0], out)


def test_fully_masked_row_gives_zeros_like_the_library():
    rng = np.random.default_rng(4)
    x1, x2, w_q, w_k, w_v = _inputs(rng, ())
    mask = np.ones((3, 5), dtype=bool)
    mask[1] = False  # query 1 may attend to nothing
    out, cache = cross_attention_forward(x1, x2, w_q, w_k, w_v, mask=mask)
    assert np.all(out[1] == 0.0) and np.all(cache.weights[1] == 0.0)
    assert np.all(np.isfinite(out))
    d_out = rng.standard_normal(out.shape)
    grads = cross_attention_backward(d_out, cache)
    assert np.all(grads.x1[1] == 0.0)
    ref_out, ref_grads = _torch_grads(x1, x2, w_q, w_k, w_v, d_out, mask=mask)
    np.testing.assert_allclose(out, ref_out, rtol=RTOL, atol=ATOL)
    for name, g, ref in zip(AttentionGrads._fields, grads, ref_grads):
        np.testing.assert_allclose(g, ref, rtol=RTOL, atol=ATOL, err_msg=name)


def test_softmax_is_stable_and_shift_invariant():
    s = np.array([[1000.0, 1001.0, 999.0], [-1000.0, -1000.0, -1000.0]])
    p = softmax(s)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=0, atol=1e-15)
    np.testing.assert_allclose(p[1], 1 / 3, rtol=0, atol=1e-15)
    np.testing.assert_allclose(softmax(s[:1] - 1000.0), p[:1], rtol=1e-14, atol=0)
    ref = torch.softmax(torch.from_numpy(s), dim=-1).numpy()
    np.testing.assert_allclose(p, ref, rtol=1e-14, atol=0)


def test_softmax_backward_is_the_jacobian_product():
    """dS = (diag(a) - a a^T) dA row by row (the Jacobian is symmetric); its rows sum to 0."""
    rng = np.random.default_rng(5)
    a = softmax(rng.standard_normal((4, 6)))
    d_a = rng.standard_normal((4, 6))
    d_s = softmax_backward(a, d_a)
    for row in range(4):
        jac = np.diag(a[row]) - np.outer(a[row], a[row])  # (6, 6)
        np.testing.assert_allclose(d_s[row], jac @ d_a[row], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(d_s.sum(-1), 0.0, rtol=0, atol=1e-14)


def test_float32_stays_float32():
    rng = np.random.default_rng(6)
    inputs = [a.astype(np.float32) for a in _inputs(rng, (2,))]
    out, cache = cross_attention_forward(*inputs)
    grads = cross_attention_backward(np.ones_like(out), cache)
    assert out.dtype == np.float32 and cache.weights.dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads)


def test_finite_difference_of_a_known_function():
    x = np.array([[0.5, -1.0], [2.0, 0.0]])
    fd = finite_difference(lambda v: float((v**3).sum()), x)
    np.testing.assert_allclose(fd, 3 * x**2, rtol=1e-8, atol=1e-9)  # O(eps^2) truncation = eps^2 exactly here
    assert x[0, 0] == 0.5, "finite_difference must not change its input"
    with pytest.raises(ValueError, match="eps"):
        finite_difference(lambda v: 0.0, x, eps=0.0)


def test_errors_name_the_argument():
    rng = np.random.default_rng(7)
    x1, x2, w_q, w_k, w_v = _inputs(rng, (2,))
    with pytest.raises(TypeError, match="x1 must be a numpy.ndarray"):
        cross_attention_forward(x1.tolist(), x2, w_q, w_k, w_v)
    with pytest.raises(TypeError, match="x2 must be a floating-point array"):
        cross_attention_forward(x1, x2.astype(np.int64), w_q, w_k, w_v)
    with pytest.raises(ValueError, match="w_q first dim is 5 but x1 last dim is 4"):
        cross_attention_forward(x1, x2, rng.standard_normal((5, 8)), w_k, w_v)
    with pytest.raises(ValueError, match="w_v first dim"):
        cross_attention_forward(x1, x2, w_q, w_k, w_v[:3])
    with pytest.raises(ValueError, match="w_k last dim"):
        cross_attention_forward(x1, x2, w_q, w_k[:, :3], w_v)
    with pytest.raises(ValueError, match="leading"):
        cross_attention_forward(x1, x2[:1], w_q, w_k, w_v)
    with pytest.raises(ValueError, match="x1 must be"):
        cross_attention_forward(x1[0, 0], x2, w_q, w_k, w_v)
    with pytest.raises(TypeError, match="mask must be a bool"):
        cross_attention_forward(x1, x2, w_q, w_k, w_v, mask=np.ones((2, 1, 5)))
    with pytest.raises(ValueError, match="mask shape"):
        cross_attention_forward(x1, x2, w_q, w_k, w_v, mask=np.ones((2, 1, 4), dtype=bool))
    out, cache = cross_attention_forward(x1, x2, w_q, w_k, w_v)
    with pytest.raises(ValueError, match="d_out shape"):
        cross_attention_backward(out[..., :3], cache)
