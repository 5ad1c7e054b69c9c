"""Compiler settings, run kernels and per-feature finishing shared by both families.

The parallel drivers in rows.py and columns.py contain only their loops: a
parallel=True function would turn any array expression into a parallel
region of its own, so the small per-feature arithmetic lives here.
"""

import numpy as np
from numba import njit

# Reassociation lets LLVM vectorize reductions; nnan/ninf stay off so that
# NaN and inf still propagate to the outputs of their feature.
REDUCE_MATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
# Element-wise loops vectorize without reassociation, and must not have it:
# it would fold (x - mean_hi) - mean_lo back into x - (mean_hi + mean_lo).
EXACT_MATH = {"contract"}


@njit(cache=True, fastmath=REDUCE_MATH)
def shifted_sums(run, shift):
    """Return sum(x - shift) and sum((x - shift)**2) over a run, in float64."""
    s1 = 0.0
    s2 = 0.0
    for i in range(run.size):
        d = np.float64(run[i]) - shift
        s1 += d
        s2 += d * d
    return s1, s2


@njit(cache=True, fastmath=REDUCE_MATH)
def centered_dot(dy_run, x_run, mean):
    """Return sum(dy) and sum(dy * (x - mean)) over a run, in float64."""
    s_dy = 0.0
    s_dyxc = 0.0
    for i in range(dy_run.size):
        g = np.float64(dy_run[i])
        s_dy += g
        s_dyxc += g * (np.float64(x_run[i]) - mean)
    return s_dy, s_dyxc


@njit(cache=True, fastmath=EXACT_MATH)
def scale_centered(x_run, out_run, mean_hi, mean_lo, scale, shift):
    """out = ((x - mean_hi) - mean_lo) * scale + shift, in x's dtype.

    Subtracting the mean as a hi + lo pair keeps float32 exact where x is
    close to a large mean (Sterbenz), so y does not inherit the rounding of
    the mean.
    """
    for i in range(x_run.size):
        out_run[i] = ((x_run[i] - mean_hi) - mean_lo) * scale + shift


@njit(cache=True, fastmath=EXACT_MATH)
def scale_centered_each(x_run, out_run, mean_hi, mean_lo, scale, shift):
    """scale_centered with one parameter per element of the run (columns)."""
    for i in range(x_run.size):
        out_run[i] = ((x_run[i] - mean_hi[i]) - mean_lo[i]) * scale[i] + shift[i]


@njit(cache=True, fastmath=EXACT_MATH)
def input_gradient(dy_run, x_run, out_run, a, b, mean_hi, mean_lo, c):
    """dx = a * dy + b * (x - mean) + c, the training backward in x's dtype."""
    for i in range(dy_run.size):
        out_run[i] = a * dy_run[i] + b * ((x_run[i] - mean_hi) - mean_lo) + c


@njit(cache=True, fastmath=EXACT_MATH)
def input_gradient_each(dy_run, x_run, out_run, a, b, mean_hi, mean_lo, c):
    """input_gradient with one parameter per element of the run (columns)."""
    for i in range(dy_run.size):
        out_run[i] = a[i] * dy_run[i] + b[i] * ((x_run[i] - mean_hi[i]) - mean_lo[i]) + c[i]


@njit(cache=True)
def zeros(shape):
    """np.zeros outside a parallel function, where it would be a parallel region."""
    return np.zeros(shape)


@njit(cache=True)
def row_sums(partials):
    """Sum each row of a (C, K) partial array left to right: a fixed order."""
    total = np.zeros(partials.shape[0])
    for c in range(partials.shape[0]):
        for k in range(partials.shape[1]):
            total[c] += partials[c, k]
    return total


@njit(cache=True)
def in_dtype(values, like):
    """values cast to the dtype of the array ``like``."""
    out = np.empty(values.size, like.dtype)
    for c in range(values.size):
        out[c] = values[c]
    return out


@njit(cache=True)
def split_mean(mean, like):
    """mean as hi + lo in like's dtype: hi is mean rounded, lo what rounding lost."""
    hi = in_dtype(mean, like)
    lo = np.empty_like(hi)
    for c in range(mean.size):
        lo[c] = mean[c] - np.float64(hi[c])
    return hi, lo


@njit(cache=True)
def forward_stats(s1, s2, shift, count, eps):
    """Per-feature float64 mean and invstd from sums of x - shift and its square.

    Shifting by a value of the feature itself keeps the one-pass variance
    free of the cancellation that E[x^2] - E[x]^2 suffers at large means.
    """
    mean = np.empty(s1.size)
    invstd = np.empty(s1.size)
    for c in range(s1.size):
        d = s1[c] / count
        var = s2[c] / count - d * d
        if var < 0.0:  # rounding only; NaN fails the test and propagates
            var = 0.0
        mean[c] = shift[c] + d
        invstd[c] = 1.0 / np.sqrt(var + eps)
    return mean, invstd


@njit(cache=True)
def train_coefficients(dbeta, dgamma, invstd, gamma, count):
    """dx = a * dy + b * (x - mean) + c, per feature (float64)."""
    a = gamma * invstd
    b = -a * invstd * dgamma / count
    c = -a * dbeta / count
    return a, b, c
