"""Compiler settings, run kernels and per-feature finishing shared by both families.

The parallel drivers in rows.py and columns.py contain only their loops: a
parallel=True function would turn any array expression into a parallel
region of its own, so the small per-feature arithmetic lives here.

Only the parallel drivers and the entry points are cached (cache=True). A
helper loaded from the cache comes as object code, which LLVM cannot inline:
its callers would then pay a call per run. Uncached, the helpers are compiled
into each cached driver, which carries them from then on.
"""

import numpy as np
from numba import njit

# Reassociation lets LLVM vectorize reductions; nnan/ninf stay off so that
# NaN and inf still propagate to the outputs of their feature.
REDUCE_MATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
# Element-wise loops vectorize without reassociation, and must not have it:
# it would fold (x - mean_hi) - mean_lo back into x - (mean_hi + mean_lo).
EXACT_MATH = {"contract"}

# The run kernels below work on flat arrays from an offset rather than on
# slices: a slice costs two reference-count calls, which add up over short
# runs. Unsigned indices spare Numba's negative-index check, which would stop
# the loops from vectorizing.


@njit(fastmath=REDUCE_MATH)
def shifted_sums(x, start, n, shift):
    """Return sum(x - shift) and sum((x - shift)**2) over x[start:start + n], in float64."""
    s1 = 0.0
    s2 = 0.0
    o = np.uint64(start)
    for i in range(np.uint64(n)):
        d = np.float64(x[o + i]) - shift
        s1 += d
        s2 += d * d
    return s1, s2


# A ReLU fused after the normalization (`relu`): the forward kernels take None
# or True, and write max(y, 0); the backward kernels take None or the
# forward's (mean_hi, mean_lo, scale, shift) as rows of one array (`relu_params`) and let
# dy through where the forward's y was positive, recomputed from x
# (`relu_passes`). None is a type of its own to Numba: the same loop compiles
# without the ReLU, at no cost. No function returns None in one branch and a
# value in another (Numba would make it an Optional, which it cannot index).


@njit(fastmath=EXACT_MATH)
def normalized(v, mean_hi, mean_lo, scale, shift):
    """((v - mean_hi) - mean_lo) * scale + shift: y before any ReLU.

    Subtracting the mean as a hi + lo pair keeps float32 exact where v is
    close to a large mean (Sterbenz), so y does not inherit the rounding of
    the mean. Under these flags only, wherever it is inlined, so that the
    backward's ReLU mask recomputes the forward's y bit for bit.
    """
    return ((v - mean_hi) - mean_lo) * scale + shift


@njit
def activated(y, relu, zero):
    """y, or max(y, zero) with a fused ReLU (NaN stays NaN); zero is 0 in y's dtype."""
    if relu is None:
        return y
    return zero if y < zero else y


@njit
def relu_passes(v, relu, k):
    """Whether the fused ReLU let the output of value v through (always without one).

    relu is None or the forward's (mean_hi, mean_lo, scale, shift) as the rows
    of one array, whose column k is v's: the output passed where y > 0, so not
    at y == 0 (ReLU's subgradient there is 0).
    """
    if relu is None:
        return True
    return normalized(v, relu[0, k], relu[1, k], relu[2, k], relu[3, k]) > 0


@njit(fastmath=REDUCE_MATH)
def centered_dot(dy, x, start, n, mean, relu=None, c=0):
    """Return sum(dy) and sum(dy * (x - mean)) over [start, start + n), in float64.

    With a fused ReLU (`relu_passes`, feature c), dy counts only where the
    forward's output passed.
    """
    s_dy = 0.0
    s_dyxc = 0.0
    o = np.uint64(start)
    for i in range(np.uint64(n)):
        v = x[o + i]
        g = np.float64(dy[o + i]) if relu_passes(v, relu, c) else 0.0
        s_dy += g
        s_dyxc += g * (np.float64(v) - mean)
    return s_dy, s_dyxc


@njit(fastmath=EXACT_MATH)
def scale_centered(x, out, start, n, mean_hi, mean_lo, scale, shift, relu=None):
    """out = ((x - mean_hi) - mean_lo) * scale + shift over [start, start + n), in x's dtype.

    With a fused ReLU, max(that, 0) (`activated`).
    """
    o = np.uint64(start)
    zero = out.dtype.type(0)
    for i in range(np.uint64(n)):
        out[o + i] = activated(normalized(x[o + i], mean_hi, mean_lo, scale, shift), relu, zero)


