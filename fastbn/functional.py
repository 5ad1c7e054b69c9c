"""The functional API: validate, view the data as (P, C, Q), dispatch to a kernel family.

Every input is viewed as (P, C, Q): C features, each reduced over P x Q
values. For C-contiguous data the view is free, and a Fortran-ordered array
is the C-contiguous transpose of another, so it is served without a copy
too. Any other memory order (a sliced or permuted view) is copied once into
a C-contiguous buffer, and results are written back into the caller's
layout. Long runs (Q >= ROWS_MIN_RUN) go to the rows family, the rest
(batch-first, channels-last) to the columns family.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, SupportsIndex, TypeAlias, TypeVar, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

from fastbn import _checks, _threading
from fastbn._threading import kernel_guard
from fastbn.kernels import columns, rows
from fastbn.kernels._twins import serial_twin

__all__ = [
    "batch_norm_backward",
    "batch_norm_eval",
    "batch_norm_relu_backward",
    "batch_norm_relu_eval",
    "batch_norm_relu_train",
    "batch_norm_train",
]

PARALLEL_MIN = 1 << 15  # values below which one thread beats a parallel launch
ROWS_MIN_RUN = 16  # shorter runs are folded into the columns family's groups
MAX_PLANS = 256  # plans kept; past that the cache starts over

# The dtype of an ndarray x, in which its results come back (float32 or float64).
_Float = TypeVar("_Float", bound=np.floating)
# (y, mean, invstd) of a training forward and (dx, dgamma, dbeta) of a backward, in float32
# or float64; for an ndarray x, the first overload of each function says which.
_Forward: TypeAlias = tuple[NDArray[np.floating], NDArray[np.float64], NDArray[np.float64]]
_Gradients: TypeAlias = tuple[NDArray[np.floating], NDArray[np.floating], NDArray[np.floating]]


@dataclasses.dataclass(frozen=True, slots=True)
class _Plan:
    """How arrays of one dtype, shape, strides and feature axis go to the kernels.

    Making a plan (`of`) checks x and the axis (`_checks.data`, `feature_axis`,
    `counts`), which depend on nothing but that key, nor does the layout; so
    a plan is made once per key and reused (see `_planned`), which spares
    small calls most of their Python overhead. A plan is a value: copies
    compare equal.

    Attributes
    ----------
    axis, n_features : int
        The feature axis in [0, ndim) and C.
    transposed : bool
        Whether the C-contiguous form is the transpose (Fortran-ordered x).
    copied : bool
        Whether x is in neither order, so that the kernels take a copy.
    shape : tuple of int
        The shape of the C-contiguous form.
    pcq : tuple of int
        (P, C, Q) of the C-contiguous form.
    lead_axis : bool
        Whether (P, C, Q) is the C-contiguous shape with a leading axis of 1,
        as for features-first (n, m) data.
    rows, serial : bool
        The kernel family (rows or columns) and one thread or many.
    columns_args : tuple of int
        (C, Q, W), the arguments the columns family takes after the data.
    """

    axis: int
    n_features: int
    transposed: bool
    copied: bool
    shape: tuple[int, ...]
    pcq: tuple[int, ...]
    lead_axis: bool
    rows: bool
    serial: bool
    columns_args: tuple[int, int, int]

    @classmethod
    def of(cls, x: NDArray[np.floating], axis: SupportsIndex, training: bool) -> _Plan:
        """The plan of x (checked by `_checks.data`) and axis, checking them."""
        axis = _checks.feature_axis(axis, x)
        n_features, _ = _checks.counts(x, axis, training)
        flags = x.flags
        transposed = not flags.c_contiguous and flags.f_contiguous
        copied = not (flags.c_contiguous or flags.f_contiguous)
        shape, c_axis = (x.shape[::-1], x.ndim - 1 - axis) if transposed else (x.shape, axis)
        if len(shape) == 2:  # the common case, without slicing and multiplying tuples
            pcq = (1, *shape) if c_axis == 0 else (*shape, 1)
        else:
            pcq = (math.prod(shape[:c_axis]), shape[c_axis], math.prod(shape[c_axis + 1 :]))
        run = pcq[2]
        return cls(
            axis=axis,
            n_features=n_features,
            transposed=transposed,
            copied=copied,
            shape=shape,
            pcq=pcq,
            lead_axis=pcq == (1, *shape),
            rows=run >= ROWS_MIN_RUN,
            serial=x.size < PARALLEL_MIN,
            columns_args=(n_features, run, columns.group_width(n_features, run)),
        )

    def kernel_x(self, x: NDArray[np.floating]) -> NDArray[np.floating]:
        """x (an array of the plan's key) as the kernels take it."""
        if self.transposed:
            x = x.T
        elif self.copied:
            x = np.ascontiguousarray(x)
        x = self.view(x)
        return x if x.flags.writeable else _checks.kernel_input(x)

    def kernel_input(self, a: NDArray[np.floating]) -> NDArray[np.floating]:
        """Another array of the caller's shape, in any memory order, as the kernels take it."""
        a = np.ascontiguousarray(a.T if self.transposed else a)
        return _checks.kernel_input(self.view(a))

    def view(self, a: NDArray[np.floating]) -> NDArray[np.floating]:
        """A C-contiguous array of `shape` as the kernels take it: (P, C, Q) or flat."""
        # Each view costs a good part of a small call: a[None] and ravel (a view
        # of a C-contiguous array) take half the time of reshape.
        if not self.rows:
            return a.ravel()
        return a[None] if self.lead_axis else a.reshape(self.pcq)

    def output(
        self, out: NDArray[np.floating] | None, dtype: np.dtype[Any]
    ) -> tuple[NDArray[np.floating], bool]:
        """The C-contiguous buffer the kernel writes, and whether it must be copied into out.

        That is out itself (or its transpose) when its layout fits, else a new array.
        """
        return output_buffer(out, dtype, self.shape, self.transposed)

    def result(
        self, buffer: NDArray[np.floating], out: NDArray[np.floating] | None, copy_back: bool
    ) -> NDArray[np.floating]:
        """The result in the caller's layout: out (copied into if need be) or the buffer."""
        return in_caller_layout(buffer, out, copy_back, self.transposed)


def output_buffer(
    out: NDArray[np.floating] | None,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
    transposed: bool,
) -> tuple[NDArray[np.floating], bool]:
    """The C-contiguous buffer of shape a kernel writes, and whether it must be copied into out.

    That is out itself (or its transpose, for a Fortran-ordered caller) when
    its layout fits, else a new array.
    """
    if out is not None:
        target = out.T if transposed else out
        if target.flags.c_contiguous:
            return target, False
    return np.empty(shape, dtype), out is not None


def in_caller_layout(
    buffer: NDArray[np.floating],
    out: NDArray[np.floating] | None,
    copy_back: bool,
    transposed: bool,
) -> NDArray[np.floating]:
    """A result in the caller's layout: out (copied into if need be) or the buffer."""
    if out is None:
        return buffer.T if transposed else buffer
    if copy_back:
        out[...] = buffer.T if transposed else buffer
    return out


# (dtype, shape, strides, axis, training) of an ndarray x and an int axis.
_PlanKey: TypeAlias = tuple[np.dtype[Any], tuple[int, ...], tuple[int, ...], int, bool]
_PLANS: dict[_PlanKey, _Plan] = {}


def _planned(
    x: ArrayLike, axis: SupportsIndex, training: bool
) -> tuple[NDArray[np.floating], _Plan]:
    """x checked as data (`_checks.data`) and its `_Plan` for axis and training.

    Raises the errors of x, the axis and the counts of values. ``training``
    is part of the key because M == 1 is an error there only.
    """
    key: _PlanKey | None = None
    # The common case, an ndarray and an int axis, looks its plan up before
    # any check: a key is stored only once its checks have passed.
    if isinstance(x, np.ndarray) and type(axis) is int:
        key = (x.dtype, x.shape, x.strides, axis, training)
        plan = _PLANS.get(key)
        if plan is not None:
            return x, plan
    x = _checks.data("x", x)
    plan = _Plan.of(x, axis, training)
    if key is not None:
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    return x, plan


def _launch(serial: bool, kernel: Callable[..., Any], *args: Any) -> Any:
    """kernel(*args), or its one-thread twin; a parallel launch under `kernel_guard`.

    The twin also in a process forked after the parent's thread pool started
    (`_threading.serial_only`), which cannot launch parallel regions.
    """
    # No parallel region: the guard would only cost. (Small calls stop at
    # `serial`; the flag costs the parallel ones a module attribute read.)
    if serial or _threading.serial_only:
        return serial_twin(kernel)(*args)
    with kernel_guard(serial):
        return kernel(*args)


def _cached_plan(x: object, axis: object, training: bool) -> _Plan | None:
    """The `_Plan` stored for x and axis (so they passed `_planned`'s checks), or None."""
    if isinstance(x, np.ndarray) and type(axis) is int:
        return _PLANS.get((x.dtype, x.shape, x.strides, axis, training))
    return None


@overload
def batch_norm_train(
    x: NDArray[_Float],
    gamma: ArrayLike | None = ...,
    beta: ArrayLike | None = ...,
    *,
    axis: SupportsIndex = ...,
    eps: float = ...,
    out: NDArray[_Float] | None = ...,
) -> tuple[NDArray[_Float], NDArray[np.float64], NDArray[np.float64]]: ...
@overload
def batch_norm_train(
    x: ArrayLike,
    gamma: ArrayLike | None = ...,
    beta: ArrayLike | None = ...,
    *,
    axis: SupportsIndex = ...,
    eps: float = ...,
    out: NDArray[np.floating] | None = ...,
) -> _Forward: ...
def batch_norm_train(
    x: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    axis: SupportsIndex = 0,
    eps: float = 1e-5,
    out: NDArray[np.floating] | None = None,
) -> _Forward:
    """Normalize with the statistics of the batch (training mode).

    Parameters
    ----------
    x : ndarray, float32 or float64, ndim >= 2
        Data; ``axis`` is the feature axis, every other axis is reduced.
    gamma, beta : ndarray of shape (C,), optional
        Scale (default 1) and shift (default 0).
    axis : int
        The feature axis: 0 for the notes' (n, m) layout, 1 or -1 for
        batch-first (m, n), 1 for (N, C, H, W), -1 for (N, H, W, C).
    eps : float
        Added to the variance, finite and > 0.
    out : ndarray, optional
        Written with y; x's shape and dtype, overlapping no input.

    Returns
    -------
    y : ndarray
        ``gamma * (x - mean) * invstd + beta`` in x's dtype.
    mean, invstd : ndarray of shape (C,), float64
        The batch mean and ``1 / sqrt(var + eps)`` with the biased variance.
    """
    x, plan = _planned(x, axis, training=True)
    return _train(x, plan, gamma, beta, eps, out)


@overload
def batch_norm_relu_train(
    x: NDArray[_Float],
    gamma: ArrayLike | None = ...,
    beta: ArrayLike | None = ...,
    *,
    axis: SupportsIndex = ...,
    eps: float = ...,
    out: NDArray[_Float] | None = ...,
) -> tuple[NDArray[_Float], NDArray[np.float64], NDArray[np.float64]]: ...
@overload
def batch_norm_relu_train(
    x: ArrayLike,
    gamma: ArrayLike | None = ...,
    beta: ArrayLike | None = ...,
    *,
    axis: SupportsIndex = ...,
    eps: float = ...,
    out: NDArray[np.floating] | None = ...,
) -> _Forward: ...
def batch_norm_relu_train(
    x: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    axis: SupportsIndex = 0,
    eps: float = 1e-5,
    out: NDArray[np.floating] | None = None,
) -> _Forward:
    """`batch_norm_train` followed by a ReLU, in the same passes over memory.

    Parameters and errors are those of `batch_norm_train`.

    Returns
    -------
    y : ndarray
        ``max(gamma * (x - mean) * invstd + beta, 0)`` in x's dtype (NaN stays NaN).
    mean, invstd : ndarray of shape (C,), float64
        The batch statistics, for `batch_norm_relu_backward`.
    """
    x, plan = _planned(x, axis, training=True)
    return _train(x, plan, gamma, beta, eps, out, relu=True)


def _train(
    x: NDArray[np.floating],
    plan: _Plan,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    eps: float,
    out: NDArray[np.floating] | None,
    relu: bool = False,
) -> _Forward:
    """`batch_norm_train` (with relu: `batch_norm_relu_train`) once x and the axis are planned."""
    n_features, axis = plan.n_features, plan.axis
    dtype = _checks.vector_dtype(x, gamma, beta)
    gamma_k = _checks.per_feature("gamma", gamma, n_features, x, axis, 1.0, dtype)
    beta_k = _checks.per_feature("beta", beta, n_features, x, axis, 0.0, dtype)
    eps = _checks.positive_eps(eps)
    if out is not None:
        _checks.output(out, x, (("x", x), ("gamma", gamma), ("beta", beta)))
    buffer, copy_back = plan.output(out, x.dtype)
    x_k, y_k = plan.kernel_x(x), plan.view(buffer)
    if plan.rows:
        kernel = rows.train_forward_relu if relu else rows.train_forward
        mean, invstd = _launch(plan.serial, kernel, x_k, gamma_k, beta_k, eps, y_k)
    else:
        kernel = columns.train_forward_relu if relu else columns.train_forward
        mean, invstd = _launch(
            plan.serial, kernel, x_k, *plan.columns_args, gamma_k, beta_k, eps, y_k
        )
    return plan.result(buffer, out, copy_back), mean, invstd


@overload
def batch_norm_eval(
    x: NDArray[_Float],
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None = ...,
    beta: ArrayLike | None = ...,
    *,
    axis: SupportsIndex = ...,
    eps: float = ...,
    out: NDArray[_Float] | None = ...,
) -> NDArray[_Float]: ...
@overload
def batch_norm_eval(
    x: ArrayLike,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None = ...,
    beta: ArrayLike | None = ...,
    *,
    axis: SupportsIndex = ...,
    eps: float = ...,
    out: NDArray[np.floating] | None = ...,
) -> NDArray[np.floating]: ...
def batch_norm_eval(
    x: ArrayLike,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    axis: SupportsIndex = 0,
    eps: float = 1e-5,
    out: NDArray[np.floating] | None = None,
) -> NDArray[np.floating]:
    """Normalize with running statistics (inference mode).

    Parameters
    ----------
    x : ndarray, float32 or float64, ndim >= 2
        Data; ``axis`` is the feature axis.
    running_mean, running_var : ndarray of shape (C,)
        The statistics to normalize with.
    gamma, beta : ndarray of shape (C,), optional
        Scale (default 1) and shift (default 0).
    axis : int
        The feature axis (see `batch_norm_train`).
    eps : float
        Added to the variance, finite and > 0.
    out : ndarray, optional
        Written with y; may be ``x`` itself (in place), may overlap no other input.

    Returns
    -------
    y : ndarray
        ``gamma * (x - running_mean) / sqrt(running_var + eps) + beta`` in x's dtype.
    """
    x, plan = _planned(x, axis, training=False)
    return _eval(x, plan, running_mean, running_var, gamma, beta, eps, out)


@overload
def batch_norm_relu_eval(
    x: NDArray[_Float],
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None = ...,
    beta: ArrayLike | None = ...,
    *,
    axis: SupportsIndex = ...,
    eps: float = ...,
    out: NDArray[_Float] | None = ...,
) -> NDArray[_Float]: ...
@overload
def batch_norm_relu_eval(
    x: ArrayLike,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None = ...,
    beta: ArrayLike | None = ...,
    *,
    axis: SupportsIndex = ...,
    eps: float = ...,
    out: NDArray[np.floating] | None = ...,
) -> NDArray[np.floating]: ...
def batch_norm_relu_eval(
    x: ArrayLike,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    axis: SupportsIndex = 0,
    eps: float = 1e-5,
    out: NDArray[np.floating] | None = None,
) -> NDArray[np.floating]:
    """`batch_norm_eval` followed by a ReLU, in one pass over memory.

    Parameters and errors are those of `batch_norm_eval`.

    Returns
    -------
    y : ndarray
        ``max(gamma * (x - running_mean) / sqrt(running_var + eps) + beta, 0)``.
    """
    x, plan = _planned(x, axis, training=False)
    return _eval(x, plan, running_mean, running_var, gamma, beta, eps, out, relu=True)


def _eval(
    x: NDArray[np.floating],
    plan: _Plan,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    eps: float,
    out: NDArray[np.floating] | None,
    relu: bool = False,
) -> NDArray[np.floating]:
    """`batch_norm_eval` (or with relu, `batch_norm_relu_eval`) once x and the axis are planned."""
    n_features, axis = plan.n_features, plan.axis
    dtype = _checks.vector_dtype(x, running_mean, running_var, gamma, beta)
    mean_k = _checks.per_feature("running_mean", running_mean, n_features, x, axis, None, dtype)
    var_k = _checks.per_feature("running_var", running_var, n_features, x, axis, None, dtype)
    gamma_k = _checks.per_feature("gamma", gamma, n_features, x, axis, 1.0, dtype)
    beta_k = _checks.per_feature("beta", beta, n_features, x, axis, 0.0, dtype)
    eps = _checks.positive_eps(eps)
    if out is not None:
        inputs = (
            ("x", x),
            ("running_mean", running_mean),
            ("running_var", running_var),
            ("gamma", gamma),
            ("beta", beta),
        )
        _checks.output(out, x, inputs, may_be=("x", x))
    buffer, copy_back = plan.output(out, x.dtype)
    x_k, y_k = plan.kernel_x(x), plan.view(buffer)
    if plan.rows:
        kernel = rows.eval_forward_relu if relu else rows.eval_forward
        _launch(plan.serial, kernel, x_k, mean_k, var_k, gamma_k, beta_k, eps, y_k)
    else:
        _launch(
            plan.serial,
            columns.eval_forward_relu if relu else columns.eval_forward,
            x_k,
            *plan.columns_args,
            mean_k,
            var_k,
            gamma_k,
            beta_k,
            eps,
            y_k,
        )
    return plan.result(buffer, out, copy_back)


@overload
def batch_norm_backward(
    dy: NDArray[_Float],
    x: NDArray[_Float],
    mean: ArrayLike,
    invstd: ArrayLike,
    gamma: ArrayLike | None = ...,
    *,
    axis: SupportsIndex = ...,
    training: bool = ...,
    out: NDArray[_Float] | None = ...,
) -> tuple[NDArray[_Float], NDArray[_Float], NDArray[_Float]]: ...
@overload
def batch_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    mean: ArrayLike,
    invstd: ArrayLike,
    gamma: ArrayLike | None = ...,
    *,
    axis: SupportsIndex = ...,
    training: bool = ...,
    out: NDArray[np.floating] | None = ...,
) -> _Gradients: ...
def batch_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    mean: ArrayLike,
    invstd: ArrayLike,
    gamma: ArrayLike | None = None,
    *,
    axis: SupportsIndex = 0,
    training: bool = True,
    out: NDArray[np.floating] | None = None,
) -> _Gradients:
    """Gradients of y = gamma * (x - mean) * invstd + beta.

    Parameters
    ----------
    dy : ndarray
        Gradient of the loss with respect to y; x's shape and dtype.
    x : ndarray, float32 or float64, ndim >= 2
        The forward's input (x_hat is recomputed from it, not stored).
    mean, invstd : ndarray of shape (C,)
        From `batch_norm_train`; for ``training=False`` the running mean and
        ``1 / sqrt(running_var + eps)``.
    gamma : ndarray of shape (C,), optional
        The forward's scale (default 1).
    axis : int
        The feature axis (see `batch_norm_train`).
    training : bool
        True when the forward used batch statistics (they depend on x), False
        when it used running statistics (constants).
    out : ndarray, optional
        Written with dx; may be ``dy`` itself, may overlap no other input.

    Returns
    -------
    dx : ndarray
        Gradient with respect to x, in x's dtype.
    dgamma, dbeta : ndarray of shape (C,)
        ``sum(dy * x_hat)`` and ``sum(dy)`` over each feature, in x's dtype.
    """
    x = _checks.data("x", x)
    dx, dgamma, dbeta = _backward(dy, x, mean, invstd, gamma, axis, training, out)
    assert dx is not None  # input_grad: dx is computed
    return dx, dgamma.astype(dx.dtype, copy=False), dbeta.astype(dx.dtype, copy=False)


