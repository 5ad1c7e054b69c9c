"""The notes' building blocks as public kernels on (n, m) features-first arrays.

Each is @njit(parallel=True), parallel over features, and validates nothing:
x must be a C-contiguous float32 or float64 array of shape (n, m).
"""

import numpy as np
from numba import njit, prange

from fastbn import _compile
from fastbn.kernels._common import REDUCE_MATH, scale_centered, shifted_sums, split_mean


@njit(parallel=True, cache=True, fastmath=REDUCE_MATH)
def mean(x):
    """Per-feature mean of x, shape (n,), float64."""
    n, m = x.shape
    out = np.empty(n)
    for i in prange(n):
        s = 0.0
        for j in range(m):
            s += np.float64(x[i, j])
        out[i] = s / m
    return out


@njit(parallel=True, cache=True)
def var(x, mean):
    """Per-feature biased variance of x about ``mean``, shape (n,), float64."""
    n, m = x.shape
    out = np.empty(n)
    flat = x.reshape(-1)
    for i in prange(n):
        out[i] = shifted_sums(flat, i * m, m, np.float64(mean[i]))[1] / m
    return out


@njit(parallel=True, cache=True)
def normalize(x, mean, var, eps):
    """z_norm = (x - mean) / sqrt(var + eps), in x's dtype."""
    n, m = x.shape
    out = np.empty_like(x)
    flat, flat_out = x.reshape(-1), out.reshape(-1)
    mean_hi, mean_lo = split_mean(mean.astype(np.float64), x)
    t = x.dtype.type
    for i in prange(n):
        invstd = t(1.0 / np.sqrt(np.float64(var[i]) + eps))
        scale_centered(flat, flat_out, i * m, m, mean_hi[i], mean_lo[i], invstd, t(0))
    return out


@njit(parallel=True, cache=True)
def affine(z_norm, gamma, beta):
    """y = gamma * z_norm + beta per feature, in z_norm's dtype."""
    n, m = z_norm.shape
    out = np.empty_like(z_norm)
    for i in prange(n):
        g = z_norm.dtype.type(gamma[i])
        b = z_norm.dtype.type(beta[i])
        for j in range(m):
            out[i, j] = g * z_norm[i, j] + b
    return out


_compile.guard(globals())
