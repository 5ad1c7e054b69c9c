"""The rows family: each feature's values are contiguous runs of length Q.

Data is viewed as (P, C, Q). A work unit is one feature over a block of
consecutive p and a chunk of at most RUN_CHUNK values of q. Units depend on
the shape only and their partial sums merge in a fixed order, so results do
not depend on the thread count or on which thread ran what.
"""

import numpy as np
from numba import njit, prange

from fastbn.kernels._common import (
    centered_dot,
    forward_stats,
    in_dtype,
    input_gradient,
    row_sums,
    scale_centered,
    shifted_sums,
    split_mean,
    train_coefficients,
)

RUN_CHUNK = 16384  # values per work unit: long enough to amortize, short enough to balance


@njit(cache=True)
def _grid(shape):
    """(p_block, q_chunks, n_units) of the unit grid for a (P, C, Q) shape."""
    P, C, Q = shape
    q_chunks = (Q + RUN_CHUNK - 1) // RUN_CHUNK
    p_block = max(1, RUN_CHUNK // Q)
    n_units = -(-P // p_block) * C * q_chunks
    return p_block, q_chunks, n_units


@njit(cache=True)
def _unit(u, shape, p_block, q_chunks):
    """Feature, p range, q range and partial slot of unit u (ordered p-block, c, q-chunk)."""
    P, C, Q = shape
    per_pb = C * q_chunks
    pb = u // per_pb
    r = u - pb * per_pb
    c = r // q_chunks
    j = r - c * q_chunks
    p0 = pb * p_block
    q0 = j * RUN_CHUNK
    return c, p0, min(p0 + p_block, P), q0, min(q0 + RUN_CHUNK, Q), pb * q_chunks + j


@njit(cache=True)
def _moments_unit(x, shift, u, grid, s1, s2):
    c, p0, p1, q0, q1, slot = _unit(u, x.shape, grid[0], grid[1])
    a1 = 0.0
    a2 = 0.0
    for p in range(p0, p1):
        b1, b2 = shifted_sums(x[p, c, q0:q1], shift[c])
        a1 += b1
        a2 += b2
    s1[c, slot] = a1
    s2[c, slot] = a2


@njit(cache=True)
def _grad_sums_unit(dy, x, mean, u, grid, s1, s2):
    c, p0, p1, q0, q1, slot = _unit(u, x.shape, grid[0], grid[1])
    a1 = 0.0
    a2 = 0.0
    for p in range(p0, p1):
        b1, b2 = centered_dot(dy[p, c, q0:q1], x[p, c, q0:q1], mean[c])
        a1 += b1
        a2 += b2
    s1[c, slot] = a1
    s2[c, slot] = a2


@njit(cache=True)
def _scale_unit(x, out, u, grid, mean_hi, mean_lo, scale, shift):
    c, p0, p1, q0, q1, _ = _unit(u, x.shape, grid[0], grid[1])
    for p in range(p0, p1):
        scale_centered(
            x[p, c, q0:q1], out[p, c, q0:q1], mean_hi[c], mean_lo[c], scale[c], shift[c]
        )


@njit(cache=True)
def _input_gradient_unit(dy, x, out, u, grid, a, b, mean_hi, mean_lo, c0):
    c, p0, p1, q0, q1, _ = _unit(u, x.shape, grid[0], grid[1])
    for p in range(p0, p1):
        input_gradient(
            dy[p, c, q0:q1],
            x[p, c, q0:q1],
            out[p, c, q0:q1],
            a[c],
            b[c],
            mean_hi[c],
            mean_lo[c],
            c0[c],
        )


@njit(parallel=True, cache=True)
def _apply(x, out, mean_hi, mean_lo, scale, shift, serial):
    """out = ((x - mean) * scale + shift) per feature, in x's dtype."""
    grid = _grid(x.shape)
    if serial:
        for u in range(grid[2]):
            _scale_unit(x, out, u, grid, mean_hi, mean_lo, scale, shift)
    else:
        for u in prange(grid[2]):
            _scale_unit(x, out, u, grid, mean_hi, mean_lo, scale, shift)


@njit(parallel=True, cache=True)
def _moments(x, shift, serial):
    """Per-unit partial sums of x - shift and its square, shape (C, units per feature)."""
    grid = _grid(x.shape)
    n_slots = grid[2] // x.shape[1]
    s1 = np.empty((x.shape[1], n_slots))
    s2 = np.empty((x.shape[1], n_slots))
    if serial:
        for u in range(grid[2]):
            _moments_unit(x, shift, u, grid, s1, s2)
    else:
        for u in prange(grid[2]):
            _moments_unit(x, shift, u, grid, s1, s2)
    return s1, s2


@njit(parallel=True, cache=True)
def _grad_sums(dy, x, mean, serial):
    """Per-unit partial sums of dy and dy * (x - mean), shape (C, units per feature)."""
    grid = _grid(x.shape)
    n_slots = grid[2] // x.shape[1]
    s1 = np.empty((x.shape[1], n_slots))
    s2 = np.empty((x.shape[1], n_slots))
    if serial:
        for u in range(grid[2]):
            _grad_sums_unit(dy, x, mean, u, grid, s1, s2)
    else:
        for u in prange(grid[2]):
            _grad_sums_unit(dy, x, mean, u, grid, s1, s2)
    return s1, s2


@njit(parallel=True, cache=True)
def _input_gradient(dy, x, out, a, b, mean_hi, mean_lo, c0, serial):
    grid = _grid(x.shape)
    if serial:
        for u in range(grid[2]):
            _input_gradient_unit(dy, x, out, u, grid, a, b, mean_hi, mean_lo, c0)
    else:
        for u in prange(grid[2]):
            _input_gradient_unit(dy, x, out, u, grid, a, b, mean_hi, mean_lo, c0)


@njit(cache=True)
def train_forward(x, gamma, beta, eps, out, serial):
    """Batch statistics, then out = gamma * (x - mean) * invstd + beta.

    x and out are (P, C, Q) C-contiguous; returns float64 mean and invstd.
    """
    shift = np.empty(x.shape[1])
    for c in range(x.shape[1]):
        shift[c] = x[0, c, 0]
    s1, s2 = _moments(x, shift, serial)
    count = x.shape[0] * x.shape[2]
    mean, invstd = forward_stats(row_sums(s1), row_sums(s2), shift, count, eps)
    mean_hi, mean_lo = split_mean(mean, x)
    _apply(x, out, mean_hi, mean_lo, in_dtype(gamma * invstd, x), in_dtype(beta, x), serial)
    return mean, invstd


@njit(cache=True)
def eval_forward(x, running_mean, running_var, gamma, beta, eps, out, serial):
    """out = gamma * (x - running_mean) / sqrt(running_var + eps) + beta."""
    mean_hi, mean_lo = split_mean(running_mean, x)
    scale = in_dtype(gamma / np.sqrt(running_var + eps), x)
    _apply(x, out, mean_hi, mean_lo, scale, in_dtype(beta, x), serial)


@njit(cache=True)
def backward(dy, x, mean, invstd, gamma, training, out, serial):
    """dx into out; returns float64 dgamma and dbeta, x_hat recomputed from x."""
    s1, s2 = _grad_sums(dy, x, mean, serial)
    dbeta = row_sums(s1)
    dgamma = row_sums(s2) * invstd
    if training:
        a, b, c0 = train_coefficients(dbeta, dgamma, invstd, gamma, x.shape[0] * x.shape[2])
        mean_hi, mean_lo = split_mean(mean, x)
        _input_gradient(
            dy, x, out, in_dtype(a, x), in_dtype(b, x), mean_hi, mean_lo, in_dtype(c0, x), serial
        )
    else:
        zero = np.zeros_like(in_dtype(mean, x))
        _apply(dy, out, zero, zero, in_dtype(gamma * invstd, x), zero, serial)
    return dgamma, dbeta
