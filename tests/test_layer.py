"""The layer, fastbn.BatchNorm (the contract's layer, docs/guide/contract.md).

References are independent of the code under test: ``fastbn.reference`` on
float64 copies for y and the gradients, the running-statistics recurrence
written out below for the running statistics, and central finite
differences for the gradients.
"""

import copy
import dataclasses
import pickle

import numpy as np
import pytest
from conftest import (
    LAYOUTS,
    assert_close,
    central_difference,
    f64,
    raises,
    reduced_axes,
    ref_backward,
    ref_eval,
    ref_train,
)

from fastbn import BatchNorm

# Features of the (C, 24) batches of the tests that need no other layout.
C = 5
TIGHT = 1e-12  # float64 statistics, relative


def make_batches(rng, shape, count, dtype=np.float64):
    """``count`` batches whose per-feature means and scales differ step to step."""
    batches = []
    for _ in range(count):
        loc = rng.uniform(-3.0, 3.0)
        scale = rng.uniform(0.5, 2.0)
        batches.append((loc + scale * rng.standard_normal(shape)).astype(dtype))
    return batches


def expected_running_stats(batches, axis, momentum, steps_before=0):
    """PyTorch's recurrence, written out in float64: returns running mean, var and count."""
    c = batches[0].shape[axis]
    running_mean, running_var, count = np.zeros(c), np.ones(c), steps_before
    for x in batches:
        x = f64(x)
        axes = reduced_axes(x.ndim, axis)
        count += 1
        f = 1.0 / count if momentum is None else momentum
        running_mean = (1 - f) * running_mean + f * x.mean(axis=axes)
        running_var = (1 - f) * running_var + f * x.var(axis=axes, ddof=1)
    return running_mean, running_var, count


def trained_layer(rng, dtype=np.float64, shape=(5, 24), axis=0, **kwargs):
    """A layer with random gamma and beta after two training steps, and its last batch."""
    bn = BatchNorm(shape[axis], axis=axis, dtype=dtype, **kwargs)
    if bn.affine:
        bn.gamma[...] = rng.uniform(0.5, 2.0, bn.num_features)
        bn.beta[...] = rng.standard_normal(bn.num_features)
    for x in make_batches(rng, shape, 2, dtype):
        bn(x)
        bn.backward(rng.standard_normal(shape).astype(dtype))
        bn.step(0.1)
    return bn


def snapshot(bn):
    """Copies of everything a failed call must leave as it was."""
    state = {
        name: (value.copy() if isinstance(value, np.ndarray) else value)
        for name, value in vars(bn).items()
        if name != "_saved"
    }
    state["ids"] = {name: id(value) for name, value in vars(bn).items()}
    saved = bn._saved
    state["cache"] = (
        None
        if saved is None
        else (
            id(saved.x),
            *(copy.copy(getattr(saved, f.name)) for f in dataclasses.fields(saved)[1:]),
        )
    )
    return state


def assert_same_state(bn, saved):
    now = snapshot(bn)
    assert now.keys() == saved.keys()
    for name, value in saved.items():
        if isinstance(value, np.ndarray):
            assert now[name].dtype == value.dtype
            np.testing.assert_array_equal(now[name], value, err_msg=name)
        elif name == "cache":
            assert (now[name] is None) == (value is None)
            if value is not None:
                assert now[name][0] == value[0]  # the same x object
                for a, b in zip(now[name][1:], value[1:], strict=True):
                    np.testing.assert_array_equal(a, b)
        else:
            assert now[name] == value, name


# --------------------------------------------------------------- construction


