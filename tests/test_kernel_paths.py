"""Every loop of every kernel family, against the float64 reference.

test_functional's layout x memory-order grid holds small shapes, each one
group of the columns family or one chunk of the rows family: a wrong term in a
loop they never enter passes it. Here the shapes are found from the kernels'
own constants and grid functions (`rows._grid`, `columns._grid`,
`columns._memory_grid`, `fastbn._plan.Plan`), so that together they enter
every loop, whatever those constants become:

- columns family: the 4-groups-a-step loops of the sums and of the
  element-wise passes, with 0, 1, 2 and 3 groups left over for the one-group
  loop; several blocks of groups, the last one short; several position blocks
  with a short last one; the tail (a partial group); runs folded into groups
  (Q > 1); data large enough that the passes go one group a step
  (`columns.STREAM_BYTES`);
- rows family: the per-feature schedule (P == 1 and P > 1) and the chunked one
  (few features, or features too large for L2), its q chunks with a short last
  one, its p blocks with a short last one and both at once; the element-wise
  passes' chunks, with a short last one and chunks that cut runs; few features
  with many values;
- each on one thread (the serial twin) and on many (the parallel split), with
  and without the fused ReLU (train, eval and both backwards), and the
  entries of a synchronized batch norm (moments, parameter gradients, dx from
  given sums);
- ghost batch norm: slices stacked for the rows and the columns family (each
  slice through its family's serial internals, the columns slices past the
  4-group step), one thread and many, and the merged features-first view.

`test_case_reaches_its_loops` checks that each case still reaches what it is
named for, and `test_the_grid_reaches_every_loop` that every loop is wanted by
some case. Results are compared with ``fastbn.reference`` on float64 copies of
the same values, with the suite's tolerances (conftest `assert_close`,
`assert_stats_close`).
"""

import functools
import math

import numpy as np
import pytest
from conftest import (
    DTYPES,
    STAT_TOL,
    TOL,
    assert_close,
    assert_stats_close,
    f64,
    ref_backward,
    ref_eval,
    ref_train,
    running_invstd,
)

import fastbn
from fastbn import _checks, _engine
from fastbn._plan import PARALLEL_MIN, ROWS_MIN_RUN, Plan, plan_for
from fastbn.ghost import GhostPlan
from fastbn.kernels import columns, rows

# Not the default eps: a kernel that used 1e-5 instead of the caller's eps
# changes invstd by ~eps / (2 var) ~ 2e-3 here (var >= 0.25), far above any tolerance.
EPS = 1e-3


