"""Bad input against a layer in mid-training: each gives its documented error and
leaves every attribute of the layer exactly as it was (the contract's "no lost
state", docs/guide/contract.md), and the functional API writes nothing when it raises.

Lists are accepted wherever an array is, as NumPy would take them
(``np.asarray``); only ``out`` must be an ndarray, since it is written into.
"""

import numpy as np
import pytest
from conftest import raises, ref_train

import fastbn
from fastbn import BatchNorm

C, M = 4, 16


def _trained(dtype=np.float32, **kwargs):
    """A layer after two training steps, with a forward cache and non-trivial state."""
    rng = np.random.default_rng(3)
    bn = BatchNorm(C, dtype=dtype, **kwargs)
    for _ in range(2):
        x = (2.0 * rng.standard_normal((C, M)) + 1.0).astype(dtype)
        bn(x)
        bn.backward(rng.standard_normal((C, M)).astype(dtype))
        bn.step(0.1)
    return bn


def _snapshot(bn):
    """Every attribute: arrays by identity and by value, the rest by value (cache by identity)."""
    snap = {}
    for key, value in vars(bn).items():
        if isinstance(value, np.ndarray):
            snap[key] = ("array", value, value.copy())
        else:
            snap[key] = ("value", value, None)
    return snap


def _assert_unchanged(bn, snap):
    assert set(vars(bn)) == set(snap)
    for key, (kind, obj, copy) in snap.items():
        now = getattr(bn, key)
        if kind == "array":
            assert now is obj, f"{key} was replaced"
            assert now.tobytes() == copy.tobytes(), f"{key} changed"
        elif key == "_saved":
            assert now is obj, "the forward cache changed"
        else:
            assert now == obj, f"{key} changed"


def _x(shape=(C, M), dtype=np.float32):
    return np.random.default_rng(9).standard_normal(shape).astype(dtype)


def _readonly(a):
    a.flags.writeable = False
    return a


# (id, call on the layer, exception, name in the message, fragments)
FORWARD_CASES = [
    (
        "list_of_float64_into_float32",
        lambda bn: bn([[1.0] * M] * C),
        TypeError,
        "x",
        ["float64", "astype(np.float32)"],
    ),
    ("0d", lambda bn: bn(np.float32(1.0)), ValueError, "x", ["()", "2 dimensions"]),
    ("0d_array", lambda bn: bn(np.array(1.0, np.float32)), ValueError, "x", ["()"]),
    ("1d", lambda bn: bn(_x((C,))), ValueError, "x", [f"({C},)", "x[None, :]"]),
    ("wrong_features", lambda bn: bn(_x((C + 1, M))), ValueError, "x", [f"num_features={C}"]),
    ("float64", lambda bn: bn(_x(dtype=np.float64)), TypeError, "x", ["float64"]),
    ("float16", lambda bn: bn(_x(dtype=np.float16)), TypeError, "x", ["float16"]),
    ("int", lambda bn: bn(np.ones((C, M), np.int64)), TypeError, "x", ["int64"]),
    ("complex", lambda bn: bn(np.ones((C, M), np.complex64)), TypeError, "x", ["complex64"]),
    ("bool", lambda bn: bn(np.ones((C, M), bool)), TypeError, "x", ["bool"]),
    ("object", lambda bn: bn(np.ones((C, M), object)), TypeError, "x", ["object"]),
    (
        "one_value_per_feature",
        lambda bn: bn(_x((C, 1))),
        ValueError,
        "Expected",
        ["more than 1 value per feature when training"],
    ),
    ("empty", lambda bn: bn(_x((C, 0))), ValueError, "x", ["empty"]),
    (
        "nan",
        lambda bn: bn(np.where(np.eye(C, M) > 0, np.nan, _x()).astype(np.float32)),
        FloatingPointError,
        "features",
        ["not finite", "unchanged"],
    ),
    (
        "inf",
        lambda bn: bn(np.full((C, M), np.inf, np.float32)),
        FloatingPointError,
        "features",
        ["[0, 1, 2, 3]"],
    ),
    (
        "out_read_only",
        lambda bn: bn(_x(), out=_readonly(np.empty((C, M), np.float32))),
        ValueError,
        "out",
        ["read-only"],
    ),
    (
        "out_wrong_shape",
        lambda bn: bn(_x(), out=np.empty((C, M + 1), np.float32)),
        ValueError,
        "out",
        [f"({C}, {M + 1})"],
    ),
    (
        "out_wrong_dtype",
        lambda bn: bn(_x(), out=np.empty((C, M), np.float64)),
        TypeError,
        "out",
        ["float64"],
    ),
    ("out_list", lambda bn: bn(_x(), out=[[0.0] * M] * C), TypeError, "out", ["list"]),
    (
        "out_is_kept_x",
        lambda bn: bn(_x(), out=bn._saved.x),
        ValueError,
        "out",
        ["kept from the previous forward"],
    ),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    ("call", "exc", "name", "fragments"),
    [case[1:] for case in FORWARD_CASES],
    ids=[case[0] for case in FORWARD_CASES],
)
def test_bad_forward_loses_no_state(call, exc, name, fragments, training):
    bn = _trained().train(training)
    if not training and exc is FloatingPointError:
        pytest.skip("eval mode uses the running statistics: NaN in x propagates, no error")
    if not training and name == "Expected":
        pytest.skip("eval mode takes one value per feature")
    snap = _snapshot(bn)
    with raises(exc, name, *fragments):
        call(bn)
    _assert_unchanged(bn, snap)


