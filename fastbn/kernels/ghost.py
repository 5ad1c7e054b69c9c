"""Ghost batch norm: a stack of G slices, each normalized with its own statistics.

The data is G equal slices stacked along a leading axis, each slice laid out
as one call of a family takes it: (G, P, C, Q) for the rows family, (G, S)
for the columns family (each slice flat, rows of C * Q values). One parallel
loop runs over the slices, a slice a unit, and each slice goes through its
family's serial internals (those of a one-thread call of the family): each
slice is normalized as it would be alone, and the results depend on neither
the thread count nor the other slices. Statistics come back as (G, C)
float64 arrays; per-slice dgamma and dbeta are written to rows of (G, C)
arrays and summed after the loop, slice after slice. With fewer slices than
threads, threads idle: the functional API sends G == 1 to the plain kernels.

The internals are uncached (a cached kernel must not call another cached
one); the entries here carry them.
"""

import numpy as np
from numba import njit, prange

from fastbn import _compile
from fastbn.kernels import columns, rows
from fastbn.kernels._common import in_dtype, row_sums, split_mean
from fastbn.kernels._twins import Twins, _quiet

twin = Twins(globals())  # every driver and entry also has a one-thread twin (serial_twin)


# One slice each: the training forward and backward of rows.py and columns.py on
# their serial internals, with the statistics written to the given rows. The
# rows family's per-feature schedule is not used: a slice is read twice
# (statistics, then output), from cache where the slice fits there.


@njit
def _rows_train_slice(x, gamma, beta, eps, out, mean, invstd):
    slice_mean, var = rows._mean_var_serial(x)
    slice_invstd = 1.0 / np.sqrt(var + eps)
    mean_hi, mean_lo = split_mean(slice_mean, x)
    scale = in_dtype(gamma * slice_invstd, x)
    rows._apply_serial(
        x.reshape(-1), out.reshape(-1), x.shape, mean_hi, mean_lo, scale, in_dtype(beta, x)
    )
    mean[:] = slice_mean
    invstd[:] = slice_invstd


@njit
def _rows_backward_slice(dy, x, mean, invstd, gamma, out, dgamma, dbeta):
    slice_dgamma, slice_dbeta = rows._param_sums_serial(dy, x, mean, invstd)
    count = x.shape[0] * x.shape[2]
    rows._train_dx_serial(dy, x, mean, invstd, gamma, slice_dgamma, slice_dbeta, count, out)
    dgamma[:] = slice_dgamma
    dbeta[:] = slice_dbeta


@njit
def _columns_train_slice(x, n_features, run, width, gamma, beta, eps, out, mean, invstd):
    slice_mean, var = columns._mean_var_serial(x, n_features, run, width)
    slice_invstd = 1.0 / np.sqrt(var + eps)
    columns._apply_per_feature_serial(
        x, out, n_features, run, width, slice_mean, gamma * slice_invstd, beta
    )
    mean[:] = slice_mean
    invstd[:] = slice_invstd


@njit
def _columns_backward_slice(
    dy, x, n_features, run, width, mean, invstd, gamma, out, dgamma, dbeta
):
    slice_dgamma, slice_dbeta = columns._param_sums_serial(
        dy, x, n_features, run, width, mean, invstd
    )
    columns._train_dx_serial(
        dy, x, n_features, run, width, mean, invstd, gamma, slice_dgamma, slice_dbeta,
        x.size // n_features, out,
    )  # fmt: skip
    dgamma[:] = slice_dgamma
    dbeta[:] = slice_dbeta


# The parallel drivers: one slice a unit, each writing its own rows only.


@twin(parallel=True)
def _rows_train_slices(x, gamma, beta, eps, out, mean, invstd):
    for g in prange(x.shape[0]):
        _rows_train_slice(x[g], gamma, beta, eps, out[g], mean[g], invstd[g])


@twin(parallel=True)
def _rows_backward_slices(dy, x, mean, invstd, gamma, out, dgamma, dbeta):
    for g in prange(x.shape[0]):
        _rows_backward_slice(dy[g], x[g], mean[g], invstd[g], gamma, out[g], dgamma[g], dbeta[g])


@twin(parallel=True)
def _columns_train_slices(x, n_features, run, width, gamma, beta, eps, out, mean, invstd):
    for g in prange(x.shape[0]):
        _columns_train_slice(
            x[g], n_features, run, width, gamma, beta, eps, out[g], mean[g], invstd[g]
        )


@twin(parallel=True)
def _columns_backward_slices(
    dy, x, n_features, run, width, mean, invstd, gamma, out, dgamma, dbeta
):
    for g in prange(x.shape[0]):
        _columns_backward_slice(
            dy[g], x[g], n_features, run, width, mean[g], invstd[g], gamma, out[g], dgamma[g],
            dbeta[g],
        )  # fmt: skip


@twin(entry=True)
def rows_train_forward(x, gamma, beta, eps, out):
    """Each slice x[g] (P, C, Q) normalized with its own statistics into out[g].

    x and out are (G, P, C, Q) C-contiguous; returns float64 mean and invstd
    of shape (G, C).
    """
    mean = np.empty((x.shape[0], x.shape[2]))
    invstd = np.empty((x.shape[0], x.shape[2]))
    _rows_train_slices(x, gamma, beta, eps, out, mean, invstd)
    return mean, invstd


@twin(entry=True)
def rows_backward(dy, x, mean, invstd, gamma, out):
    """Each slice's training dx into out; returns float64 dgamma and dbeta summed over slices.

    dy, x and out are (G, P, C, Q) C-contiguous, mean and invstd (G, C).
    """
    dgamma = np.empty(mean.shape)
    dbeta = np.empty(mean.shape)
    _rows_backward_slices(dy, x, mean, invstd, gamma, out, dgamma, dbeta)
    return row_sums(dgamma.T), row_sums(dbeta.T)


@twin(entry=True)
def columns_train_forward(x, n_features, run, width, gamma, beta, eps, out):
    """Each slice x[g] (flat rows of n_features * run values) normalized on its own into out[g].

    x and out are (G, S) C-contiguous; returns float64 mean and invstd of
    shape (G, C).
    """
    mean = np.empty((x.shape[0], n_features))
    invstd = np.empty((x.shape[0], n_features))
    _columns_train_slices(x, n_features, run, width, gamma, beta, eps, out, mean, invstd)
    return mean, invstd


@twin(entry=True)
def columns_backward(dy, x, n_features, run, width, mean, invstd, gamma, out):
    """Each slice's training dx into out; returns float64 dgamma and dbeta summed over slices."""
    dgamma = np.empty(mean.shape)
    dbeta = np.empty(mean.shape)
    _columns_backward_slices(
        dy, x, n_features, run, width, mean, invstd, gamma, out, dgamma, dbeta
    )
    return row_sums(dgamma.T), row_sums(dbeta.T)


@twin(entry=True)
def slice_sums(per_slice):
    """float64 (G, C) per-slice values summed over the slices, slice after slice."""
    return row_sums(per_slice.T)


twin.finish()
# The slices' serial internals are parallel=True functions without a parallel
# loop (see _twins): compiled into the parallel entries, they would say so.
for _entry in (rows_train_forward, rows_backward, columns_train_forward, columns_backward):
    _entry._compile_for_args = _quiet(_entry._compile_for_args)
_compile.guard(globals())
