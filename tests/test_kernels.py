"""The contract's public building-block kernels against NumPy in float64.

``fastbn.kernels.mean/var/normalize/affine`` take C-contiguous features-first
(n, m) arrays; statistics come back float64, normalize and affine in x's dtype.
"""

import numpy as np
import pytest
from conftest import DTYPES, STAT_TOL, TOL, assert_close, make_params, ref_train

from fastbn import kernels

# (n, m): tiny, odd, few features with many examples (parallel over chunks of a
# row), many features with few examples, and one over 1e6 elements.
SHAPES = [
    (1, 2),
    (2, 1),
    (3, 7),
    (37, 1001),
    (2, 300_001),
    (5000, 3),
    pytest.param((1024, 1100), marks=pytest.mark.slow),
]


def _x(rng, shape, dtype, loc=3.0, scale=2.0):
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


def _stats64(x):
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=1)
    return mean, ((x64 - mean[:, None]) ** 2).mean(axis=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_mean(rng, shape, dtype):
    """mean(x) is the float64 row mean of x's values."""
    x = _x(rng, shape, dtype)
    mean = kernels.mean(x)
    mean_ref, var_ref = _stats64(x)
    assert mean.dtype == np.float64 and mean.shape == (shape[0],)
    tol = STAT_TOL[np.dtype(dtype)]
    bound = tol * (np.abs(mean_ref) + np.sqrt(var_ref))
    np.testing.assert_array_less(np.abs(mean - mean_ref), bound + 1e-300)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_var(rng, shape, dtype):
    """var(x, mean) is the biased float64 row variance about the given mean."""
    x = _x(rng, shape, dtype)
    mean_ref, var_ref = _stats64(x)
    var = kernels.var(x, mean_ref)
    assert var.dtype == np.float64 and var.shape == (shape[0],)
    tol = STAT_TOL[np.dtype(dtype)]
    np.testing.assert_allclose(var, var_ref, rtol=tol, atol=1e-300)


@pytest.mark.parametrize("dtype", DTYPES)
def test_var_uses_the_mean_it_is_given(rng, dtype):
    """var(x, mu) is the mean of (x - mu)**2 for any mu, not only the row mean."""
    x = _x(rng, (4, 513), dtype)
    mu = np.array([0.0, 1.0, -2.0, 10.0])
    ref = ((x.astype(np.float64) - mu[:, None]) ** 2).mean(axis=1)
    np.testing.assert_allclose(kernels.var(x, mu), ref, rtol=STAT_TOL[np.dtype(dtype)])


@pytest.mark.parametrize("eps", [1e-5, 0.1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_normalize(rng, shape, dtype, eps):
    """normalize(x, mean, var, eps) is (x - mean) / sqrt(var + eps) in x's dtype."""
    x = _x(rng, shape, dtype)
    mean, var = _stats64(x)
    z = kernels.normalize(x, mean, var, eps)
    z_ref = (x.astype(np.float64) - mean[:, None]) / np.sqrt(var[:, None] + eps)
    assert z.dtype == x.dtype and z.shape == x.shape
    tol = TOL[np.dtype(dtype)]
    np.testing.assert_allclose(z, z_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("pdtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_affine(rng, shape, dtype, pdtype):
    """affine(z, gamma, beta) is gamma * z + beta per row, in z's dtype."""
    z = _x(rng, shape, dtype, loc=0.0, scale=1.0)
    gamma, beta = make_params(rng, shape[0], pdtype)
    y = kernels.affine(z, gamma, beta)
    y_ref = gamma.astype(np.float64)[:, None] * z + beta.astype(np.float64)[:, None]
    assert y.dtype == z.dtype and y.shape == z.shape
    tol = TOL[np.dtype(dtype)]
    np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_compose_to_batch_norm(rng, dtype):
    """mean -> var -> normalize -> affine equals the reference train forward (features-first)."""
    x = _x(rng, (9, 777), dtype)
    gamma, beta = make_params(rng, 9, dtype)
    mean = kernels.mean(x)
    var = kernels.var(x, mean)
    y = kernels.affine(kernels.normalize(x, mean, var, 1e-5), gamma, beta)
    y_ref, mean_ref, invstd_ref = ref_train(x, gamma, beta)
    assert_close(y, y_ref, dtype)
    np.testing.assert_allclose(mean, mean_ref, rtol=STAT_TOL[x.dtype])
    np.testing.assert_allclose(1.0 / np.sqrt(var + 1e-5), invstd_ref, rtol=STAT_TOL[x.dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_leave_inputs_alone(rng, dtype):
    """The kernels write only their outputs."""
    x = _x(rng, (5, 301), dtype)
    gamma, beta = make_params(rng, 5, dtype)
    saved = x.copy(), gamma.copy(), beta.copy()
    mean = kernels.mean(x)
    var = kernels.var(x, mean)
    m_saved, v_saved = mean.copy(), var.copy()
    z = kernels.normalize(x, mean, var, 1e-5)
    z_saved = z.copy()
    kernels.affine(z, gamma, beta)
    after = (x, gamma, beta, mean, var, z)
    for a, b in zip(after, (*saved, m_saved, v_saved, z_saved), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_statistics_are_accurate_with_large_offset(rng, dtype):
    """Row statistics of data with |mean|/std = 1e3 keep the contract's accuracy."""
    x = _x(rng, (2, 1 << 18), dtype, loc=1e3, scale=1.0)
    mean_ref, var_ref = _stats64(x)
    mean = kernels.mean(x)
    var = kernels.var(x, mean)
    std_ref = np.sqrt(var_ref)
    np.testing.assert_array_less(np.abs(mean - mean_ref), 1e-6 * (np.abs(mean_ref) + std_ref))
    np.testing.assert_allclose(var, var_ref, rtol=1e-6)


def test_float32_mean_accumulates_in_float64(rng):
    """10**6 float32 values near 0.1 a row: their mean to 1e-7 of the float64 one.

    Running sums of them in float32 (one per vector lane) reach ~1e4, where each
    addition rounds by up to half of float32's spacing (~5e-4), in the same direction
    for values this alike: a float32 accumulator misses by ~5e-6 of the mean
    (measured); float64 sums are exact to ~1e-13.
    """
    x = (0.1 + 1e-4 * rng.standard_normal((2, 10**6))).astype(np.float32)
    mean_ref = x.astype(np.float64).mean(axis=1)
    np.testing.assert_allclose(kernels.mean(x), mean_ref, rtol=1e-7, atol=0)