def test_out_is_x_loses_no_state():
    bn = _trained()
    x = _x()
    snap = _snapshot(bn)
    with raises(ValueError, "out", "keeps x for backward"):
        bn(x, out=x)
    _assert_unchanged(bn, snap)


BACKWARD_CASES = [
    ("dy_shape", lambda bn: bn.backward(_x((C, M + 1))), ValueError, "dy", [f"({C}, {M + 1})"]),
    ("dy_transposed", lambda bn: bn.backward(_x((M, C))), ValueError, "dy", [f"({M}, {C})"]),
    ("dy_1d", lambda bn: bn.backward(_x((C * M,))), ValueError, "dy", [f"({C * M},)"]),
    ("dy_dtype", lambda bn: bn.backward(_x(dtype=np.float64)), TypeError, "dy", ["float64"]),
    ("dy_list", lambda bn: bn.backward([[0.0] * M] * C), TypeError, "dy", ["float64"]),
    ("dy_int", lambda bn: bn.backward(np.ones((C, M), int)), TypeError, "dy", ["int"]),
    (
        "out_read_only",
        lambda bn: bn.backward(_x(), out=_readonly(np.empty((C, M), np.float32))),
        ValueError,
        "out",
        ["read-only"],
    ),
    (
        "out_is_x",
        lambda bn: bn.backward(_x(), out=bn._saved.x),
        ValueError,
        "out",
        ["overlaps the input x"],
    ),
]


@pytest.mark.parametrize(
    ("call", "exc", "name", "fragments"),
    [case[1:] for case in BACKWARD_CASES],
    ids=[case[0] for case in BACKWARD_CASES],
)
def test_bad_backward_loses_no_state(call, exc, name, fragments):
    bn = _trained()
    snap = _snapshot(bn)
    with raises(exc, name, *fragments):
        call(bn)
    _assert_unchanged(bn, snap)


def test_backward_before_forward():
    bn = BatchNorm(C)
    snap = _snapshot(bn)
    with raises(RuntimeError, "backward", "forward() first"):
        bn.backward(_x())
    _assert_unchanged(bn, snap)


def _state(bn, **changes):
    state = bn.state_dict()
    state.update(changes)
    return state


LOAD_CASES = [
    (
        "weight_short",
        {"weight": np.ones(C - 1, np.float32)},
        ValueError,
        "weight",
        [f"({C - 1},)", f"({C},)"],
    ),
    (
        "running_var_2d",
        {"running_var": np.ones((C, 1), np.float32)},
        ValueError,
        "running_var",
        [f"({C}, 1)"],
    ),
    ("bias_scalar", {"bias": np.float32(0.0)}, ValueError, "bias", ["()"]),
    ("weight_int", {"weight": np.ones(C, np.int64)}, TypeError, "weight", ["int64"]),
    (
        "running_mean_float16",
        {"running_mean": np.zeros(C, np.float16)},
        TypeError,
        "running_mean",
        ["float16"],
    ),
    (
        "running_mean_overflows_float32",
        {"running_mean": np.full(C, 1e300)},
        ValueError,
        "running_mean",
        ["overflow"],
    ),
    ("count_negative", {"num_batches_tracked": -1}, ValueError, "num_batches_tracked", ["-1"]),
    ("count_float", {"num_batches_tracked": 2.5}, TypeError, "num_batches_tracked", ["2.5"]),
    ("extra_key", {"momentum": 0.1}, ValueError, "state_dict", ["unexpected keys ['momentum']"]),
]


@pytest.mark.parametrize(
    ("changes", "exc", "name", "fragments"),
    [case[1:] for case in LOAD_CASES],
    ids=[case[0] for case in LOAD_CASES],
)
def test_bad_load_state_dict_loses_no_state(changes, exc, name, fragments):
    bn = _trained()
    # A valid, different weight and counter too: all or nothing, so neither may land.
    state = _state(
        bn, **{"weight": np.full(C, 7.0, np.float32), "num_batches_tracked": 99, **changes}
    )
    snap = _snapshot(bn)
    with raises(exc, name, *fragments):
        bn.load_state_dict(state)
    _assert_unchanged(bn, snap)


