"""Batch Renormalization (Ioffe, 2017): batch norm corrected toward the running statistics.

With the batch's mean mu_B and biased variance var_B, the running mean mu
and variance var, sigma_B = sqrt(var_B + eps) and sigma = sqrt(var + eps):

    r = clip(sigma_B / sigma, r_min, r_max)         (r_min = 1 / r_max by default)
    d = clip((mu_B - mu) / sigma, -d_max, d_max)
    y = gamma * (x_hat * r + d) + beta,   x_hat = (x - mu_B) / sigma_B

r and d are constants for the gradient. With r = 1 and d = 0 (r_max = 1,
d_max = 0) this is batch norm; unclipped, y equals the eval-mode output with
the running statistics, so training and inference see the same function.

It is two passes over memory, as the training forward: the batch moments,
then the eval pass with the batch statistics and the per-feature vectors
gamma * r and gamma * d + beta, in float64 whatever the data's dtype (which
keeps the mean's precision for float32 data).
"""

from __future__ import annotations

from typing import SupportsIndex, TypeAlias, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

from fastbn import _checks, _engine
from fastbn._plan import Plan, plan_for
from fastbn._types import Array, Float, Gradients

__all__ = ["batch_renorm_backward", "batch_renorm_train", "clip_limits", "corrections"]

# (r_min, r_max, d_max), from `clip_limits`.
Limits: TypeAlias = tuple[float, float, float]
_Float64: TypeAlias = NDArray[np.float64]


def clip_limits(
    r_max: float,
    d_max: float,
    r_min: float | None = None,
    *,
    names: tuple[str, str, str] = ("r_max", "d_max", "r_min"),
) -> Limits:
    """Check the limits of r and d; return (r_min, r_max, d_max) as floats.

    Parameters
    ----------
    r_max : float
        r's upper limit, >= 1 (inf: no limit).
    d_max : float
        d's limit on either side of 0, >= 0 (inf: no limit).
    r_min : float, optional
        r's lower limit, in [0, 1]; None means ``1 / r_max``.
    names : tuple of str
        The names of r_max, d_max and r_min in the error messages.

    Raises
    ------
    TypeError
        A limit that is not a real number.
    ValueError
        A limit out of its range (NaN included).
    """
    r_max_name, d_max_name, r_min_name = names
    r_max, d_max = _checks.real(r_max_name, r_max), _checks.real(d_max_name, d_max)
    if not r_max >= 1.0:
        raise ValueError(f"{r_max_name} must be >= 1, got {r_max!r}")
    if not d_max >= 0.0:
        raise ValueError(f"{d_max_name} must be >= 0, got {d_max!r}")
    if r_min is None:
        return 1.0 / r_max, r_max, d_max
    r_min = _checks.real(r_min_name, r_min)
    if not 0.0 <= r_min <= 1.0:
        raise ValueError(f"{r_min_name} must be in [0, 1], got {r_min!r}")
    return r_min, r_max, d_max


def corrections(
    mean: NDArray[np.floating],
    var: NDArray[np.floating],
    running_mean: NDArray[np.floating],
    running_var: NDArray[np.floating],
    eps: float,
    limits: Limits,
) -> tuple[_Float64, _Float64]:
    """The float64 vectors r and d from batch and running statistics (float64 vectors).

    ``limits`` is (r_min, r_max, d_max) from `clip_limits`; a NaN statistic
    gives NaN for its feature.
    """
    r_min, r_max, d_max = limits
    sigma = np.sqrt(running_var + eps)
    r = np.clip(np.sqrt(var + eps) / sigma, r_min, r_max)
    d = np.clip((mean - running_mean) / sigma, -d_max, d_max)
    return r, d


