"""Tests for mutants that survived issue 17's after-run (numpy side).

Each test names the mutant behaviour it pins down. References are independent
of the code under test: ``fastbn.reference`` on float64 copies, the formula
written out in float64, or the same call with the argument spelled out.
"""

import numpy as np
from conftest import assert_close, f64, readonly, ref_backward, ref_eval, ref_train

import fastbn
from fastbn import _checks, reference, renorm
from fastbn._plan import Plan, plan_for
from fastbn.kernels import rows
from fastbn.kernels._twins import serial_twin

# ------------------------------------------------------ _checks.kernel_input


def test_read_only_input_reaches_the_kernels_as_a_writable_view():
    """kernel_input exposes read-only memory as writable, so Numba compiles no second type.

    Pins the mutant that marks the alias read-only (``(data, True)`` in
    `_checks._ReadOnly`): the kernels then get a read-only array type, which
    compiles a signature of its own for every entry it reaches (same results).
    """
    # The behaviour: a read-only x runs the kernel compiled for a writable one.
    rng = np.random.default_rng(20240611)
    x = rng.standard_normal((4, 3, 20))  # runs of 20: the rows family, one thread
    assert plan_for(x, 1, True)[1].family is rows
    entry = serial_twin(rows.train_forward)
    fastbn.batch_norm_train(x, axis=1)
    before = list(entry.signatures)
    y = fastbn.batch_norm_train(readonly(x.copy())[0], axis=1)[0]
    assert list(entry.signatures) == before
    assert_close(y, ref_train(x, axis=1)[0], np.float64)

    # The mechanism: a writable view of the same memory.
    a = readonly(np.arange(12.0).reshape(3, 4))[0]
    k = _checks.kernel_input(a)
    assert k.flags.writeable
    assert np.shares_memory(k, a)
    np.testing.assert_array_equal(k, a)
    assert Plan.of(a, 1, training=True).kernel_x(a).flags.writeable


# ------------------------------------------------------ _plan.Plan.lead_axis


def test_features_first_with_trailing_unit_axes():
    """(C, Q, 1) data with axis=0: the rows family's view is (1, C, Q), not (1, C, Q, 1).

    Pins the mutant ``lead_axis = pcq <= (1, *shape)``: (1, C, Q) is a prefix of
    (1, C, Q, 1), so it took the shortcut ``a[None]`` and handed the kernels a
    4-D array, which the rows family's kernels do not type (a TypingError).
    """
    rng = np.random.default_rng(20240611)
    c, q = 3, 40  # runs of 40 >= ROWS_MIN_RUN: the rows family
    x = (2.0 + rng.standard_normal((c, q, 1))).astype(np.float64)
    gamma, beta = rng.uniform(0.5, 2.0, c), rng.standard_normal(c)
    y, mean, invstd = fastbn.batch_norm_train(x, gamma, beta, axis=0)
    y_ref, mean_ref, invstd_ref = ref_train(x, gamma, beta, axis=0)
    assert y.shape == x.shape
    assert_close(y, y_ref, np.float64)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-12)
    np.testing.assert_allclose(invstd, invstd_ref, rtol=1e-12)
    dy = rng.standard_normal(x.shape)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, axis=0)
    dx_ref, dgamma_ref, dbeta_ref = ref_backward(dy, x, mean, invstd, gamma, axis=0)
    assert_close(dx, dx_ref, np.float64)
    assert_close(dgamma, dgamma_ref, np.float64, scale=q)
    assert_close(dbeta, dbeta_ref, np.float64, scale=q)
    running_mean, running_var = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)
    y_eval = fastbn.batch_norm_eval(x, running_mean, running_var, gamma, beta, axis=0)
    assert_close(y_eval, ref_eval(x, running_mean, running_var, gamma, beta, axis=0), np.float64)
    plan = Plan.of(x, 0, training=True)
    assert plan.family is rows and plan.pcq == (1, c, q)
    assert plan.lead_axis is False
    assert plan.kernel_x(x).shape == (1, c, q)


# ------------------------------------------------------ functional defaults


def _features_first_case():
    """(C, M) = (3, 5) float64 data and its batch statistics: axis 1 would be 5 features."""
    rng = np.random.default_rng(20240611)
    x = rng.standard_normal((3, 5))
    dy = rng.standard_normal((3, 5))
    gamma, beta = np.array([1.5, -0.7, 1.0]), np.array([0.3, -0.2, 0.1])
    mean = x.mean(axis=1)
    invstd = 1.0 / np.sqrt(x.var(axis=1) + 1e-5)
    return x, dy, gamma, beta, mean, invstd