@overload
def batch_norm_relu_backward(
    dy: NDArray[_Float],
    x: NDArray[_Float],
    mean: ArrayLike,
    invstd: ArrayLike,
    gamma: ArrayLike | None = ...,
    beta: ArrayLike | None = ...,
    *,
    axis: SupportsIndex = ...,
    training: bool = ...,
    out: NDArray[_Float] | None = ...,
) -> tuple[NDArray[_Float], NDArray[_Float], NDArray[_Float]]: ...
@overload
def batch_norm_relu_backward(
    dy: ArrayLike,
    x: ArrayLike,
    mean: ArrayLike,
    invstd: ArrayLike,
    gamma: ArrayLike | None = ...,
    beta: ArrayLike | None = ...,
    *,
    axis: SupportsIndex = ...,
    training: bool = ...,
    out: NDArray[np.floating] | None = ...,
) -> _Gradients: ...
def batch_norm_relu_backward(
    dy: ArrayLike,
    x: ArrayLike,
    mean: ArrayLike,
    invstd: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    axis: SupportsIndex = 0,
    training: bool = True,
    out: NDArray[np.floating] | None = None,
) -> _Gradients:
    """Gradients of y = max(gamma * (x - mean) * invstd + beta, 0).

    The ReLU's mask is recomputed from x, the statistics, gamma and beta
    exactly as the forward computed y (no mask is stored): dy passes where
    y > 0, and not where y == 0 (ReLU's subgradient there is 0).

    Parameters
    ----------
    dy, x, mean, invstd, gamma, axis, training, out
        As for `batch_norm_backward`: mean and invstd from
        `batch_norm_relu_train`, or for ``training=False`` the running mean
        and ``1 / sqrt(running_var + eps)``.
    beta : ndarray of shape (C,), optional
        The forward's shift (default 0).

    Returns
    -------
    dx : ndarray
        Gradient with respect to x, in x's dtype.
    dgamma, dbeta : ndarray of shape (C,)
        ``sum(dz * x_hat)`` and ``sum(dz)``, dz being dy where y > 0 and 0
        elsewhere, in x's dtype.
    """
    x = _checks.data("x", x)
    dx, dgamma, dbeta = _backward(
        dy, x, mean, invstd, gamma, axis, training, out, relu=True, beta=beta
    )
    assert dx is not None  # input_grad: dx is computed
    return dx, dgamma.astype(dx.dtype, copy=False), dbeta.astype(dx.dtype, copy=False)


