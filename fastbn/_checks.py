"""Validation shared by every entry point: each error names its argument.

Array arguments may be anything np.asarray accepts (lists included), as in
NumPy itself; `out` must be an ndarray, since the result is written into it.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from collections.abc import Iterable
from typing import Any, SupportsIndex, overload

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

FLOAT32 = np.dtype(np.float32)
FLOAT64 = np.dtype(np.float64)
FLOAT_DTYPES = (FLOAT32, FLOAT64)


def float_array(name: str, a: ArrayLike) -> NDArray[np.floating]:
    """``a`` as an ndarray of float32 or float64, or TypeError naming the fix."""
    if not isinstance(a, np.ndarray):
        a = np.asarray(a)
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {a.dtype}; fastbn computes in float32 or float64: "
            f"pass {name}.astype(np.float32) (or np.float64)"
        )
    return a


def data(name: str, x: ArrayLike) -> NDArray[np.floating]:
    """A float array of ndim >= 2 (features and examples)."""
    x = float_array(name, x)
    if x.ndim < 2:
        raise ValueError(
            f"{name} has shape {x.shape}, but batch norm needs at least 2 dimensions "
            f"(features and examples): for one feature with many examples pass "
            f"{name}[None, :], for many features of one example {name}[:, None] "
            f"(with axis=0)"
        )
    return x


def feature_axis(axis: SupportsIndex, x: NDArray[np.floating]) -> int:
    """``axis`` as an int in [0, x.ndim)."""
    try:
        a = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an int, got {axis!r}") from None
    if not -x.ndim <= a < x.ndim:
        raise ValueError(
            f"axis {a} is out of range for x of shape {x.shape} ({x.ndim} dimensions)"
        )
    return a % x.ndim


def counts(x: NDArray[np.floating], axis: int, training: bool) -> tuple[int, int]:
    """(C, M): features and values per feature, rejecting empty input and M == 1 in training."""
    n_features = x.shape[axis]
    if x.size == 0:
        raise ValueError(f"x is empty (shape {x.shape}): batch norm needs at least one value")
    per_feature = x.size // n_features
    if training and per_feature == 1:
        raise ValueError(
            f"Expected more than 1 value per feature when training, got x of shape {x.shape} "
            f"with axis={axis} ({n_features} features of 1 value each)"
        )
    return n_features, per_feature


def positive_eps(eps: float) -> float:
    """eps as a finite float > 0."""
    # The common case first: isinstance against numbers.Real is an ABC check,
    # slow next to the rest of a small call.
    if type(eps) is float and 0.0 < eps < math.inf:
        return eps
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {eps!r}")
    value = float(eps)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"eps must be finite and > 0, got {eps!r}")
    return value


class _ReadOnly:
    """Exposes read-only memory as writable to the kernels, which never write it.

    Numba compiles read-only arrays as a type of their own; this alias keeps
    one compiled signature per dtype.
    """

    def __init__(self, a: NDArray[np.floating]) -> None:
        self.base = a
        interface = dict(a.__array_interface__)
        interface["data"] = (interface["data"][0], False)
        self.__array_interface__ = interface


def kernel_input(a: NDArray[np.floating]) -> NDArray[np.floating]:
    """``a`` as the kernels take it: writable (they only read it)."""
    return a if a.flags.writeable else np.asarray(_ReadOnly(a))


@functools.lru_cache(maxsize=64)
def _constant(value: float, n: int, dtype: np.dtype[Any]) -> NDArray[np.floating]:
    # Shared between calls: only the kernels see it, and they never write it.
    return np.full(n, value, dtype)


def vector_dtype(x: NDArray[np.floating], *vectors: ArrayLike | None) -> np.dtype[Any]:
    """The dtype per_feature gives a call's parameters and running statistics.

    x's dtype when every one given is an ndarray of it (the common case, no
    conversion at all), else float64 (exact for float32 values, and float64
    values stay as they are: running variances of float32 data may be
    beyond float32's range).
    """
    dtype = x.dtype
    for v in vectors:
        if v is not None and not (isinstance(v, np.ndarray) and v.dtype is dtype):
            return FLOAT64
    return dtype


@overload
def per_feature(
    name: str,
    v: ArrayLike | None,
    n_features: int,
    x: NDArray[np.floating],
    axis: int,
    default: float,
    dtype: np.dtype[Any] = ...,
) -> NDArray[np.floating]: ...
@overload
def per_feature(
    name: str,
    v: ArrayLike,
    n_features: int,
    x: NDArray[np.floating],
    axis: int,
    default: None = None,
    dtype: np.dtype[Any] = ...,
) -> NDArray[np.floating]: ...
@overload
def per_feature(
    name: str,
    v: ArrayLike | None,
    n_features: int,
    x: NDArray[np.floating],
    axis: int,
    default: None = None,
    dtype: np.dtype[Any] = ...,
) -> NDArray[np.floating] | None: ...
def per_feature(
    name: str,
    v: ArrayLike | None,
    n_features: int,
    x: NDArray[np.floating],
    axis: int,
    default: float | None = None,
    dtype: np.dtype[Any] = FLOAT64,
) -> NDArray[np.floating] | None:
    """A length-C float vector, contiguous, in dtype for the kernels (``default`` if None).

    The kernels compute with it in float64 whatever its dtype (see vector_dtype).
    """
    if v is None:
        return None if default is None else _constant(float(default), n_features, dtype)
    # float_array's checks, inline for an ndarray: the call would cost more than they do.
    if not (isinstance(v, np.ndarray) and v.dtype in FLOAT_DTYPES):
        v = float_array(name, v)
    if v.shape != (n_features,):
        raise ValueError(
            f"{name} has shape {v.shape}, expected ({n_features},): one value per feature "
            f"of x with shape {x.shape} and axis={axis}"
        )
    if v.dtype is dtype:  # the common case, inline: a call costs more than the test
        flags = v.flags
        if flags.c_contiguous and flags.writeable:
            return v
    return kernel_vector(v, n_features, dtype, 0.0)


def kernel_vector(
    v: NDArray[np.floating] | None, n_features: int, dtype: np.dtype[Any], default: float
) -> NDArray[np.floating]:
    """A float vector of length C (or None: ``default``s) as the kernels take it, in dtype.

    The conversion `per_feature` ends with, for callers that checked the
    length and the dtype's kind themselves (the PyTorch bridge).
    """
    if v is None:
        return _constant(default, n_features, dtype)
    # The identity test first: comparing unequal dtypes costs more.
    if v.dtype is not dtype and v.dtype != dtype:
        return v.astype(dtype)  # a new array: contiguous and writable
    flags = v.flags
    if flags.c_contiguous and flags.writeable:
        return v
    return kernel_input(np.ascontiguousarray(v))


def gradient(dy: ArrayLike, x: NDArray[np.floating]) -> NDArray[np.floating]:
    """dy as a float array of x's shape and dtype (an upstream gradient)."""
    dy = float_array("dy", dy)
    same_shape("dy", dy, x)
    if dy.dtype != x.dtype:
        raise TypeError(f"dy has dtype {dy.dtype}, but x has dtype {x.dtype}: they must match")
    return dy


def same_shape(name: str, a: NDArray[np.floating], x: NDArray[np.floating]) -> None:
    """``a`` must have x's shape (dy against x)."""
    if a.shape != x.shape:
        raise ValueError(f"{name} has shape {a.shape}, but x has shape {x.shape}: they must match")


def _same_view(a: NDArray[Any], b: NDArray[Any]) -> bool:
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.shape == b.shape
        and a.strides == b.strides
    )


