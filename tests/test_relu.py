"""Batch norm fused with a ReLU: the functional calls and ``BatchNorm(activation="relu")``.

The fused calls are held to the composition they replace, plain batch norm
then a ReLU: the forward bit for bit (``np.maximum(y, 0)``), the backward to
the plain backward of dy masked where y > 0 (the sums may round differently
in the last bit). Independently of fastbn, to the float64 reference
(``fastbn.reference`` with the mask written out) and to central finite
differences. Every layout goes through each kernel path it can take: the
columns family, the rows family's per-feature and chunked schedules, one
thread and many (`fastbn._plan.PARALLEL_MIN`), and the plans of
Fortran-ordered and non-contiguous input.
"""

import copy
import pickle

import numpy as np
import pytest
from conftest import (
    DTYPES,
    assert_close,
    central_difference,
    f64,
    layout,
    raises,
    running_invstd,
)

import fastbn
from fastbn import BatchNorm, reference
from fastbn._plan import plan_for
from fastbn.kernels import rows

EPS = 1e-5

# name -> (shape, axis, order, path): path is (family, schedule, serial) as
# `kernel_path` finds it; schedule is None for the columns family.
CASES = {
    "ff_short_rows": ((40, 10), 0, "C", ("columns", None, True)),
    "ff_short_rows_parallel": ((4000, 12), 0, "C", ("columns", None, False)),
    "ff_per_feature": ((8, 300), 0, "C", ("rows", "per_feature", True)),
    "ff_chunked": ((3, 2000), 0, "C", ("rows", "chunked", True)),
    "ff_per_feature_parallel": ((64, 1000), 0, "C", ("rows", "per_feature", False)),
    "ff_chunked_parallel": ((8, 70000), 0, "C", ("rows", "chunked", False)),
    "bf": ((300, 7), 1, "C", ("columns", None, True)),
    "bf_parallel": ((5000, 16), -1, "C", ("columns", None, False)),
    "nchw_per_feature": ((4, 8, 6, 7), 1, "C", ("rows", "per_feature", True)),
    "nchw_chunked": ((4, 5, 6, 7), 1, "C", ("rows", "chunked", True)),
    "nchw_per_feature_parallel": ((32, 16, 10, 10), 1, "C", ("rows", "per_feature", False)),
    "nchw_chunked_parallel": ((16, 4, 32, 32), 1, "C", ("rows", "chunked", False)),
    "nhwc": ((4, 6, 7, 5), -1, "C", ("columns", None, True)),
    "nhwc_parallel": ((16, 20, 20, 8), -1, "C", ("columns", None, False)),
    "ncl_short_runs": ((500, 8, 4), 1, "C", ("columns", None, True)),
    # Fortran order is served as its C-contiguous transpose: (9, 300) axis 0 as (300, 9) axis 1.
    "ff_fortran": ((9, 300), 0, "F", ("columns", None, True)),
    "nchw_fortran": ((20, 8, 3, 3), 1, "F", ("rows", "per_feature", True)),
    "bf_sliced": ((300, 7), 1, "sliced", ("columns", None, True)),
    "nchw_sliced": ((4, 8, 6, 7), 1, "sliced", ("rows", "per_feature", True)),
}
# The few the slower checks (references, ties) run on: every family, schedule and order.
SOME = (
    "ff_short_rows",
    "ff_per_feature",
    "ff_chunked_parallel",
    "bf_parallel",
    "nchw_chunked",
    "nchw_per_feature_parallel",
    "nhwc",
    "ff_fortran",
    "nchw_sliced",
)


def kernel_path(x, axis):
    """(family, schedule, serial) that the functional calls take for x and axis."""
    _, plan = plan_for(x, axis, True)
    if plan.family is not rows:
        return "columns", None, plan.serial
    per_feature = rows._per_feature(np.empty(plan.pcq, x.dtype))
    return "rows", "per_feature" if per_feature else "chunked", plan.serial


def bits(a):
    """The bytes of a, in C order: equal bits, NaN payloads and signed zeros included."""
    return np.ascontiguousarray(a).view(np.uint8)


def assert_same_bits(actual, expected, err_msg=""):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, err_msg
    np.testing.assert_array_equal(bits(actual), bits(expected), err_msg=err_msg)


def feature_view(a, axis):
    """a as (C, M): the feature axis first, every other axis flattened."""
    return np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)


def from_features(values, shape, axis):
    """The inverse of feature_view: (C, M) values into an array of shape, C along axis."""
    front = (shape[axis], *np.delete(np.array(shape), axis % len(shape)))
    return np.ascontiguousarray(np.moveaxis(values.reshape(front), 0, axis))