def _cdiv(a, b):
    return -(-a // b)


# ---------------------------------------------------------------- what a shape reaches


def _block_sizes(groups, per_block, blocks):
    """The number of groups in each block of a columns grid."""
    return [min(per_block, groups - b * per_block) for b in range(blocks)]


def _columns_loops(prefix, size, width, run):
    """Labels of the columns family's loops that data of size values in groups of width enter."""
    found = set()
    groups, per_block, blocks, position_blocks = columns._grid(size, width)
    sizes = {
        "sums": _block_sizes(groups, per_block, blocks),
        "element-wise": _block_sizes(*columns._memory_grid(size, width)),
    }
    for what, counts in sizes.items():
        if len(counts) > 1:
            found.add(f"{prefix} {what}: blocks")
            if counts[-1] != counts[0]:
                found.add(f"{prefix} {what}: a short last block")
        for n in counts:
            if n >= 4:
                found.add(f"{prefix} {what}: 4-group step")
                found.add(f"{prefix} {what}: {n % 4} left after 4-group steps")
    if position_blocks > 1 and width % columns.POSITION_BLOCK:
        found.add(f"{prefix}: position blocks, a short last one")
    if size % width:
        found.add(f"{prefix}: tail (a partial group)")
    if run > 1:
        found.add(f"{prefix}: runs folded into groups")
    return found


def _rows_chunked_loops(prefix, pcq):
    """Labels of the rows family's chunked reductions for a (P, C, Q) array."""
    P, _, Q = pcq
    p_block, q_chunks, _ = rows._grid(pcq)
    p_blocks = _cdiv(P, p_block)
    found = {f"{prefix}: chunked"}
    if q_chunks > 1 and Q % rows.RUN_CHUNK:
        found.add(f"{prefix} chunked: a short last q chunk")
    if p_blocks > 1 and P % p_block:
        found.add(f"{prefix} chunked: a short last p block")
    if p_blocks > 1 and q_chunks > 1:
        found.add(f"{prefix} chunked: p blocks x q chunks")
    return found


def _rows_elementwise_loops(prefix, pcq):
    """Labels of the rows family's element-wise passes (flat chunks of RUN_CHUNK values)."""
    size, Q = math.prod(pcq), pcq[2]
    found = set()
    chunk = rows.RUN_CHUNK
    if size > chunk and size % chunk:
        found.add(f"{prefix} element-wise: a short last chunk")
    if any(k * chunk % Q for k in range(1, _cdiv(size, chunk))):
        found.add(f"{prefix} element-wise: chunks that cut runs")
    return found


def loops_reached(shape, axis, dtype):
    """Labels of the kernel loops that the functional calls enter for x of shape, axis, dtype."""
    plan = Plan.of(np.empty(shape, dtype), axis, training=True)
    size = math.prod(shape)
    family = "rows" if plan.family is rows else "columns"
    found = {f"{family}: {'serial' if plan.serial else 'parallel'}"}
    if plan.family is columns:
        _, run, width = plan.geometry
        if not columns._takes_fours(np.empty(size, dtype), 2):
            found.add(STREAMING)  # the smallest pass (two arrays) past the limit: all are
        return found | _columns_loops("columns", size, width, run)
    P, C, Q = plan.pcq
    if rows._per_feature(np.empty(plan.pcq, dtype)):
        found.add("rows: per-feature")
        if P > 1:
            found.add("rows per-feature: runs of several p")
    else:
        found |= _rows_chunked_loops("rows", plan.pcq)
        if C >= rows.FEATURE_UNITS:
            found.add("rows chunked: features too large for the per-feature schedule")
    if C <= 2 and P * Q >= PARALLEL_MIN:
        found.add("rows: few features, many values")
    return found | _rows_elementwise_loops("rows", plan.pcq)


def ghost_loops_reached(shape, axis, k, dtype):
    """Labels of the ghost kernels' loops that ghost batch norm enters."""
    plan = GhostPlan.of(np.empty(shape, dtype), axis, k)
    threads = "serial" if plan.serial else "parallel"
    slice_plan = plan.slice_plan
    if slice_plan is None:
        return {"ghost: merged view", f"ghost merged: {threads}"}
    if slice_plan.family is rows:
        found = {f"ghost rows: {threads}"}
        found |= _rows_chunked_loops("ghost rows slice", slice_plan.pcq)
        return found | _rows_elementwise_loops("ghost rows slice", slice_plan.pcq)
    _, run, width = slice_plan.geometry
    slice_size = math.prod(shape) // plan.n_slices
    return {f"ghost columns: {threads}"} | _columns_loops(
        "ghost columns slice", slice_size, width, run
    )


# ---------------------------------------------------------------- the cases


def _first(make, wanted, dtype, start=2, stop=1 << 16):
    """The first shape make(n), n from start, whose loops include every label in wanted."""
    for n in range(start, stop):
        shape, axis = make(n)
        if wanted <= loops_reached(shape, axis, dtype):
            return shape, axis
    raise AssertionError(f"no shape reaches {sorted(wanted)}")


def _ghost_first(make, wanted, dtype, start=2, stop=1 << 12):
    for n in range(start, stop):
        shape, axis, k = make(n)
        if wanted <= ghost_loops_reached(shape, axis, k, dtype):
            return shape, axis, k
    raise AssertionError(f"no ghost shape reaches {sorted(wanted)}")


# Features in a columns row longer than a position block, not a multiple of one.
WIDE = columns.POSITION_BLOCK + columns.POSITION_BLOCK // 2 + 1
# Runs just too short for the rows family: folded into the columns family's groups.
SHORT_RUN = ROWS_MIN_RUN - 1
# Runs long enough for the rows family that a chunk holds several p, not a divisor of a chunk.
MID_RUN = next(q for q in range(2 * ROWS_MIN_RUN + 1, rows.RUN_CHUNK) if rows.RUN_CHUNK % q)


# Every pass over more than columns.STREAM_BYTES takes one group a step.
STREAMING = "columns: one group a step (large data)"


def _left(r, what="sums"):
    return f"columns {what}: {r} left after 4-group steps"


# name -> (make(n) -> (shape, axis), labels): the case is the first n whose shape reaches labels.
CASES = {
    **{
        f"bf_step4_left{r}": (
            lambda n: ((n, 7), 1),
            {
                "columns: serial",
                "columns sums: 4-group step",
                "columns element-wise: 4-group step",
                _left(r),
                _left(r, "element-wise"),
                "columns: tail (a partial group)",
            },
        )
        for r in range(4)
    },
    "bf_blocks_parallel": (
        lambda n: ((n, 64), -1),
        {
            "columns: parallel",
            "columns sums: blocks",
            "columns sums: a short last block",
            "columns element-wise: blocks",
            "columns element-wise: a short last block",
            "columns: tail (a partial group)",
            _left(2),
        },
    ),
    "bf_position_blocks": (
        lambda n: ((n, WIDE), 1),
        {
            "columns: parallel",
            "columns: position blocks, a short last one",
            "columns sums: blocks",
            "columns sums: a short last block",
            _left(3),
        },
    ),
    "nhwc_parallel": (
        lambda n: ((n, 3, 5, 24), -1),
        {"columns: parallel", "columns sums: 4-group step", _left(1, "element-wise")},
    ),
    "bf_streaming": (
        lambda n: ((1024 * n + 3, 100), 1),
        {"columns: parallel", STREAMING, "columns: tail (a partial group)"},
    ),
    "ncl_folded_runs": (
        lambda n: ((n, 5, SHORT_RUN), 1),
        {
            "columns: serial",
            "columns: runs folded into groups",
            "columns sums: 4-group step",
            _left(1),
            "columns: tail (a partial group)",
        },
    ),
    "nchw_folded_runs_parallel": (
        lambda n: ((n, 16, 1, SHORT_RUN), 1),
        {
            "columns: parallel",
            "columns: runs folded into groups",
            "columns sums: blocks",
            "columns sums: a short last block",
            _left(3),
        },
    ),
    "ff_short_rows": (
        lambda n: ((n, SHORT_RUN - 2), 0),
        {"columns: serial", "columns: runs folded into groups"},
    ),
    "ff_short_rows_parallel": (
        lambda n: ((n * 64, SHORT_RUN - 2), 0),
        {
            "columns: parallel",
            "columns: runs folded into groups",
            "columns: position blocks, a short last one",
        },
    ),
    "ff_per_feature": (
        lambda n: ((rows.FEATURE_UNITS, ROWS_MIN_RUN + n), 0),
        {"rows: serial", "rows: per-feature"},
    ),
    "ff_per_feature_parallel": (
        lambda n: ((2 * rows.FEATURE_UNITS, 64 * n + 7), 0),
        {"rows: parallel", "rows: per-feature"},
    ),
    "nchw_per_feature": (
        lambda n: ((n, rows.FEATURE_UNITS, 6, 7), 1),
        {"rows: serial", "rows: per-feature", "rows per-feature: runs of several p"},
    ),
    "nchw_per_feature_parallel": (
        lambda n: ((8 * n, 2 * rows.FEATURE_UNITS, 10, 10), 1),
        {
            "rows: parallel",
            "rows: per-feature",
            "rows per-feature: runs of several p",
            "rows element-wise: a short last chunk",
        },
    ),
    "ff_chunked_serial": (
        lambda n: ((3, ROWS_MIN_RUN + 100 * n), 0),
        {"rows: serial", "rows: chunked"},
    ),
    "ff_few_features": (
        lambda n: ((2, 2 * rows.RUN_CHUNK + n), 0),
        {
            "rows: parallel",
            "rows: few features, many values",
            "rows chunked: a short last q chunk",
            "rows element-wise: a short last chunk",
            "rows element-wise: chunks that cut runs",
        },
    ),
    "ncl_p_blocks": (
        lambda n: ((n, 3, MID_RUN), 1),
        {
            "rows: parallel",
            "rows: chunked",
            "rows chunked: a short last p block",
            "rows element-wise: a short last chunk",
            "rows element-wise: chunks that cut runs",
        },
    ),
    "ncl_p_blocks_x_q_chunks": (
        lambda n: ((2, 3, rows.RUN_CHUNK + n), 1),
        {
            "rows: parallel",
            "rows chunked: p blocks x q chunks",
            "rows chunked: a short last q chunk",
        },
    ),
    "ff_large_features": (
        lambda n: ((rows.FEATURE_UNITS, ROWS_MIN_RUN + 4096 * n + 3), 0),
        {"rows: parallel", "rows chunked: features too large for the per-feature schedule"},
    ),
}

# name -> (make(n) -> (shape, axis, virtual_batch_size), labels), as CASES.
GHOST_CASES = {
    "ghost_rows_serial": (
        lambda n: ((3 * n, 3, 4, 5), 1, n),
        {"ghost rows: serial", "ghost rows slice: chunked"},
    ),
    "ghost_rows_parallel": (
        lambda n: ((2 * n, 2, MID_RUN), 1, n),
        {
            "ghost rows: parallel",
            "ghost rows slice chunked: a short last p block",
            "ghost rows slice element-wise: chunks that cut runs",
        },
    ),
    "ghost_columns_serial": (
        lambda n: ((3 * n, 7), 1, n),
        {
            "ghost columns: serial",
            "ghost columns slice sums: 4-group step",
            "ghost columns slice sums: 2 left after 4-group steps",
            "ghost columns slice: tail (a partial group)",
        },
    ),
    "ghost_columns_parallel": (
        lambda n: ((n * (PARALLEL_MIN // (64 * n) + 1), 64), -1, n),
        {
            "ghost columns: parallel",
            "ghost columns slice sums: 4-group step",
            "ghost columns slice element-wise: 3 left after 4-group steps",
            "ghost columns slice: tail (a partial group)",
        },
    ),
    "ghost_merged": (
        lambda n: ((5, 4 * n), 0, n),
        {"ghost: merged view", "ghost merged: serial"},
    ),
    "ghost_merged_parallel": (
        lambda n: ((5, 4 * n), 0, n),
        {"ghost: merged view", "ghost merged: parallel"},
    ),
}

ALL_LOOPS = (
    {
        f"{family}: {threads}"
        for family in ("rows", "columns")
        for threads in ("serial", "parallel")
    }
    | {f"columns {what}: 4-group step" for what in ("sums", "element-wise")}
    | {_left(r, what) for r in range(4) for what in ("sums", "element-wise")}
    | {
        f"columns {what}: {part}"
        for what in ("sums", "element-wise")
        for part in ("blocks", "a short last block")
    }
    | {
        STREAMING,
        "columns: position blocks, a short last one",
        "columns: tail (a partial group)",
        "columns: runs folded into groups",
        "rows: per-feature",
        "rows per-feature: runs of several p",
        "rows: chunked",
        "rows chunked: a short last q chunk",
        "rows chunked: a short last p block",
        "rows chunked: p blocks x q chunks",
        "rows chunked: features too large for the per-feature schedule",
        "rows element-wise: a short last chunk",
        "rows element-wise: chunks that cut runs",
        "rows: few features, many values",
    }
)
ALL_GHOST_LOOPS = {
    *(
        f"ghost {kind}: {t}"
        for kind in ("rows", "columns", "merged")
        for t in ("serial", "parallel")
    ),
    "ghost: merged view",
    "ghost rows slice: chunked",
    "ghost rows slice chunked: a short last p block",
    "ghost rows slice element-wise: chunks that cut runs",
    "ghost columns slice sums: 4-group step",
    "ghost columns slice: tail (a partial group)",
    "ghost columns slice sums: 2 left after 4-group steps",
    "ghost columns slice element-wise: 3 left after 4-group steps",
}


@functools.cache
def case_shape(name, dtype):
    """(shape, axis) of a case for a dtype (the per-feature schedule depends on its size)."""
    make, wanted = CASES[name]
    return _first(make, wanted, np.dtype(dtype))


@functools.cache
def ghost_case_shape(name, dtype):
    make, wanted = GHOST_CASES[name]
    return _ghost_first(make, wanted, np.dtype(dtype))


PARAMS = [
    pytest.param(name, dtype, id=f"{name}-{np.dtype(dtype)}") for name in CASES for dtype in DTYPES
]
GHOST_PARAMS = [
    pytest.param(name, dtype, id=f"{name}-{np.dtype(dtype)}")
    for name in GHOST_CASES
    for dtype in DTYPES
]


@pytest.mark.parametrize(("name", "dtype"), PARAMS)
def test_case_reaches_its_loops(name, dtype):
    shape, axis = case_shape(name, dtype)
    wanted = CASES[name][1]
    assert wanted <= loops_reached(shape, axis, dtype), (shape, axis)
    if STREAMING not in wanted:
        assert math.prod(shape) < 1 << 20, f"{name} {shape}: keep the file fast"


@pytest.mark.parametrize(("name", "dtype"), GHOST_PARAMS)
def test_ghost_case_reaches_its_loops(name, dtype):
    shape, axis, k = ghost_case_shape(name, dtype)
    assert GHOST_CASES[name][1] <= ghost_loops_reached(shape, axis, k, dtype), (shape, axis, k)


def test_the_grid_reaches_every_loop():
    """Every loop is some case's aim, and every aim is a known loop (no typo hides a gap)."""
    wanted = set().union(*(labels for _, labels in CASES.values()))
    assert wanted == ALL_LOOPS, (sorted(ALL_LOOPS - wanted), sorted(wanted - ALL_LOOPS))
    ghost_wanted = set().union(*(labels for _, labels in GHOST_CASES.values()))
    assert ghost_wanted == ALL_GHOST_LOOPS, (
        sorted(ALL_GHOST_LOOPS - ghost_wanted),
        sorted(ghost_wanted - ALL_GHOST_LOOPS),
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_passes_past_stream_bytes_go_one_group_a_step(dtype):
    """The bf_streaming case's label is the kernels' rule: bytes touched against STREAM_BYTES."""
    values = columns.STREAM_BYTES // (2 * np.dtype(dtype).itemsize)  # two arrays at the limit
    assert columns._takes_fours(np.empty(values, dtype), 2)
    assert not columns._takes_fours(np.empty(values + 1, dtype), 2)
    assert not columns._takes_fours(np.empty(values, dtype), 3)


def test_the_single_group_grid_misses_the_4_group_step():
    """Why this file exists: the (53, 7) batch-first shape of conftest.LAYOUTS is one group."""
    assert "columns sums: 4-group step" not in loops_reached((53, 7), 1, np.float32)


# ---------------------------------------------------------------- data


def feature_view(a, axis):
    """a as (C, M): the feature axis first, every other axis flattened."""
    return np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)


def from_features(values, shape, axis):
    """The inverse of feature_view: (C, M) values into a C-contiguous array of shape."""
    axis %= len(shape)
    front = (shape[axis], *shape[:axis], *shape[axis + 1 :])
    return np.ascontiguousarray(np.moveaxis(values.reshape(front), 0, axis))


def per_feature(v, ndim, axis):
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return np.asarray(v).reshape(shape)


GAP = 0.05  # no value within GAP standard deviations of its feature's kink point


def make_data(rng, shape, axis, dtype):
    """x, dy, gamma, beta, kink: each feature its own mean and scale.

    x of feature c is mu_c + s_c * z, z standard normal pushed out of
    (t - GAP, t + GAP) with t = 0.3: a fused ReLU whose zero is placed at
    kink_c = mu_c + s_c * t (`relu_beta`) then cuts no value finely, so that
    the ReLU's mask (y > 0) is the same in float32 and in the float64 reference.
    """
    c = shape[axis]
    m = math.prod(shape) // c
    z = rng.standard_normal((c, m))
    t = 0.3
    z = np.where(np.abs(z - t) < GAP, z + np.copysign(GAP, z - t), z)
    mu = rng.uniform(-2.0, 2.0, (c, 1))
    s = rng.uniform(0.5, 2.0, (c, 1))
    x = from_features(mu + s * z, shape, axis).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma = (rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)).astype(dtype)
    beta = rng.standard_normal(c).astype(dtype)
    return x, dy, gamma, beta, (mu + s * t).reshape(-1)


def make_running(rng, c, dtype):
    """running_mean, running_var in x's dtype, of the data's order (means and scales)."""
    return rng.uniform(-2.0, 2.0, c).astype(dtype), rng.uniform(0.25, 4.0, c).astype(dtype)


def relu_beta(gamma, kink, mean, invstd, dtype):
    """beta putting the zero of y = gamma * (x - mean) * invstd + beta at x = kink."""
    return (-f64(gamma) * (kink - mean) * invstd).astype(dtype)


def relu_mask(y_ref, dtype):
    """y_ref > 0, after checking that no y_ref is near 0 (else the mask would be rounding's).

    Each |y| >= |gamma| * invstd * s * GAP >= 0.5 * 0.25 * 0.05 (eval's running
    statistics; about 0.025 with batch statistics): 100 times y's tolerance or
    more, so no y within that tolerance of y_ref is on the other side of 0.
    """
    near = np.abs(y_ref).min()
    assert near > 100 * TOL[np.dtype(dtype)], f"a value at {near:.2e} from the ReLU's kink"
    return y_ref > 0


def grad_scale(x, axis):
    """The size of dgamma and dbeta: sums of M unit terms."""
    return np.sqrt(x.size // x.shape[axis])


def check_gradients(dx, dgamma, dbeta, dx_ref, dg_ref, db_ref, x, axis):
    dtype = x.dtype
    assert dx.shape == x.shape and dx.dtype == dtype
    assert dgamma.dtype == dbeta.dtype == dtype
    assert_close(dx, dx_ref, dtype, err_msg="dx")
    s = grad_scale(x, axis)
    assert_close(dgamma, dg_ref, dtype, scale=s, err_msg="dgamma")
    assert_close(dbeta, db_ref, dtype, scale=s, err_msg="dbeta")


# ---------------------------------------------------------------- plain batch norm


@pytest.mark.parametrize(("name", "dtype"), PARAMS)
def test_train(rng, name, dtype):
    shape, axis = case_shape(name, dtype)
    x, _, gamma, beta, _ = make_data(rng, shape, axis, dtype)
    y, mean, invstd = fastbn.batch_norm_train(x, gamma, beta, axis=axis, eps=EPS)
    y_ref, mean_ref, invstd_ref = ref_train(x, gamma, beta, axis=axis, eps=EPS)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_stats_close(mean, invstd, mean_ref, invstd_ref, dtype)
    assert_close(y, y_ref, dtype)


@pytest.mark.parametrize(("name", "dtype"), PARAMS)
def test_eval(rng, name, dtype):
    shape, axis = case_shape(name, dtype)
    x, _, gamma, beta, _ = make_data(rng, shape, axis, dtype)
    rm, rv = make_running(rng, shape[axis], dtype)
    y = fastbn.batch_norm_eval(x, rm, rv, gamma, beta, axis=axis, eps=EPS)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, ref_eval(x, rm, rv, gamma, beta, axis=axis, eps=EPS), dtype)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("name", "dtype"), PARAMS)
def test_backward(rng, name, dtype, training):
    shape, axis = case_shape(name, dtype)
    x, dy, gamma, _, _ = make_data(rng, shape, axis, dtype)
    if training:
        _, mean, invstd = ref_train(x, axis=axis, eps=EPS)
    else:
        mean, rv = make_running(rng, shape[axis], dtype)
        mean, invstd = f64(mean), running_invstd(rv, EPS)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        dy, x, mean, invstd, gamma, axis=axis, training=training
    )
    expected = ref_backward(dy, x, mean, invstd, gamma, axis=axis, training=training)
    check_gradients(dx, dgamma, dbeta, *expected, x, axis)


@pytest.mark.parametrize(("name", "dtype"), PARAMS)
def test_synchronized_entries(rng, name, dtype):
    """The kernels a synchronized batch norm calls: moments, dgamma and dbeta, dx from sums."""
    shape, axis = case_shape(name, dtype)
    x, dy, gamma, _, _ = make_data(rng, shape, axis, dtype)
    x, plan = plan_for(x, axis, True)
    mean, var = _engine.moments(plan, x)
    _, mean_ref, invstd_ref = ref_train(x, axis=axis, eps=EPS)
    var_ref = feature_view(f64(x), axis).var(axis=1)  # two-pass, biased
    assert mean.dtype == var.dtype == np.float64
    assert_stats_close(mean, 1.0 / np.sqrt(var + EPS), mean_ref, invstd_ref, dtype)
    np.testing.assert_allclose(var, var_ref, rtol=STAT_TOL[np.dtype(dtype)], atol=0)

    dx_ref, dg_ref, db_ref = ref_backward(dy, x, mean_ref, invstd_ref, gamma, axis=axis)
    dgamma, dbeta = _engine.param_sums(plan, dy, x, f64(mean_ref), f64(invstd_ref))
    assert dgamma.dtype == dbeta.dtype == np.float64
    s = grad_scale(x, axis)
    # Float64 sums of float64 products of x's values: float64 accuracy, whatever x's dtype.
    assert_close(dgamma, dg_ref, np.float64, scale=s, err_msg="dgamma")
    assert_close(dbeta, db_ref, np.float64, scale=s, err_msg="dbeta")
    count = x.size // shape[axis]
    gamma_k = _checks.per_feature("gamma", gamma, shape[axis], x, axis, 1.0, x.dtype)
    dx = _engine.input_gradient(
        plan,
        dy,
        x,
        f64(mean_ref),
        f64(invstd_ref),
        gamma_k,
        f64(dg_ref),
        f64(db_ref),
        count,
        None,
    )
    assert_close(dx, dx_ref, dtype, err_msg="dx")


# ---------------------------------------------------------------- the fused ReLU


@pytest.mark.parametrize(("name", "dtype"), PARAMS)
def test_relu_train(rng, name, dtype):
    shape, axis = case_shape(name, dtype)
    x, _, gamma, _, kink = make_data(rng, shape, axis, dtype)
    _, mean_ref, invstd_ref = ref_train(x, axis=axis, eps=EPS)
    beta = relu_beta(gamma, kink, mean_ref, invstd_ref, dtype)
    y, mean, invstd = fastbn.batch_norm_relu_train(x, gamma, beta, axis=axis, eps=EPS)
    y_ref = ref_train(x, gamma, beta, axis=axis, eps=EPS)[0]
    mask = relu_mask(y_ref, dtype)
    assert 0 < np.count_nonzero(mask) < mask.size  # both sides of the kink
    assert_stats_close(mean, invstd, mean_ref, invstd_ref, dtype)
    assert_close(y, np.maximum(y_ref, 0), dtype)


@pytest.mark.parametrize(("name", "dtype"), PARAMS)
def test_relu_eval(rng, name, dtype):
    shape, axis = case_shape(name, dtype)
    x, _, gamma, _, kink = make_data(rng, shape, axis, dtype)
    rm, rv = make_running(rng, shape[axis], dtype)
    beta = relu_beta(gamma, kink, f64(rm), running_invstd(rv, EPS), dtype)
    y = fastbn.batch_norm_relu_eval(x, rm, rv, gamma, beta, axis=axis, eps=EPS)
    y_ref = ref_eval(x, rm, rv, gamma, beta, axis=axis, eps=EPS)
    relu_mask(y_ref, dtype)
    assert_close(y, np.maximum(y_ref, 0), dtype)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("name", "dtype"), PARAMS)