def output(
    out: object,
    x: NDArray[np.floating],
    inputs: Iterable[tuple[str, ArrayLike | None]],
    may_be: tuple[str, NDArray[np.floating]] | None = None,
) -> NDArray[np.floating]:
    """Check ``out``: x's shape and dtype, writable, overlapping no input but ``may_be`` itself."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"out has shape {out.shape}, but x has shape {x.shape}: they must match")
    if out.dtype != x.dtype:
        raise TypeError(f"out has dtype {out.dtype}, but x has dtype {x.dtype}: they must match")
    if not out.flags.writeable:
        raise ValueError(
            f"out (shape {out.shape}, dtype {out.dtype}) is read-only: pass a writable array"
        )
    for name, a in inputs:
        if a is None or not np.may_share_memory(out, a):
            continue
        if may_be is not None and a is may_be[1] and _same_view(out, may_be[1]):
            continue
        if np.shares_memory(out, a):
            allowed = f" (only {may_be[0]} itself may be passed as out)" if may_be else ""
            raise ValueError(f"out overlaps the input {name}{allowed}")
    return out


# ------------------------------------------------------ the layers' arguments


def is_int(value: object) -> bool:
    """Whether value is an integer (a NumPy one included), and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_real(value: object) -> bool:
    """Whether value is a real number (a NumPy one included), and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def real(name: str, value: object) -> float:
    """value as a float, or TypeError naming it."""
    if not is_real(value):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def positive_int(name: str, value: object) -> int:
    """value as a positive int, or TypeError / ValueError naming it."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value <= 0:  # type: ignore[operator]
        raise ValueError(f"{name} must be positive, got {value}")
    return int(value)  # type: ignore[call-overload]


def layer_dtype(dtype: DTypeLike) -> np.dtype[Any]:
    """dtype as np.dtype float32 or float64, or TypeError: a layer's dtype."""
    try:
        # np.dtype(None) would be float64: None is no choice of dtype here.
        resolved = None if dtype is None else np.dtype(dtype)
    except TypeError:
        resolved = None
    # Not only `not in`: None == np.dtype(np.float64) is True.
    if resolved is None or resolved not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be np.float32 or np.float64, got {dtype!r}")
    return resolved


def layer_array(array: ArrayLike, name: str, dtype: np.dtype[Any]) -> NDArray[Any]:
    """array as an ndarray of a layer's dtype, or TypeError naming the fix."""
    array = np.asarray(array)
    if array.dtype != dtype:
        other_layer = (
            f", or build the layer with dtype=np.{array.dtype}"
            if array.dtype in FLOAT_DTYPES
            else ""
        )
        raise TypeError(
            f"{name} has dtype {array.dtype} but the layer's dtype is {dtype}: "
            f"convert it with {name}.astype(np.{dtype}){other_layer}"
        )
    return array
