"""Ghost batch norm (Hoffer et al. 2017): each virtual batch of k examples normalized alone.

``virtual_batch_size=k`` splits the batch along its examples axis (the first
axis that is not the feature axis) into G = N / k consecutive slices of k
examples; each slice is normalized with its own mean and biased variance
(over its k examples and, for images, every spatial position), and each
slice's backward uses its own statistics. G == 1 is plain batch norm.

Views, in the C-contiguous form of x (x itself, the transpose of a
Fortran-ordered x, else a copy of x in C order):

- examples axis first (batch-first, NCHW, NHWC): the slices are G contiguous
  blocks, each laid out as a (k, ...) array; the family of one slice's plan
  runs the G slices in one parallel loop (its ``ghost_*`` entries).
- examples axis right after the feature axis (the features-first (n, m)
  layout, or a Fortran-ordered NCHW): x is plain batch norm with C * G
  features, (..., C, N, ...) viewed as (..., C * G, k, ...), feature c * G + g
  being feature c of slice g; no kernel of its own.

Each public function checks its arguments, then runs `train` or `backward`,
which check nothing (as `fastbn._engine`'s executors); the layer and the
PyTorch bridge call those directly.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, SupportsIndex, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

from fastbn import _checks, _engine
from fastbn._plan import PARALLEL_MIN, Plan, in_caller_layout, output_buffer, plan_cache
from fastbn._threading import launch
from fastbn._types import Array, Float, Float64, Forward, Gradients

__all__ = ["ghost_batch_norm_backward", "ghost_batch_norm_train"]


def checked_virtual_batch_size(virtual_batch_size: object) -> int:
    """virtual_batch_size as a positive int, or TypeError / ValueError."""
    if isinstance(virtual_batch_size, (bool, np.bool_)) or not isinstance(
        virtual_batch_size, numbers.Integral
    ):
        raise TypeError(f"virtual_batch_size must be an int, got {virtual_batch_size!r}")
    if virtual_batch_size <= 0:
        raise ValueError(f"virtual_batch_size must be positive, got {virtual_batch_size}")
    return int(virtual_batch_size)


@dataclasses.dataclass(frozen=True, slots=True)
class GhostPlan:
    """How an x of one shape, memory order and feature axis goes to the slices.

    Attributes
    ----------
    axis, n_features : int
        The feature axis of x in [0, ndim) and C.
    n_slices, slice_values : int
        G, and the values per feature in each slice (k times the spatial size).
    transposed : bool
        Whether the C-contiguous form is x's transpose (a Fortran-ordered x);
        else it is x itself, or a copy of x in C order.
    shape : tuple of int
        The shape of the C-contiguous form.
    plain : Plan or None
        When G == 1, the plan of x itself: plain batch norm.
    slice_plan : Plan or None
        When the slices are leading blocks of the form (G > 1), the plan of
        one (k, ...) slice: its family's ghost kernels run the stack.
    merged_plan : Plan or None
        Otherwise (G > 1), the plan of the form viewed as plain batch norm
        of C * G features (..., C * G, k, ...): feature c * G + g is feature
        c of slice g.
    serial : bool
        Whether one thread runs the kernels (small data).
    """

    axis: int
    n_features: int
    n_slices: int
    slice_values: int
    transposed: bool
    shape: tuple[int, ...]
    plain: Plan | None
    slice_plan: Plan | None
    merged_plan: Plan | None
    serial: bool

    @classmethod
    def of(
        cls, x: NDArray[np.floating], axis: SupportsIndex, virtual_batch_size: int
    ) -> GhostPlan:
        """The plan of x (checked by `_checks.data`), axis and k, checking them."""
        axis = _checks.feature_axis(axis, x)
        n_features, _ = _checks.counts(x, axis, training=True)
        k = checked_virtual_batch_size(virtual_batch_size)
        examples_axis = 1 if axis == 0 else 0
        n_examples = x.shape[examples_axis]
        if n_examples % k:
            raise ValueError(
                f"virtual_batch_size={k} does not divide the batch size {n_examples} "
                f"(x of shape {x.shape}, examples along axis {examples_axis}): "
                f"use a batch size that is a multiple of {k}"
            )
        slice_values = x.size // n_features // n_examples * k
        if slice_values == 1:
            raise ValueError(
                "Expected more than 1 value per feature when training, got "
                f"virtual_batch_size={k} for x of shape {x.shape} with axis={axis} "
                "(1 value per feature in each virtual batch)"
            )
        flags = x.flags
        transposed = not flags.c_contiguous and flags.f_contiguous
        if transposed:  # the form's axes are x's reversed
            form_axis, form_examples = x.ndim - 1 - axis, x.ndim - 1 - examples_axis
            if not (form_examples == 0 or form_examples == form_axis + 1):
                transposed = False  # neither view fits: copy into C order
        if not transposed:
            form_axis, form_examples = axis, examples_axis
        shape = x.shape[::-1] if transposed else x.shape
        n_slices = n_examples // k
        plain = slice_plan = merged_plan = None
        if n_slices == 1:
            plain = Plan.of(x, axis, training=True)
        elif form_examples == 0:
            slice_plan = Plan.of_form((k, *shape[1:]), form_axis)
        else:
            merged = (*shape[:form_axis], n_features * n_slices, k, *shape[form_axis + 2 :])
            merged_plan = Plan.of_form(merged, form_axis)
        return cls(
            axis=axis,
            n_features=n_features,
            n_slices=n_slices,
            slice_values=slice_values,
            transposed=transposed,
            shape=shape,
            plain=plain,
            slice_plan=slice_plan,
            merged_plan=merged_plan,
            serial=x.size < PARALLEL_MIN,
        )

    def form(self, a: NDArray[np.floating]) -> NDArray[np.floating]:
        """An array of x's shape (x, dy) in the plan's C-contiguous form, for the kernels."""
        if self.transposed:
            a = a.T
        return _checks.kernel_input(np.ascontiguousarray(a))

    def stack(self, a: NDArray[np.floating]) -> NDArray[np.floating]:
        """The C-contiguous form as the ghost kernels take it: (G, P, C, Q) or (G, S)."""
        assert self.slice_plan is not None  # stacked
        if self.slice_plan.geometry:  # the columns family: each slice flat
            return a.reshape((self.n_slices, -1))
        return a.reshape((self.n_slices, *self.slice_plan.pcq))

    def output(
        self, out: NDArray[np.floating] | None, dtype: np.dtype[Any]
    ) -> tuple[NDArray[np.floating], bool]:
        """The C-contiguous buffer to write, and whether it must be copied into out."""
        return output_buffer(out, dtype, self.shape, self.transposed)

    def result(
        self, buffer: NDArray[np.floating], out: NDArray[np.floating] | None, copy_back: bool
    ) -> NDArray[np.floating]:
        """The result in the caller's layout: out (copied into if need be) or the buffer."""
        return in_caller_layout(buffer, out, copy_back, self.transposed)

    def merged(self, per_slice: NDArray[np.float64]) -> NDArray[np.float64]:
        """(G, C) per-slice values as the C * G per-feature values of the merged view."""
        return np.ascontiguousarray(per_slice.T).reshape(-1)

    def per_slice(self, merged: NDArray[np.float64]) -> NDArray[np.float64]:
        """C * G per-feature values of the merged view as (G, C) per-slice values."""
        return np.ascontiguousarray(merged.reshape(self.n_features, self.n_slices).T)