def per_feature(v, ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def make_case(rng, name, dtype):
    """x, dy, gamma, beta of a case, in its memory order; gamma of both signs."""
    shape, axis, order, _ = CASES[name]
    c = shape[axis]
    x = layout((0.5 + 2.0 * rng.standard_normal(shape)).astype(dtype), order)
    dy = layout(rng.standard_normal(shape).astype(dtype), order)
    gamma = (rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)).astype(dtype)
    beta = (0.5 * rng.standard_normal(c)).astype(dtype)
    return x, dy, gamma, beta


def make_running(rng, c, dtype):
    running_mean = (0.5 + 0.3 * rng.standard_normal(c)).astype(dtype)
    running_var = rng.uniform(2.0, 6.0, c).astype(dtype)
    return running_mean, running_var


def kink_free(rng, shape, axis, dtype):
    """x, gamma, beta whose y = gamma * (x_hat + u) is nowhere near 0.

    Each feature's values come in pairs mu +- s * a with a >= 0.3 (M even),
    so the mean is mu and |x_hat| = a / rms(a) >= 0.3 / rms(a), about 0.2
    or more; beta = gamma * u with |u| <= 0.1. Features 0 to 2 lie wholly on
    one side of the kink: u = 5, -5, 5. Tests that need a margin assert it.
    """
    c = shape[axis]
    m = int(np.prod(shape)) // c
    assert m % 2 == 0
    a = 0.3 + np.abs(rng.standard_normal((c, m // 2)))
    signed = np.concatenate([a, -a], axis=1)
    signed = np.take_along_axis(signed, rng.permuted(np.tile(np.arange(m), (c, 1)), axis=1), 1)
    mu = rng.uniform(-1.0, 1.0, (c, 1))
    s = rng.uniform(0.5, 2.0, (c, 1))
    x = from_features(mu + s * signed, shape, axis).astype(dtype)
    gamma = rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)
    u = rng.uniform(-0.1, 0.1, c)
    u[: min(c, 3)] = [5.0, -5.0, 5.0][: min(c, 3)]
    return x, gamma.astype(dtype), (gamma * u).astype(dtype)


def assert_sums_close(actual, expected, terms, dtype, what):
    """Per-feature sums to 1e-12 (float64) or 1e-6 (float32) of the sum of |terms|."""
    tol = 1e-12 if np.dtype(dtype) == np.float64 else 1e-6
    scale = np.abs(terms).sum(axis=1)
    np.testing.assert_array_less(np.abs(f64(actual) - f64(expected)), tol * scale + 1e-300, what)


def assert_few_ulp(actual, expected, what, ulps=8):
    """Within a few ulp of the array's largest magnitude (dx sums round in their own order)."""
    spacing = np.spacing(np.abs(expected).max().astype(expected.dtype))
    np.testing.assert_array_less(np.abs(f64(actual) - f64(expected)), ulps * spacing, what)


# ---------------------------------------------------------------- the cases and their paths


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CASES)
def test_cases_take_their_paths(name, dtype):
    """Each case reaches the kernel path it is named for, so that every path is tested."""
    shape, axis, order, path = CASES[name]
    assert kernel_path(layout(np.zeros(shape, dtype), order), axis) == path


# ---------------------------------------------------------------- the fused forward is max(y, 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CASES)
def test_train_is_batch_norm_then_relu_bit_for_bit(rng, name, dtype):
    """y of batch_norm_relu_train has the bits of np.maximum(batch_norm_train's y, 0)."""
    x, _, gamma, beta = make_case(rng, name, dtype)
    axis = CASES[name][1]
    y, mean, invstd = fastbn.batch_norm_train(x, gamma, beta, axis=axis)
    y_relu, mean_relu, invstd_relu = fastbn.batch_norm_relu_train(x, gamma, beta, axis=axis)
    assert_same_bits(y_relu, np.maximum(y, 0))
    assert_same_bits(mean_relu, mean)
    assert_same_bits(invstd_relu, invstd)
    # Not vacuous: both sides of the kink occur.
    assert 0 < np.count_nonzero(y_relu) < y.size


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CASES)
def test_eval_is_batch_norm_then_relu_bit_for_bit(rng, name, dtype):
    """batch_norm_relu_eval has the bits of np.maximum(batch_norm_eval, 0)."""
    x, _, gamma, beta = make_case(rng, name, dtype)
    axis = CASES[name][1]
    rm, rv = make_running(rng, x.shape[axis], dtype)
    y = fastbn.batch_norm_eval(x, rm, rv, gamma, beta, axis=axis)
    y_relu = fastbn.batch_norm_relu_eval(x, rm, rv, gamma, beta, axis=axis)
    assert_same_bits(y_relu, np.maximum(y, 0))
    assert 0 < np.count_nonzero(y_relu) < y.size


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis"), [((6, 1), 0), ((1, 6), 1), ((1, 6, 1, 1), 1)])
def test_eval_takes_one_value_per_feature(rng, shape, axis, dtype):
    """Eval needs no batch statistics: M == 1 is fine, as for batch_norm_eval."""
    x = (0.5 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    c = shape[axis]
    gamma = (rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)).astype(dtype)
    beta = (0.5 * rng.standard_normal(c)).astype(dtype)
    rm, rv = make_running(rng, c, dtype)
    y = fastbn.batch_norm_eval(x, rm, rv, gamma, beta, axis=axis)
    y_relu = fastbn.batch_norm_relu_eval(x, rm, rv, gamma, beta, axis=axis)
    assert_same_bits(y_relu, np.maximum(y, 0))
    y_ref = reference.batch_norm_eval(f64(x), f64(rm), f64(rv), f64(gamma), f64(beta), axis=axis)
    assert_close(y_relu, np.maximum(y_ref, 0), dtype)


