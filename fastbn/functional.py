"""The functional API: check the arguments, then run the engine.

Each function turns its arguments into a plan (`_plan.plan_for`: the data's
layout, (P, C, Q) and kernel family, made once per dtype, shape, strides and
axis) and validated parameters (`_checks`), then calls one executor of
`_engine`, which checks nothing. See `_plan` for how each memory order is
served.
"""

from __future__ import annotations

from typing import SupportsIndex, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

from fastbn import _checks, _engine
from fastbn._plan import plan_for
from fastbn._types import Array, Float, Float64, Forward, Gradients

__all__ = [
    "batch_norm_backward",
    "batch_norm_eval",
    "batch_norm_relu_backward",
    "batch_norm_relu_eval",
    "batch_norm_relu_train",
    "batch_norm_train",
]


@overload
def batch_norm_train(
    x: NDArray[Float],
    gamma: ArrayLike | None = ...,
    beta: ArrayLike | None = ...,
    *,
    axis: SupportsIndex = ...,
    eps: float = ...,
    out: NDArray[Float] | None = ...,
) -> tuple[NDArray[Float], NDArray[np.float64], NDArray[np.float64]]: ...
@overload
def batch_norm_train(
    x: ArrayLike,
    gamma: ArrayLike | None = ...,
    beta: ArrayLike | None = ...,
    *,
    axis: SupportsIndex = ...,
    eps: float = ...,
    out: NDArray[np.floating] | None = ...,
) -> Forward: ...
def batch_norm_train(
    x: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    axis: SupportsIndex = 0,
    eps: float = 1e-5,
    out: NDArray[np.floating] | None = None,
) -> Forward:
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
    return _train(x, gamma, beta, axis, eps, out, None)


@overload
def batch_norm_relu_train(
    x: NDArray[Float],
    gamma: ArrayLike | None = ...,
    beta: ArrayLike | None = ...,
    *,
    axis: SupportsIndex = ...,
    eps: float = ...,
    out: NDArray[Float] | None = ...,
) -> tuple[NDArray[Float], NDArray[np.float64], NDArray[np.float64]]: ...
@overload
def batch_norm_relu_train(
    x: ArrayLike,
    gamma: ArrayLike | None = ...,
    beta: ArrayLike | None = ...,
    *,
    axis: SupportsIndex = ...,
    eps: float = ...,
    out: NDArray[np.floating] | None = ...,
) -> Forward: ...
def batch_norm_relu_train(
    x: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    axis: SupportsIndex = 0,
    eps: float = 1e-5,
    out: NDArray[np.floating] | None = None,
) -> Forward:
    """`batch_norm_train` followed by a ReLU, in the same passes over memory.

    Parameters and errors are those of `batch_norm_train`.

    Returns
    -------
    y : ndarray
        ``max(gamma * (x - mean) * invstd + beta, 0)`` in x's dtype (NaN stays NaN).
    mean, invstd : ndarray of shape (C,), float64
        The batch statistics, for `batch_norm_relu_backward`.
    """
    return _train(x, gamma, beta, axis, eps, out, True)


def _train(
    x: ArrayLike,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    axis: SupportsIndex,
    eps: float,
    out: Array | None,
    relu: bool | None,
) -> Forward:
    """`batch_norm_train` (with relu True: `batch_norm_relu_train`): check, then run."""
    x, plan = plan_for(x, axis, True)
    dtype = _checks.vector_dtype(x, gamma, beta)
    gamma_k = _checks.per_feature("gamma", gamma, plan.n_features, x, plan.axis, 1.0, dtype)
    beta_k = _checks.per_feature("beta", beta, plan.n_features, x, plan.axis, 0.0, dtype)
    eps = _checks.positive_eps(eps)
    if out is not None:
        _checks.output(out, x, (("x", x), ("gamma", gamma), ("beta", beta)))
    return _engine.train(plan, x, gamma_k, beta_k, eps, out, relu)


@overload
def batch_norm_eval(
    x: NDArray[Float],
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None = ...,
    beta: ArrayLike | None = ...,
    *,
    axis: SupportsIndex = ...,
    eps: float = ...,
    out: NDArray[Float] | None = ...,
) -> NDArray[Float]: ...
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
    return _eval(x, running_mean, running_var, gamma, beta, axis, eps, out, None)


