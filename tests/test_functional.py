"""The functional API against the float64 NumPy reference: the contract's shapes, dtypes,
functional API, accuracy and reliability (docs/guide/contract.md).

Every result is compared with ``fastbn.reference`` run on float64 copies of the
same values, over every layout, memory order and dtype.
"""

import numpy as np
import pytest
from conftest import (
    DTYPES,
    LARGE_LAYOUTS,
    LAYOUTS,
    ORDERS,
    assert_close,
    assert_stats_close,
    assert_unchanged,
    copies,
    f64,
    feature_slice,
    layout,
    make_params,
    make_running,
    per_example,
    readonly,
    ref_backward,
    ref_eval,
    ref_train,
)

import fastbn

AFFINE = ("none", "gamma", "gamma_beta")


def _params(rng, c, dtype, affine):
    gamma, beta = make_params(rng, c, dtype)
    return (None if affine == "none" else gamma), (beta if affine == "gamma_beta" else None)


def _data(rng, shape, dtype, order="C", loc=0.0, scale=1.0):
    x = (loc + scale * rng.standard_normal(shape)).astype(dtype)
    return layout(x, order)


def _grad_scale(shape, axis):
    """Typical magnitude of dgamma/dbeta: a sum of M unit terms."""
    return np.sqrt(per_example(shape, axis))


def check_train(x, gamma, beta, axis, eps=1e-5, out=None):
    """Run batch_norm_train and check y, mean, invstd against the reference."""
    y, mean, invstd = fastbn.batch_norm_train(x, gamma, beta, axis=axis, eps=eps, out=out)
    y_ref, mean_ref, invstd_ref = ref_train(x, gamma, beta, axis=axis, eps=eps)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert mean.shape == invstd.shape == (x.shape[axis],)
    assert_stats_close(mean, invstd, mean_ref, invstd_ref, x.dtype)
    assert_close(y, y_ref, x.dtype)
    return y, mean, invstd


def check_eval(x, rm, rv, gamma, beta, axis, eps=1e-5, out=None):
    """Run batch_norm_eval and check y against the reference."""
    y_ref = ref_eval(x, rm, rv, gamma, beta, axis=axis, eps=eps)
    y = fastbn.batch_norm_eval(x, rm, rv, gamma, beta, axis=axis, eps=eps, out=out)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, y_ref, y.dtype)
    return y


def check_backward(dy, x, mean, invstd, gamma, axis, training, out=None):
    """Run batch_norm_backward and check dx, dgamma, dbeta against the reference."""
    dx_ref, dg_ref, db_ref = ref_backward(dy, x, mean, invstd, gamma, axis=axis, training=training)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        dy, x, mean, invstd, gamma, axis=axis, training=training, out=out
    )
    c = x.shape[axis]
    assert dx.shape == x.shape and dx.dtype == dy.dtype
    assert dgamma.shape == dbeta.shape == (c,)
    assert dgamma.dtype == dbeta.dtype == x.dtype
    assert_close(dx, dx_ref, x.dtype)
    s = _grad_scale(x.shape, axis)
    assert_close(dgamma, dg_ref, x.dtype, scale=s)
    assert_close(dbeta, db_ref, x.dtype, scale=s)
    return dx, dgamma, dbeta


def _backward_inputs(rng, shape, axis, dtype, order, training, stat_dtype=np.float64):
    x = _data(rng, shape, dtype, order, loc=0.5, scale=2.0)
    dy = _data(rng, shape, dtype, order)
    c = shape[axis]
    if training:
        _, mean, invstd = ref_train(x, axis=axis)
    else:
        mean, var = make_running(rng, c, np.float64)
        invstd = 1.0 / np.sqrt(var + 1e-5)
    return dy, x, mean.astype(stat_dtype), invstd.astype(stat_dtype)


# --- every layout x memory order x dtype x affine --------------------------------------


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("name", LAYOUTS)
def test_train_matches_reference(rng, name, order, dtype, affine):
    """batch_norm_train gives the reference y, mean, invstd in every layout and order."""
    shape, axis = LAYOUTS[name]
    x = _data(rng, shape, dtype, order, loc=0.5, scale=2.0)
    gamma, beta = _params(rng, shape[axis], dtype, affine)
    check_train(x, gamma, beta, axis)


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("name", LAYOUTS)
def test_eval_matches_reference(rng, name, order, dtype, affine):
    """batch_norm_eval gives the reference y in every layout and order."""
    shape, axis = LAYOUTS[name]
    x = _data(rng, shape, dtype, order)
    rm, rv = make_running(rng, shape[axis], dtype)
    gamma, beta = _params(rng, shape[axis], dtype, affine)
    check_eval(x, rm, rv, gamma, beta, axis)


