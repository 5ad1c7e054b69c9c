"""Every error of the contract's shapes, dtypes and functional API, with its type and message.

Each message must name the offending argument by its parameter name and show
its shape or value; dtype errors name the dtype and the ``astype`` fix.
"""

import numpy as np
import pytest
from conftest import raises

import fastbn

C, M = 3, 4


def _valid(dtype=np.float64):
    """Valid arguments for every entry point: x (C, M) features-first, axis 0."""
    rng = np.random.default_rng(7)
    return {
        "x": rng.standard_normal((C, M)).astype(dtype),
        "dy": rng.standard_normal((C, M)).astype(dtype),
        "gamma": np.ones(C, dtype),
        "beta": np.zeros(C, dtype),
        "running_mean": np.zeros(C, dtype),
        "running_var": np.ones(C, dtype),
        "mean": np.zeros(C),
        "invstd": np.ones(C),
        "axis": 0,
        "eps": 1e-5,
        "out": None,
    }


def _train(a):
    return fastbn.batch_norm_train(
        a["x"], a["gamma"], a["beta"], axis=a["axis"], eps=a["eps"], out=a["out"]
    )


def _eval(a):
    return fastbn.batch_norm_eval(
        a["x"],
        a["running_mean"],
        a["running_var"],
        a["gamma"],
        a["beta"],
        axis=a["axis"],
        eps=a["eps"],
        out=a["out"],
    )


def _backward(a, training=True):
    return fastbn.batch_norm_backward(
        a["dy"],
        a["x"],
        a["mean"],
        a["invstd"],
        a["gamma"],
        axis=a["axis"],
        training=training,
        out=a["out"],
    )


def _backward_eval(a):
    return _backward(a, training=False)


FUNCS = {"train": _train, "eval": _eval, "backward": _backward, "backward_eval": _backward_eval}
ARGS = {
    "train": ("x", "gamma", "beta"),
    "eval": ("x", "running_mean", "running_var", "gamma", "beta"),
    "backward": ("dy", "x", "mean", "invstd", "gamma"),
    "backward_eval": ("dy", "x", "mean", "invstd", "gamma"),
}
VECTORS = ("gamma", "beta", "running_mean", "running_var", "mean", "invstd")
# (function, argument) for every array argument of every entry point.
ARRAY_ARGS = [(f, name) for f, names in ARGS.items() for name in names]
VECTOR_ARGS = [(f, name) for f, name in ARRAY_ARGS if name in VECTORS]


def _with_x(a, x):
    """Set x (and dy, for the backward) to ``x``'s shape."""
    a["x"] = x
    a["dy"] = np.ones_like(x)
    return a


def test_valid_arguments_work():
    """The baseline arguments of this module are accepted (so each error is its own)."""
    for f in FUNCS.values():
        f(_valid())


# --- x: ndim, axis, emptiness, M == 1 -----------------------------------------------------


@pytest.mark.parametrize("func", FUNCS)
def test_1d_x_suggests_adding_an_axis(func):
    """A 1-D x is a ValueError that shows its shape and suggests x[:, None]."""
    a = _with_x(_valid(), np.arange(5.0))
    with raises(ValueError, "x", "(5,)", "x[:, None]"):
        FUNCS[func](a)


@pytest.mark.parametrize("func", FUNCS)
def test_0d_x(func):
    """A 0-d x is a ValueError naming x and its shape ()."""
    a = _with_x(_valid(), np.array(1.0))
    with raises(ValueError, "x", "()"):
        FUNCS[func](a)


@pytest.mark.parametrize("axis", [2, -3, 10])
@pytest.mark.parametrize("func", FUNCS)
def test_axis_out_of_range(func, axis):
    """An axis outside [-ndim, ndim) is a ValueError naming axis and its value."""
    a = _valid()
    a["axis"] = axis
    with raises(ValueError, "axis", str(axis)):
        FUNCS[func](a)


@pytest.mark.parametrize("axis", [1.0, "1", None])
@pytest.mark.parametrize("func", ["train", "eval"])
def test_axis_not_an_integer(func, axis):
    """A non-integer axis is a TypeError naming axis and its value."""
    a = _valid()
    a["axis"] = axis
    with raises(TypeError, "axis", repr(axis)):
        FUNCS[func](a)


@pytest.mark.parametrize(
    ("shape", "axis"),
    [((0, 4), 0), ((3, 0), 0), ((0, 3), 1), ((4, 0), 1), ((2, 0, 3, 3), 1), ((2, 3, 3, 0), -1)],
    ids=str,
)
@pytest.mark.parametrize("func", FUNCS)
def test_empty_input(func, shape, axis):
    """C == 0 or M == 0 is a ValueError saying x is empty and showing its shape."""
    a = _with_x(_valid(), np.zeros(shape))
    a["axis"] = axis
    c = shape[axis]
    for name in VECTORS:
        a[name] = np.ones(c)
    with raises(ValueError, "x", "empty", str(shape)):
        FUNCS[func](a)