def test_initial_state():
    bn = BatchNorm(4)
    assert bn.training is True
    assert bn.num_batches_tracked == 0 and type(bn.num_batches_tracked) is int
    for name, value in (
        ("gamma", 1),
        ("beta", 0),
        ("running_mean", 0),
        ("running_var", 1),
        ("dgamma", 0),
        ("dbeta", 0),
    ):
        array = getattr(bn, name)
        assert array.dtype == np.float32 and array.shape == (4,), name
        np.testing.assert_array_equal(array, value, err_msg=name)
    assert BatchNorm(4, dtype=np.float64).gamma.dtype == np.float64
    assert BatchNorm(4, dtype="float64").running_var.dtype == np.float64


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"num_features": 0}, ValueError, "num_features must be positive, got 0"),
        ({"num_features": -3}, ValueError, "num_features must be positive"),
        ({"num_features": 2.0}, TypeError, "num_features must be an int, got 2.0"),
        ({"num_features": True}, TypeError, "num_features must be an int, got True"),
        ({"num_features": "4"}, TypeError, "num_features must be an int"),
        ({"momentum": 1.5}, ValueError, r"momentum must be in \[0, 1\] or None, got 1.5"),
        ({"momentum": -0.1}, ValueError, "momentum must be in"),
        ({"momentum": float("nan")}, ValueError, "momentum must be in"),
        ({"momentum": "0.1"}, TypeError, "momentum must be a real number or None"),
        ({"momentum": True}, TypeError, "momentum must be a real number or None"),
        ({"eps": 0.0}, ValueError, "eps must be finite and > 0, got 0.0"),
        ({"eps": -1e-5}, ValueError, "eps must be finite and > 0"),
        ({"eps": float("inf")}, ValueError, "eps must be finite and > 0, got inf"),
        ({"eps": None}, TypeError, "eps must be a real number, got None"),
        ({"dtype": np.float16}, TypeError, "dtype must be np.float32 or np.float64"),
        ({"dtype": np.int32}, TypeError, "dtype must be np.float32 or np.float64"),
        ({"dtype": None}, TypeError, "dtype must be np.float32 or np.float64, got None"),
        ({"dtype": "not a dtype"}, TypeError, "dtype must be np.float32 or np.float64"),
        ({"axis": 1.0}, TypeError, "axis must be an int, got 1.0"),
        ({"affine": 1}, TypeError, "affine must be a bool, got 1"),
        ({"track_running_stats": "yes"}, TypeError, "track_running_stats must be a bool"),
    ],
)
def test_constructor_validation(kwargs, exc, match):
    kwargs = {"num_features": 4, **kwargs}
    with pytest.raises(exc, match=match):
        BatchNorm(**kwargs)


def test_constructor_accepts_edges():
    assert BatchNorm(np.int64(3), momentum=0).momentum == 0.0
    assert BatchNorm(3, momentum=1).momentum == 1.0
    assert BatchNorm(3, momentum=None).momentum is None
    assert BatchNorm(3, eps=1e-12).eps == 1e-12


def test_repr_shows_configuration():
    bn = BatchNorm(
        7, axis=-1, eps=1e-3, momentum=None, affine=False, track_running_stats=False,
        dtype=np.float64,
    )  # fmt: skip
    assert repr(bn) == (
        "BatchNorm(7, axis=-1, eps=0.001, momentum=None, affine=False, "
        "track_running_stats=False, dtype=np.float64)"
    )
    assert repr(BatchNorm(3)) == (
        "BatchNorm(3, axis=0, eps=1e-05, momentum=0.1, affine=True, "
        "track_running_stats=True, dtype=np.float32)"
    )


def test_train_and_eval_return_self():
    bn = BatchNorm(3)
    assert bn.eval() is bn and bn.training is False
    assert bn.train() is bn and bn.training is True
    assert bn.train(False) is bn and bn.training is False
    assert bn.train(np.bool_(True)).training is True
    with pytest.raises(TypeError, match="mode must be a bool, got 'eval'"):
        bn.train("eval")


