"""Batch Renormalization: the functional API (fastbn.renorm) and BatchNorm(renorm=True).

The reference is the paper's Algorithm 1 (Ioffe, 2017), transcribed below in
float64 NumPy: the forward, and the backward with r and d constants, term by
term as the paper writes it. Its running statistics are the layer's rule
(PyTorch's, with the unbiased variance), not the paper's update of sigma,
as the brief asks. Gradients are also checked by central finite differences
of a scalar loss with r and d held fixed, and the identity r == 1, d == 0
against plain batch norm.
"""

import copy
import pickle

import numpy as np
import pytest
from conftest import (
    DTYPES,
    LAYOUTS,
    TOL,
    assert_close,
    assert_stats_close,
    assert_unchanged,
    central_difference,
    copies,
    f64,
    layout,
    make_params,
    make_running,
    raises,
    readonly,
    reduced_axes,
)
from test_layer import assert_same_state, snapshot

import fastbn
from fastbn import BatchNorm, batch_norm_train, batch_renorm_backward, batch_renorm_train

# The four layouts of the brief: features-first, batch-first, NCHW, NHWC.
RENORM_LAYOUTS = {
    name: LAYOUTS[name] for name in ("features_first", "batch_first", "nchw", "nhwc")
}
EPS = 1e-5


# ------------------------------------------------------------ the paper's Algorithm 1


def _broadcast(v, ndim, axis):
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return np.asarray(v).reshape(shape)


def algorithm1_forward(x, running_mean, running_var, gamma, beta, *, axis, r_max, d_max,
                       r_min=None, eps=EPS):  # fmt: skip
    """Algorithm 1's training output in float64; returns y, mu_B, sigma_B, r, d (per feature)."""
    x = f64(x)
    axes = reduced_axes(x.ndim, axis)
    c = x.shape[axis]
    gamma = np.ones(c) if gamma is None else f64(gamma)
    beta = np.zeros(c) if beta is None else f64(beta)
    mu_b = x.mean(axis=axes)
    sigma_b = np.sqrt(((x - _broadcast(mu_b, x.ndim, axis)) ** 2).mean(axis=axes) + eps)
    sigma = np.sqrt(f64(running_var) + eps)
    r = np.clip(sigma_b / sigma, 1.0 / r_max if r_min is None else r_min, r_max)
    d = np.clip((mu_b - f64(running_mean)) / sigma, -d_max, d_max)
    b = lambda v: _broadcast(v, x.ndim, axis)  # noqa: E731
    x_renorm = (x - b(mu_b)) / b(sigma_b) * b(r) + b(d)
    return b(gamma) * x_renorm + b(beta), mu_b, sigma_b, r, d


def algorithm1_backward(dy, x, gamma, r, d, *, axis, eps=EPS):
    """Algorithm 1's gradients, r and d constants: dx, dgamma, dbeta in float64."""
    dy, x = f64(dy), f64(x)
    axes = reduced_axes(x.ndim, axis)
    c = x.shape[axis]
    m = x.size // c
    gamma = np.ones(c) if gamma is None else f64(gamma)
    b = lambda v: _broadcast(v, x.ndim, axis)  # noqa: E731
    mu_b = x.mean(axis=axes)
    sigma_b = np.sqrt(((x - b(mu_b)) ** 2).mean(axis=axes) + eps)
    centered = x - b(mu_b)
    x_renorm = centered / b(sigma_b) * b(r) + b(d)
    d_xhat = dy * b(gamma)
    d_sigma = (d_xhat * centered * b(-r / sigma_b**2)).sum(axis=axes)
    d_mu = (d_xhat * b(-r / sigma_b)).sum(axis=axes)
    dx = d_xhat * b(r / sigma_b) + b(d_sigma) * centered / (m * b(sigma_b)) + b(d_mu) / m
    return dx, (dy * x_renorm).sum(axis=axes), dy.sum(axis=axes)


def torch_rule(running_mean, running_var, x, axis, momentum, count):
    """The layer's running-statistics update (PyTorch's), in float64; count is after this batch."""
    x = f64(x)
    axes = reduced_axes(x.ndim, axis)
    f = 1.0 / count if momentum is None else momentum
    new_mean = (1 - f) * f64(running_mean) + f * x.mean(axis=axes)
    new_var = (1 - f) * f64(running_var) + f * x.var(axis=axes, ddof=1)
    return new_mean, new_var