# planned(x, axis, virtual_batch_size): x checked as data and its GhostPlan, made once
# per key (as `_plan.plan_for`).
planned = plan_cache(GhostPlan.of, int)


@overload
def ghost_batch_norm_train(
    x: NDArray[Float],
    gamma: ArrayLike | None = ...,
    beta: ArrayLike | None = ...,
    *,
    virtual_batch_size: int,
    axis: SupportsIndex = ...,
    eps: float = ...,
    out: NDArray[Float] | None = ...,
) -> tuple[NDArray[Float], NDArray[np.float64], NDArray[np.float64]]: ...
@overload
def ghost_batch_norm_train(
    x: ArrayLike,
    gamma: ArrayLike | None = ...,
    beta: ArrayLike | None = ...,
    *,
    virtual_batch_size: int,
    axis: SupportsIndex = ...,
    eps: float = ...,
    out: NDArray[np.floating] | None = ...,
) -> Forward: ...
def ghost_batch_norm_train(
    x: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    virtual_batch_size: int,
    axis: SupportsIndex = 0,
    eps: float = 1e-5,
    out: NDArray[np.floating] | None = None,
) -> Forward:
    """Normalize each virtual batch of k examples with its own statistics (training mode).

    Parameters
    ----------
    x : ndarray, float32 or float64, ndim >= 2
        Data; ``axis`` is the feature axis. The examples axis is the first
        other axis: 0, or 1 when ``axis`` is 0 (the (n, m) layout).
    gamma, beta : ndarray of shape (C,), optional
        Scale (default 1) and shift (default 0), shared by every virtual batch.
    virtual_batch_size : int
        k, the examples in each virtual ("ghost") batch; it must divide the
        batch size N. The G = N / k virtual batches are consecutive slices
        along the examples axis; G == 1 is `batch_norm_train`.
    axis : int
        The feature axis (see `batch_norm_train`).
    eps : float
        Added to the variance, finite and > 0.
    out : ndarray, optional
        Written with y; x's shape and dtype, overlapping no input.

    Returns
    -------
    y : ndarray
        Each slice g normalized as ``gamma * (x - mean[g]) * invstd[g] + beta``, in x's dtype.
    mean, invstd : ndarray of shape (G, C), float64
        Each slice's mean and ``1 / sqrt(var + eps)`` with its biased variance.

    Raises
    ------
    ValueError
        The errors of `batch_norm_train`; k not dividing N (naming both);
        k < 1; one value per feature in a virtual batch.
    TypeError
        As `batch_norm_train`; k not an int.
    """
    x, plan = planned(x, axis, virtual_batch_size)
    dtype = _checks.vector_dtype(x, gamma, beta)
    n, axis = plan.n_features, plan.axis
    gamma_k = _checks.per_feature("gamma", gamma, n, x, axis, 1.0, dtype)
    beta_k = _checks.per_feature("beta", beta, n, x, axis, 0.0, dtype)
    eps = _checks.positive_eps(eps)
    if out is not None:
        _checks.output(out, x, (("x", x), ("gamma", gamma), ("beta", beta)))
    return train(x, plan, gamma_k, beta_k, eps, out)


