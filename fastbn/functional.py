"""The functional API: validate, view the data as (P, C, Q), dispatch to a kernel family.

Every input is viewed as (P, C, Q): C features, each reduced over P x Q
values. For C-contiguous data the view is free, and a Fortran-ordered array
is the C-contiguous transpose of another, so it is served without a copy
too. Any other memory order (a sliced or permuted view) is copied once into
a C-contiguous buffer, and results are written back into the caller's
layout. Long runs (Q >= ROWS_MIN_RUN) go to the rows family, the rest
(batch-first, channels-last) to the columns family.
"""

import math

import numpy as np

from fastbn import _checks
from fastbn.kernels import columns, rows

__all__ = ["batch_norm_backward", "batch_norm_eval", "batch_norm_train"]

PARALLEL_MIN = 1 << 15  # values below which one thread beats a parallel launch
ROWS_MIN_RUN = 16  # shorter runs are folded into the columns family's groups


class _Layout:
    """How an array is handed to the kernels: its C-contiguous form and (P, C, Q)."""

    def __init__(self, x, axis):
        if x.flags.c_contiguous:
            self.transposed = False
        elif x.flags.f_contiguous:
            self.transposed = True
            x = x.T
            axis = x.ndim - 1 - axis
        else:
            self.transposed = False
            x = np.ascontiguousarray(x)
        shape = x.shape
        self.shape = shape
        self.pcq = (math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :]))
        self.x = _checks.kernel_input(x)
        self.serial = x.size < PARALLEL_MIN
        self.rows = self.pcq[2] >= ROWS_MIN_RUN
        self.width = columns.group_width(self.pcq[1], self.pcq[2])

    def contiguous(self, a):
        """Another array of the caller's shape, in this layout's C-contiguous form."""
        a = a.T if self.transposed else a
        return _checks.kernel_input(np.ascontiguousarray(a))

    def output(self, out):
        """The buffer the kernel writes: out itself when its layout fits, else a new array."""
        if out is not None:
            target = out.T if self.transposed else out
            if target.flags.c_contiguous:
                self.copy_back = False
                return target
        self.copy_back = out is not None
        return np.empty(self.shape, self.x.dtype)

    def finish(self, buffer, out):
        """The result in the caller's layout: out (copied into if need be) or the buffer."""
        if out is None:
            return buffer.T if self.transposed else buffer
        if self.copy_back:
            out[...] = buffer.T if self.transposed else buffer
        return out

    def view(self, a):
        """a as the kernels take it: (P, C, Q) for rows, flat for columns."""
        return a.reshape(self.pcq) if self.rows else a.reshape(-1)

    def columns_args(self):
        return self.pcq[1], self.pcq[2], self.width


def batch_norm_train(x, gamma=None, beta=None, *, axis=0, eps=1e-5, out=None):
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
    x = _checks.data("x", x)
    axis = _checks.feature_axis(axis, x)
    n_features, _ = _checks.counts(x, axis, training=True)
    gamma64 = _checks.per_feature("gamma", gamma, n_features, x, axis, default=1.0)
    beta64 = _checks.per_feature("beta", beta, n_features, x, axis, default=0.0)
    eps = _checks.positive_eps(eps)
    if out is not None:
        _checks.output(out, x, (("x", x), ("gamma", gamma), ("beta", beta)))
    layout = _Layout(x, axis)
    buffer = layout.output(out)
    if layout.rows:
        mean, invstd = rows.train_forward(
            layout.view(layout.x), gamma64, beta64, eps, layout.view(buffer), layout.serial
        )
    else:
        mean, invstd = columns.train_forward(
            layout.view(layout.x),
            *layout.columns_args(),
            gamma64,
            beta64,
            eps,
            layout.view(buffer),
            layout.serial,
        )
    return layout.finish(buffer, out), mean, invstd


def batch_norm_eval(
    x, running_mean, running_var, gamma=None, beta=None, *, axis=0, eps=1e-5, out=None
):
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
    x = _checks.data("x", x)
    axis = _checks.feature_axis(axis, x)
    n_features, _ = _checks.counts(x, axis, training=False)
    mean64 = _checks.per_feature("running_mean", running_mean, n_features, x, axis)
    var64 = _checks.per_feature("running_var", running_var, n_features, x, axis)
    gamma64 = _checks.per_feature("gamma", gamma, n_features, x, axis, default=1.0)
    beta64 = _checks.per_feature("beta", beta, n_features, x, axis, default=0.0)
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
    layout = _Layout(x, axis)
    buffer = layout.output(out)
    if layout.rows:
        rows.eval_forward(
            layout.view(layout.x),
            mean64,
            var64,
            gamma64,
            beta64,
            eps,
            layout.view(buffer),
            layout.serial,
        )
    else:
        columns.eval_forward(
            layout.view(layout.x),
            *layout.columns_args(),
            mean64,
            var64,
            gamma64,
            beta64,
            eps,
            layout.view(buffer),
            layout.serial,
        )
    return layout.finish(buffer, out)


def batch_norm_backward(dy, x, mean, invstd, gamma=None, *, axis=0, training=True, out=None):
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
    dy = _checks.float_array("dy", dy)
    _checks.same_shape("dy", dy, x)
    if dy.dtype != x.dtype:
        raise TypeError(f"dy has dtype {dy.dtype}, but x has dtype {x.dtype}: they must match")
    axis = _checks.feature_axis(axis, x)
    n_features, _ = _checks.counts(x, axis, training=False)
    mean64 = _checks.per_feature("mean", mean, n_features, x, axis)
    invstd64 = _checks.per_feature("invstd", invstd, n_features, x, axis)
    gamma64 = _checks.per_feature("gamma", gamma, n_features, x, axis, default=1.0)
    if out is not None:
        inputs = (("dy", dy), ("x", x), ("mean", mean), ("invstd", invstd), ("gamma", gamma))
        _checks.output(out, x, inputs, may_be=("dy", dy))
    layout = _Layout(x, axis)
    dy_c = layout.contiguous(dy)
    buffer = layout.output(out)
    if layout.rows:
        dgamma, dbeta = rows.backward(
            layout.view(dy_c),
            layout.view(layout.x),
            mean64,
            invstd64,
            gamma64,
            bool(training),
            layout.view(buffer),
            layout.serial,
        )
    else:
        dgamma, dbeta = columns.backward(
            layout.view(dy_c),
            layout.view(layout.x),
            *layout.columns_args(),
            mean64,
            invstd64,
            gamma64,
            bool(training),
            layout.view(buffer),
            layout.serial,
        )
    dx = layout.finish(buffer, out)
    return dx, dgamma.astype(x.dtype, copy=False), dbeta.astype(x.dtype, copy=False)