@njit(fastmath=EXACT_MATH)
def passed_scaled(dy, x, out, start, n, scale, relu, c):
    """dx = scale * dy where the fused ReLU passed (`relu_passes`, feature c), else 0.

    The backward through running statistics and a ReLU; dy is not mixed with
    x_hat, so an infinite x whose output passed gives a finite dx.
    """
    o = np.uint64(start)
    zero = dy.dtype.type(0)
    for i in range(np.uint64(n)):
        out[o + i] = scale * (dy[o + i] if relu_passes(x[o + i], relu, c) else zero)


@njit(fastmath=EXACT_MATH)
def input_gradient(
    dy, x, out, start, n, scale, invstd, mean_hi, mean_lo, k_xhat, k0, relu=None, c=0
):
    """dx = scale * (dy + x_hat * k_xhat + k0) over [start, start + n): the training backward.

    With scale = gamma * invstd, k_xhat = -dgamma / M and k0 = -dbeta / M this
    is the notes' formula. x_hat and the bracket are of order one whatever
    the data's scale, so float32 neither overflows nor underflows before the
    last product. With a fused ReLU, dy is 0 where the forward's output was
    not positive (`relu_passes`, feature c).
    """
    o = np.uint64(start)
    zero = dy.dtype.type(0)
    for i in range(np.uint64(n)):
        v = x[o + i]
        g = dy[o + i] if relu_passes(v, relu, c) else zero
        x_hat = ((v - mean_hi) - mean_lo) * invstd
        out[o + i] = scale * (g + x_hat * k_xhat + k0)


@njit
def zeros(shape):
    """np.zeros outside a parallel function, where it would be a parallel region."""
    return np.zeros(shape)


@njit
def row_sums(partials):
    """Sum each row of a (C, K) partial array left to right: a fixed order."""
    total = np.zeros(partials.shape[0])
    for c in range(partials.shape[0]):
        for k in range(partials.shape[1]):
            total[c] += partials[c, k]
    return total


@njit
def in_dtype(values, like):
    """values cast to the dtype of the array ``like``."""
    out = np.empty(values.size, like.dtype)
    for c in range(values.size):
        out[c] = values[c]
    return out


@njit(inline="always")
def split(mean, t):
    """A float64 mean as hi + lo of type t: hi is mean rounded, lo what rounding lost."""
    hi = t(mean)
    return hi, t(mean - np.float64(hi))


@njit
def split_mean(mean, like):
    """`split` of every feature's mean, in like's dtype: (hi, lo) arrays."""
    hi = np.empty(mean.size, like.dtype)
    lo = np.empty_like(hi)
    for c in range(mean.size):
        hi[c], lo[c] = split(mean[c], like.dtype.type)
    return hi, lo


@njit
def relu_params(mean, invstd, gamma, beta, like):
    """The forward's per-feature (mean_hi, mean_lo, scale, shift) in like's dtype.

    The mask of a fused ReLU (`relu_passes`), as the train and eval forwards
    computed their parameters: a (4, C) array.
    """
    mean_hi, mean_lo = split_mean(mean, like)
    params = np.empty((4, mean.size), like.dtype)  # one array: one pointer for LLVM's alias checks
    params[0] = mean_hi
    params[1] = mean_lo
    params[2] = in_dtype(gamma * invstd, like)
    params[3] = in_dtype(beta, like)
    return params


@njit
def feature_moments(s1, s2, shift, count):
    """Mean and biased variance (float64) of one feature from sums of x - shift and its square.

    Shifting by a value of the feature itself keeps the one-pass variance
    free of the cancellation that E[x^2] - E[x]^2 suffers at large means.
    """
    d = s1 / count
    var = s2 / count - d * d
    if s2 == np.inf and np.isfinite(d):
        # A square overflowed (inf - inf would be NaN) while the values are finite: the
        # variance is beyond float64, inf, as torch finds it. Infinite values give NaN.
        var = np.inf
    elif var < 0.0:  # rounding only; NaN fails the test and propagates
        var = 0.0
    return shift + d, var


@njit
def feature_stats(s1, s2, shift, count, eps):
    """Mean and invstd (float64) of one feature (see feature_moments)."""
    mean, var = feature_moments(s1, s2, shift, count)
    return mean, 1.0 / np.sqrt(var + eps)


@njit
def forward_moments(s1, s2, shift, count):
    """feature_moments for every feature: (mean, var) arrays."""
    mean = np.empty(s1.size)
    var = np.empty(s1.size)
    for c in range(s1.size):
        mean[c], var[c] = feature_moments(s1[c], s2[c], shift[c], count)
    return mean, var


@njit
def train_coefficients(dbeta, dgamma, invstd, gamma, count):
    """(scale, k_xhat, k0) of input_gradient, per feature (arrays or scalars)."""
    return gamma * invstd, -dgamma / count, -dbeta / count
