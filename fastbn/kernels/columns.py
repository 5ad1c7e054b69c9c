"""The columns family: features interleave along each row of memory.

Data is a flat C-contiguous array of rows of C*Q values (batch-first has
Q == 1; a short Q is folded in). Rows are grouped k at a time into groups of
W = k*C*Q values, position j of a group belonging to feature (j // Q) % C,
so short rows still give long vectors. A work unit is a block of groups
times a block of positions; it accumulates down its groups into its own
partial row, vectorized across positions. Partial rows are merged after the
parallel loop in a fixed order, and the units depend on the shape only, so
results do not depend on the thread count; no thread ever writes where
another does. The element-wise passes reduce nothing: their units are
blocks of whole groups, so that each thread streams through memory in
order (a unit of 1024-position pieces, one 4 KiB page a row, ran batch-first
(4096, 4096) float32 eval at 2.25x the RW floor, whole groups at 1.05-1.5x).
"""

import numpy as np
from numba import njit, prange

from fastbn import _compile
from fastbn.kernels._common import (
    EXACT_MATH,
    REDUCE_MATH,
    activated,
    forward_moments,
    normalized,
    relu_params,
    relu_passes,
    row_sums,
    split,
    train_coefficients,
    zeros,
)
from fastbn.kernels._twins import Twins

MIN_WIDTH = 256  # values per group at least, so that each group is a few vectors long
POSITION_BLOCK = 1024  # positions per unit: its partial rows stay in L1
UNIT_VALUES = 16384  # values per unit at least: amortizes the unit's set-up
TARGET_UNITS = 32  # units to share among threads, where the data allows
PARTIAL_VALUES = 8192  # partial rows hold this many sums at most: they stay in L2
STREAM_BYTES = 1 << 24  # passes touching more than this take one group a step (see below)

twin = Twins(globals())  # every driver and entry also has a one-thread twin (serial_twin)