def test_relu_backward(rng, name, dtype, training):
    """dx, dgamma, dbeta are the reference backward of dy masked where the forward's y > 0."""
    shape, axis = case_shape(name, dtype)
    x, dy, gamma, _, kink = make_data(rng, shape, axis, dtype)
    if training:
        _, mean, invstd = ref_train(x, axis=axis, eps=EPS)
    else:
        rm, rv = make_running(rng, shape[axis], dtype)
        mean, invstd = f64(rm), running_invstd(rv, EPS)
    beta = relu_beta(gamma, kink, mean, invstd, dtype)
    x_hat = (f64(x) - per_feature(mean, x.ndim, axis)) * per_feature(invstd, x.ndim, axis)
    y_ref = per_feature(f64(gamma), x.ndim, axis) * x_hat + per_feature(f64(beta), x.ndim, axis)
    dz = np.where(relu_mask(y_ref, dtype), f64(dy), 0.0)
    dx, dgamma, dbeta = fastbn.batch_norm_relu_backward(
        dy, x, mean, invstd, gamma, beta, axis=axis, training=training
    )
    expected = ref_backward(dz, x, mean, invstd, gamma, axis=axis, training=training)
    check_gradients(dx, dgamma, dbeta, *expected, x, axis)


# ---------------------------------------------------------------- ghost batch norm