@pytest.mark.parametrize(
    ("shape", "axis"), [((3, 1), 0), ((1, 3), 1), ((1, 3), -1), ((1, 3, 1, 1), 1)], ids=str
)
def test_single_value_per_feature_in_training(shape, axis):
    """M == 1 in batch_norm_train is PyTorch's ValueError, showing x's shape."""
    a = _with_x(_valid(), np.zeros(shape))
    a["axis"] = axis
    a["gamma"] = a["beta"] = None
    with raises(ValueError, "x", "Expected more than 1 value per feature when training", shape):
        _train(a)


# --- per-feature vectors: length and ndim ------------------------------------------------


@pytest.mark.parametrize("bad_shape", [(C + 1,), (C - 1,), (1,), (C, 1), (1, C), ()], ids=str)
@pytest.mark.parametrize(("func", "name"), VECTOR_ARGS)
def test_vector_of_wrong_shape(func, name, bad_shape):
    """gamma/beta/running stats/mean/invstd must be 1-D of length C (ValueError)."""
    a = _valid()
    a[name] = np.ones(bad_shape)
    with raises(ValueError, name, str(bad_shape)):
        FUNCS[func](a)


@pytest.mark.parametrize(("shape", "axis"), [((5, 3), 1), ((2, 3, 4), 1), ((2, 4, 3), -1)])
def test_vector_length_follows_axis(shape, axis):
    """The expected length is x.shape[axis]: gamma of length x.shape[0] is wrong for axis=1."""
    a = _with_x(_valid(), np.ones(shape))
    a["axis"] = axis
    a["gamma"] = np.ones(shape[0])
    a["beta"] = np.zeros(shape[axis])
    with raises(ValueError, "gamma", str((shape[0],))):
        _train(a)


@pytest.mark.parametrize("dy_shape", [(C, M + 1), (M, C), (C, M, 1), (C * M,)], ids=str)
@pytest.mark.parametrize("func", ["backward", "backward_eval"])
def test_dy_shape_differs_from_x(func, dy_shape):
    """dy.shape != x.shape is a ValueError naming dy and its shape."""
    a = _valid()
    a["dy"] = np.ones(dy_shape)
    with raises(ValueError, "dy", str(dy_shape)):
        FUNCS[func](a)


@pytest.mark.parametrize("func", ["backward", "backward_eval"])
def test_dy_dtype_differs_from_x(func):
    """dy of another float dtype than x is a TypeError naming both dtypes."""
    a = _valid()
    a["dy"] = a["dy"].astype(np.float32)
    with raises(TypeError, "dy", "float32", "float64"):
        FUNCS[func](a)


# --- eps -----------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, -1e-5, -np.inf, np.inf, np.nan], ids=repr)
@pytest.mark.parametrize("func", ["train", "eval"])
def test_bad_eps(func, eps):
    """eps <= 0 or not finite is a ValueError naming eps and its value."""
    a = _valid()
    a["eps"] = eps
    with raises(ValueError, "eps", repr(eps)):
        FUNCS[func](a)


@pytest.mark.parametrize("eps", ["1e-5", None, True, 1e-5j], ids=repr)
@pytest.mark.parametrize("func", ["train", "eval"])
def test_eps_not_a_real_number(func, eps):
    """A non-real eps (str, None, bool, complex) is a TypeError naming eps and its value."""
    a = _valid()
    a["eps"] = eps
    with raises(TypeError, "eps", repr(eps)):
        FUNCS[func](a)


@pytest.mark.parametrize("eps", [np.float32(1e-3), np.float64(1e-3), 1], ids=repr)
def test_eps_real_scalars_are_accepted(eps):
    """NumPy float scalars and Python ints are valid eps values."""
    a = _valid()
    a["eps"] = eps
    y = _train(a)[0]
    expected = fastbn.batch_norm_train(a["x"], a["gamma"], a["beta"], eps=float(eps))[0]
    np.testing.assert_array_equal(y, expected)


# --- dtypes ------------------------------------------------------------------------------

BAD_DTYPES = [np.int64, np.int32, np.bool_, np.complex128, np.float16, np.object_]


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("func", "name"), ARRAY_ARGS)
def test_bad_dtype(func, name, dtype):
    """Any non-float32/float64 dtype is a TypeError naming the argument, dtype and astype fix."""
    a = _valid()
    a[name] = a[name].astype(dtype)
    with raises(TypeError, name, np.dtype(dtype).name, f"{name}.astype("):
        FUNCS[func](a)