def make_data(rng, shape, axis, dtype):
    """Data whose features have different means and scales, in dtype."""
    c = shape[axis]
    loc = _broadcast(rng.uniform(-2.0, 2.0, c), len(shape), axis)
    scale = _broadcast(rng.uniform(0.3, 3.0, c), len(shape), axis)
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


def clipping_running_stats(x, axis, r_max, d_max):
    """Running statistics that put feature 0's r at r_max, 1's at 1 / r_max, 2's d at d_max
    and 3's at -d_max (C >= 5 features); the others stay inside the limits."""
    x = f64(x)
    axes = reduced_axes(x.ndim, axis)
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    running_mean, running_var = mean.copy(), var.copy()
    running_var[0] = var[0] / (4 * r_max) ** 2  # sigma_B / sigma = 4 r_max
    running_var[1] = var[1] * (4 * r_max) ** 2
    running_mean[2] = mean[2] - 3 * d_max * np.sqrt(var[2])
    running_mean[3] = mean[3] + 3 * d_max * np.sqrt(var[3])
    running_mean[4] = mean[4] - 0.3 * np.sqrt(var[4])  # inside: d = 0.3, r = 1
    return running_mean, running_var


# ------------------------------------------------------------------ functional


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", RENORM_LAYOUTS)
def test_forward_and_backward_match_algorithm1(rng, name, dtype):
    shape, axis = RENORM_LAYOUTS[name]
    c = shape[axis]
    x = make_data(rng, shape, axis, dtype)
    running_mean, running_var = make_running(rng, c, dtype)
    gamma, beta = make_params(rng, c, dtype)
    y, mean, invstd, r, d = batch_renorm_train(
        x, running_mean, running_var, gamma, beta, r_max=1.5, d_max=0.5, axis=axis
    )
    y_ref, mu_ref, sigma_ref, r_ref, d_ref = algorithm1_forward(
        x, running_mean, running_var, gamma, beta, axis=axis, r_max=1.5, d_max=0.5
    )
    assert y.dtype == dtype and y.shape == x.shape
    for v in (mean, invstd, r, d):
        assert v.dtype == np.float64 and v.shape == (c,)
    assert_stats_close(mean, invstd, mu_ref, 1.0 / sigma_ref, dtype)
    tol = TOL[np.dtype(dtype)]
    np.testing.assert_allclose(r, r_ref, rtol=tol)
    np.testing.assert_allclose(d, d_ref, rtol=0, atol=tol)
    assert_close(y, y_ref, dtype, scale=3.0)
    # The limits are active somewhere, else the test would not see the clipping.
    assert np.any(r == 1.5) or np.any(r == 1 / 1.5) or np.any(np.abs(d) == 0.5)

    dy = rng.standard_normal(shape).astype(dtype)
    dx, dgamma, dbeta = batch_renorm_backward(dy, x, mean, invstd, r, d, gamma, axis=axis)
    dx_ref, dgamma_ref, dbeta_ref = algorithm1_backward(dy, x, gamma, r, d, axis=axis)
    assert dx.dtype == dgamma.dtype == dbeta.dtype == dtype
    assert_close(dx, dx_ref, dtype, scale=3.0)
    m = x.size // c
    assert_close(dgamma, dgamma_ref, dtype, scale=np.sqrt(m) * 5)
    assert_close(dbeta, dbeta_ref, dtype, scale=np.sqrt(m))