# --------------------------------------------------------- running statistics


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("name", LAYOUTS)
def test_running_stats_follow_pytorch_rule(rng, name, momentum):
    shape, axis = LAYOUTS[name]
    bn = BatchNorm(shape[axis], axis=axis, momentum=momentum, dtype=np.float64)
    batches = make_batches(rng, shape, 4)
    for step, x in enumerate(batches, start=1):
        bn(x)
        mean, var, count = expected_running_stats(batches[:step], axis, momentum)
        assert bn.num_batches_tracked == count == step
        assert type(bn.num_batches_tracked) is int
        np.testing.assert_allclose(bn.running_mean, mean, rtol=TIGHT, atol=TIGHT)
        np.testing.assert_allclose(bn.running_var, var, rtol=TIGHT)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_float32(rng, momentum):
    shape, axis = LAYOUTS["nchw"]
    bn = BatchNorm(shape[axis], axis=axis, momentum=momentum)
    batches = make_batches(rng, shape, 3, np.float32)
    for x in batches:
        bn(x)
    mean, var, _ = expected_running_stats(batches, axis, momentum)
    assert bn.running_mean.dtype == bn.running_var.dtype == np.float32
    # One rounding to float32 per step.
    np.testing.assert_allclose(bn.running_mean, mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(bn.running_var, var, rtol=1e-6)


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_momentum_edges(rng, momentum):
    bn = BatchNorm(C, momentum=momentum, dtype=np.float64)
    x = make_batches(rng, (C, 30), 1)[0]
    bn(x)
    if momentum == 0.0:
        np.testing.assert_array_equal(bn.running_mean, 0.0)
        np.testing.assert_array_equal(bn.running_var, 1.0)
    else:  # the batch's own statistics, the variance unbiased
        np.testing.assert_allclose(bn.running_mean, x.mean(axis=1), rtol=TIGHT)
        np.testing.assert_allclose(bn.running_var, x.var(axis=1, ddof=1), rtol=TIGHT)
    assert bn.num_batches_tracked == 1


def test_constant_feature(rng):
    """Zero variance: y is beta, dx finite, running variance (1 - f) * running."""
    bn = BatchNorm(3, dtype=np.float64)
    bn.beta[...] = [0.5, -1.0, 2.0]
    x = rng.standard_normal((3, 10))
    x[1] = 4.25
    y = bn(x)
    np.testing.assert_allclose(y[1], -1.0, atol=1e-12)
    assert bn.running_var[1] == pytest.approx(0.9, abs=1e-15)
    assert bn.running_mean[1] == pytest.approx(0.425, abs=1e-15)
    dy = rng.standard_normal((3, 10))
    dx = bn.backward(dy)
    invstd = 1.0 / np.sqrt(bn.eps)
    np.testing.assert_allclose(dx[1], invstd * (dy[1] - dy[1].mean()), rtol=1e-9, atol=1e-9)


def test_constant_feature_running_variance_is_never_negative():
    """The variance recovered from invstd rounds to either side of 0: never store below 0."""
    x = np.full((1, 8), 3.0)
    for eps in np.geomspace(1e-8, 1e-2, 25):
        bn = BatchNorm(1, eps=eps, momentum=1.0, dtype=np.float64)
        bn(x)
        assert bn.running_mean[0] == 3.0
        assert 0.0 <= bn.running_var[0] <= 1e-15 * eps, eps


# --------------------------------------------------------- forward, both modes


@pytest.mark.parametrize("name", LAYOUTS)
def test_train_then_eval_forward_and_backward(rng, name):
    """Every layout: y and gradients in both modes against the float64 reference."""
    shape, axis = LAYOUTS[name]
    bn = trained_layer(rng, shape=shape, axis=axis)
    gamma, beta = bn.gamma.copy(), bn.beta.copy()

    x = make_batches(rng, shape, 1)[0]
    dy = rng.standard_normal(shape)
    y_ref, mean_ref, invstd_ref = ref_train(x, gamma, beta, axis=axis)
    dx_ref, dgamma_ref, dbeta_ref = ref_backward(dy, x, mean_ref, invstd_ref, gamma, axis=axis)
    assert_close(bn(x), y_ref, np.float64)
    assert_close(bn.backward(dy), dx_ref, np.float64)
    assert_close(bn.dgamma, dgamma_ref, np.float64, scale=10)
    assert_close(bn.dbeta, dbeta_ref, np.float64, scale=10)

    bn.eval()
    rm, rv, count = bn.running_mean.copy(), bn.running_var.copy(), bn.num_batches_tracked
    invstd = 1.0 / np.sqrt(rv + bn.eps)
    y_ref = ref_eval(x, rm, rv, gamma, beta, axis=axis)
    dx_ref, dgamma_ref, dbeta_ref = ref_backward(
        dy, x, rm, invstd, gamma, axis=axis, training=False
    )
    assert_close(bn(x), y_ref, np.float64)
    assert_close(bn.backward(dy), dx_ref, np.float64)
    assert_close(bn.dgamma, dgamma_ref, np.float64, scale=10)
    assert_close(bn.dbeta, dbeta_ref, np.float64, scale=10)
    # Eval mode reads the running statistics and leaves them alone.
    np.testing.assert_array_equal(bn.running_mean, rm)
    np.testing.assert_array_equal(bn.running_var, rv)
    assert bn.num_batches_tracked == count


def test_float32_forward_and_backward(rng):
    shape, axis = LAYOUTS["nhwc"]
    bn = trained_layer(rng, np.float32, shape=shape, axis=axis)
    x = make_batches(rng, shape, 1, np.float32)[0]
    dy = rng.standard_normal(shape).astype(np.float32)
    y = bn(x)
    dx = bn.backward(dy)
    assert y.dtype == dx.dtype == bn.dgamma.dtype == np.float32
    y_ref, mean_ref, invstd_ref = ref_train(x, bn.gamma, bn.beta, axis=axis)
    dx_ref, dgamma_ref, dbeta_ref = ref_backward(dy, x, mean_ref, invstd_ref, bn.gamma, axis=axis)
    assert_close(y, y_ref, np.float32)
    assert_close(dx, dx_ref, np.float32)
    assert_close(bn.dgamma, dgamma_ref, np.float32, scale=10)
    assert_close(bn.dbeta, dbeta_ref, np.float32, scale=10)


def test_without_running_stats(rng):
    """track_running_stats=False: batch statistics in both modes, nothing tracked."""
    shape, axis = LAYOUTS["batch_first"]
    bn = trained_layer(rng, shape=shape, axis=axis, track_running_stats=False)
    assert bn.running_mean is None and bn.running_var is None
    assert bn.num_batches_tracked == 0
    assert set(bn.state_dict()) == {"weight", "bias"}
    x = make_batches(rng, shape, 1)[0]
    dy = rng.standard_normal(shape)
    y_ref, mean_ref, invstd_ref = ref_train(x, bn.gamma, bn.beta, axis=axis)
    dx_ref, _, _ = ref_backward(dy, x, mean_ref, invstd_ref, bn.gamma, axis=axis)
    for mode in (True, False):
        bn.train(mode)
        assert_close(bn(x), y_ref, np.float64)
        # Batch statistics depend on x: the training formula, in eval mode too.
        assert_close(bn.backward(dy), dx_ref, np.float64)
    assert bn.num_batches_tracked == 0
    bn.reset_running_stats()  # nothing to reset
    assert bn.running_mean is None


def test_without_affine(rng):
    shape, axis = LAYOUTS["features_first"]
    bn = BatchNorm(shape[axis], axis=axis, affine=False, dtype=np.float64)
    assert bn.gamma is None and bn.beta is None and bn.dgamma is None and bn.dbeta is None
    assert bn.parameters() == []
    assert set(bn.state_dict()) == {"running_mean", "running_var", "num_batches_tracked"}
    x = make_batches(rng, shape, 1)[0]
    dy = rng.standard_normal(shape)
    y_ref, mean_ref, invstd_ref = ref_train(x, axis=axis)
    dx_ref, _, _ = ref_backward(dy, x, mean_ref, invstd_ref, axis=axis)
    assert_close(bn(x), y_ref, np.float64)
    assert_close(bn.backward(dy), dx_ref, np.float64)
    bn.step(0.5)
    bn.reset_parameters()
    assert bn.gamma is None and bn.dgamma is None
    np.testing.assert_array_equal(bn.running_var, 1.0)


def test_backward_uses_the_formula_of_its_forward(rng):
    """A mode switch between forward and backward does not change the gradient."""
    bn = trained_layer(rng)
    x = make_batches(rng, (C, 24), 1)[0]
    dy = rng.standard_normal((C, 24))
    _, mean_ref, invstd_ref = ref_train(x, bn.gamma, bn.beta)
    dx_ref, _, _ = ref_backward(dy, x, mean_ref, invstd_ref, bn.gamma)
    bn(x)
    bn.eval()
    assert_close(bn.backward(dy), dx_ref, np.float64)


def test_eval_backward_uses_statistics_of_its_forward(rng):
    """Running statistics changed after an eval forward do not reach its backward."""
    bn = trained_layer(rng).eval()
    x = make_batches(rng, (C, 24), 1)[0]
    dy = rng.standard_normal((C, 24))
    invstd = 1.0 / np.sqrt(bn.running_var + bn.eps)
    dx_ref, dgamma_ref, _ = ref_backward(dy, x, bn.running_mean, invstd, bn.gamma, training=False)
    bn(x)
    bn.reset_running_stats()
    assert_close(bn.backward(dy), dx_ref, np.float64)
    assert_close(bn.dgamma, dgamma_ref, np.float64, scale=10)


# ------------------------------------------------------------ finite differences


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", ["features_first", "nhwc"])
def test_gradients_match_finite_differences(rng, name, training):
    shape, axis = LAYOUTS[name]
    shape = tuple(max(s // 2, 2) for s in shape)
    bn = trained_layer(rng, shape=shape, axis=axis).train(training)
    x = make_batches(rng, shape, 1)[0]
    weights = rng.standard_normal(shape)  # loss = sum(weights * y), so dy = weights

    def loss():
        return float(np.sum(weights * bn(x)))

    bn(x)
    dx = bn.backward(weights)
    dgamma, dbeta = bn.dgamma.copy(), bn.dbeta.copy()
    np.testing.assert_allclose(dx, central_difference(loss, x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dgamma, central_difference(loss, bn.gamma), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dbeta, central_difference(loss, bn.beta), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------ parameters, step


def test_gradient_arrays_are_overwritten_in_place(rng):
    bn = trained_layer(rng)
    params = bn.parameters()
    assert [name for name, _, _ in params] == ["gamma", "beta"]
    (_, gamma, dgamma), (_, beta, dbeta) = params
    assert gamma is bn.gamma and dgamma is bn.dgamma and beta is bn.beta and dbeta is bn.dbeta
    for _ in range(2):
        x = make_batches(rng, (C, 24), 1)[0]
        dy = rng.standard_normal((C, 24))
        _, mean_ref, invstd_ref = ref_train(x, bn.gamma, bn.beta)
        _, dgamma_ref, dbeta_ref = ref_backward(dy, x, mean_ref, invstd_ref, bn.gamma)
        bn(x)
        bn.backward(dy)
        assert bn.dgamma is dgamma and bn.dbeta is dbeta
        assert_close(dgamma, dgamma_ref, np.float64, scale=10)
        assert_close(dbeta, dbeta_ref, np.float64, scale=10)


def test_step_is_gradient_descent_in_place(rng):
    bn = trained_layer(rng)
    gamma, beta = bn.gamma, bn.beta
    expected_gamma = bn.gamma - 0.25 * bn.dgamma
    expected_beta = bn.beta - 0.25 * bn.dbeta
    bn.step(0.25)
    assert bn.gamma is gamma and bn.beta is beta
    np.testing.assert_array_equal(bn.gamma, expected_gamma)
    np.testing.assert_array_equal(bn.beta, expected_beta)


def test_step_keeps_the_layer_dtype(rng):
    bn = trained_layer(rng, np.float32)
    expected = bn.gamma - np.float32(0.1) * bn.dgamma
    bn.step(np.float64(0.1))
    assert bn.gamma.dtype == np.float32
    np.testing.assert_array_equal(bn.gamma, expected)


def test_step_validates_lr():
    bn = BatchNorm(3)
    with pytest.raises(TypeError, match=r"lr must be a real number, got '0\.1'"):
        bn.step("0.1")
    with pytest.raises(ValueError, match="lr must be finite, got nan"):
        bn.step(float("nan"))


# ------------------------------------------------------------------ state


def test_state_dict_round_trip(rng):
    bn = trained_layer(rng)
    state = bn.state_dict()
    assert list(state) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert state["num_batches_tracked"] == 2
    np.testing.assert_array_equal(state["weight"], bn.gamma)
    np.testing.assert_array_equal(state["running_var"], bn.running_var)
    # Copies: changing them leaves the layer alone.
    state["weight"][0] += 1.0
    assert state["weight"][0] != bn.gamma[0]
    state = bn.state_dict()

    other = BatchNorm(C, dtype=np.float64)
    gamma, running_var = other.gamma, other.running_var
    other.load_state_dict(state)
    assert other.gamma is gamma and other.running_var is running_var  # copied in place
    for key, value in other.state_dict().items():
        np.testing.assert_array_equal(value, state[key])
    assert type(other.num_batches_tracked) is int


def test_load_state_dict_converts_dtype(rng):
    bn = BatchNorm(C)
    state = {
        "weight": rng.standard_normal(C),
        "bias": rng.standard_normal(C).astype(np.float32),
        "running_mean": rng.standard_normal(C),
        "running_var": rng.uniform(0.5, 2.0, C),
        "num_batches_tracked": np.array(7, dtype=np.int64),
    }
    bn.load_state_dict(state)
    assert bn.gamma.dtype == np.float32
    np.testing.assert_array_equal(bn.gamma, state["weight"].astype(np.float32))
    np.testing.assert_array_equal(bn.beta, state["bias"])
    assert bn.num_batches_tracked == 7 and type(bn.num_batches_tracked) is int


# (key, value put into a valid state_dict, exception, message pattern)
BAD_STATES = {
    "long_weight": ("weight", np.ones(C + 1, np.float32), ValueError, r"\(6,\); expected \(5,\)"),
    "2d_var": ("running_var", np.ones((C, 1), np.float32), ValueError, r"has shape \(5, 1\)"),
    "int_bias": ("bias", np.zeros(C, np.int64), TypeError, r"\['bias'\] has dtype int64"),
    "float16_mean": ("running_mean", np.zeros(C, np.float16), TypeError, "dtype float16"),
    "overflow": ("running_var", np.full(C, 1e300), ValueError, "values that overflow float32"),
    "negative_count": ("num_batches_tracked", -1, ValueError, "must be >= 0, got -1"),
    "float_count": ("num_batches_tracked", 2.0, TypeError, "must be an integer, got 2.0"),
    "bool_count": ("num_batches_tracked", True, TypeError, "must be an integer, got True"),
    "array_count": ("num_batches_tracked", np.arange(2), TypeError, "must be an integer"),
    "unexpected": ("momentum", 0.1, ValueError, r"unexpected keys \['momentum'\]"),
}


@pytest.mark.parametrize("case", BAD_STATES)
def test_load_state_dict_rejects_and_changes_nothing(rng, case):
    key, value, exc, match = BAD_STATES[case]
    bn = trained_layer(rng, np.float32)
    state = BatchNorm(C).state_dict()  # valid, and different from bn's state
    state[key] = value
    saved = snapshot(bn)
    with pytest.raises(exc, match=match):
        bn.load_state_dict(state)
    assert_same_state(bn, saved)


def test_load_state_dict_takes_a_zero_counter(rng):
    """num_batches_tracked == 0 (a fresh torch module's) is valid: it is loaded, not refused."""
    bn = trained_layer(rng, np.float32)
    state = {
        "weight": rng.uniform(0.5, 2.0, C).astype(np.float32),
        "bias": rng.standard_normal(C).astype(np.float32),
        "running_mean": rng.standard_normal(C).astype(np.float32),
        "running_var": rng.uniform(0.5, 2.0, C).astype(np.float32),
    }
    for counter in (0, np.array(0, np.int64)):
        bn.load_state_dict({**state, "num_batches_tracked": counter})
        assert bn.num_batches_tracked == 0 and type(bn.num_batches_tracked) is int
        for key, value in state.items():
            np.testing.assert_array_equal(bn.state_dict()[key], value, err_msg=key)


def test_load_state_dict_names_missing_keys(rng):
    bn = trained_layer(rng, np.float32)
    saved = snapshot(bn)
    with pytest.raises(ValueError, match=r"missing keys \['bias', 'running_mean'"):
        bn.load_state_dict({"weight": np.ones(C, np.float32)})
    assert_same_state(bn, saved)


def test_reset(rng):
    bn = trained_layer(rng)
    dgamma = bn.dgamma.copy()
    running_mean = bn.running_mean
    bn.reset_running_stats()
    assert bn.running_mean is running_mean
    np.testing.assert_array_equal(bn.running_mean, 0.0)
    np.testing.assert_array_equal(bn.running_var, 1.0)
    assert bn.num_batches_tracked == 0
    assert not np.all(bn.gamma == 1.0)  # parameters untouched
    bn(make_batches(rng, (C, 24), 1)[0])
    bn.reset_parameters()
    np.testing.assert_array_equal(bn.gamma, 1.0)
    np.testing.assert_array_equal(bn.beta, 0.0)
    np.testing.assert_array_equal(bn.running_mean, 0.0)
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(bn.dgamma, dgamma)  # gradients untouched, as in torch


@pytest.mark.parametrize("duplicate", [copy.deepcopy, lambda bn: pickle.loads(pickle.dumps(bn))])
def test_copies_are_equal_and_independent(rng, duplicate):
    bn = trained_layer(rng, momentum=None).eval()
    bn(make_batches(rng, (C, 24), 1)[0])
    twin = duplicate(bn)
    assert repr(twin) == repr(bn) and twin.training is False
    assert twin.num_batches_tracked == bn.num_batches_tracked
    for name in ("gamma", "beta", "dgamma", "dbeta", "running_mean", "running_var"):
        assert getattr(twin, name) is not getattr(bn, name)
        np.testing.assert_array_equal(getattr(twin, name), getattr(bn, name))
    # The forward cache references the caller's batch: copies leave it out.
    with pytest.raises(RuntimeError, match="forward"):
        twin.backward(np.ones((C, 24)))
    # Trained on, the copy behaves exactly as the original, which it does not touch.
    twin.train()
    bn.train()
    saved = snapshot(bn)
    x, dy = make_batches(rng, (C, 24), 1)[0], rng.standard_normal((C, 24))
    y_twin, dx_twin = twin(x), twin.backward(dy)
    twin.step(0.1)
    assert_same_state(bn, saved)
    np.testing.assert_array_equal(bn(x), y_twin)
    np.testing.assert_array_equal(bn.backward(dy), dx_twin)
    bn.step(0.1)
    for name in ("gamma", "running_var"):
        np.testing.assert_array_equal(getattr(twin, name), getattr(bn, name))


# ----------------------------------------------------------- out= and cache


def test_backward_before_forward():
    bn = BatchNorm(3)
    with pytest.raises(RuntimeError, match=r"backward\(\) needs a forward\(\) first"):
        bn.backward(np.ones((3, 4), np.float32))


def test_fresh_arrays_without_out(rng):
    bn = BatchNorm(C, dtype=np.float64)
    x1, x2 = make_batches(rng, (C, 24), 2)
    y1 = bn(x1)
    y1_saved = y1.copy()
    dx1 = bn.backward(np.ones((C, 24)))
    y2 = bn(x2)
    dx2 = bn.backward(np.ones((C, 24)))
    for a, b in ((y1, y2), (dx1, dx2), (y1, x1), (y2, x2)):
        assert not np.shares_memory(a, b)
    np.testing.assert_array_equal(y1, y1_saved)


def test_out_buffers(rng):
    bn = trained_layer(rng)
    x = make_batches(rng, (C, 24), 1)[0]
    dy = rng.standard_normal((C, 24))
    reference = copy.deepcopy(bn)
    y_expected = reference(x)
    dx_expected = reference.backward(dy)
    y_buffer, dx_buffer = np.empty_like(x), np.empty_like(x)
    assert bn(x, out=y_buffer) is y_buffer
    assert bn.backward(dy, out=dx_buffer) is dx_buffer
    np.testing.assert_array_equal(y_buffer, y_expected)
    np.testing.assert_array_equal(dx_buffer, dx_expected)
    # dy may take dx, as in the functional API.
    dy_copy = dy.copy()
    assert bn.backward(dy_copy, out=dy_copy) is dy_copy
    np.testing.assert_array_equal(dy_copy, dx_expected)


# ------------------------------------------------------------ no lost state


def _wrong_dtype(bn, x, rng):
    bn(x.astype(np.float32))


def _wrong_features(bn, x, rng):
    bn(x[:-1])


def _one_dimensional(bn, x, rng):
    bn(x[0])


def _one_value_per_feature(bn, x, rng):
    bn(x[:, :1])


def _nan_batch(bn, x, rng):
    x = x.copy()
    x[2, 3] = np.nan
    bn(x)


def _inf_batch(bn, x, rng):
    x = x.copy()
    x[0, 0] = -np.inf
    bn(x)


def _variance_overflows_float64(bn, x, rng):
    bn(1e200 * x)


def _out_is_x(bn, x, rng):
    x = x.copy()
    bn(x, out=x)


def _out_overlaps_x(bn, x, rng):
    x = x.copy()
    bn(x[:, :12], out=x[:, 6:18])


def _out_is_the_kept_x(bn, x, rng):
    bn(x.copy(), out=bn._saved.x)


def _out_wrong_shape(bn, x, rng):
    bn(x, out=np.empty((C, 23)))


def _dy_wrong_dtype(bn, x, rng):
    bn.backward(np.ones((C, 24), np.float32))


def _dy_wrong_shape(bn, x, rng):
    bn.backward(np.ones((C, 25)))


FAILURES = {
    _wrong_dtype: (TypeError, "x has dtype float32 but the layer's dtype is float64"),
    _wrong_features: (ValueError, "num_features=5"),
    _one_dimensional: (ValueError, r"x\[None, :\]"),
    _one_value_per_feature: (ValueError, "Expected more than 1 value per feature when training"),
    _nan_batch: (FloatingPointError, r"features \[2\] are not finite"),
    _inf_batch: (FloatingPointError, r"features \[0\] are not finite"),
    _variance_overflows_float64: (FloatingPointError, r"features \[0, 1, 2, 3, 4\]"),
    _out_is_x: (ValueError, "out overlaps x"),
    _out_overlaps_x: (ValueError, "out overlaps x"),
    _out_is_the_kept_x: (ValueError, "out overlaps the x kept from the previous forward"),
    _out_wrong_shape: (ValueError, "out has shape"),
    _dy_wrong_dtype: (TypeError, "dy has dtype float32 but the layer's dtype is float64"),
    _dy_wrong_shape: (ValueError, "dy has shape"),
}
# Possible only where batch statistics are computed: not in eval mode with running ones.
BATCH_FAILURES = (_one_value_per_feature, _nan_batch, _inf_batch, _variance_overflows_float64)


FAILURE_CASES = [
    pytest.param(failure, training, tracking, id=f"{failure.__name__.strip('_')}-{mode}")
    for failure in FAILURES
    for training, tracking, mode in (
        (True, True, "train"),
        (False, True, "eval"),
        (True, False, "untracked_train"),
        (False, False, "untracked_eval"),
    )
    if training or not tracking or failure not in BATCH_FAILURES
]


@pytest.mark.parametrize(("failure", "training", "tracking"), FAILURE_CASES)
def test_failed_call_loses_no_state(rng, failure, training, tracking):
    bn = trained_layer(rng, track_running_stats=tracking).train(training)
    x = make_batches(rng, (C, 24), 1)[0]
    dy = rng.standard_normal((C, 24))
    bn(x)
    dx_before = bn.backward(dy)
    saved = snapshot(bn)
    exc, match = FAILURES[failure]
    with pytest.raises(exc, match=match):
        failure(bn, x, rng)
    assert_same_state(bn, saved)
    # The cache still holds the last successful forward.
    np.testing.assert_array_equal(bn.backward(dy), dx_before)
    assert_same_state(bn, saved)


@pytest.mark.parametrize("tracking", [True, False], ids=["tracked", "untracked"])
@pytest.mark.parametrize(
    ("n_bad", "listed"),
    [
        (10, "[0, 1, 2, 3, 4, 5, 6, 7 and 2 more]"),
        (8, "[0, 1, 2, 3, 4, 5, 6, 7]"),
        (19, "[0, 1, 2, 3, 4, 5, 6, 7 and 11 more]"),  # 11: not 19 % 8 (a survivor's count)
    ],
    ids=["ten", "eight", "nineteen"],
)
def test_nonfinite_features_listed_up_to_eight(rng, tracking, n_bad, listed):
    """The error lists the first 8 offending features, then how many more there are."""
    bn = trained_layer(rng, shape=(20, 24), track_running_stats=tracking)
    x = make_batches(rng, (20, 24), 1)[0]
    x[:n_bad, 3] = np.nan
    saved = snapshot(bn)
    with pytest.raises(FloatingPointError) as info:
        bn(x)
    message = str(info.value)
    assert f"features {listed} " in message, message
    assert "more" not in message.replace(listed, "")
    assert_same_state(bn, saved)


def test_running_variance_overflowing_float32_loses_no_state(rng):
    """Finite in float64, var ~1e60 overflows the float32 running variance."""
    bn = trained_layer(rng, np.float32)
    x = (1e30 * rng.standard_normal((C, 24))).astype(np.float32)
    assert np.isfinite(x).all()
    dy = rng.standard_normal((C, 24)).astype(np.float32)
    bn(make_batches(rng, (C, 24), 1, np.float32)[0])
    dx_before = bn.backward(dy)
    saved = snapshot(bn)
    with pytest.raises(FloatingPointError, match="overflow float32 in the running statistics"):
        bn(x)
    assert_same_state(bn, saved)
    np.testing.assert_array_equal(bn.backward(dy), dx_before)


def test_failure_before_any_forward_leaves_no_cache(rng):
    bn = BatchNorm(C)
    saved = snapshot(bn)
    with pytest.raises(FloatingPointError):
        bn(np.full((C, 4), np.nan, np.float32))
    assert_same_state(bn, saved)
    with pytest.raises(RuntimeError):
        bn.backward(np.ones((C, 4), np.float32))


def test_dtype_error_names_both_and_the_fix():
    bn = BatchNorm(3)
    with raises(TypeError, "x", "float64", "float32", "x.astype(np.float32)", "dtype=np.float64"):
        bn(np.ones((3, 4)))
    with raises(TypeError, "x", "int64", "x.astype(np.float32)") as info:
        bn(np.ones((3, 4), np.int64))
    assert "dtype=np.int64" not in str(info.value)  # not a layer dtype to suggest