@overload
def batch_renorm_train(
    x: NDArray[Float],
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None = ...,
    beta: ArrayLike | None = ...,
    *,
    r_max: float = ...,
    d_max: float = ...,
    r_min: float | None = ...,
    axis: SupportsIndex = ...,
    eps: float = ...,
    out: NDArray[Float] | None = ...,
) -> tuple[NDArray[Float], _Float64, _Float64, _Float64, _Float64]: ...
@overload
def batch_renorm_train(
    x: ArrayLike,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None = ...,
    beta: ArrayLike | None = ...,
    *,
    r_max: float = ...,
    d_max: float = ...,
    r_min: float | None = ...,
    axis: SupportsIndex = ...,
    eps: float = ...,
    out: NDArray[np.floating] | None = ...,
) -> tuple[NDArray[np.floating], _Float64, _Float64, _Float64, _Float64]: ...
def batch_renorm_train(
    x: ArrayLike,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    r_max: float = 3.0,
    d_max: float = 5.0,
    r_min: float | None = None,
    axis: SupportsIndex = 0,
    eps: float = 1e-5,
    out: NDArray[np.floating] | None = None,
) -> tuple[NDArray[np.floating], _Float64, _Float64, _Float64, _Float64]:
    """Batch Renormalization's training forward: batch norm corrected by r and d.

    The running statistics are read, not updated: a training loop folds the
    returned batch statistics into them afterwards (as `fastbn.BatchNorm`
    with ``renorm=True`` does).

    Parameters
    ----------
    x : ndarray, float32 or float64, ndim >= 2
        Data; ``axis`` is the feature axis, every other axis is reduced.
    running_mean, running_var : ndarray of shape (C,)
        The running statistics, before this batch's update.
    gamma, beta : ndarray of shape (C,), optional
        Scale (default 1) and shift (default 0).
    r_max : float, default 3.0
        r is clipped to [r_min, r_max]; r_max >= 1 (1 with d_max = 0 is batch norm).
    d_max : float, default 5.0
        d is clipped to [-d_max, d_max]; d_max >= 0.
    r_min : float, optional
        r's lower limit in [0, 1]; None (the paper's choice) means ``1 / r_max``.
    axis : int
        The feature axis (see `fastbn.batch_norm_train`).
    eps : float
        Added to both variances, finite and > 0.
    out : ndarray, optional
        Written with y; x's shape and dtype, overlapping no input.

    Returns
    -------
    y : ndarray
        ``gamma * ((x - mean) * invstd * r + d) + beta`` in x's dtype.
    mean, invstd : ndarray of shape (C,), float64
        The batch mean and ``1 / sqrt(var + eps)`` with the biased variance,
        as `fastbn.batch_norm_train` returns them.
    r, d : ndarray of shape (C,), float64
        The corrections, for `batch_renorm_backward`.
    """
    x, plan = plan_for(x, axis, True)
    limits = clip_limits(r_max, d_max, r_min)
    n, axis = plan.n_features, plan.axis
    mean_run = _checks.per_feature("running_mean", running_mean, n, x, axis)
    var_run = _checks.per_feature("running_var", running_var, n, x, axis)
    gamma64 = _checks.per_feature("gamma", gamma, n, x, axis, 1.0)
    beta64 = _checks.per_feature("beta", beta, n, x, axis, 0.0)
    eps = _checks.positive_eps(eps)
    if out is not None:
        inputs = (
            ("x", x),
            ("running_mean", running_mean),
            ("running_var", running_var),
            ("gamma", gamma),
            ("beta", beta),
        )
        _checks.output(out, x, inputs)
    return train(plan, x, mean_run, var_run, gamma64, beta64, limits, eps, out)


def train(
    plan: Plan,
    x: Array,
    running_mean: Array,
    running_var: Array,
    gamma: Array,
    beta: Array,
    limits: Limits,
    eps: float,
    out: Array | None,
) -> tuple[Array, _Float64, _Float64, _Float64, _Float64]:
    """`batch_renorm_train`'s executor: checks nothing (see `fastbn._engine`).

    The vectors are C-contiguous float64 (`_checks.per_feature`), the limits
    checked (`clip_limits`).
    """
    mean, var = _engine.moments(plan, x)
    r, d = corrections(mean, var, running_mean, running_var, eps, limits)
    y = _engine.evaluate(plan, x, mean, var, gamma * r, gamma * d + beta, eps, out)
    return y, mean, 1.0 / np.sqrt(var + eps), r, d