@pytest.mark.parametrize("with_gamma", [False, True], ids=["no_gamma", "gamma"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("name", LAYOUTS)
def test_backward_matches_reference(rng, name, order, dtype, training, with_gamma):
    """batch_norm_backward gives the reference dx, dgamma, dbeta (training and eval)."""
    shape, axis = LAYOUTS[name]
    dy, x, mean, invstd = _backward_inputs(rng, shape, axis, dtype, order, training)
    gamma = make_params(rng, shape[axis], dtype)[0] if with_gamma else None
    check_backward(dy, x, mean, invstd, gamma, axis, training)


@pytest.mark.parametrize("order", ["C", "F", "sliced"])
@pytest.mark.parametrize("name", ["features_first", "batch_first", "nchw"])
def test_mixed_orders_backward(rng, name, order):
    """dy and x may have different memory orders from each other."""
    shape, axis = LAYOUTS[name]
    dy, x, mean, invstd = _backward_inputs(rng, shape, axis, np.float64, "C", True)
    other = "transposed" if order != "transposed" else "C"
    check_backward(layout(dy, order), layout(x, other), mean, invstd, None, axis, True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis"), [((6, 300), 0), ((300, 6), 1), ((4, 3, 5, 7), 1)])
def test_zero_stride_inputs(rng, shape, axis, dtype):
    """Broadcast (zero-stride, read-only) x and dy work, e.g. dy = broadcast_to(1.0, shape)."""
    c = shape[axis]
    # every feature holds the same values: x varies along the last reduced axis only
    last = -1 if axis % len(shape) != len(shape) - 1 else 0
    row = rng.standard_normal(shape[last]).astype(dtype)
    x = np.broadcast_to(row if last == -1 else row[:, None], shape)
    dy = np.broadcast_to(np.asarray(1.5, dtype), shape)
    gamma, beta = make_params(rng, c, dtype)
    rm, rv = make_running(rng, c, dtype)
    _, mean, invstd = check_train(x, gamma, beta, axis)
    check_eval(x, rm, rv, gamma, beta, axis)
    for training in (True, False):
        check_backward(dy, x, mean, invstd, gamma, axis, training)


# --- parameter dtypes differing from the data's -----------------------------------------


@pytest.mark.parametrize(("dtype", "pdtype"), [(np.float64, np.float32), (np.float32, np.float64)])
@pytest.mark.parametrize("name", ["features_first", "batch_first", "nhwc"])
def test_parameter_dtype_differs_from_data(rng, name, dtype, pdtype):
    """gamma/beta/running stats/mean/invstd of the other float dtype are accepted.

    Outputs still come back in x's dtype with x's dtype accuracy.
    """
    shape, axis = LAYOUTS[name]
    c = shape[axis]
    x = _data(rng, shape, dtype)
    gamma, beta = make_params(rng, c, pdtype)
    rm, rv = make_running(rng, c, pdtype)
    check_train(x, gamma, beta, axis)
    check_eval(x, rm, rv, gamma, beta, axis)
    for training in (True, False):
        dy, x, mean, invstd = _backward_inputs(rng, shape, axis, dtype, "C", training, pdtype)
        check_backward(dy, x, mean, invstd, gamma, axis, training)


# --- shapes: tiny, odd and large (parallel path) -----------------------------------------

SHAPES = [
    ((1, 2), 0),  # one feature, two examples (the notes' layout)
    ((2, 1), 1),  # the same, batch-first
    ((2, 1), -1),
    ((2, 2), 0),
    ((2, 1, 1, 1), 1),  # M = 2 images of one pixel
    ((2, 3), 0),
    ((37, 1001), 0),
    ((1001, 37), 1),
    ((1001, 37), -1),
    ((37, 1001), 1),
    ((5000, 3), 0),  # many features, few examples
    ((3, 5000), 1),
    ((1000, 1), -1),  # a single feature, batch-first
    ((3, 7, 5, 11), 1),
    ((3, 5, 11, 7), -1),
    ((2, 3, 4, 5, 6), 2),  # 5-D, a middle axis
    ((6, 5, 4, 3), -2),
    ((17, 3, 129), 1),
]
LARGE = [pytest.param(*v, id=k, marks=pytest.mark.slow) for k, v in LARGE_LAYOUTS.items()]


def _shape_id(p):
    return "x".join(map(str, p)) if isinstance(p, tuple) else str(p)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis"), SHAPES + LARGE, ids=_shape_id)
def test_shapes_match_reference(rng, shape, axis, dtype):
    """Train, eval and backward match the reference for tiny, odd and large shapes."""
    c = shape[axis]
    x = _data(rng, shape, dtype, loc=-1.0, scale=3.0)
    gamma, beta = make_params(rng, c, dtype)
    rm, rv = make_running(rng, c, dtype)
    _, mean, invstd = check_train(x, gamma, beta, axis)
    check_eval(x, rm, rv, gamma, beta, axis)
    dy = _data(rng, shape, dtype)
    check_backward(dy, x, mean, invstd, gamma, axis, True)
    check_backward(dy, x, rm, 1.0 / np.sqrt(rv.astype(np.float64) + 1e-5), gamma, axis, False)


@pytest.mark.parametrize("eps", [1e-12, 1e-3, 0.5])
@pytest.mark.parametrize("name", ["features_first", "batch_first", "nchw"])
def test_eps_is_used(rng, name, eps):
    """eps enters invstd = 1/sqrt(var + eps) in train and eval."""
    shape, axis = LAYOUTS[name]
    x = _data(rng, shape, np.float64, scale=0.3)
    rm, rv = make_running(rng, shape[axis], np.float64)
    check_train(x, None, None, axis, eps=eps)
    check_eval(x, rm, rv, None, None, axis, eps=eps)


def test_axis_may_be_numpy_integer(rng):
    """A NumPy integer is a valid axis, as in NumPy itself."""
    x = _data(rng, (6, 4, 5), np.float64)
    check_train(x, None, None, np.int64(1))
    check_train(x, None, None, np.intp(-1))


def test_eval_single_example(rng):
    """Eval needs no batch statistics: M == 1 is fine there."""
    x = _data(rng, (1, 4), np.float32)
    rm, rv = make_running(rng, 4, np.float32)
    check_eval(x, rm, rv, None, None, 1)
    dy = _data(rng, (1, 4), np.float32)
    check_backward(dy, x, rm, 1.0 / np.sqrt(rv + 1e-5), None, 1, False)


# --- consistency identities of the contract's mathematics --------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", LAYOUTS)
def test_eval_with_batch_statistics_equals_train(rng, name, dtype):
    """Eval with running stats set to the batch stats reproduces train's y."""
    shape, axis = LAYOUTS[name]
    x = _data(rng, shape, dtype)
    gamma, beta = make_params(rng, shape[axis], dtype)
    eps = 1e-3
    y, mean, invstd = fastbn.batch_norm_train(x, gamma, beta, axis=axis, eps=eps)
    var = 1.0 / invstd**2 - eps
    y_eval = fastbn.batch_norm_eval(x, mean, var, gamma, beta, axis=axis, eps=eps)
    assert_close(y_eval, y, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", LAYOUTS)
def test_identity_parameters(rng, name, dtype):
    """gamma = sqrt(var + eps), beta = mu makes the layer the identity (the mathematics)."""
    shape, axis = LAYOUTS[name]
    x = _data(rng, shape, dtype, loc=2.0)
    _, mean, invstd = fastbn.batch_norm_train(x, axis=axis)
    y, _, _ = fastbn.batch_norm_train(x, 1.0 / invstd, mean, axis=axis)
    assert_close(y, x, dtype)


# --- out= --------------------------------------------------------------------------------

OUT_ORDERS = ("C", "F", "sliced", "reversed")


def _out_like(x, order):
    return layout(np.full(x.shape, np.nan, x.dtype), order)


@pytest.mark.parametrize("out_order", OUT_ORDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", LAYOUTS)
def test_train_out(rng, name, dtype, out_order):
    """out= receives y, is what is returned, and may be non-contiguous."""
    shape, axis = LAYOUTS[name]
    x = _data(rng, shape, dtype)
    gamma, beta = make_params(rng, shape[axis], dtype)
    out = _out_like(x, out_order)
    y, _, _ = check_train(x, gamma, beta, axis, out=out)
    assert y is out


@pytest.mark.parametrize("out_order", OUT_ORDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", LAYOUTS)
def test_eval_out(rng, name, dtype, out_order):
    """out= receives eval's y and is what is returned."""
    shape, axis = LAYOUTS[name]
    x = _data(rng, shape, dtype)
    rm, rv = make_running(rng, shape[axis], dtype)
    out = _out_like(x, out_order)
    assert check_eval(x, rm, rv, None, None, axis, out=out) is out


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("out_order", OUT_ORDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", LAYOUTS)
def test_backward_out(rng, name, dtype, out_order, training):
    """out= receives dx and is what is returned."""
    shape, axis = LAYOUTS[name]
    dy, x, mean, invstd = _backward_inputs(rng, shape, axis, dtype, "C", training)
    out = _out_like(x, out_order)
    dx, _, _ = check_backward(dy, x, mean, invstd, None, axis, training, out=out)
    assert dx is out


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", LAYOUTS)
def test_eval_out_is_x(rng, name, dtype, order):
    """out=x normalizes x in place in eval (any memory order)."""
    shape, axis = LAYOUTS[name]
    x = _data(rng, shape, dtype, order)
    rm, rv = make_running(rng, shape[axis], dtype)
    gamma, beta = make_params(rng, shape[axis], dtype)
    y_ref = ref_eval(x, rm, rv, gamma, beta, axis=axis)
    y = fastbn.batch_norm_eval(x, rm, rv, gamma, beta, axis=axis, out=x)
    assert y is x
    assert_close(x, y_ref, dtype)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", LAYOUTS)
def test_backward_out_is_dy(rng, name, dtype, order, training):
    """out=dy computes dx in place of dy (the training formula needs both passes)."""
    shape, axis = LAYOUTS[name]
    dy, x, mean, invstd = _backward_inputs(rng, shape, axis, dtype, order, training)
    gamma = make_params(rng, shape[axis], dtype)[0]
    dx_ref, dg_ref, db_ref = ref_backward(dy, x, mean, invstd, gamma, axis=axis, training=training)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        dy, x, mean, invstd, gamma, axis=axis, training=training, out=dy
    )
    assert dx is dy
    assert_close(dx, dx_ref, dtype)
    s = np.sqrt(per_example(shape, axis))
    assert_close(dgamma, dg_ref, dtype, scale=s)
    assert_close(dbeta, db_ref, dtype, scale=s)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["features_first", "batch_first", "nhwc"])
def test_large_out_in_place(rng, name, dtype):
    """out=x (eval) and out=dy (backward) also hold on the parallel paths."""
    shape, axis = LARGE_LAYOUTS[name]
    dy, x, mean, invstd = _backward_inputs(rng, shape, axis, dtype, "C", True)
    dx_ref = ref_backward(dy, x, mean, invstd, axis=axis)[0]
    fastbn.batch_norm_backward(dy, x, mean, invstd, axis=axis, out=dy)
    assert_close(dy, dx_ref, dtype)
    rm, rv = make_running(rng, shape[axis], dtype)
    y_ref = ref_eval(x, rm, rv, axis=axis)
    fastbn.batch_norm_eval(x, rm, rv, axis=axis, out=x)
    assert_close(x, y_ref, dtype)


# --- outputs are fresh, inputs are never modified ---------------------------------------


@pytest.mark.parametrize("order", ["C", "F", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", LAYOUTS)
def test_inputs_unmodified_and_readonly_ok(rng, name, dtype, order):
    """Read-only inputs work, are left untouched, and outputs are fresh arrays."""
    shape, axis = LAYOUTS[name]
    c = shape[axis]
    x = _data(rng, shape, dtype, order)
    dy = _data(rng, shape, dtype, order)
    gamma, beta = make_params(rng, c, dtype)
    rm, rv = make_running(rng, c, dtype)
    _, mean, invstd = ref_train(x, axis=axis)
    inputs = (x, dy, gamma, beta, rm, rv, mean, invstd)
    saved = copies(*inputs)
    readonly(*inputs)

    y = check_train(x, gamma, beta, axis)[0]
    assert y.flags.writeable and not np.shares_memory(y, x)
    y = check_eval(x, rm, rv, gamma, beta, axis)
    assert y.flags.writeable and not np.shares_memory(y, x)
    for training in (True, False):
        dx = check_backward(dy, x, mean, invstd, gamma, axis, training)[0]
        assert dx.flags.writeable and not np.shares_memory(dx, dy)
        assert not np.shares_memory(dx, x)
    assert_unchanged(inputs, saved)


# --- NaN / inf confinement (the contract's functional API) -------------------------------

# Per case: where the poison goes, and what each output must look like.
# "feature": every value of the poisoned feature non-finite; "element": only the
# poisoned element non-finite; "stat": the feature's entry non-finite; "same": the
# poisoned feature's values equal the clean run's. Every other feature always equals
# the clean run bit for bit.
CASES = {
    "train": ("x", ("feature", "stat", None)),
    "eval": ("x", ("element",)),
    "backward_train_dy": ("dy", ("feature", "stat", "stat")),
    "backward_train_x": ("x", ("feature", "stat", None)),
    "backward_eval_dy": ("dy", ("element", "stat", "stat")),
    "backward_eval_x": ("x", ("same", "stat", "same")),
}


def _run_case(case, x, dy, axis, params):
    gamma, beta, rm, rv, mean, invstd = params
    if case == "train":
        return fastbn.batch_norm_train(x, gamma, beta, axis=axis)[:2]
    if case == "eval":
        return (fastbn.batch_norm_eval(x, rm, rv, gamma, beta, axis=axis),)
    training = case.startswith("backward_train")
    if not training:
        mean, invstd = rm, 1.0 / np.sqrt(rv + 1e-5)
    return fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, axis=axis, training=training)


def _check_confined(got, clean, kind, axis, c, pos):
    if got.ndim == 1:
        others = np.arange(got.size) != c
        np.testing.assert_array_equal(got[others], clean[others])
        if kind == "stat":
            assert not np.isfinite(got[c]), got[c]
        elif kind == "same":
            np.testing.assert_array_equal(got[c], clean[c])
        return
    mask = np.zeros(got.shape, bool)
    mask[feature_slice(got.ndim, axis, c)] = True
    np.testing.assert_array_equal(got[~mask], clean[~mask])
    if kind == "feature":
        assert not np.isfinite(got[mask]).any(), got[mask]
    elif kind == "element":
        assert not np.isfinite(got[pos])
        mask[pos] = False
        np.testing.assert_array_equal(got[mask], clean[mask])
    elif kind == "same":
        np.testing.assert_array_equal(got[mask], clean[mask])


def _confinement(rng, shape, axis, dtype, case, bad):
    c_all = shape[axis]
    x = _data(rng, shape, dtype)
    dy = _data(rng, shape, dtype)
    gamma, beta = make_params(rng, c_all, dtype)
    rm, rv = make_running(rng, c_all, dtype)
    _, mean, invstd = ref_train(x, axis=axis)
    params = (gamma, beta, rm, rv, mean, invstd)
    clean = _run_case(case, x, dy, axis, params)

    target, kinds = CASES[case]
    c = c_all // 2
    pos = [int(rng.integers(s)) for s in shape]
    pos[axis] = c
    pos = tuple(pos)
    poisoned = {"x": x.copy(), "dy": dy.copy()}
    poisoned[target][pos] = bad
    with np.errstate(all="ignore"):
        got = _run_case(case, poisoned["x"], poisoned["dy"], axis, params)
    for g, cl, kind in zip(got, clean, kinds, strict=False):
        _check_confined(g, cl, kind, axis, c, pos)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", LAYOUTS)
def test_nonfinite_is_confined_to_its_feature(rng, name, dtype, case, bad):
    """NaN/inf in one feature spoils that feature's outputs only, never the others."""
    shape, axis = LAYOUTS[name]
    _confinement(rng, shape, axis, dtype, case, bad)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["train", "backward_train_dy", "backward_train_x"])
@pytest.mark.parametrize("name", ["features_first", "batch_first", "nchw", "nhwc"])
def test_nonfinite_is_confined_on_parallel_paths(rng, name, case):
    """Confinement also holds when the reductions are split across threads."""
    shape, axis = LARGE_LAYOUTS[name]
    _confinement(rng, shape, axis, np.float32, case, np.nan)


# --- constant features (the contract's accuracy) ------------------------------------------


@pytest.mark.parametrize("value", [0.0, 3.7, -1e3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", LAYOUTS)
def test_constant_feature(rng, name, dtype, value):
    """A constant feature gives y == beta and dx == gamma*invstd*(dy - mean(dy)), no NaN."""
    shape, axis = LAYOUTS[name]
    c_all = shape[axis]
    x = _data(rng, shape, dtype)
    c = c_all - 1
    fs = feature_slice(x.ndim, axis, c)
    x[fs] = value
    gamma, beta = make_params(rng, c_all, dtype)
    eps = 1e-5
    y, mean, invstd = check_train(x, gamma, beta, axis, eps=eps)
    assert np.isfinite(y).all() and np.isfinite(mean).all() and np.isfinite(invstd).all()
    # A constant feature's variance is exactly 0 (its values less the first, summed).
    np.testing.assert_allclose(invstd[c], 1.0 / np.sqrt(eps), rtol=1e-15)
    assert_close(y[fs], np.broadcast_to(beta[c], y[fs].shape), dtype)

    dy = _data(rng, shape, dtype)
    dx, dgamma, dbeta = check_backward(dy, x, mean, invstd, gamma, axis, True)
    assert np.isfinite(dx).all() and np.isfinite(dgamma).all() and np.isfinite(dbeta).all()
    dyc = dy[fs].astype(np.float64)
    expected = float(gamma[c]) * invstd[c] * (dyc - dyc.mean())
    assert_close(dx[fs], expected, dtype, scale=abs(float(gamma[c])) * invstd[c])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", LAYOUTS)
def test_all_constant_input(rng, name, dtype):
    """All-constant (here all-zero and all-equal) input: y == beta everywhere, dx finite."""
    shape, axis = LAYOUTS[name]
    gamma, beta = make_params(rng, shape[axis], dtype)
    for value in (0.0, 0.1):
        x = np.full(shape, value, dtype)
        y, mean, invstd = fastbn.batch_norm_train(x, gamma, beta, axis=axis)
        y_ref = ref_train(x, gamma, beta, axis=axis)[0]  # beta, broadcast
        assert np.isfinite(y).all()
        assert_close(y, y_ref, dtype)
        # The statistics are exact: the value (rounded to x's dtype) and a variance of 0.
        np.testing.assert_array_equal(mean, float(x.flat[0]))
        np.testing.assert_allclose(invstd, 1.0 / np.sqrt(1e-5), rtol=1e-15)
        dy = _data(rng, shape, dtype)
        dx = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, axis=axis)[0]
        assert np.isfinite(dx).all()
        # x_hat == 0: dx = gamma * invstd * (dy - mean(dy)), of the size gamma * invstd.
        dx_ref = ref_backward(dy, x, mean, invstd, gamma, axis=axis)[0]
        assert_close(dx, dx_ref, dtype, scale=np.abs(f64(gamma)).max() * invstd.max())


# --- determinism (the contract's reliability) ---------------------------------------------


def _all_outputs(x, dy, axis, params):
    gamma, beta, rm, rv = params
    y, mean, invstd = fastbn.batch_norm_train(x, gamma, beta, axis=axis)
    ye = fastbn.batch_norm_eval(x, rm, rv, gamma, beta, axis=axis)
    bt = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, axis=axis)
    be = fastbn.batch_norm_backward(
        dy, x, rm, 1.0 / np.sqrt(rv + 1e-5), gamma, axis=axis, training=False
    )
    return (y, mean, invstd, ye, *bt, *be)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", LARGE_LAYOUTS)
def test_deterministic_on_parallel_paths(rng, name, dtype):
    """Two identical calls give bit-identical outputs, on inputs of the parallel paths."""
    shape, axis = LARGE_LAYOUTS[name]
    x = _data(rng, shape, dtype, loc=5.0)
    dy = _data(rng, shape, dtype)
    params = (*make_params(rng, shape[axis], dtype), *make_running(rng, shape[axis], dtype))
    first = _all_outputs(x, dy, axis, params)
    second = _all_outputs(x, dy, axis, params)
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a, b)