def _backward(
    dy: ArrayLike,
    x: NDArray[np.floating],
    mean: ArrayLike,
    invstd: ArrayLike,
    gamma: ArrayLike | None,
    axis: SupportsIndex,
    training: bool,
    out: NDArray[np.floating] | None,
    forward_plan: _Plan | None = None,
    input_grad: bool = True,
    relu: bool = False,
    beta: ArrayLike | None = None,
) -> tuple[NDArray[np.floating] | None, NDArray[np.float64], NDArray[np.float64]]:
    """`batch_norm_backward` with dgamma and dbeta in float64, as the kernels return them.

    x is checked as data (`_checks.data`) by the caller. The layer rounds
    dgamma and dbeta into its own arrays, with no conversion in between.
    It also passes ``forward_plan``, the plan of the forward that made mean
    and invstd from this x: then x is checked and planned already, and mean
    and invstd are writable C-contiguous float64 vectors of length C, so
    none of them is checked again. With ``input_grad=False`` dx is not
    computed (None is returned in its place): one pass over dy and x less.
    With ``relu=True`` it is `batch_norm_relu_backward`'s, beta the
    forward's shift (dx is then always computed).
    """
    mean64: ArrayLike
    invstd64: ArrayLike
    dy = _checks.float_array("dy", dy)
    _checks.same_shape("dy", dy, x)
    if dy.dtype != x.dtype:
        raise TypeError(f"dy has dtype {dy.dtype}, but x has dtype {x.dtype}: they must match")
    if forward_plan is None:
        x, plan = _planned(x, axis, training=False)
        mean64 = _checks.per_feature("mean", mean, plan.n_features, x, plan.axis)
        invstd64 = _checks.per_feature("invstd", invstd, plan.n_features, x, plan.axis)
    else:
        plan, mean64, invstd64 = forward_plan, mean, invstd
    gamma_k = _checks.per_feature(
        "gamma", gamma, plan.n_features, x, plan.axis, 1.0, _checks.vector_dtype(x, gamma)
    )
    inputs: tuple[tuple[str, ArrayLike | None], ...] = (
        ("dy", dy),
        ("x", x),
        ("mean", mean),
        ("invstd", invstd),
        ("gamma", gamma),
    )
    if relu:
        beta_k = _checks.per_feature(
            "beta", beta, plan.n_features, x, plan.axis, 0.0, _checks.vector_dtype(x, beta)
        )
        inputs += (("beta", beta),)
    if out is not None:
        _checks.output(out, x, inputs, may_be=("dy", dy))
    dy_k, x_k = plan.kernel_input(dy), plan.kernel_x(x)
    if relu:
        buffer, copy_back = plan.output(out, x.dtype)
        dx_k = plan.view(buffer)
        if plan.rows:
            args = (dy_k, x_k, mean64, invstd64, gamma_k, beta_k, bool(training), dx_k)
            dgamma, dbeta = _launch(plan.serial, rows.backward_relu, *args)
        else:
            dgamma, dbeta = _launch(
                plan.serial, columns.backward_relu, dy_k, x_k, *plan.columns_args, mean64,
                invstd64, gamma_k, beta_k, bool(training), dx_k,
            )  # fmt: skip
        return plan.result(buffer, out, copy_back), dgamma, dbeta
    if not input_grad:
        if plan.rows:
            dgamma, dbeta = _launch(plan.serial, rows.param_grads, dy_k, x_k, mean64, invstd64)
        else:
            dgamma, dbeta = _launch(
                plan.serial, columns.param_grads, dy_k, x_k, *plan.columns_args, mean64, invstd64
            )
        return None, dgamma, dbeta
    buffer, copy_back = plan.output(out, x.dtype)
    dx_k = plan.view(buffer)
    training = bool(training)
    if plan.rows:
        dgamma, dbeta = _launch(
            plan.serial, rows.backward, dy_k, x_k, mean64, invstd64, gamma_k, training, dx_k
        )
    else:
        dgamma, dbeta = _launch(
            plan.serial,
            columns.backward,
            dy_k,
            x_k,
            *plan.columns_args,
            mean64,
            invstd64,
            gamma_k,
            training,
            dx_k,
        )
    return plan.result(buffer, out, copy_back), dgamma, dbeta