def train(
    x: Array, plan: GhostPlan, gamma: Array, beta: Array, eps: float, out: Array | None
) -> Forward:
    """`ghost_batch_norm_train`'s executor: checks nothing (see `_engine`).

    x is planned (`planned`); gamma and beta as the kernels take them.
    """
    if plan.plain is not None:
        y, mean, invstd = _engine.train(plan.plain, x, gamma, beta, eps, out)
        return y, mean[None], invstd[None]
    buffer, copy_back = plan.output(out, x.dtype)
    x_form = plan.form(x)
    if plan.slice_plan is not None:
        mean, invstd = launch(
            plan.serial, plan.slice_plan.family.ghost_train_forward, plan.stack(x_form),
            *plan.slice_plan.geometry, gamma, beta, eps, plan.stack(buffer),
        )  # fmt: skip
    else:
        merged = plan.merged_plan
        assert merged is not None  # neither plain nor stacked
        _, merged_mean, merged_invstd = _engine.train(
            merged, x_form.reshape(merged.shape), np.repeat(gamma, plan.n_slices),
            np.repeat(beta, plan.n_slices), eps, buffer.reshape(merged.shape),
        )  # fmt: skip
        mean, invstd = plan.per_slice(merged_mean), plan.per_slice(merged_invstd)
    return plan.result(buffer, out, copy_back), mean, invstd