@overload
def batch_renorm_backward(
    dy: NDArray[Float],
    x: NDArray[Float],
    mean: ArrayLike,
    invstd: ArrayLike,
    r: ArrayLike,
    d: ArrayLike,
    gamma: ArrayLike | None = ...,
    *,
    axis: SupportsIndex = ...,
    out: NDArray[Float] | None = ...,
) -> tuple[NDArray[Float], NDArray[Float], NDArray[Float]]: ...
@overload
def batch_renorm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    mean: ArrayLike,
    invstd: ArrayLike,
    r: ArrayLike,
    d: ArrayLike,
    gamma: ArrayLike | None = ...,
    *,
    axis: SupportsIndex = ...,
    out: NDArray[np.floating] | None = ...,
) -> Gradients: ...
def batch_renorm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    mean: ArrayLike,
    invstd: ArrayLike,
    r: ArrayLike,
    d: ArrayLike,
    gamma: ArrayLike | None = None,
    *,
    axis: SupportsIndex = 0,
    out: NDArray[np.floating] | None = None,
) -> Gradients:
    """Gradients of Batch Renormalization's training forward, r and d held constant.

    dx is batch norm's training gradient with ``gamma * r`` in place of
    gamma (the batch statistics depend on x; r and d do not).

    Parameters
    ----------
    dy : ndarray
        Gradient of the loss with respect to y; x's shape and dtype.
    x : ndarray, float32 or float64, ndim >= 2
        The forward's input.
    mean, invstd, r, d : ndarray of shape (C,)
        From `batch_renorm_train`.
    gamma : ndarray of shape (C,), optional
        The forward's scale (default 1).
    axis : int
        The feature axis (see `fastbn.batch_norm_train`).
    out : ndarray, optional
        Written with dx; may be ``dy`` itself, may overlap no other input.

    Returns
    -------
    dx : ndarray
        Gradient with respect to x, in x's dtype.
    dgamma, dbeta : ndarray of shape (C,)
        ``r * sum(dy * x_hat) + d * sum(dy)`` and ``sum(dy)`` over each
        feature, in x's dtype.
    """
    x, plan = plan_for(x, axis, False)
    n, axis = plan.n_features, plan.axis
    r64 = _checks.per_feature("r", r, n, x, axis)
    d64 = _checks.per_feature("d", d, n, x, axis)
    dy = _checks.gradient(dy, x)
    mean64 = _checks.per_feature("mean", mean, n, x, axis)
    invstd64 = _checks.per_feature("invstd", invstd, n, x, axis)
    gamma64 = _checks.per_feature("gamma", gamma, n, x, axis, 1.0)
    if out is not None:
        inputs = (
            ("dy", dy),
            ("x", x),
            ("mean", mean),
            ("invstd", invstd),
            ("r", r),
            ("d", d),
            ("gamma", gamma),
        )
        _checks.output(out, x, inputs, may_be=("dy", dy))
    dx, dgamma, dbeta = backward(plan, dy, x, mean64, invstd64, r64, d64, gamma64, out)
    return dx, dgamma.astype(dx.dtype, copy=False), dbeta.astype(dx.dtype, copy=False)


def backward(
    plan: Plan,
    dy: Array,
    x: Array,
    mean: Array,
    invstd: Array,
    r: Array,
    d: Array,
    gamma: Array,
    out: Array | None,
) -> tuple[Array, _Float64, _Float64]:
    """`batch_renorm_backward`'s executor, float64 dgamma and dbeta: checks nothing.

    Batch norm's training backward with ``gamma * r`` in place of gamma; the
    vectors C-contiguous float64.
    """
    dx, dgamma_hat, dbeta = _engine.backward(plan, dy, x, mean, invstd, gamma * r, True, out)
    return dx, r * dgamma_hat + d * dbeta, dbeta


def param_grads(
    plan: Plan, dy: Array, x: Array, mean: Array, invstd: Array, r: Array, d: Array
) -> tuple[_Float64, _Float64]:
    """`backward`'s float64 dgamma and dbeta alone: one pass over dy and x, no dx."""
    dgamma_hat, dbeta = _engine.param_sums(plan, dy, x, mean, invstd)
    return r * dgamma_hat + d * dbeta, dbeta
