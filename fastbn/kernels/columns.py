"""The columns family: features interleave along each row of memory.

Data is a flat C-contiguous array of rows of C*Q values (batch-first has
Q == 1; a short Q is folded in). Rows are grouped k at a time into groups of
W = k*C*Q values, position j of a group belonging to feature (j // Q) % C,
so short rows still give vectors to work with. A work unit is a block of
groups times a block of positions; it accumulates down the groups into its
own partial row, vectorized across positions. Partial rows are merged after
the parallel loop in a fixed order, so results do not depend on the thread
count; no thread ever writes where another does.
"""

import numpy as np
from numba import njit, prange

from fastbn.kernels._common import (
    forward_stats,
    in_dtype,
    input_gradient_each,
    scale_centered_each,
    split_mean,
    train_coefficients,
    zeros,
)

GROUP_BLOCK = 32768  # values per block of groups
POSITION_BLOCK = 1024  # positions per unit: its partial rows stay in L1
PARTIAL_LIMIT = 1 << 18  # values in all partial rows together, whatever W


@njit(cache=True)
def _grid(n, width):
    """(groups, groups per block, blocks, position blocks) for n values in groups of width."""
    groups = n // width
    max_blocks = max(1, PARTIAL_LIMIT // width)
    per_block = max(1, -(-GROUP_BLOCK // width), -(-groups // max_blocks))
    blocks = -(-groups // per_block)
    return groups, per_block, blocks, -(-width // POSITION_BLOCK)


@njit(cache=True)
def _unit(u, width, grid):
    """Group range and position range of unit u."""
    groups, per_block, _, position_blocks = grid
    b = u // position_blocks
    j0 = (u - b * position_blocks) * POSITION_BLOCK
    g0 = b * per_block
    return b, g0, min(g0 + per_block, groups), j0, min(j0 + POSITION_BLOCK, width)


@njit(cache=True)
def tile(values, n_features, run, width):
    """values per feature -> values per group position (feature (j // run) % n_features)."""
    out = np.empty(width, values.dtype)
    for j in range(width):
        out[j] = values[(j // run) % n_features]
    return out


@njit(cache=True)
def fold(partials, n_features, run):
    """Sum (blocks, W) partial rows to per-feature totals in a fixed order."""
    total = np.zeros(n_features)
    for b in range(partials.shape[0]):
        for j in range(partials.shape[1]):
            total[(j // run) % n_features] += partials[b, j]
    return total


@njit(cache=True)
def _moments_groups(flat, shift, width, g0, g1, j0, j1, s1, s2):
    """Add x - shift and its square, down groups g0..g1, to s1, s2 at j0..j1."""
    # Slices let every index start at 0: Numba then drops its negative-index
    # check, which would otherwise stop the loop from vectorizing.
    shift = shift[j0:j1]
    s1 = s1[j0:j1]
    s2 = s2[j0:j1]
    for g in range(g0, g1):
        x = flat[g * width + j0 : g * width + j1]
        for j in range(x.size):
            d = np.float64(x[j]) - shift[j]
            s1[j] += d
            s2[j] += d * d


@njit(cache=True)
def _grad_sums_groups(dy_flat, flat, mean, width, g0, g1, j0, j1, s1, s2):
    """Add dy and dy * (x - mean), down groups g0..g1, to s1, s2 at j0..j1."""
    mean = mean[j0:j1]
    s1 = s1[j0:j1]
    s2 = s2[j0:j1]
    for g in range(g0, g1):
        dy = dy_flat[g * width + j0 : g * width + j1]
        x = flat[g * width + j0 : g * width + j1]
        for j in range(x.size):
            d = np.float64(dy[j])
            s1[j] += d
            s2[j] += d * (np.float64(x[j]) - mean[j])


@njit(parallel=True, cache=True)
def _moments(flat, shift, width, serial):
    """Partial rows (blocks + 1, W) of x - shift and its square; the last row is the tail."""
    grid = _grid(flat.size, width)
    groups, _, blocks, position_blocks = grid
    s1 = zeros((blocks + 1, width))
    s2 = zeros((blocks + 1, width))
    if serial:
        for u in range(blocks * position_blocks):
            b, g0, g1, j0, j1 = _unit(u, width, grid)
            _moments_groups(flat, shift, width, g0, g1, j0, j1, s1[b], s2[b])
    else:
        for u in prange(blocks * position_blocks):
            b, g0, g1, j0, j1 = _unit(u, width, grid)
            _moments_groups(flat, shift, width, g0, g1, j0, j1, s1[b], s2[b])
    tail = flat.size - groups * width
    _moments_groups(flat[groups * width :], shift, width, 0, 1, 0, tail, s1[blocks], s2[blocks])
    return s1, s2


@njit(parallel=True, cache=True)
def _grad_sums(dy, flat, mean, width, serial):
    """Partial rows (blocks + 1, W) of dy and dy * (x - mean); the last row is the tail."""
    grid = _grid(flat.size, width)
    groups, _, blocks, position_blocks = grid
    s1 = zeros((blocks + 1, width))
    s2 = zeros((blocks + 1, width))
    if serial:
        for u in range(blocks * position_blocks):
            b, g0, g1, j0, j1 = _unit(u, width, grid)
            _grad_sums_groups(dy, flat, mean, width, g0, g1, j0, j1, s1[b], s2[b])
    else:
        for u in prange(blocks * position_blocks):
            b, g0, g1, j0, j1 = _unit(u, width, grid)
            _grad_sums_groups(dy, flat, mean, width, g0, g1, j0, j1, s1[b], s2[b])
    tail = flat.size - groups * width
    start = groups * width
    _grad_sums_groups(dy[start:], flat[start:], mean, width, 0, 1, 0, tail, s1[blocks], s2[blocks])
    return s1, s2


@njit(cache=True)
def _apply_groups(flat, out, width, g0, g1, j0, j1, mean_hi, mean_lo, scale, shift):
    for g in range(g0, g1):
        lo = g * width
        scale_centered_each(
            flat[lo + j0 : lo + j1],
            out[lo + j0 : lo + j1],
            mean_hi[j0:j1],
            mean_lo[j0:j1],
            scale[j0:j1],
            shift[j0:j1],
        )


@njit(cache=True)
def _input_gradient_groups(dy, flat, out, width, g0, g1, j0, j1, a, b, mean_hi, mean_lo, c):
    for g in range(g0, g1):
        lo = g * width + j0
        hi = g * width + j1
        input_gradient_each(
            dy[lo:hi],
            flat[lo:hi],
            out[lo:hi],
            a[j0:j1],
            b[j0:j1],
            mean_hi[j0:j1],
            mean_lo[j0:j1],
            c[j0:j1],
        )


@njit(parallel=True, cache=True)
def _apply(flat, out, mean_hi, mean_lo, scale, shift, serial):
    """out = ((x - mean) * scale + shift) with per-position parameters of length W."""
    width = mean_hi.size
    grid = _grid(flat.size, width)
    groups, _, blocks, position_blocks = grid
    if serial:
        for u in range(blocks * position_blocks):
            _, g0, g1, j0, j1 = _unit(u, width, grid)
            _apply_groups(flat, out, width, g0, g1, j0, j1, mean_hi, mean_lo, scale, shift)
    else:
        for u in prange(blocks * position_blocks):
            _, g0, g1, j0, j1 = _unit(u, width, grid)
            _apply_groups(flat, out, width, g0, g1, j0, j1, mean_hi, mean_lo, scale, shift)
    tail = flat.size - groups * width
    start = groups * width
    _apply_groups(flat[start:], out[start:], width, 0, 1, 0, tail, mean_hi, mean_lo, scale, shift)


@njit(parallel=True, cache=True)
def _input_gradient(dy, flat, out, a, b, mean_hi, mean_lo, c, serial):
    width = a.size
    grid = _grid(flat.size, width)
    groups, _, blocks, position_blocks = grid
    if serial:
        for u in range(blocks * position_blocks):
            _, g0, g1, j0, j1 = _unit(u, width, grid)
            _input_gradient_groups(dy, flat, out, width, g0, g1, j0, j1, a, b, mean_hi, mean_lo, c)
    else:
        for u in prange(blocks * position_blocks):
            _, g0, g1, j0, j1 = _unit(u, width, grid)
            _input_gradient_groups(dy, flat, out, width, g0, g1, j0, j1, a, b, mean_hi, mean_lo, c)
    tail = flat.size - groups * width
    s = groups * width
    _input_gradient_groups(
        dy[s:], flat[s:], out[s:], width, 0, 1, 0, tail, a, b, mean_hi, mean_lo, c
    )


@njit(cache=True)
def _apply_per_feature(flat, out, n_features, run, width, mean, scale, beta, serial):
    """The normalize + affine pass from per-feature float64 parameters."""
    mean_hi, mean_lo = split_mean(tile(mean, n_features, run, width), flat)
    scale_t = in_dtype(tile(scale, n_features, run, width), flat)
    shift_t = in_dtype(tile(beta, n_features, run, width), flat)
    _apply(flat, out, mean_hi, mean_lo, scale_t, shift_t, serial)


@njit(cache=True)
def train_forward(flat, n_features, run, width, gamma, beta, eps, out, serial):
    """Batch statistics, then out = gamma * (x - mean) * invstd + beta.

    flat and out are 1-D C-contiguous, rows of n_features * run values;
    width is a multiple of that. Returns float64 mean and invstd.
    """
    first = np.empty(n_features)
    for c in range(n_features):
        first[c] = flat[c * run]
    s1, s2 = _moments(flat, tile(first, n_features, run, width), width, serial)
    count = flat.size // n_features
    mean, invstd = forward_stats(
        fold(s1, n_features, run), fold(s2, n_features, run), first, count, eps
    )
    _apply_per_feature(flat, out, n_features, run, width, mean, gamma * invstd, beta, serial)
    return mean, invstd


@njit(cache=True)
def eval_forward(
    flat, n_features, run, width, running_mean, running_var, gamma, beta, eps, out, serial
):
    """out = gamma * (x - running_mean) / sqrt(running_var + eps) + beta."""
    scale = gamma / np.sqrt(running_var + eps)
    _apply_per_feature(flat, out, n_features, run, width, running_mean, scale, beta, serial)


@njit(cache=True)
def backward(dy, flat, n_features, run, width, mean, invstd, gamma, training, out, serial):
    """dx into out; returns float64 dgamma and dbeta, x_hat recomputed from x."""
    s1, s2 = _grad_sums(dy, flat, tile(mean, n_features, run, width), width, serial)
    dbeta = fold(s1, n_features, run)
    dgamma = fold(s2, n_features, run) * invstd
    if training:
        a, b, c = train_coefficients(dbeta, dgamma, invstd, gamma, flat.size // n_features)
        mean_hi, mean_lo = split_mean(tile(mean, n_features, run, width), flat)
        _input_gradient(
            dy,
            flat,
            out,
            in_dtype(tile(a, n_features, run, width), flat),
            in_dtype(tile(b, n_features, run, width), flat),
            mean_hi,
            mean_lo,
            in_dtype(tile(c, n_features, run, width), flat),
            serial,
        )
    else:
        zero = np.zeros(n_features)
        _apply_per_feature(dy, out, n_features, run, width, zero, gamma * invstd, zero, serial)
    return dgamma, dbeta
