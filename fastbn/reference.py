"""The NumPy baseline: batch normalization as the textbook writes it.

Plain and readable, temporaries and all. It is the correctness reference of
the tests (called on float64 data) and the speed baseline of the benchmarks.
It computes in the input's dtype and validates nothing.
"""

from typing import TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

# The dtype of x, in which the results come back.
_Float = TypeVar("_Float", bound=np.floating)

__all__ = ["batch_norm_backward", "batch_norm_eval", "batch_norm_train"]


def _reduced_axes(x: NDArray[np.floating], axis: int) -> tuple[int, ...]:
    axis = axis % x.ndim
    return tuple(a for a in range(x.ndim) if a != axis)


def _per_feature(v: ArrayLike, x: NDArray[np.floating], axis: int) -> NDArray[np.floating]:
    """Reshape a length-C vector so that it broadcasts along ``axis`` of x."""
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    return np.asarray(v).reshape(shape)


def batch_norm_train(
    x: NDArray[_Float],
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    axis: int = 0,
    eps: float = 1e-5,
) -> tuple[NDArray[_Float], NDArray[np.float64], NDArray[np.float64]]:
    """Normalize with batch statistics; return y, mean and invstd (float64)."""
    axes = _reduced_axes(x, axis)
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    invstd = 1.0 / np.sqrt(var + eps)
    y = (x - mu) * invstd
    if gamma is not None:
        y = y * _per_feature(gamma, x, axis)
    if beta is not None:
        y = y + _per_feature(beta, x, axis)
    return (
        y.astype(x.dtype, copy=False),
        mu.reshape(-1).astype(np.float64),
        invstd.reshape(-1).astype(np.float64),
    )


def batch_norm_eval(
    x: NDArray[_Float],
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    axis: int = 0,
    eps: float = 1e-5,
) -> NDArray[_Float]:
    """Normalize with running statistics."""
    mu = _per_feature(running_mean, x, axis)
    invstd = 1.0 / np.sqrt(_per_feature(running_var, x, axis) + eps)
    y = (x - mu) * invstd
    if gamma is not None:
        y = y * _per_feature(gamma, x, axis)
    if beta is not None:
        y = y + _per_feature(beta, x, axis)
    return y.astype(x.dtype, copy=False)


def batch_norm_backward(
    dy: NDArray[np.floating],
    x: NDArray[_Float],
    mean: ArrayLike,
    invstd: ArrayLike,
    gamma: ArrayLike | None = None,
    *,
    axis: int = 0,
    training: bool = True,
) -> tuple[NDArray[_Float], NDArray[_Float], NDArray[_Float]]:
    """Return dx, dgamma, dbeta for y = gamma * (x - mean) * invstd + beta."""
    axes = _reduced_axes(x, axis)
    m = x.size // x.shape[axis]
    mu = _per_feature(mean, x, axis)
    inv = _per_feature(invstd, x, axis)
    g = 1.0 if gamma is None else _per_feature(gamma, x, axis)
    x_hat = (x - mu) * inv
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * x_hat).sum(axis=axes)
    if training:
        dx = (
            g
            * inv
            / m
            * (m * dy - _per_feature(dbeta, x, axis) - x_hat * _per_feature(dgamma, x, axis))
        )
    else:
        dx = g * inv * dy
    dt = x.dtype
    return dx.astype(dt, copy=False), dgamma.astype(dt, copy=False), dbeta.astype(dt, copy=False)