@overload
def batch_norm_relu_eval(
    x: NDArray[Float],
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None = ...,
    beta: ArrayLike | None = ...,
    *,
    axis: SupportsIndex = ...,
    eps: float = ...,
    out: NDArray[Float] | None = ...,
) -> NDArray[Float]: ...
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
    return _eval(x, running_mean, running_var, gamma, beta, axis, eps, out, True)


def _eval(
    x: ArrayLike,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    axis: SupportsIndex,
    eps: float,
    out: Array | None,
    relu: bool | None,
) -> Array:
    """`batch_norm_eval` (with relu True: `batch_norm_relu_eval`): check, then run."""
    x, plan = plan_for(x, axis, False)
    n, axis = plan.n_features, plan.axis
    dtype = _checks.vector_dtype(x, running_mean, running_var, gamma, beta)
    mean_k = _checks.per_feature("running_mean", running_mean, n, x, axis, None, dtype)
    var_k = _checks.per_feature("running_var", running_var, n, x, axis, None, dtype)
    gamma_k = _checks.per_feature("gamma", gamma, n, x, axis, 1.0, dtype)
    beta_k = _checks.per_feature("beta", beta, n, x, axis, 0.0, dtype)
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
    return _engine.evaluate(plan, x, mean_k, var_k, gamma_k, beta_k, eps, out, relu)


@overload
def batch_norm_backward(
    dy: NDArray[Float],
    x: NDArray[Float],
    mean: ArrayLike,
    invstd: ArrayLike,
    gamma: ArrayLike | None = ...,
    *,
    axis: SupportsIndex = ...,
    training: bool = ...,
    out: NDArray[Float] | None = ...,
) -> tuple[NDArray[Float], NDArray[Float], NDArray[Float]]: ...
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
) -> Gradients: ...
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
) -> Gradients:
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
    dx, dgamma, dbeta = _backward(dy, x, mean, invstd, gamma, axis, training, out)
    return dx, dgamma.astype(dx.dtype, copy=False), dbeta.astype(dx.dtype, copy=False)


@overload
def batch_norm_relu_backward(
    dy: NDArray[Float],
    x: NDArray[Float],
    mean: ArrayLike,
    invstd: ArrayLike,
    gamma: ArrayLike | None = ...,
    beta: ArrayLike | None = ...,
    *,
    axis: SupportsIndex = ...,
    training: bool = ...,
    out: NDArray[Float] | None = ...,
) -> tuple[NDArray[Float], NDArray[Float], NDArray[Float]]: ...
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
) -> Gradients: ...
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
) -> Gradients:
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
    dx, dgamma, dbeta = _backward(
        dy, x, mean, invstd, gamma, axis, training, out, relu=True, beta=beta
    )
    return dx, dgamma.astype(dx.dtype, copy=False), dbeta.astype(dx.dtype, copy=False)


def _backward(
    dy: ArrayLike,
    x: ArrayLike,
    mean: ArrayLike,
    invstd: ArrayLike,
    gamma: ArrayLike | None,
    axis: SupportsIndex,
    training: bool,
    out: Array | None,
    relu: bool = False,
    beta: ArrayLike | None = None,
) -> tuple[Array, Float64, Float64]:
    """`batch_norm_backward` (relu: `batch_norm_relu_backward`, with beta): check, then run.

    dgamma and dbeta come back in float64, as the engine gives them.
    """
    x = _checks.data("x", x)
    dy = _checks.gradient(dy, x)
    x, plan = plan_for(x, axis, False)
    n, axis = plan.n_features, plan.axis
    mean64 = _checks.per_feature("mean", mean, n, x, axis)
    invstd64 = _checks.per_feature("invstd", invstd, n, x, axis)
    gamma_k = _checks.per_feature("gamma", gamma, n, x, axis, 1.0, _checks.vector_dtype(x, gamma))
    inputs: tuple[tuple[str, ArrayLike | None], ...] = (
        ("dy", dy),
        ("x", x),
        ("mean", mean),
        ("invstd", invstd),
        ("gamma", gamma),
    )
    beta_k = None
    if relu:  # the forward's shift, default 0: the ReLU's mask is recomputed from it
        beta_k = _checks.per_feature("beta", beta, n, x, axis, 0.0, _checks.vector_dtype(x, beta))
        inputs += (("beta", beta),)
    if out is not None:
        _checks.output(out, x, inputs, may_be=("dy", dy))
    return _engine.backward(plan, dy, x, mean64, invstd64, gamma_k, bool(training), out, beta_k)
