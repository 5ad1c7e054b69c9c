"""The notes' building blocks as public kernels on (n, m) features-first arrays.

Each is @njit(parallel=True), parallel over features, and validates nothing:
x must be a C-contiguous float32 or float64 array of shape (n, m).
"""

from typing import TypeAlias

import numpy as np
from numba import njit, prange
from numpy.typing import NDArray

from fastbn import _compile
from fastbn.kernels._common import REDUCE_MATH, scale_centered, shifted_sums, split_mean

# The arrays the kernels compute on. (Numba's Dispatcher cannot carry a type
# variable, so no signature says that normalize and affine return x's dtype.)
_FloatArray: TypeAlias = NDArray[np.float32] | NDArray[np.float64]


@njit(parallel=True, cache=True, fastmath=REDUCE_MATH)
def mean(x: _FloatArray) -> NDArray[np.float64]:
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
def var(x: _FloatArray, mean: NDArray[np.floating]) -> NDArray[np.float64]:
    """Per-feature biased variance of x about ``mean``, shape (n,), float64."""
    n, m = x.shape
    out = np.empty(n)
    flat = x.reshape(-1)
    for i in prange(n):
        out[i] = shifted_sums(flat, i * m, m, np.float64(mean[i]))[1] / m
    return out


@njit(parallel=True, cache=True)
def normalize(
    x: _FloatArray, mean: NDArray[np.floating], var: NDArray[np.floating], eps: float
) -> _FloatArray:
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
def affine(
    z_norm: _FloatArray, gamma: NDArray[np.floating], beta: NDArray[np.floating]
) -> _FloatArray:
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