@pytest.mark.parametrize("func", FUNCS)
def test_bad_dtype_of_a_list(func):
    """A nested list of ints is converted and then rejected like an int64 array."""
    a = _valid()
    a["x"] = [[1, 2], [3, 4], [5, 6]]
    a["dy"] = np.ones((3, 2))
    with raises(TypeError, "x", "int", "astype"):
        FUNCS[func](a)


# --- out -----------------------------------------------------------------------------------


@pytest.mark.parametrize("out_shape", [(C, M + 1), (M, C), (C * M,), (1, C, M)], ids=str)
@pytest.mark.parametrize("func", FUNCS)
def test_out_wrong_shape(func, out_shape):
    """An out of another shape is a ValueError naming out and its shape."""
    a = _valid()
    a["out"] = np.empty(out_shape)
    with raises(ValueError, "out", str(out_shape)):
        FUNCS[func](a)


@pytest.mark.parametrize("out_dtype", [np.float32, np.int64, np.float16])
@pytest.mark.parametrize("func", FUNCS)
def test_out_wrong_dtype(func, out_dtype):
    """An out of another dtype than x's is a TypeError naming out and its dtype."""
    a = _valid()
    a["out"] = np.empty((C, M), out_dtype)
    with raises(TypeError, "out", np.dtype(out_dtype).name):
        FUNCS[func](a)


@pytest.mark.parametrize("func", FUNCS)
def test_out_wrong_dtype_float64_into_float32(func):
    """A float64 out for float32 x is a TypeError too (no silent casting)."""
    a = _valid(np.float32)
    a["out"] = np.empty((C, M))
    with raises(TypeError, "out", "float64"):
        FUNCS[func](a)


@pytest.mark.parametrize("func", FUNCS)
def test_out_read_only(func):
    """A read-only out is a ValueError naming out."""
    a = _valid()
    a["out"] = np.empty((C, M))
    a["out"].flags.writeable = False
    with raises(ValueError, "out", "read-only"):
        FUNCS[func](a)


@pytest.mark.parametrize("out", [[[0.0] * M] * C, (1.0,), 3.0], ids=["list", "tuple", "float"])
@pytest.mark.parametrize("func", FUNCS)
def test_out_not_an_ndarray(func, out):
    """out must be an ndarray (the result is written into it): TypeError naming out."""
    a = _valid()
    a["out"] = out
    with raises(TypeError, "out", type(out).__name__):
        FUNCS[func](a)


@pytest.mark.parametrize("func", ["train", "backward", "backward_eval"])
def test_out_is_x_outside_eval(func):
    """out=x is allowed only in batch_norm_eval: elsewhere a ValueError naming out and x."""
    a = _valid()
    a["out"] = a["x"]
    with raises(ValueError, "out", "x") as info:
        FUNCS[func](a)
    # Nothing else may be passed as out here: no "only ... itself" (the backward's dy).
    assert "x itself" not in str(info.value)
    np.testing.assert_array_equal(a["x"], _valid()["x"])


@pytest.mark.parametrize("func", ["backward", "backward_eval"])
def test_out_partially_overlapping_dy(func):
    """out=dy is allowed in the backward, but a partial overlap with dy is a ValueError."""
    a = _valid()
    buf = np.zeros((C + 1, M))
    buf[:C] = a["dy"]
    a["dy"] = buf[:C]
    a["out"] = buf[1:]
    with raises(ValueError, "out", "dy", "(only dy itself may be passed as out)"):
        FUNCS[func](a)


@pytest.mark.parametrize("shift", ["rows", "columns", "strided"])
def test_out_partially_overlapping_x_in_eval(shift):
    """In eval only out=x itself is allowed: a shifted or strided view of x's memory is not."""
    a = _valid()
    buf = np.zeros((C + 1, 2 * M + 1))
    a["x"] = buf[:C, :M]
    if shift == "rows":
        a["out"] = buf[1:, :M]
    elif shift == "columns":
        a["out"] = buf[:C, 1 : M + 1]
    else:
        a["out"] = buf[:C, : 2 * M : 2]
    with raises(ValueError, "out", "x", "(only x itself may be passed as out)"):
        _eval(a)


@pytest.mark.parametrize(("func", "name"), [*VECTOR_ARGS, ("backward", "x"), ("eval", "x")])
def test_out_overlapping_another_input(func, name):
    """out sharing memory with any other input (here a vector in out's memory) is a ValueError."""
    a = _valid()
    out = np.empty((C, M))
    if name == "x":
        out[...] = a["x"]
        a["x"] = out[:, ::-1] if func == "eval" else out
    else:
        out[:, 0] = a[name]
        a[name] = out[:, 0]
    a["out"] = out
    with raises(ValueError, "out", name):
        FUNCS[func](a)