def test_eval_defaults_to_the_features_first_axis(rng):
    """batch_norm_relu_eval's axis defaults to 0, as batch_norm_eval's: (C, M) data."""
    x = rng.standard_normal((3, 5))
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2.0, 3)
    y = fastbn.batch_norm_relu_eval(x, rm, rv)
    assert_same_bits(y, fastbn.batch_norm_relu_eval(x, rm, rv, axis=0))
    assert_same_bits(y, np.maximum(fastbn.batch_norm_eval(x, rm, rv), 0))


def test_defaults_and_float64_parameters_of_float32_data(rng):
    """gamma and beta default to 1 and 0; float64 parameters of float32 data give the same bits."""
    x, _, gamma, beta = make_case(rng, "nchw_per_feature", np.float32)
    y, _, _ = fastbn.batch_norm_train(x, axis=1)
    assert_same_bits(fastbn.batch_norm_relu_train(x, axis=1)[0], np.maximum(y, 0))
    y, _, _ = fastbn.batch_norm_train(x, f64(gamma), f64(beta), axis=1)
    y_relu, _, _ = fastbn.batch_norm_relu_train(x, f64(gamma), f64(beta), axis=1)
    assert_same_bits(y_relu, np.maximum(y, 0))


# ---------------------------------------------------------------- the fused backward


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CASES)
def test_backward_is_batch_norm_backward_of_masked_dy(rng, name, dtype, training):
    """batch_norm_relu_backward(dy) == batch_norm_backward(where(y > 0, dy, 0)).

    y is the plain forward's; dx within a few ulp, dgamma and dbeta to 1e-12
    (float64) or 1e-6 (float32) of their sums of magnitudes.
    """
    x, dy, gamma, beta = make_case(rng, name, dtype)
    axis = CASES[name][1]
    if training:
        y, mean, invstd = fastbn.batch_norm_train(x, gamma, beta, axis=axis)
    else:
        rm, rv = make_running(rng, x.shape[axis], dtype)
        y = fastbn.batch_norm_eval(x, rm, rv, gamma, beta, axis=axis)
        mean, invstd = rm.astype(np.float64), running_invstd(rv, EPS)
    dz = np.where(y > 0, dy, 0).astype(dtype)
    dx, dgamma, dbeta = fastbn.batch_norm_relu_backward(
        dy, x, mean, invstd, gamma, beta, axis=axis, training=training
    )
    dx_ref, dgamma_ref, dbeta_ref = fastbn.batch_norm_backward(
        dz, x, mean, invstd, gamma, axis=axis, training=training
    )
    assert dx.dtype == dgamma.dtype == dbeta.dtype == x.dtype and dx.shape == x.shape
    assert_few_ulp(dx, dx_ref, "dx")
    x_hat = (f64(x) - per_feature(mean, x.ndim, axis % x.ndim)) * per_feature(
        invstd, x.ndim, axis % x.ndim
    )
    assert_sums_close(dgamma, dgamma_ref, feature_view(f64(dz) * x_hat, axis), dtype, "dgamma")
    assert_sums_close(dbeta, dbeta_ref, feature_view(f64(dz), axis), dtype, "dbeta")
    # Not vacuous: the mask changes the answer (an unmasked backward is far off).
    dx_plain = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, axis=axis, training=training)
    assert np.abs(f64(dx_plain[0]) - f64(dx_ref)).max() > 0.1


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_without_gamma_and_beta(rng, training):
    """gamma None is 1 and beta None is 0 in the mask, as in the forward."""
    x, dy, _, _ = make_case(rng, "bf", np.float64)
    if training:
        y, mean, invstd = fastbn.batch_norm_relu_train(x, axis=1)
    else:
        rm, rv = make_running(rng, x.shape[1], np.float64)
        y = fastbn.batch_norm_relu_eval(x, rm, rv, axis=1)
        mean, invstd = rm, running_invstd(rv, EPS)
    dx, dgamma, dbeta = fastbn.batch_norm_relu_backward(
        dy, x, mean, invstd, axis=1, training=training
    )
    dz = np.where(y > 0, dy, 0)
    expected = fastbn.batch_norm_backward(dz, x, mean, invstd, axis=1, training=training)
    np.testing.assert_allclose(dx, expected[0], rtol=0, atol=1e-14)
    np.testing.assert_allclose(dgamma, expected[1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dbeta, expected[2], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- independent references


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", SOME)
def test_matches_float64_reference(rng, name, dtype, training):
    """Forward and backward against fastbn.reference in float64, with the mask written out.

    Kink-free data, so that float32 rounding cannot move a value across 0.
    """
    shape, axis, order, _ = CASES[name]
    x, gamma, beta = kink_free(rng, shape, axis, dtype)
    x = layout(x, order)
    dy = layout(rng.standard_normal(shape).astype(dtype), order)
    tol = 1e-5 if dtype == np.float32 else 1e-10
    if training:
        y, mean, invstd = fastbn.batch_norm_relu_train(x, gamma, beta, axis=axis)
        y_ref, mean_ref, invstd_ref = reference.batch_norm_train(
            f64(x), f64(gamma), f64(beta), axis=axis
        )
        np.testing.assert_allclose(mean, mean_ref, rtol=0, atol=tol)
        np.testing.assert_allclose(invstd, invstd_ref, rtol=tol)
    else:
        rm, rv = make_running(rng, shape[axis], dtype)
        y = fastbn.batch_norm_relu_eval(x, rm, rv, gamma, beta, axis=axis)
        y_ref = reference.batch_norm_eval(
            f64(x), f64(rm), f64(rv), f64(gamma), f64(beta), axis=axis
        )
        mean, invstd = rm.astype(np.float64), running_invstd(rv, EPS)
        mean_ref, invstd_ref = mean, invstd
    passed = y_ref > 0
    assert_close(y, np.where(passed, y_ref, 0.0), dtype)
    dx, dgamma, dbeta = fastbn.batch_norm_relu_backward(
        dy, x, mean, invstd, gamma, beta, axis=axis, training=training
    )
    dx_ref, dgamma_ref, dbeta_ref = reference.batch_norm_backward(
        np.where(passed, f64(dy), 0.0), f64(x), mean_ref, invstd_ref, f64(gamma), axis=axis,
        training=training,
    )  # fmt: skip
    assert_close(dx, dx_ref, dtype)
    m = x.size // x.shape[axis]
    assert_close(dgamma, dgamma_ref, dtype, scale=np.sqrt(m))
    assert_close(dbeta, dbeta_ref, dtype, scale=np.sqrt(m))


# name -> (shape, axis): small, M even, for finite differences.
FD_CASES = {
    "ff": ((4, 10), 0),
    "ff_short_rows": ((5, 6), 0),
    "bf": ((10, 4), 1),
    "nchw": ((2, 3, 4, 4), 1),
    "nhwc": ((2, 2, 3, 4), -1),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", FD_CASES)
def test_gradients_match_finite_differences(rng, name, training):
    """dx, dgamma, dbeta of sum(w * y) against central differences, in float64, off the kinks."""
    shape, axis = FD_CASES[name]
    x, gamma, beta = kink_free(rng, shape, axis, np.float64)
    w = rng.standard_normal(shape)
    rm, rv = make_running(rng, shape[axis], np.float64)

    def forward():
        if training:
            return fastbn.batch_norm_relu_train(x, gamma, beta, axis=axis)
        y = fastbn.batch_norm_relu_eval(x, rm, rv, gamma, beta, axis=axis)
        return y, rm, running_invstd(rv, EPS)

    def loss():
        return float(np.sum(w * forward()[0]))

    y, mean, invstd = forward()
    if training:
        y_plain = fastbn.batch_norm_train(x, gamma, beta, axis=axis)[0]
    else:
        y_plain = fastbn.batch_norm_eval(x, rm, rv, gamma, beta, axis=axis)
    assert np.abs(y_plain).min() > 1e-3  # no perturbation below crosses a kink
    assert 0 < np.count_nonzero(y) < y.size
    dx, dgamma, dbeta = fastbn.batch_norm_relu_backward(
        w, x, mean, invstd, gamma, beta, axis=axis, training=training
    )
    np.testing.assert_allclose(dx, central_difference(loss, x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dgamma, central_difference(loss, gamma), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dbeta, central_difference(loss, beta), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- ties: y == 0 exactly


def tied(rng, shape, axis, dtype):
    """x whose values are 2.5 + k for integers k in [-3, 3], each feature symmetric about 2.5.

    The mean is 2.5 exactly (every sum is of small integers), so with beta
    = 0 the forward's y is exactly 0 where x == 2.5, and only there. Returns
    x and the boolean array of those positions.
    """
    c = shape[axis]
    m = int(np.prod(shape)) // c
    assert m % 2 == 1
    k = rng.integers(1, 4, (c, m // 2))
    k[:2, 0] = 0  # features 0 and 1 get more ties, in place of a pair +-k
    signed = np.concatenate([k, -k, np.zeros((c, 1), k.dtype)], axis=1)
    signed = np.take_along_axis(signed, rng.permuted(np.tile(np.arange(m), (c, 1)), axis=1), 1)
    x = from_features(2.5 + signed.astype(np.float64), shape, axis).astype(dtype)
    return x, x == 2.5


# name -> (shape, axis, path of `kernel_path`): M odd.
TIE_CASES = {
    "ff_per_feature": ((8, 301), 0, ("rows", "per_feature", True)),
    "ff_chunked": ((3, 2001), 0, ("rows", "chunked", True)),
    "ff_chunked_parallel": ((3, 40001), 0, ("rows", "chunked", False)),
    "ff_short_rows": ((40, 9), 0, ("columns", None, True)),
    "bf_parallel": ((4001, 16), 1, ("columns", None, False)),
    "nchw_per_feature_parallel": ((33, 16, 11, 9), 1, ("rows", "per_feature", False)),
    "nhwc": ((3, 5, 7, 6), -1, ("columns", None, True)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", TIE_CASES)
def test_ties_pass_no_gradient(rng, name, dtype):
    """Where y == 0 exactly, dy does not pass (ReLU's subgradient 0), in training and eval.

    dy is positive, so that the ties' dy would show in dbeta: by more than 1
    in every feature, far beyond the sums' tolerance.
    """
    shape, axis, path = TIE_CASES[name]
    c = shape[axis]
    x, ties = tied(rng, shape, axis, dtype)
    assert kernel_path(x, axis) == path
    dy = (1.0 + rng.random(shape)).astype(dtype)
    gamma = (rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)).astype(dtype)
    beta = np.zeros(c, dtype)
    assert feature_view(f64(np.where(ties, dy, 0)), axis).sum(axis=1).min() > 1.0
    for training in (True, False):
        if training:
            y_plain, mean, invstd = fastbn.batch_norm_train(x, gamma, beta, axis=axis)
            y, _, _ = fastbn.batch_norm_relu_train(x, gamma, beta, axis=axis)
            assert np.all(mean == 2.5)
        else:  # running statistics that put the kink at 2.5 too
            rm, rv = np.full(c, 2.5, dtype), rng.uniform(0.5, 2.0, c).astype(dtype)
            y_plain = fastbn.batch_norm_eval(x, rm, rv, gamma, beta, axis=axis)
            y = fastbn.batch_norm_relu_eval(x, rm, rv, gamma, beta, axis=axis)
            mean, invstd = rm.astype(np.float64), running_invstd(rv, EPS)
        assert np.array_equal(y_plain == 0, ties) and np.array_equal(y == 0, ties | (y_plain < 0))
        dx, _, dbeta = fastbn.batch_norm_relu_backward(
            dy, x, mean, invstd, gamma, beta, axis=axis, training=training
        )
        dz = np.where(y_plain > 0, dy, 0).astype(dtype)
        terms = feature_view(f64(dz), axis)
        assert_sums_close(dbeta, terms.sum(axis=1), terms, dtype, "dbeta")
        expected = fastbn.batch_norm_backward(
            dz, x, mean, invstd, gamma, axis=axis, training=training
        )
        assert_few_ulp(dx, expected[0], "dx")
        if not training:  # dx = gamma * invstd * dz: exactly 0 at the ties
            assert np.all(dx[ties] == 0)


# ---------------------------------------------------------------- non-finite data


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["ff_per_feature", "ff_chunked", "bf", "nchw_chunked", "nhwc"])
def test_nan_propagates_as_in_plain_batch_norm(rng, name, dtype):
    """NaN in x: y is NaN over its feature in training, at its value in eval, as unfused."""
    x, _, gamma, beta = make_case(rng, name, dtype)
    axis = CASES[name][1]
    feature_values = np.moveaxis(x, axis, 0)  # a view: writes go to x
    feature_values[1].flat[3] = np.nan
    y_plain, _, _ = fastbn.batch_norm_train(x, gamma, beta, axis=axis)
    y, mean_relu, invstd_relu = fastbn.batch_norm_relu_train(x, gamma, beta, axis=axis)
    assert_same_bits(y, np.maximum(y_plain, 0))
    assert np.isnan(mean_relu[1]) and np.isnan(invstd_relu[1])
    nan_features = np.isnan(feature_view(y, axis)).all(axis=1)
    assert nan_features.tolist() == [i == 1 for i in range(x.shape[axis])]
    rm, rv = make_running(rng, x.shape[axis], dtype)
    y = fastbn.batch_norm_relu_eval(x, rm, rv, gamma, beta, axis=axis)
    assert_same_bits(y, np.maximum(fastbn.batch_norm_eval(x, rm, rv, gamma, beta, axis=axis), 0))
    assert np.count_nonzero(np.isnan(y)) == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["ff_per_feature", "ff_chunked", "bf", "nchw_chunked", "nhwc"])
def test_eval_backward_of_infinite_input_is_that_of_batch_norm_then_relu(rng, name, dtype):
    """x = +inf where y = +inf passed the ReLU: dx there is gamma * invstd * dy, as unfused.

    With running statistics x enters dx only through the mask; plain batch
    norm's eval backward, and torch's BatchNorm then ReLU, give a finite dx.
    """
    x, dy, gamma, beta = make_case(rng, name, dtype)
    axis = CASES[name][1]
    gamma = np.abs(gamma)  # y = +inf at x = +inf: the ReLU passes it
    feature_values = np.moveaxis(x, axis, 0)
    feature_values[1].flat[3] = np.inf
    rm, rv = make_running(rng, x.shape[axis], dtype)
    y = fastbn.batch_norm_relu_eval(x, rm, rv, gamma, beta, axis=axis)
    assert np.isposinf(np.moveaxis(y, axis, 0)[1].flat[3])
    mean, invstd = rm.astype(np.float64), running_invstd(rv, EPS)
    dx, _, _ = fastbn.batch_norm_relu_backward(
        dy, x, mean, invstd, gamma, beta, axis=axis, training=False
    )
    expected, _, _ = fastbn.batch_norm_backward(
        np.where(y > 0, dy, 0).astype(dtype), x, mean, invstd, gamma, axis=axis, training=False
    )
    assert np.isfinite(expected).all()
    at = np.isinf(x)
    assert dx[at] == expected[at], f"dx at x = +inf: {dx[at]}, expected {expected[at]}"
    assert_few_ulp(dx, expected, "dx")


# ---------------------------------------------------------------- out= and errors


@pytest.mark.parametrize("name", ["ff_per_feature", "bf", "nchw_sliced", "ff_fortran"])
def test_out(rng, name):
    """out= receives y and dx (and is what is returned); eval may write x, backward dy."""
    x, dy, gamma, beta = make_case(rng, name, np.float32)
    axis = CASES[name][1]
    y_expected, mean, invstd = fastbn.batch_norm_relu_train(x, gamma, beta, axis=axis)
    out = layout(np.full(x.shape, np.nan, x.dtype), CASES[name][2])
    y, _, _ = fastbn.batch_norm_relu_train(x, gamma, beta, axis=axis, out=out)
    assert y is out
    assert_same_bits(out, y_expected)

    dx_expected = fastbn.batch_norm_relu_backward(dy, x, mean, invstd, gamma, beta, axis=axis)[0]
    out = np.full(x.shape, np.nan, x.dtype)
    assert (
        fastbn.batch_norm_relu_backward(dy, x, mean, invstd, gamma, beta, axis=axis, out=out)[0]
        is out
    )
    assert_same_bits(out, dx_expected)
    dy_copy = dy.copy()
    dx = fastbn.batch_norm_relu_backward(
        dy_copy, x, mean, invstd, gamma, beta, axis=axis, out=dy_copy
    )[0]
    assert dx is dy_copy
    assert_same_bits(dx, dx_expected)

    rm, rv = make_running(rng, x.shape[axis], x.dtype)
    y_expected = fastbn.batch_norm_relu_eval(x, rm, rv, gamma, beta, axis=axis)
    x_copy = x.copy()
    assert (
        fastbn.batch_norm_relu_eval(x_copy, rm, rv, gamma, beta, axis=axis, out=x_copy) is x_copy
    )
    assert_same_bits(x_copy, y_expected)


def _error_of(call):
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    return type(info.value), str(info.value)


# name -> the arguments that replace good ones, given x.
BAD_CALLS = {
    "beta_length": lambda x: dict(beta=np.zeros(3, x.dtype)),
    "gamma_dtype": lambda x: dict(gamma=np.ones(x.shape[1], np.int64)),
    "x_dtype": lambda x: dict(x=x.astype(np.float16)),
    "x_1d": lambda x: dict(x=x[0]),
    "axis": lambda x: dict(axis=2),
    "eps": lambda x: dict(eps=0.0),
    "out_dtype": lambda x: dict(out=np.empty(x.shape, np.float64)),
    "out_overlaps_x": lambda x: dict(out=x),
}


@pytest.mark.parametrize("bad", BAD_CALLS)
def test_train_and_eval_errors_are_the_plain_ones(rng, bad):
    """Each bad argument raises the exception, with the message, of the plain function."""
    x = rng.standard_normal((6, 5)).astype(np.float32)
    c = x.shape[1]
    rm, rv = make_running(rng, c, np.float32)
    args = dict(x=x, gamma=np.ones(c, np.float32), beta=np.zeros(c, np.float32), axis=1)
    args.update(BAD_CALLS[bad](x))
    x_arg = args.pop("x")
    train = _error_of(lambda: fastbn.batch_norm_train(x_arg, **args))
    assert _error_of(lambda: fastbn.batch_norm_relu_train(x_arg, **args)) == train
    if bad == "out_overlaps_x":  # allowed in eval (in place)
        return
    evaluated = _error_of(lambda: fastbn.batch_norm_eval(x_arg, rm, rv, **args))
    assert _error_of(lambda: fastbn.batch_norm_relu_eval(x_arg, rm, rv, **args)) == evaluated


# name -> the arguments that replace good ones, given x of shape (6, 5).
BAD_BACKWARD = {
    "dy_dtype": lambda x: dict(dy=x.astype(np.float64)),
    "dy_shape": lambda x: dict(dy=x.T.copy()),
    "mean_length": lambda x: dict(mean=np.zeros(4)),
    "gamma_length": lambda x: dict(gamma=np.ones(4, np.float32)),
    "gamma_dtype": lambda x: dict(gamma=np.ones(5, np.int32)),
    "out_overlaps_x": lambda x: dict(out=x),
}


@pytest.mark.parametrize("bad", BAD_BACKWARD)
def test_backward_errors_are_the_plain_ones(rng, bad):
    """Each bad argument raises the exception, with the message, of batch_norm_backward."""
    x = rng.standard_normal((6, 5)).astype(np.float32)
    args = dict(dy=np.ones_like(x), x=x, mean=np.zeros(5), invstd=np.ones(5), gamma=None, axis=1)
    args.update(BAD_BACKWARD[bad](x))
    plain = _error_of(lambda: fastbn.batch_norm_backward(**args))
    assert _error_of(lambda: fastbn.batch_norm_relu_backward(**args)) == plain


def test_backward_checks_beta(rng):
    """beta, the fused backward's own argument, is checked as gamma is: length and dtype."""
    x = rng.standard_normal((6, 5)).astype(np.float32)
    args = (np.ones_like(x), x, np.zeros(5), np.ones(5))
    with raises(ValueError, "beta", "(4,)", "(5,)"):
        fastbn.batch_norm_relu_backward(*args, None, np.zeros(4, np.float32), axis=1)
    with raises(TypeError, "beta", "int64"):
        fastbn.batch_norm_relu_backward(*args, None, np.zeros(5, np.int64), axis=1)


# ---------------------------------------------------------------- the layer

LAYER_CASES = {
    "ff": ((6, 40), 0),
    "bf": ((40, 6), 1),
    "nchw": ((4, 6, 5, 4), 1),
    "nhwc": ((4, 5, 4, 6), -1),
}


def layer_pair(rng, shape, axis, dtype, **kwargs):
    """A BatchNorm(activation="relu") and a plain BatchNorm with the same random gamma, beta."""
    c = shape[axis]
    fused = BatchNorm(c, axis=axis, dtype=dtype, activation="relu", **kwargs)
    plain = BatchNorm(c, axis=axis, dtype=dtype, **kwargs)
    if fused.affine:
        fused.gamma[...] = rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)
        fused.beta[...] = 0.5 * rng.standard_normal(c)
        plain.load_state_dict(fused.state_dict())
    return fused, plain


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", LAYER_CASES)
def test_layer_is_plain_layer_then_relu(rng, name, dtype):
    """Training steps, then eval: y bit for bit, gradients as for dy masked where y > 0.

    Also the functional fused calls with the layer's own arguments, bit for
    bit, and the running statistics of the plain layer, bit for bit. The
    gradient sums may differ in the last bit: each step starts the plain
    layer from the fused one's parameters.
    """
    shape, axis = LAYER_CASES[name]
    fused, plain = layer_pair(rng, shape, axis, dtype)
    for step in range(3):
        plain.load_state_dict(fused.state_dict())
        x = (rng.uniform(-1, 1) + rng.uniform(0.5, 2) * rng.standard_normal(shape)).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        if step == 2:
            fused.eval()
            plain.eval()
            rm, rv = fused.running_mean.copy(), fused.running_var.copy()
            y_functional = fastbn.batch_norm_relu_eval(
                x, rm, rv, fused.gamma, fused.beta, axis=axis
            )
            mean, invstd = rm.astype(np.float64), running_invstd(rv, EPS)
        else:
            y_functional, mean, invstd = fastbn.batch_norm_relu_train(
                x, fused.gamma, fused.beta, axis=axis
            )
        y_plain = plain(x)
        y = fused(x)
        assert_same_bits(y, np.maximum(y_plain, 0))
        assert_same_bits(y, y_functional)
        for key, value in plain.state_dict().items():
            assert np.array_equal(fused.state_dict()[key], value), key

        dx = fused.backward(dy)
        dx_functional, dgamma, dbeta = fastbn.batch_norm_relu_backward(
            dy, x, mean, invstd, fused.gamma, fused.beta, axis=axis, training=fused.training
        )
        assert_same_bits(dx, dx_functional)
        assert_same_bits(fused.dgamma, dgamma)
        assert_same_bits(fused.dbeta, dbeta)
        dz = np.where(y_plain > 0, dy, 0).astype(dtype)
        dx_plain = plain.backward(dz)
        assert_few_ulp(dx, dx_plain, "dx")
        terms = feature_view(f64(dz), axis)
        assert_sums_close(fused.dbeta, plain.dbeta, terms, dtype, "dbeta")
        x_hat = (f64(x) - per_feature(mean, x.ndim, axis % x.ndim)) * per_feature(
            invstd, x.ndim, axis % x.ndim
        )
        assert_sums_close(
            fused.dgamma, plain.dgamma, feature_view(f64(dz) * x_hat, axis), dtype, "dgamma"
        )
        fused.step(0.1)
        plain.step(0.1)


@pytest.mark.parametrize(
    "kwargs", [dict(affine=False), dict(track_running_stats=False), dict(momentum=None)]
)
def test_layer_options(rng, kwargs):
    """Without affine, without running statistics (batch statistics in eval too), momentum None."""
    shape, axis = LAYER_CASES["nchw"]
    fused, plain = layer_pair(rng, shape, axis, np.float64, **kwargs)
    for training in (True, True, False):
        fused.train(training)
        plain.train(training)
        x = rng.standard_normal(shape)
        dy = rng.standard_normal(shape)
        y_plain = plain(x)
        assert_same_bits(fused(x), np.maximum(y_plain, 0))
        np.testing.assert_allclose(
            fused.backward(dy), plain.backward(np.where(y_plain > 0, dy, 0)), rtol=0, atol=1e-14
        )
        for key, value in plain.state_dict().items():
            assert np.array_equal(fused.state_dict()[key], value), key


def test_layer_out(rng):
    shape, axis = LAYER_CASES["bf"]
    fused, _ = layer_pair(rng, shape, axis, np.float32)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    expected_y = copy.deepcopy(fused)(x)
    out = np.full(shape, np.nan, np.float32)
    assert fused(x, out=out) is out
    assert_same_bits(out, expected_y)
    expected_dx = fastbn.batch_norm_relu_backward(
        dy, x, *fastbn.batch_norm_relu_train(x, fused.gamma, fused.beta, axis=axis)[1:],
        fused.gamma, fused.beta, axis=axis,
    )[0]  # fmt: skip
    dx_out = np.full(shape, np.nan, np.float32)
    assert fused.backward(dy, out=dx_out) is dx_out
    assert_same_bits(dx_out, expected_dx)


def test_layer_repr_and_state():
    """repr names the activation (a plain layer's does not); state_dict has the plain keys."""
    fused = BatchNorm(4, axis=1, activation="relu")
    plain = BatchNorm(4, axis=1)
    assert repr(fused) == repr(plain)[:-1] + ", activation='relu')"
    assert "activation" not in repr(plain)
    assert fused.activation == "relu" and plain.activation is None
    assert list(fused.state_dict()) == list(plain.state_dict())
    fused.load_state_dict(plain.state_dict())


@pytest.mark.parametrize("duplicate", [copy.deepcopy, lambda bn: pickle.loads(pickle.dumps(bn))])
def test_layer_copies_keep_the_activation(rng, duplicate):
    shape, axis = LAYER_CASES["nhwc"]
    fused, _ = layer_pair(rng, shape, axis, np.float32)
    x = rng.standard_normal(shape).astype(np.float32)
    fused(x)
    twin = duplicate(fused)
    assert twin.activation == "relu"
    assert repr(twin) == repr(fused)
    assert_same_bits(twin(x), fused(x))
    assert np.count_nonzero(twin(x) == 0) > 0


@pytest.mark.parametrize("activation", ["gelu", "ReLU", "", True, 1, np.str_("sigmoid")])
def test_layer_rejects_other_activations(activation):
    with raises(ValueError, "activation", repr(activation)):
        BatchNorm(4, activation=activation)


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        (dict(renorm=True), ("activation", "renorm")),
        (dict(virtual_batch_size=2), ("activation", "virtual_batch_size")),
    ],
)
def test_layer_activation_does_not_combine(kwargs, names):
    """A fused ReLU with renorm or virtual batches is a ValueError naming both options."""
    with raises(ValueError, *names):
        BatchNorm(4, activation="relu", **kwargs)
    BatchNorm(4, **kwargs)  # each alone is fine
