"""Ghost batch norm: the kernels, the functional API and the layer's virtual_batch_size.

Every result is compared with normalizing each virtual batch (a consecutive
slice of k examples) on its own: the float64 ``fastbn.reference`` on each
slice for y, the statistics and the gradients, the plain layer called on each
slice in turn and PyTorch's running-statistics recurrence written out in
float64 for the running statistics.
"""

import copy
import pickle

import numpy as np
import pytest
from conftest import (
    DTYPES,
    ORDERS,
    STAT_TOL,
    assert_close,
    assert_stats_close,
    f64,
    layout,
    raises,
    readonly,
    reduced_axes,
    ref_backward,
    ref_train,
)

import fastbn
from fastbn import BatchNorm, ghost_batch_norm_backward, ghost_batch_norm_train
from fastbn.kernels import columns, rows
from fastbn.kernels._twins import serial_twin

# name -> (shape, axis, k): every layout, small, with G = 3 or 4 slices.
LAYOUTS = {
    "features_first": ((5, 24), 0, 6),
    "features_first_3d": ((5, 12, 3), 0, 3),
    "batch_first": ((24, 5), 1, 6),
    "batch_first_neg": ((24, 5), -1, 8),
    "nchw": ((12, 5, 3, 7), 1, 4),
    "nchw_long_runs": ((12, 4, 20), 1, 3),  # runs of 20: the rows family
    "nhwc": ((12, 3, 7, 5), -1, 4),
}

# Large enough (> 32768 values) for the parallel kernels.
LARGE_LAYOUTS = {
    "features_first": ((7, 8192), 0, 1024),
    "batch_first": ((4096, 24), 1, 256),
    "nchw": ((64, 8, 12, 12), 1, 16),
    "nchw_long_runs": ((64, 4, 200), 1, 8),
    "nhwc": ((64, 12, 12, 8), -1, 16),
}


def examples_axis(ndim, axis):
    return 1 if axis % ndim == 0 else 0