def test_load_state_dict_missing_key_loses_no_state():
    bn = _trained()
    state = _state(bn)
    del state["running_var"]
    snap = _snapshot(bn)
    with raises(ValueError, "state_dict", "missing keys ['running_var']"):
        bn.load_state_dict(state)
    _assert_unchanged(bn, snap)


@pytest.mark.parametrize(
    ("call", "exc", "fragment"),
    [
        (lambda bn: bn.step(float("nan")), ValueError, "lr must be finite"),
        (lambda bn: bn.step(np.inf), ValueError, "lr must be finite"),
        (lambda bn: bn.step("0.1"), TypeError, "lr must be a real number"),
        (lambda bn: bn.train("yes"), TypeError, "mode must be a bool"),
    ],
    ids=["lr_nan", "lr_inf", "lr_str", "mode_str"],
)
def test_bad_step_and_mode_lose_no_state(call, exc, fragment):
    bn = _trained()
    snap = _snapshot(bn)
    with pytest.raises(exc, match=fragment):
        call(bn)
    _assert_unchanged(bn, snap)


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragment"),
    [
        ({"eps": np.nan}, ValueError, "eps must be finite and > 0"),
        ({"eps": np.inf}, ValueError, "eps must be finite and > 0"),
        ({"eps": -1e-5}, ValueError, "eps must be finite and > 0"),
        ({"eps": 0.0}, ValueError, "eps must be finite and > 0"),
        ({"eps": "1e-5"}, TypeError, "eps must be a real number"),
        ({"momentum": -0.1}, ValueError, "momentum must be in"),
        ({"momentum": 1.5}, ValueError, "momentum must be in"),
        ({"momentum": np.nan}, ValueError, "momentum must be in"),
        ({"num_features": 0}, ValueError, "num_features must be positive"),
        ({"num_features": 2.0}, TypeError, "num_features must be an int"),
        ({"dtype": np.float16}, TypeError, "dtype must be np.float32 or np.float64"),
        ({"dtype": None}, TypeError, "dtype must be np.float32 or np.float64"),
    ],
    ids=repr,
)
def test_bad_constructor_arguments(kwargs, exc, fragment):
    args = {"num_features": C, **kwargs}
    with pytest.raises(exc, match=fragment):
        BatchNorm(args.pop("num_features"), **args)


@pytest.mark.parametrize("eps", [np.nan, -np.inf, -1.0, 0.0, np.inf], ids=repr)
def test_bad_eps_writes_nothing(eps):
    x = _x(dtype=np.float64)
    x_before, out = x.copy(), np.full_like(x, 5.0)
    with raises(ValueError, "eps", repr(eps)):
        fastbn.batch_norm_train(x, axis=0, eps=eps, out=out)
    with raises(ValueError, "eps", repr(eps)):
        fastbn.batch_norm_eval(x, np.zeros(C), np.ones(C), eps=eps, out=x)
    np.testing.assert_array_equal(x, x_before)
    assert np.all(out == 5.0)


@pytest.mark.parametrize("eps", [1e30, 1e300])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_eps_is_valid_and_correct(eps, dtype):
    """A huge eps is finite and > 0: accepted, y -> beta; the layer's state stays finite."""
    x = (3.0 * _x() + 1.0).astype(dtype)
    beta = np.arange(C, dtype=dtype)
    y, _, invstd = fastbn.batch_norm_train(x, None, beta, eps=eps)
    y_ref, _, invstd_ref = ref_train(x, None, beta, eps=eps)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(invstd, invstd_ref, rtol=1e-12)
    bn = BatchNorm(C, eps=eps, dtype=dtype)
    np.testing.assert_allclose(bn(x), x * 0.0, atol=1e-6)
    assert np.all(np.isfinite(bn.running_var))


def test_lists_are_taken_as_numpy_would():
    """Documented choice: lists go through np.asarray (float64 for Python floats)."""
    rows = [[1.0, 2.0, 4.0], [3.0, 5.0, 9.0]]
    y, mean, _ = fastbn.batch_norm_train(rows, [1.0, 2.0], [0.0, 1.0])
    y2, mean2, _ = fastbn.batch_norm_train(
        np.array(rows), np.array([1.0, 2.0]), np.array([0.0, 1.0])
    )
    assert y.dtype == np.float64
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(mean, mean2)
    layers = BatchNorm(2, dtype=np.float64), BatchNorm(2, dtype=np.float64)
    np.testing.assert_array_equal(layers[0](rows), layers[1](np.array(rows)))
    np.testing.assert_array_equal(layers[0].running_var, layers[1].running_var)
    with raises(TypeError, "x", "int64"):
        fastbn.batch_norm_train([[1, 2], [3, 4]])
