"""Extreme values: float32 data near the overflow limit, constant features (the contract)."""

import numpy as np
import pytest
from conftest import (
    LAYOUTS,
    TOL,
    assert_close,
    feature_slice,
    make_params,
    ref_backward,
    ref_train,
)

import fastbn
from fastbn import BatchNorm

F32_MAX = float(np.finfo(np.float32).max)

SHAPES = {
    **LAYOUTS,
    "parallel_features_first": ((16, 4099), 0),
    "parallel_batch_first": ((4099, 16), 1),
}


def _huge(rng, shape, axis, scale):
    """float32 data of magnitude ``scale`` with a per-feature offset of the same order."""
    c = shape[axis]
    offset = rng.uniform(-2, 2, c).reshape(
        [-1 if a == axis % len(shape) else 1 for a in range(len(shape))]
    )
    with np.errstate(over="raise"):
        return (scale * (rng.standard_normal(shape) + offset)).astype(np.float32)


@pytest.mark.parametrize("scale", [1e30, 1e37])
@pytest.mark.parametrize(("shape", "axis"), SHAPES.values(), ids=SHAPES.keys())
def test_float32_near_overflow_functional(rng, shape, axis, scale):
    """Squares of |x| ~ 1e30 overflow float32; statistics in float64 keep every output right."""
    x = _huge(rng, shape, axis, scale)
    dy = rng.standard_normal(shape).astype(np.float32)
    gamma, beta = make_params(rng, shape[axis], np.float32)
    y, mean, invstd = fastbn.batch_norm_train(x, gamma, beta, axis=axis)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, axis=axis)
    y_ref, mean_ref, invstd_ref = ref_train(x, gamma, beta, axis=axis)
    dx_ref, dgamma_ref, dbeta_ref = ref_backward(dy, x, mean_ref, invstd_ref, gamma, axis=axis)
    for a in (y, mean, invstd, dx, dgamma, dbeta):
        assert np.all(np.isfinite(a))
    # dx is of invstd's size (~1 / scale): relative to that, as in the test below.
    tol = TOL[np.dtype(np.float32)]
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=tol * np.max(np.abs(dx_ref)))
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(invstd, invstd_ref, rtol=1e-6)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-4 * 2)  # |gamma| <= 2
    # Sums of M unit terms in float64, rounded once to float32: the suite's float32
    # standard (conftest assert_close, scale sqrt(M)); measured ~3e-8 of that scale.
    m = x.size // shape[axis]
    assert_close(dgamma, dgamma_ref, np.float32, scale=np.sqrt(m))
    assert_close(dbeta, dbeta_ref, np.float32, scale=np.sqrt(m))
    y_eval = fastbn.batch_norm_eval(x, mean, 1.0 / invstd**2 - 1e-5, gamma, beta, axis=axis)
    assert np.all(np.isfinite(y_eval))
    np.testing.assert_allclose(y_eval, y_ref, rtol=0, atol=1e-4 * 2)  # as y: |gamma| <= 2


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("scale", [1e25, 1e30, 1e37])
def test_float32_near_overflow_backward_dx(rng, scale, axis):
    """dx stays within float32 rounding of the reference however large x is.

    Products like invstd**2 underflow in float32 at this scale; the kernels
    keep every intermediate of order one (x_hat and the bracket) instead.
    """
    x = _huge(rng, (4, 1000) if axis == 0 else (1000, 4), axis, scale)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    _, mean, invstd = fastbn.batch_norm_train(x, axis=axis)
    dx = fastbn.batch_norm_backward(dy, x, mean, invstd, axis=axis)[0]
    _, mean_ref, invstd_ref = ref_train(x, axis=axis)
    dx_ref = ref_backward(dy, x, mean_ref, invstd_ref, axis=axis)[0]
    assert np.all(np.isfinite(dx))
    # float32 rounding of order-one terms, relative to dx's scale: TOL's ~100 ulp
    # (measured ~1e-7 of max |dx_ref|).
    tol = TOL[np.dtype(np.float32)]
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=tol * np.max(np.abs(dx_ref)))


def test_float32_at_the_limit(rng):
    """+-FLT_MAX alternating: x - mean and its square exist only in float64."""
    x = np.where(np.arange(64 * 2048).reshape(64, 2048) % 2 == 0, F32_MAX, -F32_MAX)
    x = x.astype(np.float32)
    y, mean, invstd = fastbn.batch_norm_train(x)
    np.testing.assert_array_equal(mean, 0.0)
    np.testing.assert_allclose(invstd, 1.0 / F32_MAX, rtol=1e-12)
    np.testing.assert_allclose(y, np.sign(x), atol=1e-6)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_float32_layer_rejects_an_overflowing_running_var(rng, momentum):
    bn = BatchNorm(16, dtype=np.float32, momentum=momentum)
    bn(rng.standard_normal((16, 64)).astype(np.float32))
    bn.backward(rng.standard_normal((16, 64)).astype(np.float32))
    saved = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in vars(bn).items()}
    x = _huge(rng, (16, 64), 0, 1e30)  # var ~1e60: finite in float64, not in float32
    with pytest.raises(FloatingPointError, match=r"overflow float32.*the layer is unchanged"):
        bn(x)
    for key, value in saved.items():
        now = getattr(bn, key)
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(now, value, err_msg=key)
        elif key == "_cache":
            assert now is value
        else:
            assert now == value, key
    # The functional API on the same data is fine, and so is a float64 layer.
    assert np.all(np.isfinite(fastbn.batch_norm_train(x)[0]))
    bn64 = BatchNorm(16, dtype=np.float64, momentum=momentum)
    y64 = bn64(x.astype(np.float64))
    assert np.all(np.isfinite(y64)) and np.all(np.isfinite(bn64.running_var))
    assert bn64.running_var.max() > 1e50