def group_width(n_features, run):
    """W: the smallest multiple of a row (n_features * run values) of at least MIN_WIDTH."""
    row = n_features * run
    return row * -(-MIN_WIDTH // row)


@njit(inline="always")
def _grid(n, width):
    """(groups, groups per block, blocks, position blocks) for n values in groups of width."""
    groups = n // width
    position_blocks = -(-width // POSITION_BLOCK)
    wanted_blocks = min(-(-TARGET_UNITS // position_blocks), max(1, PARTIAL_VALUES // width))
    per_block = max(1, -(-groups // wanted_blocks), -(-UNIT_VALUES // min(width, POSITION_BLOCK)))
    return groups, per_block, -(-groups // per_block), position_blocks


@njit(inline="always")
def _memory_grid(n, width):
    """(groups, groups per block, blocks) of an element-wise pass: blocks of whole groups."""
    groups = n // width
    per_block = max(1, -(-UNIT_VALUES // width), -(-groups // TARGET_UNITS))
    return groups, per_block, -(-groups // per_block)


@njit(inline="always")
def _unit(u, width, grid):
    """Block, group range and position range of unit u."""
    groups, per_block, _, position_blocks = grid
    b = u // position_blocks
    j0 = (u - b * position_blocks) * POSITION_BLOCK
    g0 = b * per_block
    return b, g0, min(g0 + per_block, groups), j0, min(j0 + POSITION_BLOCK, width)


@njit
def tile_rows(params, n_features, run, width):
    """(K, C) values per feature -> (K, W) values per group position.

    Position j belongs to feature (j // run) % n_features: the first row of
    C * run positions is filled per feature, the others repeat it.
    """
    row = n_features * run
    out = np.empty((params.shape[0], width), params.dtype)
    for k in range(params.shape[0]):
        j = 0
        for c in range(n_features):
            v = params[k, c]
            for _ in range(run):
                out[k, j] = v
                j += 1
        for j in range(row, width):
            out[k, j] = out[k, j - row]
    return out


@njit
def tile(values, n_features, run, width):
    """values per feature -> values per group position (see tile_rows)."""
    return tile_rows(values.reshape((1, values.size)), n_features, run, width)[0]


@njit
def fold(partials, n_features, run):
    """Sum (blocks, W) partial rows to per-feature totals in a fixed order.

    The rows are summed position by position first (a vectorized loop), then
    each position's total goes to its feature.
    """
    width = partials.shape[1]
    flat = partials.reshape(-1)
    w = np.uint64(width)
    by_position = np.zeros(width)
    for b in range(partials.shape[0]):
        o = np.uint64(b) * w
        for j in range(w):
            by_position[j] += flat[o + j]
    total = np.zeros(n_features)
    j = 0
    for _ in range(width // (n_features * run)):  # counters, not a division per position
        for c in range(n_features):
            for _ in range(run):
                total[c] += by_position[j]
                j += 1
    return total


# The block kernels take flat arrays and unsigned offsets, as the run kernels
# of _common do. Position j0 + i of group g is x[g * width + j0 + i]; its
# parameters and its partial sums sit at j0 + i of their rows.


@njit(fastmath=REDUCE_MATH)
def _moments_block(x, width, g0, g1, j0, n, shift, s1, s2, row):
    """Add x - shift and its square, down groups g0..g1, to the partial row at row*width + j0."""
    w = np.uint64(width)
    w2 = w + w  # offsets stay unsigned: an int literal times a uint64 is a float in Numba
    w3 = w2 + w
    oj = np.uint64(j0)
    oa = np.uint64(row) * w + oj
    g = g0
    while g + 4 <= g1:  # four groups a step: a quarter of the partial-row traffic
        o = np.uint64(g) * w + oj
        for i in range(np.uint64(n)):
            k = shift[oj + i]
            d0 = np.float64(x[o + i]) - k
            d1 = np.float64(x[o + w + i]) - k
            d2 = np.float64(x[o + w2 + i]) - k
            d3 = np.float64(x[o + w3 + i]) - k
            s1[oa + i] += (d0 + d1) + (d2 + d3)
            s2[oa + i] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        g += 4
    while g < g1:
        o = np.uint64(g) * w + oj
        for i in range(np.uint64(n)):
            d = np.float64(x[o + i]) - shift[oj + i]
            s1[oa + i] += d
            s2[oa + i] += d * d
        g += 1


@njit(fastmath=REDUCE_MATH)
def _grad_sums_block(dy, x, width, g0, g1, j0, n, mean, s1, s2, row, fours):
    """Add dy and dy * (x - mean), down groups g0..g1, to the partial row at row*width + j0.

    fours: whether to take four groups a step (see `_takes_fours`).
    """
    w = np.uint64(width)
    w2 = w + w  # offsets stay unsigned: an int literal times a uint64 is a float in Numba
    w3 = w2 + w
    oj = np.uint64(j0)
    oa = np.uint64(row) * w + oj
    g = g0
    while fours and g + 4 <= g1:
        o = np.uint64(g) * w + oj
        for i in range(np.uint64(n)):
            m = mean[oj + i]
            e0 = np.float64(dy[o + i])
            e1 = np.float64(dy[o + w + i])
            e2 = np.float64(dy[o + w2 + i])
            e3 = np.float64(dy[o + w3 + i])
            s1[oa + i] += (e0 + e1) + (e2 + e3)
            s2[oa + i] += (
                e0 * (np.float64(x[o + i]) - m) + e1 * (np.float64(x[o + w + i]) - m)
            ) + (e2 * (np.float64(x[o + w2 + i]) - m) + e3 * (np.float64(x[o + w3 + i]) - m))
        g += 4
    while g < g1:
        o = np.uint64(g) * w + oj
        for i in range(np.uint64(n)):
            e = np.float64(dy[o + i])
            s1[oa + i] += e
            s2[oa + i] += e * (np.float64(x[o + i]) - mean[oj + i])
        g += 1


@njit(fastmath=EXACT_MATH, inline="always")
def _input_grad(dy, v, scale, invstd, mean_hi, mean_lo, k_xhat, k0):
    x_hat = ((v - mean_hi) - mean_lo) * invstd
    return scale * (dy + x_hat * k_xhat + k0)


# The element-wise blocks also take four groups a step: each load of a
# position's parameters then serves four values, where one a value would
# leave the loop bound by loads from L1 (5 per value for _scale_block).


@njit(inline="always")
def _takes_fours(x, arrays):
    """Whether a pass over this many arrays of x's size takes four groups a step.

    Four groups a step read and write 8-12 interleaved streams, each a
    single row long (1 KiB at 256 float32 features): from cache that is the
    faster loop, but a pass that streams from memory ran 1.5-3.5x slower
    than one group a step (x of 16-32 MiB, 2 threads, AMD EPYC), so past
    STREAM_BYTES touched the blocks go one group a step.
    """
    return x.size * x.itemsize * arrays <= STREAM_BYTES


@njit(fastmath=EXACT_MATH, inline="always")
def _output(v, mean_hi, mean_lo, scale, shift, relu, zero):
    return activated(normalized(v, mean_hi, mean_lo, scale, shift), relu, zero)


@njit(fastmath=EXACT_MATH)
def _scale_block(x, out, width, g0, g1, j0, n, mean_hi, mean_lo, scale, shift, relu, fours):
    """out = ((x - mean_hi) - mean_lo) * scale + shift (then relu), per position, over g0..g1."""
    w = np.uint64(width)
    w2 = w + w
    w3 = w2 + w
    oj = np.uint64(j0)
    zero = out.dtype.type(0)
    g = g0
    while fours and g + 4 <= g1:
        o = np.uint64(g) * w + oj
        for i in range(np.uint64(n)):
            p = oj + i
            h, lo, sc, sh = mean_hi[p], mean_lo[p], scale[p], shift[p]
            out[o + i] = _output(x[o + i], h, lo, sc, sh, relu, zero)
            out[o + w + i] = _output(x[o + w + i], h, lo, sc, sh, relu, zero)
            out[o + w2 + i] = _output(x[o + w2 + i], h, lo, sc, sh, relu, zero)
            out[o + w3 + i] = _output(x[o + w3 + i], h, lo, sc, sh, relu, zero)
        g += 4
    while g < g1:
        o = np.uint64(g) * w + oj
        for i in range(np.uint64(n)):
            p = oj + i
            out[o + i] = _output(x[o + i], mean_hi[p], mean_lo[p], scale[p], shift[p], relu, zero)
        g += 1


@njit(fastmath=EXACT_MATH)
def _input_gradient_block(dy, x, out, width, g0, g1, j0, n, coefficients, fours):
    """dx = scale * (dy + x_hat * k_xhat + k0) per position, over groups g0..g1."""
    scale, invstd, mean_hi, mean_lo, k_xhat, k0 = coefficients
    w = np.uint64(width)
    w2 = w + w
    w3 = w2 + w
    oj = np.uint64(j0)
    g = g0
    while fours and g + 4 <= g1:
        o = np.uint64(g) * w + oj
        for i in range(np.uint64(n)):
            p = oj + i
            s, v, h, lo, kx, kc = scale[p], invstd[p], mean_hi[p], mean_lo[p], k_xhat[p], k0[p]
            out[o + i] = _input_grad(dy[o + i], x[o + i], s, v, h, lo, kx, kc)
            out[o + w + i] = _input_grad(dy[o + w + i], x[o + w + i], s, v, h, lo, kx, kc)
            out[o + w2 + i] = _input_grad(dy[o + w2 + i], x[o + w2 + i], s, v, h, lo, kx, kc)
            out[o + w3 + i] = _input_grad(dy[o + w3 + i], x[o + w3 + i], s, v, h, lo, kx, kc)
        g += 4
    while g < g1:
        o = np.uint64(g) * w + oj
        for i in range(np.uint64(n)):
            p = oj + i
            out[o + i] = _input_grad(
                dy[o + i], x[o + i], scale[p], invstd[p], mean_hi[p], mean_lo[p], k_xhat[p], k0[p]
            )
        g += 1


@twin(parallel=True)
def _moments(x, shift, width):
    """Partial rows (blocks + 1, W) of x - shift and its square; the last row is the tail."""
    grid = _grid(x.size, width)
    groups, _, blocks, position_blocks = grid
    s1 = zeros((blocks + 1) * width)
    s2 = zeros((blocks + 1) * width)
    for u in prange(blocks * position_blocks):
        b, g0, g1, j0, j1 = _unit(u, width, grid)
        _moments_block(x, width, g0, g1, j0, j1 - j0, shift, s1, s2, b)
    tail = x.size - groups * width
    _moments_block(x, width, groups, groups + 1, 0, tail, shift, s1, s2, blocks)
    return s1.reshape((blocks + 1, width)), s2.reshape((blocks + 1, width))


@twin(parallel=True)
def _grad_sums(dy, x, mean, width):
    """Partial rows (blocks + 1, W) of dy and dy * (x - mean); the last row is the tail."""
    grid = _grid(x.size, width)
    groups, _, blocks, position_blocks = grid
    s1 = zeros((blocks + 1) * width)
    s2 = zeros((blocks + 1) * width)
    fours = _takes_fours(x, 2)
    for u in prange(blocks * position_blocks):
        b, g0, g1, j0, j1 = _unit(u, width, grid)
        _grad_sums_block(dy, x, width, g0, g1, j0, j1 - j0, mean, s1, s2, b, fours)
    tail = x.size - groups * width
    _grad_sums_block(dy, x, width, groups, groups + 1, 0, tail, mean, s1, s2, blocks, fours)
    return s1.reshape((blocks + 1, width)), s2.reshape((blocks + 1, width))


@twin(parallel=True)
def _apply(x, out, mean_hi, mean_lo, scale, shift, relu=None):
    """out = ((x - mean) * scale + shift) with per-position parameters of length W; then relu."""
    width = mean_hi.size
    groups, per_block, blocks = _memory_grid(x.size, width)
    fours = _takes_fours(x, 2)
    for u in prange(blocks):
        g0 = u * per_block
        g1 = min(g0 + per_block, groups)
        _scale_block(x, out, width, g0, g1, 0, width, mean_hi, mean_lo, scale, shift, relu, fours)
    tail = x.size - groups * width
    _scale_block(
        x, out, width, groups, groups + 1, 0, tail, mean_hi, mean_lo, scale, shift, relu, fours
    )


@njit(fastmath=EXACT_MATH)
def _passed_scaled_block(dy, x, out, width, g0, g1, n, scale, relu):
    """dx = scale * dy per position where the fused ReLU passed, else 0, over groups g0..g1."""
    w = np.uint64(width)
    zero = out.dtype.type(0)
    for g in range(g0, g1):
        o = np.uint64(g) * w
        for i in range(np.uint64(n)):
            out[o + i] = scale[i] * (dy[o + i] if relu_passes(x[o + i], relu, i) else zero)


@twin(parallel=True)
def _passed_scaled(dy, x, out, scale, relu):
    """dx = scale * dy where the fused ReLU passed, else 0, with per-position scale of length W."""
    width = scale.size
    groups, per_block, blocks = _memory_grid(x.size, width)
    for u in prange(blocks):
        g0 = u * per_block
        _passed_scaled_block(
            dy, x, out, width, g0, min(g0 + per_block, groups), width, scale, relu
        )
    tail = x.size - groups * width
    _passed_scaled_block(dy, x, out, width, groups, groups + 1, tail, scale, relu)


@twin(parallel=True)
def _input_gradient(dy, x, out, coefficients):
    """dx from per-position (scale, invstd, mean_hi, mean_lo, k_xhat, k0) of length W."""
    width = coefficients[0].size
    groups, per_block, blocks = _memory_grid(x.size, width)
    fours = _takes_fours(x, 3)
    for u in prange(blocks):
        g0 = u * per_block
        g1 = min(g0 + per_block, groups)
        _input_gradient_block(dy, x, out, width, g0, g1, 0, width, coefficients, fours)
    tail = x.size - groups * width
    _input_gradient_block(dy, x, out, width, groups, groups + 1, 0, tail, coefficients, fours)


@twin()
def _apply_per_feature(x, out, n_features, run, width, mean, scale, beta, relu=None):
    """The normalize + affine pass from per-feature float64 parameters (then relu)."""
    t = x.dtype.type
    params = np.empty((4, n_features), x.dtype)  # mean as hi + lo, scale, shift
    for c in range(n_features):
        params[0, c], params[1, c] = split(mean[c], t)
        params[2, c] = scale[c]
        params[3, c] = beta[c]
    p = tile_rows(params, n_features, run, width)
    _apply(x, out, p[0], p[1], p[2], p[3], relu)


@twin()
def _mean_var(x, n_features, run, width):
    """float64 mean and biased variance of each feature (x as in train_forward)."""
    first = np.empty(n_features)
    for c in range(n_features):
        first[c] = x[c * run]
    s1, s2 = _moments(x, tile(first, n_features, run, width), width)
    s1, s2 = fold(s1, n_features, run), fold(s2, n_features, run)
    return forward_moments(s1, s2, first, x.size // n_features)


@twin()
def _train(x, n_features, run, width, gamma, beta, eps, out, relu):
    """train_forward, then a ReLU where relu is True (None: none)."""
    mean, var = _mean_var(x, n_features, run, width)
    invstd = 1.0 / np.sqrt(var + eps)
    _apply_per_feature(x, out, n_features, run, width, mean, gamma * invstd, beta, relu)
    return mean, invstd


@twin(entry=True)
def train_forward(x, n_features, run, width, gamma, beta, eps, out, relu):
    """Batch statistics, then out = gamma * (x - mean) * invstd + beta (relu True: max(., 0)).

    x and out are 1-D C-contiguous, rows of n_features * run values; width
    is a multiple of that. Returns float64 mean and invstd. relu is None or True.
    """
    return _train(x, n_features, run, width, gamma, beta, eps, out, relu)


@twin()
def _eval(x, n_features, run, width, running_mean, running_var, gamma, beta, eps, out, relu):
    """eval_forward, then a ReLU where relu is True (None: none).

    The scale is gamma * invstd with invstd = 1 / sqrt(running_var + eps) in
    float64, as the backward gets it: a fused ReLU's mask then matches.
    """
    scale = gamma * (1.0 / np.sqrt(running_var.astype(np.float64) + eps))
    _apply_per_feature(x, out, n_features, run, width, running_mean, scale, beta, relu)


@twin(entry=True)
def eval_forward(
    x, n_features, run, width, running_mean, running_var, gamma, beta, eps, out, relu
):
    """out = gamma * (x - running_mean) / sqrt(running_var + eps) + beta (relu True: max(., 0))."""
    _eval(x, n_features, run, width, running_mean, running_var, gamma, beta, eps, out, relu)


@twin()
def _param_sums(dy, x, n_features, run, width, mean, invstd):
    """float64 dgamma = sum(dy * x_hat) and dbeta = sum(dy) per feature, without dx."""
    s1, s2 = _grad_sums(dy, x, tile(mean, n_features, run, width), width)
    return fold(s2, n_features, run) * invstd, fold(s1, n_features, run)


@twin()
def _train_dx(dy, x, n_features, run, width, mean, invstd, gamma, dgamma, dbeta, count, out):
    """dx of the training formula from given sums dgamma, dbeta over count values per feature.

    backward() passes this batch's sums; a synchronized batch norm passes
    the sums and count of every process's batch.
    """
    scale, k_xhat, k0 = train_coefficients(dbeta, dgamma, invstd, gamma, count)
    t = x.dtype.type
    params = np.empty((6, n_features), x.dtype)  # the coefficients of _input_gradient_block
    for c in range(n_features):
        params[0, c] = scale[c]
        params[1, c] = invstd[c]
        params[2, c], params[3, c] = split(mean[c], t)
        params[4, c] = k_xhat[c]
        params[5, c] = k0[c]
    p = tile_rows(params, n_features, run, width)
    _input_gradient(dy, x, out, (p[0], p[1], p[2], p[3], p[4], p[5]))


@twin()
def _backward(dy, x, n_features, run, width, mean, invstd, gamma, training, out):
    """backward's body (entries must not call entries: see `Twins`)."""
    dgamma, dbeta = _param_sums(dy, x, n_features, run, width, mean, invstd)
    if training:
        _train_dx(
            dy, x, n_features, run, width, mean, invstd, gamma, dgamma, dbeta,
            x.size // n_features, out,
        )  # fmt: skip
    else:
        zero = np.zeros(n_features)
        _apply_per_feature(dy, out, n_features, run, width, zero, gamma * invstd, zero)
    return dgamma, dbeta


@twin(entry=True)
def backward(dy, x, n_features, run, width, mean, invstd, gamma, beta, training, out):
    """dx into out; returns float64 dgamma and dbeta, x_hat recomputed from x.

    beta None: plain batch norm; else the forward's shift, and the gradient
    goes through the ReLU fused after it (its mask recomputed from x). Then
    dy is masked into a buffer first, and the plain backward runs on that:
    one pass and one input-sized buffer more than the rows family's fused
    loops, whose mask parameters are per feature. With per-position
    parameters the fused loops stayed scalar (LLVM here) and ran 4x the
    plain backward.
    """
    if beta is None:
        return _backward(dy, x, n_features, run, width, mean, invstd, gamma, training, out)
    relu = tile_rows(relu_params(mean, invstd, gamma, beta, x), n_features, run, width)
    passed = np.empty_like(dy)  # not out: in place, the backward's loops run scalar
    _passed_scaled(dy, x, passed, np.ones(width, x.dtype), relu)
    return _backward(passed, x, n_features, run, width, mean, invstd, gamma, training, out)


@twin(entry=True)
def moments(x, n_features, run, width):
    """float64 mean and biased variance of each feature (for a synchronized batch norm)."""
    return _mean_var(x, n_features, run, width)


@twin(entry=True)
def param_grads(dy, x, n_features, run, width, mean, invstd):
    """float64 dgamma = sum(dy * x_hat) and dbeta = sum(dy) per feature, without dx."""
    return _param_sums(dy, x, n_features, run, width, mean, invstd)


@twin(entry=True)
def train_input_gradient(
    dy, x, n_features, run, width, mean, invstd, gamma, dgamma, dbeta, count, out
):
    """dx of the training formula from given sums over count values per feature."""
    _train_dx(dy, x, n_features, run, width, mean, invstd, gamma, dgamma, dbeta, count, out)


# Ghost batches: G slices stacked as (G, S), each slice flat (rows of C * Q
# values) and normalized with its own statistics, as in rows.py: one parallel
# loop over the slices through this family's serial internals.


@twin(serial=True)
def _train_slice(x, n_features, run, width, gamma, beta, eps, out, mean, invstd):
    slice_mean, var = _mean_var(x, n_features, run, width)
    slice_invstd = 1.0 / np.sqrt(var + eps)
    _apply_per_feature(x, out, n_features, run, width, slice_mean, gamma * slice_invstd, beta)
    mean[:] = slice_mean
    invstd[:] = slice_invstd


@twin(serial=True)
def _backward_slice(dy, x, n_features, run, width, mean, invstd, gamma, out, dgamma, dbeta):
    slice_dgamma, slice_dbeta = _param_sums(dy, x, n_features, run, width, mean, invstd)
    _train_dx(
        dy, x, n_features, run, width, mean, invstd, gamma, slice_dgamma, slice_dbeta,
        x.size // n_features, out,
    )  # fmt: skip
    dgamma[:] = slice_dgamma
    dbeta[:] = slice_dbeta


@twin(parallel=True)
def _train_slices(x, n_features, run, width, gamma, beta, eps, out, mean, invstd):
    for g in prange(x.shape[0]):
        _train_slice(x[g], n_features, run, width, gamma, beta, eps, out[g], mean[g], invstd[g])


@twin(parallel=True)
def _backward_slices(dy, x, n_features, run, width, mean, invstd, gamma, out, dgamma, dbeta):
    for g in prange(x.shape[0]):
        _backward_slice(
            dy[g], x[g], n_features, run, width, mean[g], invstd[g], gamma, out[g], dgamma[g],
            dbeta[g],
        )  # fmt: skip


@twin(entry=True, quiet=True)
def ghost_train_forward(x, n_features, run, width, gamma, beta, eps, out):
    """Each slice x[g] (flat rows of n_features * run values) normalized on its own into out[g].

    x and out are (G, S) C-contiguous; returns float64 mean and invstd of
    shape (G, C).
    """
    mean = np.empty((x.shape[0], n_features))
    invstd = np.empty((x.shape[0], n_features))
    _train_slices(x, n_features, run, width, gamma, beta, eps, out, mean, invstd)
    return mean, invstd


@twin(entry=True, quiet=True)
def ghost_backward(dy, x, n_features, run, width, mean, invstd, gamma, out):
    """Each slice's training dx into out; returns float64 dgamma and dbeta summed over slices."""
    dgamma = np.empty(mean.shape)
    dbeta = np.empty(mean.shape)
    _backward_slices(dy, x, n_features, run, width, mean, invstd, gamma, out, dgamma, dbeta)
    return row_sums(dgamma.T), row_sums(dbeta.T)


twin.finish()
_compile.guard(globals())