@pytest.mark.parametrize("order", ["F", "sliced", "transposed"])
def test_any_memory_order(rng, order):
    shape, axis = LAYOUTS["nchw"]
    x = make_data(rng, shape, axis, np.float64)
    running_mean, running_var = make_running(rng, shape[axis], np.float64)
    expected = batch_renorm_train(x, running_mean, running_var, axis=axis)
    got = batch_renorm_train(layout(x, order), running_mean, running_var, axis=axis)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)
    dy = rng.standard_normal(shape)
    grads = batch_renorm_backward(dy, x, *expected[1:], axis=axis)
    got_grads = batch_renorm_backward(
        layout(dy, order), layout(x, order), *expected[1:], axis=axis
    )
    for a, b in zip(got_grads, grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("affine", [True, False])
def test_gradients_match_finite_differences_with_r_and_d_fixed(rng, affine):
    shape, axis = (4, 3, 5), 1
    x = make_data(rng, shape, axis, np.float64)
    running_mean, running_var = make_running(rng, 3, np.float64)
    gamma, beta = make_params(rng, 3, np.float64) if affine else (None, None)
    weights = rng.standard_normal(shape)
    y, mean, invstd, r, d = batch_renorm_train(
        x, running_mean, running_var, gamma, beta, r_max=1.2, d_max=0.2, axis=axis
    )
    g = np.ones(3) if gamma is None else gamma
    b = np.zeros(3) if beta is None else beta

    def loss():
        # r and d fixed: batch norm with scale gamma * r and shift gamma * d + beta.
        y_fixed, _, _ = batch_norm_train(x, g * r, g * d + b, axis=axis)
        return float((weights * y_fixed).sum())

    np.testing.assert_allclose(loss(), (weights * y).sum(), rtol=1e-13)
    dx, dgamma, dbeta = batch_renorm_backward(weights, x, mean, invstd, r, d, gamma, axis=axis)
    np.testing.assert_allclose(dx, central_difference(loss, x), atol=1e-7)
    if affine:
        # y depends on gamma and beta through the scale and the shift only.
        np.testing.assert_allclose(dgamma, central_difference(loss, gamma), atol=1e-7)
        np.testing.assert_allclose(dbeta, central_difference(loss, beta), atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", RENORM_LAYOUTS)
def test_running_statistics_of_the_batch_give_batch_norm(rng, name, dtype):
    shape, axis = RENORM_LAYOUTS[name]
    x = make_data(rng, shape, axis, dtype)
    gamma, beta = make_params(rng, shape[axis], dtype)
    axes = reduced_axes(x.ndim, axis)
    running_mean, running_var = f64(x).mean(axis=axes), f64(x).var(axis=axes)
    y, mean, invstd, r, d = batch_renorm_train(
        x, running_mean, running_var, gamma, beta, axis=axis
    )
    np.testing.assert_allclose(r, 1.0, rtol=1e-12)
    np.testing.assert_allclose(d, 0.0, atol=1e-12)
    y_bn, mean_bn, invstd_bn = batch_norm_train(x, gamma, beta, axis=axis)
    assert_close(y, y_bn, dtype, scale=3.0)
    np.testing.assert_allclose(mean, mean_bn, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(invstd, invstd_bn, rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_room_to_correct_is_batch_norm(rng, dtype):
    """r_max = 1 and d_max = 0 make r == 1 and d == 0 exactly, whatever the running statistics."""
    shape, axis = LAYOUTS["batch_first"]
    x = make_data(rng, shape, axis, dtype)
    gamma, beta = make_params(rng, shape[axis], dtype)
    running_mean, running_var = make_running(rng, shape[axis], dtype)
    y, mean, invstd, r, d = batch_renorm_train(
        x, running_mean, running_var, gamma, beta, r_max=1.0, d_max=0.0, axis=axis
    )
    np.testing.assert_array_equal(r, 1.0)
    np.testing.assert_array_equal(d, 0.0)
    assert_close(y, batch_norm_train(x, gamma, beta, axis=axis)[0], dtype, scale=3.0)
    dy = rng.standard_normal(shape).astype(dtype)
    expected = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, axis=axis)
    got = batch_renorm_backward(dy, x, mean, invstd, r, d, gamma, axis=axis)
    for a, b in zip(got, expected, strict=True):
        assert_close(a, b, dtype, scale=10.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", RENORM_LAYOUTS)
def test_clipping_at_both_limits(rng, name, dtype):
    shape, axis = {
        "features_first": ((6, 40), 0),
        "batch_first": ((40, 6), 1),
        "nchw": ((4, 6, 3, 5), 1),
        "nhwc": ((4, 3, 5, 6), -1),
    }[name]
    x = make_data(rng, shape, axis, dtype)
    running_mean, running_var = clipping_running_stats(x, axis, 2.0, 1.5)
    gamma, beta = make_params(rng, shape[axis], dtype)
    y, _, _, r, d = batch_renorm_train(
        x, running_mean, running_var, gamma, beta, r_max=2.0, d_max=1.5, axis=axis
    )
    assert r[0] == 2.0 and r[1] == 0.5
    assert d[2] == 1.5 and d[3] == -1.5
    assert 0.0 < d[4] < 1.5 and 0.5 < r[4] < 2.0
    y_ref = algorithm1_forward(
        x, running_mean, running_var, gamma, beta, axis=axis, r_max=2.0, d_max=1.5
    )[0]
    assert_close(y, y_ref, dtype, scale=5.0)
    # A lower limit of its own (Keras's rmin).
    _, _, _, r, _ = batch_renorm_train(
        x, running_mean, running_var, r_max=2.0, d_max=1.5, r_min=0.75, axis=axis
    )
    assert r[1] == 0.75 and r[0] == 2.0


def test_infinite_limits_do_not_clip(rng):
    shape, axis = LAYOUTS["features_first"]
    x = make_data(rng, shape, axis, np.float64)
    running_mean, running_var = clipping_running_stats(x, axis, 2.0, 1.5)
    _, _, _, r, d = batch_renorm_train(
        x, running_mean, running_var, r_max=np.inf, d_max=np.inf, axis=axis
    )
    _, _, _, r_ref, d_ref = algorithm1_forward(
        x, running_mean, running_var, None, None, axis=axis, r_max=np.inf, d_max=np.inf
    )
    np.testing.assert_allclose(r, r_ref, rtol=1e-12)
    np.testing.assert_allclose(d, d_ref, rtol=1e-12, atol=1e-12)
    # Beyond the helper's limits: 4 * r_max and 3 * d_max, but for eps.
    np.testing.assert_allclose(r[:2], [8.0, 1 / 8.0], rtol=1e-3)
    assert d[2] > 4.4 and d[3] < -4.4


def test_out_and_inputs_left_alone(rng):
    shape, axis = LAYOUTS["nhwc"]
    x = make_data(rng, shape, axis, np.float32)
    running_mean, running_var = make_running(rng, shape[axis], np.float32)
    gamma, beta = make_params(rng, shape[axis], np.float32)
    inputs = (x, running_mean, running_var, gamma, beta)
    saved = copies(*inputs)
    readonly(*inputs)
    expected = batch_renorm_train(*inputs, axis=axis)
    out = np.empty_like(x)
    got = batch_renorm_train(*inputs, axis=axis, out=out)
    assert got[0] is out
    np.testing.assert_array_equal(out, expected[0])
    assert_unchanged(inputs, saved)
    dy = rng.standard_normal(shape).astype(np.float32)
    grads = batch_renorm_backward(dy, x, *expected[1:], gamma, axis=axis)
    dy_copy = dy.copy()
    dx = batch_renorm_backward(dy_copy, x, *expected[1:], gamma, axis=axis, out=dy_copy)[0]
    assert dx is dy_copy
    np.testing.assert_array_equal(dx, grads[0])


def test_nan_stays_in_its_feature(rng):
    shape, axis = LAYOUTS["batch_first"]
    x = make_data(rng, shape, axis, np.float64)
    x[5, 2] = np.nan
    running_mean, running_var = make_running(rng, shape[axis], np.float64)
    y, _, _, r, d = batch_renorm_train(x, running_mean, running_var, axis=axis)
    assert np.isnan(y[:, 2]).all() and np.isnan(r[2]) and np.isnan(d[2])
    others = np.arange(shape[axis]) != 2
    assert np.isfinite(y[:, others]).all() and np.isfinite(r[others]).all()


# ---------------------------------------------------------------------- errors


def _args(rng):
    x = make_data(rng, (3, 8), 0, np.float64)
    return x, np.zeros(3), np.ones(3)


@pytest.mark.parametrize(
    ("kwargs", "exc", "name", "fragments"),
    [
        ({"r_max": 0.5}, ValueError, "r_max", (">= 1", "0.5")),
        ({"r_max": float("nan")}, ValueError, "r_max", (">= 1",)),
        ({"r_max": "3"}, TypeError, "r_max", ("real number",)),
        ({"r_max": True}, TypeError, "r_max", ("real number",)),
        ({"d_max": -0.1}, ValueError, "d_max", (">= 0", "-0.1")),
        ({"d_max": None}, TypeError, "d_max", ("real number",)),
        ({"r_min": 1.5}, ValueError, "r_min", ("[0, 1]", "1.5")),
        ({"r_min": -0.1}, ValueError, "r_min", ("[0, 1]",)),
        ({"eps": 0.0}, ValueError, "eps", ("finite and > 0",)),
        ({"axis": 2}, ValueError, "axis", ("out of range",)),
        ({"gamma": np.ones(4)}, ValueError, "gamma", ("(4,)", "(3,)")),
        ({"beta": np.ones(2)}, ValueError, "beta", ("(2,)",)),
        ({"running_mean": np.zeros(4)}, ValueError, "running_mean", ("(4,)",)),
        ({"running_var": np.ones((3, 1))}, ValueError, "running_var", ("(3, 1)",)),
        ({"running_var": np.ones(3, np.int64)}, TypeError, "running_var", ("int64",)),
        ({"gamma": np.ones(3, np.float16)}, TypeError, "gamma", ("float16",)),
        ({"out": np.empty((3, 9))}, ValueError, "out", ("(3, 9)",)),
        ({"out": np.empty((3, 8), np.float32)}, TypeError, "out", ("float32",)),
    ],
)
def test_train_errors(rng, kwargs, exc, name, fragments):
    x, running_mean, running_var = _args(rng)
    call = {"running_mean": running_mean, "running_var": running_var, **kwargs}
    with raises(exc, name, *fragments):
        batch_renorm_train(x, **call)


def test_train_errors_of_the_data(rng):
    x, running_mean, running_var = _args(rng)
    with raises(ValueError, "x", "x[None, :]"):
        batch_renorm_train(x[0], running_mean[:1], running_var[:1])
    with raises(ValueError, "x", "Expected more than 1 value per feature when training"):
        batch_renorm_train(x[:, :1], running_mean, running_var)
    with raises(TypeError, "x", "int64", "x.astype(np.float32)"):
        batch_renorm_train(x.astype(np.int64), running_mean, running_var)
    with raises(ValueError, "out", "overlaps the input x"):
        batch_renorm_train(x, running_mean, running_var, out=x)
    readonly_out = np.empty_like(x)
    readonly_out.flags.writeable = False
    with raises(ValueError, "out", "read-only"):
        batch_renorm_train(x, running_mean, running_var, out=readonly_out)


def test_backward_errors(rng):
    x, running_mean, running_var = _args(rng)
    _, mean, invstd, r, d = batch_renorm_train(x, running_mean, running_var)
    dy = np.ones_like(x)
    with raises(ValueError, "r", "(2,)", "(3,)"):
        batch_renorm_backward(dy, x, mean, invstd, r[:2], d)
    with raises(ValueError, "d", "(4,)"):
        batch_renorm_backward(dy, x, mean, invstd, r, np.zeros(4))
    with raises(ValueError, "dy", "(3, 7)"):
        batch_renorm_backward(dy[:, :7], x, mean, invstd, r, d)
    with raises(TypeError, "dy", "float32"):
        batch_renorm_backward(dy.astype(np.float32), x, mean, invstd, r, d)
    with raises(ValueError, "invstd", "(2,)"):
        batch_renorm_backward(dy, x, mean, invstd[:2], r, d)
    with raises(ValueError, "gamma", "(5,)"):
        batch_renorm_backward(dy, x, mean, invstd, r, d, np.ones(5))
    with raises(ValueError, "out", "overlaps the input x"):
        batch_renorm_backward(dy, x, mean, invstd, r, d, out=x)


# ----------------------------------------------------------------------- layer


def renorm_steps(bn, batches, rng, *, limits):
    """Train bn (renorm) on batches against Algorithm 1; check every step's y, grads, stats.

    ``limits`` gives (r_max, d_max) per step, set on the layer before its forward.
    """
    axis, dtype = bn.axis, bn.dtype
    running_mean, running_var = f64(bn.running_mean), f64(bn.running_var)
    count = bn.num_batches_tracked
    for x, (r_max, d_max) in zip(batches, limits, strict=True):
        bn.r_max, bn.d_max = r_max, d_max
        gamma, beta = f64(bn.gamma), f64(bn.beta)
        y_ref, _, _, r, d = algorithm1_forward(
            x, running_mean, running_var, gamma, beta, axis=axis, r_max=r_max, d_max=d_max
        )
        y = bn(x)
        assert_close(y, y_ref, dtype, scale=5.0)
        count += 1
        running_mean, running_var = torch_rule(
            running_mean, running_var, x, axis, bn.momentum, count
        )
        tol = TOL[np.dtype(dtype)]
        np.testing.assert_allclose(bn.running_mean, running_mean, rtol=tol, atol=tol)
        np.testing.assert_allclose(bn.running_var, running_var, rtol=tol)
        assert bn.num_batches_tracked == count
        dy = rng.standard_normal(x.shape).astype(dtype)
        dx = bn.backward(dy)
        dx_ref, dgamma_ref, dbeta_ref = algorithm1_backward(dy, x, gamma, r, d, axis=axis)
        assert_close(dx, dx_ref, dtype, scale=5.0)
        m = x.size // bn.num_features
        assert_close(bn.dgamma, dgamma_ref, dtype, scale=5 * np.sqrt(m))
        assert_close(bn.dbeta, dbeta_ref, dtype, scale=np.sqrt(m))
        bn.step(0.05)
        # Keep the reference's statistics in the layer's dtype, as the layer stores them.
        running_mean = f64(running_mean.astype(dtype))
        running_var = f64(running_var.astype(dtype))


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", RENORM_LAYOUTS)
def test_layer_trains_as_algorithm1_over_several_steps(rng, name, dtype, momentum):
    shape, axis = RENORM_LAYOUTS[name]
    bn = BatchNorm(shape[axis], axis=axis, dtype=dtype, momentum=momentum, renorm=True)
    batches = [make_data(rng, shape, axis, dtype) for _ in range(5)]
    # The paper's ramp: from batch norm (1, 0) up to looser limits.
    limits = [(1.0, 0.0), (1.2, 0.1), (1.5, 0.5), (3.0, 5.0), (3.0, 5.0)]
    renorm_steps(bn, batches, rng, limits=limits)


def test_layer_eval_mode_is_unchanged(rng):
    shape, axis = LAYOUTS["nchw"]
    bn = BatchNorm(shape[axis], axis=axis, dtype=np.float64, renorm=True)
    plain = BatchNorm(shape[axis], axis=axis, dtype=np.float64)
    for x in [make_data(rng, shape, axis, np.float64) for _ in range(3)]:
        bn(x)
        plain(x)
    # Same running statistics: renorm changes the output, not what is tracked.
    np.testing.assert_allclose(bn.running_mean, plain.running_mean, rtol=1e-13)
    np.testing.assert_allclose(bn.running_var, plain.running_var, rtol=1e-13)
    x = make_data(rng, shape, axis, np.float64)
    bn.eval()
    y = bn(x)
    expected = fastbn.batch_norm_eval(x, bn.running_mean, bn.running_var, axis=axis)
    np.testing.assert_allclose(y, expected, rtol=1e-13, atol=1e-13)
    dy = rng.standard_normal(shape)
    invstd = 1.0 / np.sqrt(bn.running_var + EPS)
    np.testing.assert_allclose(bn.backward(dy), dy * invstd[None, :, None, None], rtol=1e-13)


def test_layer_out_buffer(rng):
    bn = BatchNorm(5, dtype=np.float64, renorm=True)
    twin = copy.deepcopy(bn)
    x = make_data(rng, (5, 24), 0, np.float64)
    out = np.empty_like(x)
    assert bn(x, out=out) is out
    np.testing.assert_array_equal(out, twin(x))


def test_layer_options_validation_and_repr():
    with raises(ValueError, "renorm", "track_running_stats=True"):
        BatchNorm(3, renorm=True, track_running_stats=False)
    with raises(TypeError, "renorm", "must be a bool"):
        BatchNorm(3, renorm=1)
    with raises(ValueError, "r_max", ">= 1"):
        BatchNorm(3, renorm=True, r_max=0.9)
    with raises(ValueError, "d_max", ">= 0"):
        BatchNorm(3, d_max=-1)
    bn = BatchNorm(3, renorm=True, r_max=2, d_max=np.float64(1.5))
    assert (bn.renorm, bn.r_max, bn.d_max) == (True, 2.0, 1.5)
    assert type(bn.r_max) is float and type(bn.d_max) is float
    assert repr(bn) == (
        "BatchNorm(3, axis=0, eps=1e-05, momentum=0.1, affine=True, "
        "track_running_stats=True, dtype=np.float32, renorm=True, r_max=2.0, d_max=1.5)"
    )
    assert "renorm" not in repr(BatchNorm(3))
    for clone in (copy.deepcopy(bn), pickle.loads(pickle.dumps(bn))):
        assert (clone.renorm, clone.r_max, clone.d_max) == (True, 2.0, 1.5)


def _bad_r_max(bn, x):
    limit, bn.r_max = bn.r_max, 0.5
    try:
        bn(x)
    finally:  # the layer's own float back: the state check compares identities too
        bn.r_max = limit


def _bad_d_max(bn, x):
    limit, bn.d_max = bn.d_max, float("nan")
    try:
        bn(x)
    finally:
        bn.d_max = limit


def _nan_batch(bn, x):
    x = x.copy()
    x[1, 3] = np.nan
    bn(x)


def _overflow_float64(bn, x):
    bn(1e200 * x)


def _one_value_per_feature(bn, x):
    bn(x[:, :1])


def _wrong_dtype(bn, x):
    bn(x.astype(np.float32))


def _out_is_x(bn, x):
    x = x.copy()
    bn(x, out=x)


RENORM_FAILURES = {
    _bad_r_max: (ValueError, "r_max must be >= 1"),
    _bad_d_max: (ValueError, "d_max must be >= 0"),
    _nan_batch: (FloatingPointError, r"features \[1\] are not finite"),
    _overflow_float64: (FloatingPointError, "are not finite"),
    _one_value_per_feature: (ValueError, "Expected more than 1 value per feature"),
    _wrong_dtype: (TypeError, "x has dtype float32"),
    _out_is_x: (ValueError, "out overlaps x"),
}


@pytest.mark.parametrize("failure", RENORM_FAILURES, ids=lambda f: f.__name__.strip("_"))
def test_layer_failed_call_loses_no_state(rng, failure):
    bn = BatchNorm(5, dtype=np.float64, renorm=True)
    bn.gamma[...] = rng.uniform(0.5, 2.0, 5)
    bn.beta[...] = rng.standard_normal(5)
    x = make_data(rng, (5, 24), 0, np.float64)
    dy = rng.standard_normal((5, 24))
    for batch in [make_data(rng, (5, 24), 0, np.float64) for _ in range(2)]:
        bn(batch)
        bn.backward(dy)
        bn.step(0.1)
    bn(x)
    dx_before = bn.backward(dy)
    saved = snapshot(bn)
    exc, match = RENORM_FAILURES[failure]
    with pytest.raises(exc, match=match):
        failure(bn, x)
    assert_same_state(bn, saved)
    # The cache still holds the last successful forward, with its r and d.
    np.testing.assert_array_equal(bn.backward(dy), dx_before)
    assert_same_state(bn, saved)


def test_renorm_limits_default_to_the_papers_final_values():
    """r_max 3 and d_max 5 (Ioffe 2017's final schedule values), in the layer and the function.

    The function's defaults are seen through its result: with running statistics far
    off, r and d are clipped at exactly the defaults.
    """
    bn = BatchNorm(4, renorm=True)
    assert (bn.r_max, bn.d_max) == (3.0, 5.0)
    x = np.array([[0.0, 2.0], [0.0, 2.0]])  # per feature: mean 1, std 1
    running_mean, running_var = np.array([-100.0, -100.0]), np.array([1e-4, 1e4])
    y = batch_renorm_train(x, running_mean, running_var)[0]
    limited = batch_renorm_train(x, running_mean, running_var, r_max=3.0, d_max=5.0)[0]
    np.testing.assert_array_equal(y, limited)
    for r_max, d_max in ((3.0, 4.0), (3.0, 6.0), (2.0, 5.0), (4.0, 5.0)):
        other = batch_renorm_train(x, running_mean, running_var, r_max=r_max, d_max=d_max)[0]
        assert not np.array_equal(y, other), (r_max, d_max)