@overload
def ghost_batch_norm_backward(
    dy: NDArray[Float],
    x: NDArray[Float],
    mean: ArrayLike,
    invstd: ArrayLike,
    gamma: ArrayLike | None = ...,
    *,
    virtual_batch_size: int,
    axis: SupportsIndex = ...,
    out: NDArray[Float] | None = ...,
) -> tuple[NDArray[Float], NDArray[Float], NDArray[Float]]: ...
@overload
def ghost_batch_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    mean: ArrayLike,
    invstd: ArrayLike,
    gamma: ArrayLike | None = ...,
    *,
    virtual_batch_size: int,
    axis: SupportsIndex = ...,
    out: NDArray[np.floating] | None = ...,
) -> Gradients: ...
def ghost_batch_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    mean: ArrayLike,
    invstd: ArrayLike,
    gamma: ArrayLike | None = None,
    *,
    virtual_batch_size: int,
    axis: SupportsIndex = 0,
    out: NDArray[np.floating] | None = None,
) -> Gradients:
    """Gradients of `ghost_batch_norm_train`: each virtual batch's training backward.

    Parameters
    ----------
    dy : ndarray
        Gradient of the loss with respect to y; x's shape and dtype.
    x : ndarray, float32 or float64, ndim >= 2
        The forward's input.
    mean, invstd : ndarray of shape (G, C)
        From `ghost_batch_norm_train`.
    gamma : ndarray of shape (C,), optional
        The forward's scale (default 1).
    virtual_batch_size : int
        The forward's k.
    axis : int
        The feature axis.
    out : ndarray, optional
        Written with dx; may be ``dy`` itself, may overlap no other input.

    Returns
    -------
    dx : ndarray
        Gradient with respect to x, each slice by the training formula with
        its own statistics, in x's dtype.
    dgamma, dbeta : ndarray of shape (C,)
        ``sum(dy * x_hat)`` and ``sum(dy)``, each slice's sums added in slice
        order (in float64, rounded once to x's dtype).
    """
    x, plan = planned(x, axis, virtual_batch_size)
    dy = _checks.gradient(dy, x)
    mean64 = _per_slice_stat("mean", mean, plan, x)
    invstd64 = _per_slice_stat("invstd", invstd, plan, x)
    gamma_k = _checks.per_feature(
        "gamma", gamma, plan.n_features, x, plan.axis, 1.0, _checks.vector_dtype(x, gamma)
    )
    if out is not None:
        inputs = (("dy", dy), ("x", x), ("mean", mean), ("invstd", invstd), ("gamma", gamma))
        _checks.output(out, x, inputs, may_be=("dy", dy))
    dx, dgamma, dbeta = backward(dy, x, plan, mean64, invstd64, gamma_k, out)
    return dx, dgamma.astype(dx.dtype, copy=False), dbeta.astype(dx.dtype, copy=False)


def backward(
    dy: Array,
    x: Array,
    plan: GhostPlan,
    mean: Float64,
    invstd: Float64,
    gamma: Array,
    out: Array | None,
) -> tuple[Array, Float64, Float64]:
    """`ghost_batch_norm_backward`'s executor, float64 dgamma and dbeta: checks nothing.

    mean and invstd are C-contiguous float64 (G, C); gamma as the kernels take it.
    """
    if plan.plain is not None:
        return _engine.backward(plan.plain, dy, x, mean[0], invstd[0], gamma, True, out)
    buffer, copy_back = plan.output(out, x.dtype)
    dy_form, x_form = plan.form(dy), plan.form(x)
    if plan.slice_plan is not None:
        dgamma, dbeta = launch(
            plan.serial, plan.slice_plan.family.ghost_backward, plan.stack(dy_form),
            plan.stack(x_form), *plan.slice_plan.geometry, mean, invstd, gamma,
            plan.stack(buffer),
        )  # fmt: skip
        return plan.result(buffer, out, copy_back), dgamma, dbeta
    merged = plan.merged_plan
    assert merged is not None  # neither plain nor stacked
    merged_dy = dy_form.reshape(merged.shape)
    # out is dy (which the caller may pass) and written in place: allowed when
    # out is the very view dy is read from.
    in_place = out is dy and not copy_back
    _, merged_dgamma, merged_dbeta = _engine.backward(
        merged, merged_dy, x_form.reshape(merged.shape), plan.merged(mean), plan.merged(invstd),
        np.repeat(gamma, plan.n_slices), True,
        merged_dy if in_place else buffer.reshape(merged.shape),
    )  # fmt: skip
    # Each feature's slices summed in slice order (a reduction over the leading axis).
    dgamma = plan.per_slice(merged_dgamma).sum(axis=0)
    dbeta = plan.per_slice(merged_dbeta).sum(axis=0)
    return plan.result(buffer, out, copy_back), dgamma, dbeta


def _per_slice_stat(
    name: str, values: ArrayLike, plan: GhostPlan, x: NDArray[np.floating]
) -> NDArray[np.float64]:
    """mean or invstd as a C-contiguous float64 (G, C) array, or ValueError naming its shape."""
    values = _checks.float_array(name, values)
    expected = (plan.n_slices, plan.n_features)
    if values.shape != expected:
        raise ValueError(
            f"{name} has shape {values.shape}, expected {expected}: one row per virtual batch "
            f"of x with shape {x.shape} and axis={plan.axis}"
        )
    return np.ascontiguousarray(values, dtype=np.float64)