# For a batch norm synchronized across processes (fastbn.torch.SyncBatchNorm),
# which normalizes with statistics and gradient sums of every process's batch.


def _moments(
    x: NDArray[np.floating], plan: _Plan
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """float64 mean and biased variance per feature of x, checked and planned (`_planned`)."""
    x_k = plan.kernel_x(x)
    if plan.rows:
        return _launch(plan.serial, rows.moments, x_k)
    return _launch(plan.serial, columns.moments, x_k, *plan.columns_args)


def _train_input_gradient(
    dy: NDArray[np.floating],
    x: NDArray[np.floating],
    plan: _Plan,
    mean: NDArray[np.float64],
    invstd: NDArray[np.float64],
    gamma: ArrayLike | None,
    dgamma: NDArray[np.float64],
    dbeta: NDArray[np.float64],
    count: int,
    out: NDArray[np.floating] | None = None,
) -> NDArray[np.floating]:
    """dx of the training formula from given float64 sums over count values per feature.

    x is checked and planned (`_planned`); mean, invstd, dgamma and dbeta are
    C-contiguous float64 vectors of length C; gamma is checked here; out, a
    writable array of x's shape and dtype overlapping no input, or None.
    """
    gamma_k = _checks.per_feature(
        "gamma", gamma, plan.n_features, x, plan.axis, 1.0, _checks.vector_dtype(x, gamma)
    )
    buffer, copy_back = plan.output(out, x.dtype)
    dy_k, x_k, dx_k = plan.kernel_input(dy), plan.kernel_x(x), plan.view(buffer)
    if plan.rows:
        _launch(
            plan.serial, rows.train_input_gradient, dy_k, x_k, mean, invstd, gamma_k, dgamma,
            dbeta, count, dx_k,
        )  # fmt: skip
    else:
        _launch(
            plan.serial, columns.train_input_gradient, dy_k, x_k, *plan.columns_args, mean,
            invstd, gamma_k, dgamma, dbeta, count, dx_k,
        )  # fmt: skip
    return plan.result(buffer, out, copy_back)
