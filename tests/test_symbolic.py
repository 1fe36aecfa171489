"""sympy helpers: symbol matrices, softmax, gradients, equality and numeric evaluation."""

import numpy as np
import pytest
import sympy as sp
import torch

from mmlite import symbolic as S


def test_matrix_and_vector_symbols():
    q = S.matrix("q", 2, 3)
    assert q.shape == (2, 3) and str(q[0, 1]) == "q_{12}"
    assert all(s.is_real for s in q)
    assert len(set(q)) == 6
    assert str(S.matrix("w", 2, 10)[1, 9]) == "w_{2,10}"
    z = S.vector("z", 4)
    assert z.shape == (4, 1) and str(z[3]) == "z_4"
    with pytest.raises(ValueError, match="rows and cols"):
        S.matrix("q", 0, 2)
    with pytest.raises(TypeError, match="name"):
        S.matrix("", 2, 2)


def test_softmax_sums_to_one_and_matches_torch():
    z = S.vector("z", 3)
    p = S.softmax(z)
    assert S.is_zero(sum(p) - 1)
    values = np.array([0.3, -1.2, 2.0])
    ref = torch.softmax(torch.tensor(values), 0).numpy()
    np.testing.assert_allclose(S.evaluate(p, {z: values}).ravel(), ref, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="vector"):
        S.softmax(S.matrix("s", 2, 2))


def test_softmax_rows_is_a_row_wise_softmax():
    s = S.matrix("s", 2, 3)
    a = S.softmax_rows(s)
    assert a.shape == (2, 3)
    assert S.is_zero(a * sp.ones(3, 1) - sp.ones(2, 1))
    values = np.array([[0.1, 0.2, -0.5], [3.0, 1.0, 0.0]])
    ref = torch.softmax(torch.tensor(values), -1).numpy()
    np.testing.assert_allclose(S.evaluate(a, {s: values}), ref, rtol=1e-14, atol=0)


def test_gradient_of_a_quadratic_form():
    """d(x^T M x)/dx = (M + M^T) x, in the denominator layout (same shape as x)."""
    x, m = S.vector("x", 3), S.matrix("m", 3, 3)
    f = (x.T * m * x)[0, 0]
    g = S.gradient(f, x)
    assert g.shape == (3, 1)
    assert S.equal(g, (m + m.T) * x)
    with pytest.raises(ValueError, match="scalar"):
        S.gradient(m * x, x)


def test_equal_tells_different_expressions_apart():
    z = S.vector("z", 2)
    p = S.softmax(z)
    assert S.equal(p[0], 1 / (1 + sp.exp(z[1] - z[0])))
    assert not S.equal(p[0], 1 / (1 + sp.exp(z[0] - z[1])))
    assert not S.is_zero(sp.Matrix([0, z[0]]))
    with pytest.raises(ValueError, match="shapes differ"):
        S.equal(S.matrix("a", 2, 2), S.matrix("a", 2, 1))
    with pytest.raises(ValueError, match="matrix with a scalar"):
        S.equal(S.matrix("a", 2, 2), z[0])


def test_evaluate_checks_its_inputs():
    a = S.matrix("a", 2, 2)
    t = sp.Symbol("t", real=True)
    expr = t * a
    np.testing.assert_allclose(S.evaluate(expr, [(a, np.eye(2)), (t, 2.0)]), 2 * np.eye(2), rtol=0, atol=0)
    assert S.evaluate(t**2, {t: 3.0}) == 9.0
    with pytest.raises(ValueError, match="no value given"):
        S.evaluate(expr, {a: np.eye(2)})
    with pytest.raises(ValueError, match="shape"):
        S.evaluate(expr, {a: np.eye(3), t: 1.0})
    with pytest.raises(TypeError, match="keys"):
        S.evaluate(expr, {"t": 1.0})