def ghost_slices(shape, axis, k):
    """The index of each virtual batch (k examples along the examples axis), in order."""
    e = 1 if axis % len(shape) == 0 else 0
    for g in range(shape[e] // k):
        index = [slice(None)] * len(shape)
        index[e] = slice(g * k, (g + 1) * k)
        yield tuple(index)


@pytest.mark.parametrize(("name", "dtype"), GHOST_PARAMS)
def test_ghost_train_and_backward(rng, name, dtype):
    """Each virtual batch is normalized, and differentiated, as the reference does it alone."""
    shape, axis, k = ghost_case_shape(name, dtype)
    x, dy, gamma, beta, _ = make_data(rng, shape, axis, dtype)
    # Each example its own offset, so that the slices' statistics differ.
    e = 1 if axis % len(shape) == 0 else 0
    offset = rng.uniform(-3.0, 3.0, shape[e]).reshape([-1 if a == e else 1 for a in range(x.ndim)])
    x = (x + offset).astype(dtype)
    y, mean, invstd = fastbn.ghost_batch_norm_train(
        x, gamma, beta, virtual_batch_size=k, axis=axis, eps=EPS
    )
    dx, dgamma, dbeta = fastbn.ghost_batch_norm_backward(
        dy, x, mean, invstd, gamma, virtual_batch_size=k, axis=axis
    )
    c = shape[axis]
    index = list(ghost_slices(shape, axis, k))
    assert len(index) > 1 and mean.shape == invstd.shape == (len(index), c)
    dg_ref, db_ref = np.zeros(c), np.zeros(c)
    for g, s in enumerate(index):
        y_ref, mean_ref, invstd_ref = ref_train(x[s], gamma, beta, axis=axis, eps=EPS)
        assert_stats_close(mean[g], invstd[g], mean_ref, invstd_ref, dtype)
        assert_close(y[s], y_ref, dtype, err_msg=f"y of slice {g}")
        dx_ref, dg, db = ref_backward(dy[s], x[s], mean_ref, invstd_ref, gamma, axis=axis)
        assert_close(dx[s], dx_ref, dtype, err_msg=f"dx of slice {g}")
        dg_ref += dg
        db_ref += db
    s = grad_scale(x, axis)
    assert_close(dgamma, dg_ref, dtype, scale=s, err_msg="dgamma")
    assert_close(dbeta, db_ref, dtype, scale=s, err_msg="dbeta")


# ---------------------------------------------------------------- a large mean in float32

# name -> (shape, axis, a loop it reaches): each way the kernels subtract a mean from
# float32 values (the rows family's two schedules, the columns family batch-first).
LARGE_MEAN_CASES = {
    "rows_per_feature": ((2 * rows.FEATURE_UNITS, 4096), 0, "rows: per-feature"),
    "rows_chunked": ((rows.FEATURE_UNITS // 2, 4096), 0, "rows: chunked"),
    "columns": ((4096, 2 * rows.FEATURE_UNITS), 1, "columns: parallel"),
}
# Small next to the data's variance (1e-4): invstd ~ 100, so that a mean rounded to
# float32 (|error| up to half an ulp of 1000, 3e-5) moves y by up to ~3e-3.
LARGE_MEAN_EPS = 1e-6


def large_mean_data(rng, shape, axis):
    """float32 x = mu_c + 0.01 * N(0, 1) with mu_c ~ 1000: the mean is not a float32 number."""
    c = shape[axis]
    mu = 1000.0 + rng.uniform(-1.0, 1.0, (c, 1))
    x = from_features(mu + 0.01 * rng.standard_normal((c, math.prod(shape) // c)), shape, axis)
    gamma = (rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)).astype(np.float32)
    beta = rng.standard_normal(c).astype(np.float32)
    return x.astype(np.float32), gamma, beta, mu.reshape(-1)


def assert_low_part_matters(mean, invstd, gamma):
    """Not vacuous: the mean rounded to float32 would move y by 100 tolerances or more."""
    lost = np.abs(mean - mean.astype(np.float32).astype(np.float64)) * invstd * np.abs(gamma)
    assert lost.max() > 100 * TOL[np.dtype(np.float32)], lost.max()


@pytest.mark.parametrize("name", LARGE_MEAN_CASES)
def test_large_mean_train_and_backward_keep_its_low_part(rng, name):
    """y and dx subtract the float64 batch mean as float32 hi + lo (`_common.split`).

    Dropping lo (the mean rounded to float32) costs up to ~3e-3 in y; y is held
    to the suite's float32 tolerance (1e-5 at unit scale).
    """
    shape, axis, loop = LARGE_MEAN_CASES[name]
    assert loop in loops_reached(shape, axis, np.float32)
    x, gamma, beta, _ = large_mean_data(rng, shape, axis)
    y, mean, invstd = fastbn.batch_norm_train(x, gamma, beta, axis=axis, eps=LARGE_MEAN_EPS)
    y_ref, mean_ref, invstd_ref = ref_train(x, gamma, beta, axis=axis, eps=LARGE_MEAN_EPS)
    assert_low_part_matters(mean_ref, invstd_ref, gamma)
    assert_stats_close(mean, invstd, mean_ref, invstd_ref, np.float32)
    assert_close(y, y_ref, np.float32, err_msg="y")
    # dy along x_hat (plus noise): dgamma ~ M, so dx = gamma * invstd * (dy - x_hat *
    # dgamma / M - dbeta / M) weighs x_hat, and any error in it, fully.
    x_hat = (f64(x) - per_feature(mean_ref, x.ndim, axis)) * per_feature(invstd_ref, x.ndim, axis)
    dy = (x_hat + 0.5 * rng.standard_normal(shape)).astype(np.float32)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, axis=axis)
    dx_ref, dg_ref, db_ref = ref_backward(dy, x, mean, invstd, gamma, axis=axis)
    # dx is of the size of gamma * invstd (~100): float32 rounding of order-one terms
    # relative to that, as test_extreme holds a dx of any scale.
    tol = TOL[np.dtype(np.float32)]
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=tol * np.abs(dx_ref).max(), err_msg="dx")
    m = x.size // shape[axis]
    assert_close(dgamma, dg_ref, np.float32, scale=m, err_msg="dgamma")  # ~M: dy along x_hat
    assert_close(dbeta, db_ref, np.float32, scale=np.sqrt(m), err_msg="dbeta")


@pytest.mark.parametrize("name", LARGE_MEAN_CASES)
def test_large_running_mean_eval_keeps_its_low_part(rng, name):
    """A float64 running mean ~1000 is subtracted as float32 hi + lo: y to 1e-5, not ~3e-3."""
    shape, axis, loop = LARGE_MEAN_CASES[name]
    assert loop in loops_reached(shape, axis, np.float32)
    x, gamma, beta, mu = large_mean_data(rng, shape, axis)
    c = shape[axis]
    running_mean = mu + 0.005 * rng.standard_normal(c)  # float64: not a float32 number
    running_var = 1e-4 * rng.uniform(0.5, 2.0, c)
    invstd = 1.0 / np.sqrt(running_var + LARGE_MEAN_EPS)
    assert_low_part_matters(running_mean, invstd, gamma)
    y = fastbn.batch_norm_eval(
        x, running_mean, running_var, gamma, beta, axis=axis, eps=LARGE_MEAN_EPS
    )
    y_ref = ref_eval(x, running_mean, running_var, gamma, beta, axis=axis, eps=LARGE_MEAN_EPS)
    assert y.dtype == np.float32
    assert_close(y, y_ref, np.float32)


# ---------------------------------------------------------------- the columns' group width


@pytest.mark.parametrize("run", [1, 3, 49])
@pytest.mark.parametrize("n_features", [1, 3, 7, 64, 100, 255, 256, 257, 1000])
def test_group_width_is_the_smallest_multiple_of_a_row_of_at_least_min_width(n_features, run):
    """W: whole rows (n_features * run values), at least MIN_WIDTH, one row fewer would not be.

    Results do not depend on W (every multiple of a row is correct); the vector loops'
    length does, and a rounded-down W (a surviving mutant) went unseen by the results.
    """
    row = n_features * run
    width = columns.group_width(n_features, run)
    assert width % row == 0
    assert width >= columns.MIN_WIDTH
    assert width - row < columns.MIN_WIDTH