@pytest.mark.parametrize("value", [0.0, -3.5, 1e30])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), SHAPES.values(), ids=SHAPES.keys())
def test_constant_features(rng, shape, axis, dtype, value):
    """A zero variance gives y == beta and dx = gamma * invstd * (dy - mean(dy))."""
    x = rng.standard_normal(shape).astype(dtype)
    c = shape[axis]
    constant = [0, c - 1]  # the first and last features are constant
    for k in constant:
        x[feature_slice(x.ndim, axis, k)] = value
    dy = rng.standard_normal(shape).astype(dtype)
    gamma, beta = make_params(rng, c, dtype)
    y, mean, invstd = fastbn.batch_norm_train(x, gamma, beta, axis=axis)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, axis=axis)
    for a in (y, mean, invstd, dx, dgamma, dbeta):
        assert np.all(np.isfinite(a))
    # float32: TOL (~100 ulp of unit values); float64 tighter than TOL: a constant
    # feature's x - mean is exactly 0, and the other values round at ~1e-16.
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for k in constant:
        sel = feature_slice(x.ndim, axis, k)
        assert mean[k] == float(x[sel].flat[0])  # exactly the value, rounded to x's dtype
        np.testing.assert_allclose(invstd[k], 1.0 / np.sqrt(1e-5), rtol=1e-12)
        np.testing.assert_allclose(y[sel], beta[k], rtol=tol, atol=tol)
        d = dy[sel].astype(np.float64)
        expected = float(gamma[k]) * invstd[k] * (d - d.mean())
        np.testing.assert_allclose(dx[sel], expected, rtol=0, atol=tol * np.abs(expected).max())
        np.testing.assert_allclose(dgamma[k], 0.0, atol=tol)
    # The other features are untouched by their constant neighbours (the
    # reference itself is no judge of a constant 1e30: its mean rounds).
    y_ref, _, _ = ref_train(x, gamma, beta, axis=axis)
    rest = feature_slice(x.ndim, axis, slice(1, c - 1))
    np.testing.assert_allclose(y[rest], y_ref[rest], rtol=tol, atol=tol)
    # Every feature's gradients, constant or not, against the reference backward at
    # fastbn's statistics (x - mean is then exactly 0 on the constant features).
    dx_ref, dgamma_ref, dbeta_ref = ref_backward(dy, x, mean, invstd, gamma, axis=axis)
    s = np.sqrt(x.size // c)  # dgamma, dbeta: sums of M unit terms
    np.testing.assert_allclose(dx, dx_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=tol, atol=tol * s)
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=tol, atol=tol * s)
    # The layer too: finite running statistics, an unbiased variance of 0.
    bn = BatchNorm(c, axis=axis, dtype=dtype)
    assert np.all(np.isfinite(bn(x)))
    assert np.all(bn.running_var[constant] == np.asarray(0.9, dtype))


# name -> (shape, axis): both families, the rows family's two schedules, a few values.
OVERFLOW_SHAPES = {
    "rows_per_feature": ((8, 32), 0),
    "rows_chunked": ((3, 32), 0),
    "columns_features_first": ((3, 8), 0),
    "columns_batch_first": ((8, 3), 1),
}


@pytest.mark.parametrize(("shape", "axis"), OVERFLOW_SHAPES.values(), ids=OVERFLOW_SHAPES.keys())
def test_float64_squares_overflow_while_values_are_finite(rng, shape, axis):
    """Feature 0 is [0, 1e300, 1e300, ...]: its squares overflow float64, its values do not.

    The variance is then inf, as torch finds it: invstd 0 and y == beta (torch's output is
    its bias), dx 0. Feature 1 holds an inf value: its statistics stay NaN. The others are
    ordinary data, untouched by their neighbours.
    """
    x = rng.standard_normal(shape)
    c, m = shape[axis], x.size // shape[axis]
    big = np.full(m, 1e300)
    big[0] = 0.0  # the first value: the kernels' shift, so the overflow is in the squares
    x[feature_slice(x.ndim, axis, 0)] = big.reshape(x[feature_slice(x.ndim, axis, 0)].shape)
    x[feature_slice(x.ndim, axis, 1)].flat[m // 2] = np.inf
    gamma, beta = make_params(rng, c, np.float64)
    dy = rng.standard_normal(shape)
    y, mean, invstd = fastbn.batch_norm_train(x, gamma, beta, axis=axis)
    dx, _, _ = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, axis=axis)
    f0, f1 = feature_slice(x.ndim, axis, 0), feature_slice(x.ndim, axis, 1)
    np.testing.assert_allclose(mean[0], 1e300 * (m - 1) / m, rtol=1e-12)
    assert invstd[0] == 0.0  # 1 / sqrt(inf)
    np.testing.assert_array_equal(y[f0], beta[0])
    np.testing.assert_array_equal(dx[f0], 0.0)
    assert np.isnan(invstd[1])  # inf - inf: an infinite value is no overflow
    assert np.all(np.isnan(y[f1]))
    rest = feature_slice(x.ndim, axis, slice(2, c))
    y_ref, mean_ref, invstd_ref = ref_train(x[rest], gamma[2:], beta[2:], axis=axis)
    np.testing.assert_allclose(mean[2:], mean_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(invstd[2:], invstd_ref, rtol=1e-12)
    assert_close(y[rest], y_ref, np.float64)