def slices(shape, axis, k):
    """The index of each virtual batch, in order."""
    e = examples_axis(len(shape), axis)
    found = []
    for g in range(shape[e] // k):
        index = [slice(None)] * len(shape)
        index[e] = slice(g * k, (g + 1) * k)
        found.append(tuple(index))
    return found


def make_data(rng, shape, dtype, order="C"):
    """Data whose per-slice means and scales differ, so that slices matter."""
    x = rng.standard_normal(shape)
    e = examples_axis(len(shape), -1)
    x = x * rng.uniform(0.5, 3.0, shape[e]).reshape((-1,) + (1,) * (len(shape) - 1))
    return layout((x + 2.0).astype(dtype), order)


def make_params(rng, c, dtype):
    return rng.uniform(0.5, 2.0, c).astype(dtype), rng.standard_normal(c).astype(dtype)


def check_against_slices(x, dy, gamma, beta, axis, k):
    """Forward and backward of the ghost functional against the reference on each slice."""
    y, mean, invstd = ghost_batch_norm_train(x, gamma, beta, virtual_batch_size=k, axis=axis)
    dx, dgamma, dbeta = ghost_batch_norm_backward(
        dy, x, mean, invstd, gamma, virtual_batch_size=k, axis=axis
    )
    index = slices(x.shape, axis, k)
    c = x.shape[axis]
    assert mean.shape == invstd.shape == (len(index), c)
    assert y.dtype == dx.dtype == dgamma.dtype == dbeta.dtype == x.dtype
    assert y.shape == dx.shape == x.shape
    dgamma_ref, dbeta_ref = np.zeros(c), np.zeros(c)
    for g, s in enumerate(index):
        y_ref, mean_ref, invstd_ref = ref_train(x[s], gamma, beta, axis=axis)
        dx_ref, dg, db = ref_backward(dy[s], x[s], mean_ref, invstd_ref, gamma, axis=axis)
        assert_stats_close(mean[g], invstd[g], mean_ref, invstd_ref, x.dtype)
        assert_close(y[s], y_ref, x.dtype, err_msg=f"y of slice {g}")
        assert_close(dx[s], dx_ref, x.dtype, err_msg=f"dx of slice {g}")
        dgamma_ref += dg
        dbeta_ref += db
    scale = np.sqrt(x.size / c)  # sums of that many unit terms
    assert_close(dgamma, dgamma_ref, x.dtype, scale=scale)
    assert_close(dbeta, dbeta_ref, x.dtype, scale=scale)
    return y, mean, invstd, dx, dgamma, dbeta


# ---------------------------------------------------------------- functional


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_slice_is_normalized_alone(rng, name, order, dtype):
    shape, axis, k = LAYOUTS[name]
    x = make_data(rng, shape, dtype, order)
    dy = layout(rng.standard_normal(shape).astype(dtype), order)
    gamma, beta = make_params(rng, shape[axis], dtype)
    check_against_slices(x, dy, gamma, beta, axis, k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(LARGE_LAYOUTS))
def test_large_inputs_take_the_parallel_kernels(rng, name, dtype):
    shape, axis, k = LARGE_LAYOUTS[name]
    x = make_data(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma, beta = make_params(rng, shape[axis], dtype)
    check_against_slices(x, dy, gamma, beta, axis, k)


@pytest.mark.parametrize("name", ["batch_first", "nchw", "nhwc", "features_first"])
def test_slices_match_the_plain_functional(rng, name):
    """Each slice's y and statistics are what batch_norm_train gives for it alone."""
    shape, axis, k = LAYOUTS[name]
    x = make_data(rng, shape, np.float32)
    y, mean, invstd = ghost_batch_norm_train(x, virtual_batch_size=k, axis=axis)
    for g, s in enumerate(slices(shape, axis, k)):
        y_plain, mean_plain, invstd_plain = fastbn.batch_norm_train(x[s], axis=axis)
        np.testing.assert_allclose(mean[g], mean_plain, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(invstd[g], invstd_plain, rtol=1e-12)
        np.testing.assert_allclose(y[s], y_plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["batch_first", "nchw", "features_first"])
def test_one_slice_is_plain_batch_norm(rng, name, dtype):
    shape, axis, _ = LAYOUTS[name]
    k = shape[examples_axis(len(shape), axis)]
    x = make_data(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma, beta = make_params(rng, shape[axis], dtype)
    y, mean, invstd = ghost_batch_norm_train(x, gamma, beta, virtual_batch_size=k, axis=axis)
    y_plain, mean_plain, invstd_plain = fastbn.batch_norm_train(x, gamma, beta, axis=axis)
    assert mean.shape == (1, shape[axis])
    np.testing.assert_array_equal(y, y_plain)
    np.testing.assert_array_equal(mean[0], mean_plain)
    np.testing.assert_array_equal(invstd[0], invstd_plain)
    grads = ghost_batch_norm_backward(dy, x, mean, invstd, gamma, virtual_batch_size=k, axis=axis)
    plain = fastbn.batch_norm_backward(dy, x, mean_plain, invstd_plain, gamma, axis=axis)
    for got, expected in zip(grads, plain, strict=True):
        np.testing.assert_array_equal(got, expected)


# Fortran-ordered x whose transpose (the C-contiguous form) has the examples axis first or
# right after the feature axis: served as that transpose. The others are copied.
FORTRAN_SERVED = ("features_first", "batch_first", "batch_first_neg", "nchw", "nchw_long_runs")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_fortran_order_is_served_as_its_transpose(rng, name, dtype):
    """A Fortran-ordered x is normalized without a copy where its transpose fits the slices.

    The plan says so (``transposed``), and y and dx come back Fortran-ordered (the
    transposes of the buffers the kernels wrote); every result is the C-ordered call's,
    within the suite's tolerances (other kernels may sum in another order).
    """
    shape, axis, k = LAYOUTS[name]
    x_c = make_data(rng, shape, dtype)
    dy_c = rng.standard_normal(shape).astype(dtype)
    gamma, beta = make_params(rng, shape[axis], dtype)
    x, dy = np.asfortranarray(x_c), np.asfortranarray(dy_c)
    served = name in FORTRAN_SERVED
    assert fastbn.ghost.planned(x, axis, k)[1].transposed == served
    assert not fastbn.ghost.planned(x_c, axis, k)[1].transposed
    results = check_against_slices(x, dy, gamma, beta, axis, k)
    y, dx = results[0], results[3]
    assert y.flags.f_contiguous == dx.flags.f_contiguous == served
    results_c = check_against_slices(x_c, dy_c, gamma, beta, axis, k)
    scale = np.sqrt(x.size / shape[axis])
    for what, got, expected, s in zip(
        ("y", "mean", "invstd", "dx", "dgamma", "dbeta"),
        results,
        results_c,
        (1, 1, 1, 1, scale, scale),
        strict=True,
    ):
        assert_close(got, expected, dtype, scale=s, err_msg=what)


@pytest.mark.parametrize("name", ["batch_first", "nchw", "nhwc", "features_first"])
@pytest.mark.parametrize("order", ["C", "F", "sliced"])
def test_out_and_dx_in_place(rng, name, order):
    """out= is written (any layout of out); backward may write dx into dy itself."""
    shape, axis, k = LAYOUTS[name]
    x = make_data(rng, shape, np.float64)
    dy = rng.standard_normal(shape)
    gamma, beta = make_params(rng, shape[axis], np.float64)
    y_new, mean, invstd = ghost_batch_norm_train(x, gamma, beta, virtual_batch_size=k, axis=axis)
    out = layout(np.zeros(shape), order)
    y = ghost_batch_norm_train(x, gamma, beta, virtual_batch_size=k, axis=axis, out=out)[0]
    assert y is out
    np.testing.assert_array_equal(out, y_new)
    dx_new, dgamma, _ = ghost_batch_norm_backward(
        dy, x, mean, invstd, gamma, virtual_batch_size=k, axis=axis
    )
    dy_buffer = layout(dy, order)
    dx, dgamma_in_place, _ = ghost_batch_norm_backward(
        dy_buffer, x, mean, invstd, gamma, virtual_batch_size=k, axis=axis, out=dy_buffer
    )
    assert dx is dy_buffer
    np.testing.assert_allclose(dy_buffer, dx_new, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dgamma_in_place, dgamma, rtol=1e-12, atol=1e-12)


def test_inputs_are_not_modified_and_may_be_read_only(rng):
    shape, axis, k = LAYOUTS["nchw"]
    x = make_data(rng, shape, np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    gamma, beta = make_params(rng, shape[axis], np.float32)
    saved = [a.copy() for a in (x, dy, gamma, beta)]
    readonly(x, dy, gamma, beta)
    _, mean, invstd = ghost_batch_norm_train(x, gamma, beta, virtual_batch_size=k, axis=axis)
    ghost_batch_norm_backward(dy, x, mean, invstd, gamma, virtual_batch_size=k, axis=axis)
    for a, s in zip((x, dy, gamma, beta), saved, strict=True):
        np.testing.assert_array_equal(a, s)


def test_nan_stays_in_its_slice_and_feature(rng):
    shape, axis, k = LAYOUTS["batch_first"]
    x = make_data(rng, shape, np.float64)
    x[7, 2] = np.nan  # slice 1, feature 2
    y, mean, _ = ghost_batch_norm_train(x, virtual_batch_size=k, axis=axis)
    bad = np.isnan(y)
    assert bad[6:12, 2].all() and bad.sum() == k
    assert np.isnan(mean[1, 2]) and np.isfinite(np.delete(mean.ravel(), 1 * shape[1] + 2)).all()


def test_constant_slice_gives_beta_and_finite_gradients(rng):
    shape, axis, k = (16, 3), 1, 4
    x = make_data(rng, shape, np.float64)
    x[4:8] = 1.5  # slice 1 constant in every feature
    dy = rng.standard_normal(shape)
    gamma, beta = make_params(rng, 3, np.float64)
    y, mean, invstd = ghost_batch_norm_train(x, gamma, beta, virtual_batch_size=k, axis=axis)
    np.testing.assert_allclose(y[4:8], np.broadcast_to(beta, (4, 3)), atol=1e-12)
    dx = ghost_batch_norm_backward(dy, x, mean, invstd, gamma, virtual_batch_size=k, axis=axis)[0]
    expected = gamma * invstd[1] * (dy[4:8] - dy[4:8].mean(axis=0))
    np.testing.assert_allclose(dx[4:8], expected, rtol=1e-9, atol=1e-12)


def test_gradients_match_finite_differences(rng):
    """dx, dgamma, dbeta of the loss sum(w * y) against central differences, float64."""
    shape, axis, k = (6, 2, 4), 1, 2
    x = make_data(rng, shape, np.float64)
    gamma, beta = make_params(rng, 2, np.float64)
    weights = rng.standard_normal(shape)

    def loss(x, gamma, beta):
        y = ghost_batch_norm_train(x, gamma, beta, virtual_batch_size=k, axis=axis)[0]
        return float((weights * y).sum())

    _, mean, invstd = ghost_batch_norm_train(x, gamma, beta, virtual_batch_size=k, axis=axis)
    analytic = ghost_batch_norm_backward(
        weights, x, mean, invstd, gamma, virtual_batch_size=k, axis=axis
    )
    inputs = [x, gamma, beta]
    h = 1e-6
    for which, grad in enumerate(analytic):
        numeric = np.zeros_like(grad)
        for i in np.ndindex(grad.shape):
            plus, minus = list(inputs), list(inputs)
            plus[which], minus[which] = inputs[which].copy(), inputs[which].copy()
            plus[which][i] += h
            minus[which][i] -= h
            numeric[i] = (loss(*plus) - loss(*minus)) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- errors


def test_batch_size_not_divisible_names_both_numbers():
    x = np.ones((10, 3), np.float32)
    with raises(ValueError, "virtual_batch_size", "10", "4"):
        ghost_batch_norm_train(x, virtual_batch_size=4, axis=1)
    with raises(ValueError, "virtual_batch_size", "10", "4"):
        ghost_batch_norm_backward(
            x, x, np.zeros((2, 3)), np.ones((2, 3)), virtual_batch_size=4, axis=1
        )
    # Features-first: the examples are along axis 1.
    with raises(ValueError, "virtual_batch_size", "10", "3"):
        ghost_batch_norm_train(x.T.copy(), virtual_batch_size=3, axis=0)


@pytest.mark.parametrize("k", [0, -2])
def test_virtual_batch_size_must_be_positive(k):
    with raises(ValueError, "virtual_batch_size", str(k)):
        ghost_batch_norm_train(np.ones((8, 3)), virtual_batch_size=k, axis=1)


@pytest.mark.parametrize("k", [2.0, "2", True, None])
def test_virtual_batch_size_must_be_an_int(k):
    with raises(TypeError, "virtual_batch_size", repr(k)):
        ghost_batch_norm_train(np.ones((8, 3)), virtual_batch_size=k, axis=1)


def test_one_value_per_feature_in_a_slice_is_an_error():
    with raises(ValueError, "virtual_batch_size", "Expected more than 1 value per feature"):
        ghost_batch_norm_train(np.ones((8, 3)), virtual_batch_size=1, axis=1)
    # With spatial positions, one example per slice is enough.
    _, mean, _ = ghost_batch_norm_train(np.ones((8, 3, 2)), virtual_batch_size=1, axis=1)
    assert mean.shape == (8, 3)


def test_errors_shared_with_batch_norm_train():
    with raises(TypeError, "x", "int64", "astype"):
        ghost_batch_norm_train(np.ones((8, 3), np.int64), virtual_batch_size=2, axis=1)
    with raises(ValueError, "x", "(8,)"):
        ghost_batch_norm_train(np.ones(8), virtual_batch_size=2)
    with raises(ValueError, "axis", "2"):
        ghost_batch_norm_train(np.ones((8, 3)), virtual_batch_size=2, axis=2)
    with raises(ValueError, "gamma", "(4,)"):
        ghost_batch_norm_train(np.ones((8, 3)), np.ones(4), virtual_batch_size=2, axis=1)
    with raises(ValueError, "eps"):
        ghost_batch_norm_train(np.ones((8, 3)), virtual_batch_size=2, axis=1, eps=0.0)
    x = np.ones((8, 3))
    with raises(ValueError, "out", "overlaps", "x"):
        ghost_batch_norm_train(x, virtual_batch_size=2, axis=1, out=x)
    with raises(TypeError, "out", "float32"):
        ghost_batch_norm_train(x, virtual_batch_size=2, axis=1, out=np.ones((8, 3), np.float32))


def test_backward_checks_the_per_slice_statistics():
    x = np.random.default_rng(0).standard_normal((8, 3))
    _, mean, invstd = ghost_batch_norm_train(x, virtual_batch_size=2, axis=1)
    with raises(ValueError, "mean", "(3,)", "(4, 3)"):
        ghost_batch_norm_backward(x, x, mean[0], invstd, virtual_batch_size=2, axis=1)
    with raises(ValueError, "invstd", "(2, 3)", "(4, 3)"):
        ghost_batch_norm_backward(x, x, mean, invstd[:2], virtual_batch_size=2, axis=1)
    with raises(ValueError, "dy", "(4, 3)"):
        ghost_batch_norm_backward(x[:4], x, mean, invstd, virtual_batch_size=2, axis=1)
    with raises(TypeError, "dy", "float32"):
        ghost_batch_norm_backward(
            x.astype(np.float32), x, mean, invstd, virtual_batch_size=2, axis=1
        )


# ---------------------------------------------------------------- kernels


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_give_the_same_bits_on_one_thread_and_many(rng, dtype):
    """Each slice is one thread's whatever the thread count: serial twin == parallel entry."""
    g, k, c, q = 6, 16, 5, 40
    x = make_data(rng, (g * k, c, q), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    gamma, beta = make_params(rng, c, dtype)
    stacked = (g, k, c, q)
    results = []
    for kernel_of in (lambda kernel: kernel, serial_twin):
        out, dx = np.empty(stacked, dtype), np.empty(stacked, dtype)
        mean, invstd = kernel_of(rows.ghost_train_forward)(
            x.reshape(stacked), gamma, beta, 1e-5, out
        )
        sums = kernel_of(rows.ghost_backward)(
            dy.reshape(stacked), x.reshape(stacked), mean, invstd, gamma, dx
        )
        results.append((out, mean, invstd, dx, *sums))
    for parallel, serial in zip(*results, strict=True):
        np.testing.assert_array_equal(parallel, serial)
    # The rows of the statistics are the slices'.
    for i in range(g):
        _, mean_ref, invstd_ref = ref_train(x[i * k : (i + 1) * k], axis=1)
        assert_stats_close(results[0][1][i], results[0][2][i], mean_ref, invstd_ref, dtype)


def test_columns_kernel_sums_the_slices_in_order(rng):
    """dgamma and dbeta: each slice's float64 sums, added slice after slice."""
    g, k, c = 5, 12, 7
    x = make_data(rng, (g * k, c), np.float64)
    dy = rng.standard_normal(x.shape)
    columns_args = (c, 1, columns.group_width(c, 1))
    out = np.empty((g, k * c))
    mean, invstd = columns.ghost_train_forward(
        x.reshape(g, -1), *columns_args, np.ones(c), np.zeros(c), 1e-5, out
    )
    dgamma, dbeta = columns.ghost_backward(
        dy.reshape(g, -1), x.reshape(g, -1), *columns_args, mean, invstd, np.ones(c), out
    )
    x_hat = (x.reshape(g, k, c) - mean[:, None]) * invstd[:, None]
    per_slice_dgamma = (dy.reshape(g, k, c) * x_hat).sum(axis=1)
    np.testing.assert_allclose(dgamma, per_slice_dgamma.sum(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dbeta, dy.sum(axis=0), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- the layer


def expected_running_stats(x, axis, k, momentum, dtype):
    """PyTorch's recurrence over the slices, rounded to the layer's dtype after each."""
    c = x.shape[axis]
    running_mean, running_var = np.zeros(c, dtype), np.ones(c, dtype)
    count = 0
    for s in slices(x.shape, axis, k):
        values = f64(x[s])
        axes = reduced_axes(x.ndim, axis)
        count += 1
        f = 1.0 / count if momentum is None else momentum
        running_mean = ((1 - f) * f64(running_mean) + f * values.mean(axis=axes)).astype(dtype)
        running_var = ((1 - f) * f64(running_var) + f * values.var(axis=axes, ddof=1)).astype(
            dtype
        )
    return running_mean, running_var


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["features_first", "batch_first", "nchw", "nhwc"])
def test_layer_equals_a_plain_layer_on_each_slice_in_turn(rng, name, dtype, momentum):
    shape, axis, k = LAYOUTS[name]
    c = shape[axis]
    ghost_layer = BatchNorm(c, axis=axis, dtype=dtype, momentum=momentum, virtual_batch_size=k)
    plain = BatchNorm(c, axis=axis, dtype=dtype, momentum=momentum)
    gamma, beta = make_params(rng, c, dtype)
    for layer in (ghost_layer, plain):
        layer.gamma[...], layer.beta[...] = gamma, beta
    tol = STAT_TOL[np.dtype(dtype)]
    stream = []
    for _ in range(3):
        x = make_data(rng, shape, dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        stream.append(x)
        y = ghost_layer(x)
        dx = ghost_layer.backward(dy)
        dgamma, dbeta = np.zeros(c), np.zeros(c)
        for s in slices(shape, axis, k):
            assert_close(y[s], plain(x[s]), dtype)
            assert_close(dx[s], plain.backward(dy[s]), dtype)
            dgamma += plain.dgamma
            dbeta += plain.dbeta
        scale = np.sqrt(x.size / c)
        assert_close(ghost_layer.dgamma, dgamma, dtype, scale=scale)
        assert_close(ghost_layer.dbeta, dbeta, dtype, scale=scale)
        assert ghost_layer.num_batches_tracked == plain.num_batches_tracked
        np.testing.assert_allclose(
            ghost_layer.running_mean, plain.running_mean, rtol=tol, atol=tol
        )
        np.testing.assert_allclose(ghost_layer.running_var, plain.running_var, rtol=tol)
    assert ghost_layer.num_batches_tracked == 3 * len(slices(shape, axis, k))
    # And against the recurrence written out over the whole stream of slices.
    whole = np.concatenate(stream, axis=examples_axis(len(shape), axis))
    running_mean, running_var = expected_running_stats(whole, axis, k, momentum, dtype)
    np.testing.assert_allclose(ghost_layer.running_mean, running_mean, rtol=10 * tol, atol=tol)
    np.testing.assert_allclose(ghost_layer.running_var, running_var, rtol=10 * tol)


def test_running_stats_do_not_depend_on_how_the_stream_is_batched(rng):
    """The reason for one update per slice: 2 batches of 4 slices == 4 batches of 2."""
    stream = make_data(rng, (64, 3), np.float64)
    big, small = (BatchNorm(3, axis=1, dtype=np.float64, virtual_batch_size=8) for _ in "ab")
    for batch in np.split(stream, 2):
        big(batch)
    for batch in np.split(stream, 4):
        small(batch)
    assert big.num_batches_tracked == small.num_batches_tracked == 8
    np.testing.assert_allclose(big.running_mean, small.running_mean, rtol=1e-14)
    np.testing.assert_allclose(big.running_var, small.running_var, rtol=1e-14)


def test_layer_eval_ignores_virtual_batches(rng):
    shape, axis, k = LAYOUTS["nchw"]
    x = make_data(rng, shape, np.float32)
    ghost_layer = BatchNorm(shape[axis], axis=axis, virtual_batch_size=k)
    plain = BatchNorm(shape[axis], axis=axis)
    ghost_layer(x)
    plain.load_state_dict(ghost_layer.state_dict())
    ghost_layer.eval()
    plain.eval()
    np.testing.assert_array_equal(ghost_layer(x[:5]), plain(x[:5]))  # 5: not a multiple of k
    dy = rng.standard_normal((5, *shape[1:])).astype(np.float32)
    np.testing.assert_array_equal(ghost_layer.backward(dy), plain.backward(dy))


def test_layer_without_running_stats(rng):
    """Training normalizes per slice and tracks nothing; eval uses the whole batch's statistics."""
    shape, axis, k = LAYOUTS["batch_first"]
    x = make_data(rng, shape, np.float64)
    layer = BatchNorm(shape[axis], axis=axis, dtype=np.float64, track_running_stats=False,
                      virtual_batch_size=k)  # fmt: skip
    y = layer(x)
    for s in slices(shape, axis, k):
        assert_close(y[s], ref_train(x[s], layer.gamma, layer.beta, axis=axis)[0], np.float64)
    assert layer.num_batches_tracked == 0 and layer.running_mean is None
    layer.eval()
    assert_close(layer(x), ref_train(x, layer.gamma, layer.beta, axis=axis)[0], np.float64)


def layer_state(layer):
    saved = layer._saved
    return (
        [a.copy() for a in (layer.gamma, layer.beta, layer.dgamma, layer.dbeta)],
        [layer.running_mean.copy(), layer.running_var.copy(), layer.num_batches_tracked],
        None if saved is None else [saved.x, saved.mean.copy(), saved.invstd.copy()],
    )


def assert_same_state(state, saved):
    for now, before in zip(state, saved, strict=True):
        if before is None:
            assert now is None
            continue
        for a, b in zip(now, before, strict=True):
            if isinstance(b, np.ndarray):
                np.testing.assert_array_equal(a, b)
            else:
                assert a == b


def test_layer_is_unchanged_by_a_failing_call(rng):
    shape, axis, k = LAYOUTS["nhwc"]
    layer = BatchNorm(shape[axis], axis=axis, virtual_batch_size=k)
    good = make_data(rng, shape, np.float32)
    layer(good)
    dy = rng.standard_normal(shape).astype(np.float32)
    dx_before = layer.backward(dy)
    saved = layer_state(layer)
    bad = good.copy()
    bad[9, 1, 2, 3] = np.inf  # slice 2 of 3: slices 0 and 1 would fold first
    with raises(FloatingPointError, "virtual", "batch 2", "[3]", "unchanged"):
        layer(bad)
    assert_same_state(layer_state(layer), saved)
    with raises(ValueError, "virtual_batch_size", "10", str(k)):
        layer(good[:10])
    assert_same_state(layer_state(layer), saved)
    with raises(TypeError, "x", "float64"):
        layer(good.astype(np.float64))
    assert_same_state(layer_state(layer), saved)
    # The kept forward is still the good batch's: backward is as before.
    np.testing.assert_array_equal(layer.backward(dy), dx_before)


def test_layer_without_running_stats_rejects_a_nonfinite_slice(rng):
    shape, axis, k = LAYOUTS["batch_first"]
    layer = BatchNorm(shape[axis], axis=axis, track_running_stats=False, virtual_batch_size=k)
    x = make_data(rng, shape, np.float32)
    x[13, 4] = np.nan
    with raises(FloatingPointError, "features", "[4]", "virtual batch 2", "unchanged"):
        layer(x)
    assert layer._saved is None


@pytest.mark.parametrize("g", [1, 2])
@pytest.mark.parametrize("tracking", [True, False], ids=["tracked", "untracked"])
def test_layer_names_the_virtual_batch_of_a_nan(rng, tracking, g):
    """A NaN only in virtual batch g >= 1: the error says "in virtual batch g"; no change."""
    shape, axis, k = LAYOUTS["batch_first"]  # G = 4 slices of 6 examples
    layer = BatchNorm(shape[axis], axis=axis, track_running_stats=tracking, virtual_batch_size=k)
    good = make_data(rng, shape, np.float32)
    layer(good)
    dy = rng.standard_normal(shape).astype(np.float32)
    dx_before = layer.backward(dy)
    state = [layer.gamma, layer.beta, layer.dgamma, layer.dbeta]
    if tracking:
        state += [layer.running_mean, layer.running_var]
    saved = [a.copy() for a in state], layer.num_batches_tracked, layer._saved
    bad = good.copy()
    bad[g * k + 2, 3] = np.nan
    with raises(FloatingPointError, "features", "[3]", f"in virtual batch {g} ", "unchanged"):
        layer(bad)
    for a, before in zip(state, saved[0], strict=True):
        np.testing.assert_array_equal(a, before)
    assert layer.num_batches_tracked == saved[1] and layer._saved is saved[2]
    np.testing.assert_array_equal(layer.backward(dy), dx_before)


def test_layer_options(rng):
    layer = BatchNorm(3, axis=1, virtual_batch_size=4)
    assert "virtual_batch_size=4" in repr(layer)
    assert "virtual_batch_size" not in repr(BatchNorm(3))
    assert "virtual_batch_size" not in layer.state_dict()
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.virtual_batch_size == 4
    with raises(ValueError, "virtual_batch_size", "0"):
        BatchNorm(3, virtual_batch_size=0)
    with raises(TypeError, "virtual_batch_size", "'4'"):
        BatchNorm(3, virtual_batch_size="4")
    with raises(ValueError, "virtual_batch_size", "renorm"):
        BatchNorm(3, virtual_batch_size=4, renorm=True)
    # An attribute, checked by each training forward.
    layer.virtual_batch_size = 2.5
    with raises(TypeError, "virtual_batch_size", "2.5"):
        layer(np.ones((8, 3), np.float32))
    layer.virtual_batch_size = None
    assert layer(make_data(rng, (8, 3), np.float32)).shape == (8, 3)
    assert layer.num_batches_tracked == 1