def test_batch_norm_backward_defaults_to_the_features_first_axis():
    """batch_norm_backward's axis defaults to 0, as batch_norm_train's: (C, M) data.

    Pins the mutant ``axis: SupportsIndex = 1`` of batch_norm_backward.
    """
    x, dy, gamma, _, mean, invstd = _features_first_case()
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma)
    dx0, dgamma0, dbeta0 = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, axis=0)
    np.testing.assert_array_equal(dx, dx0)
    np.testing.assert_array_equal(dgamma, dgamma0)
    np.testing.assert_array_equal(dbeta, dbeta0)
    dx_ref, dgamma_ref, dbeta_ref = ref_backward(dy, x, mean, invstd, gamma, axis=0)
    assert_close(dx, dx_ref, np.float64)
    assert_close(dgamma, dgamma_ref, np.float64)
    assert_close(dbeta, dbeta_ref, np.float64)


def test_batch_norm_relu_backward_defaults_to_the_features_first_axis():
    """batch_norm_relu_backward's axis defaults to 0: (C, M) data.

    Pins the mutants ``axis: SupportsIndex = 1`` and ``= -1`` of
    batch_norm_relu_backward. The reference masks dy where the forward's
    y > 0 and takes the plain float64 backward.
    """
    x, dy, gamma, beta, mean, invstd = _features_first_case()
    dx, dgamma, dbeta = fastbn.batch_norm_relu_backward(dy, x, mean, invstd, gamma, beta)
    dx0, dgamma0, dbeta0 = fastbn.batch_norm_relu_backward(
        dy, x, mean, invstd, gamma, beta, axis=0
    )
    np.testing.assert_array_equal(dx, dx0)
    np.testing.assert_array_equal(dgamma, dgamma0)
    np.testing.assert_array_equal(dbeta, dbeta0)
    y = gamma[:, None] * (x - mean[:, None]) * invstd[:, None] + beta[:, None]
    dz = np.where(y > 0, dy, 0.0)
    dx_ref, dgamma_ref, dbeta_ref = reference.batch_norm_backward(
        dz, f64(x), mean, invstd, gamma, axis=0
    )
    assert_close(dx, dx_ref, np.float64)
    assert_close(dgamma, dgamma_ref, np.float64)
    assert_close(dbeta, dbeta_ref, np.float64)


# ------------------------------------------------------ renorm.param_grads


def test_renorm_param_grads_are_the_backwards_dgamma_and_dbeta():
    """param_grads (no dx: the bridge's path when the input needs no gradient) gives
    dgamma = r * sum(dy * x_hat) + d * sum(dy) and dbeta = sum(dy), as backward does.

    Pins the mutant ``r ** dgamma_hat + d * dbeta`` in `fastbn.renorm.param_grads`.
    """
    rng = np.random.default_rng(20240611)
    x = 0.5 + 1.5 * rng.standard_normal((4, 30))  # (C, M), axis 0
    dy = rng.standard_normal(x.shape)
    running_mean, running_var = rng.standard_normal(4), rng.uniform(0.5, 2.0, 4)
    _, mean, invstd, r, d = fastbn.batch_renorm_train(x, running_mean, running_var, axis=0)
    assert not np.allclose(r, 1.0) and not np.allclose(d, 0.0)  # the corrections matter
    x_, plan = plan_for(x, 0, False)
    dgamma, dbeta = renorm.param_grads(plan, dy, x_, mean, invstd, r, d)
    x_hat = (x - mean[:, None]) * invstd[:, None]
    dgamma_ref = r * (dy * x_hat).sum(axis=1) + d * dy.sum(axis=1)
    assert_close(dgamma, dgamma_ref, np.float64, scale=30)
    assert_close(dbeta, dy.sum(axis=1), np.float64, scale=30)
    _, dgamma_b, dbeta_b = fastbn.batch_renorm_backward(dy, x, mean, invstd, r, d, axis=0)
    assert_close(dgamma, dgamma_b, np.float64, scale=30)
    assert_close(dbeta, dbeta_b, np.float64, scale=30)
