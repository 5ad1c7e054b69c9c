"""The running-statistics rule shared by the layers: PyTorch's update, all features or none."""

from collections.abc import Sequence

import numpy as np
from numba import njit

from fastbn import _compile

__all__ = ["feature_list", "fold_batches", "nonfinite_batch_stats", "nonfinite_features"]

# How many offending features an error message lists before it stops.
SHOWN_FEATURES = 8

# The per-feature work of a small batch is a few microseconds of NumPy calls
# (about 1 us each); these loops do it in one call.


@njit(cache=True)
def nonfinite_batch_stats(mean, invstd):
    """Return the features whose batch mean is not finite or whose variance overflowed."""
    bad = []
    for c in range(mean.size):
        # invstd > 0 is False for NaN and for 1 / sqrt(inf).
        if not (np.isfinite(mean[c]) and invstd[c] > 0.0):
            bad.append(c)
    return bad


@njit(cache=True)
def nonfinite_features(running_mean, running_var):
    """Return the features whose running mean or variance is not finite (after torch's update).

    One call of about 0.5 us at 128 features, where NumPy's isfinite over
    both, or their dot product under np.errstate, took 2-3 us.
    """
    bad = []
    for c in range(running_mean.size):
        if not (np.isfinite(running_mean[c]) and np.isfinite(running_var[c])):
            bad.append(c)
    return bad


@njit(cache=True, error_model="numpy")
def fold_batches(running_mean, running_var, mean, invstd, eps, momentum, counter, bessel):
    """Apply PyTorch's running-statistics update in place, batch after batch, all or none.

    mean and invstd are (G, C): G batches' float64 statistics, folded in
    order (ghost batches), or (C,) for one batch. Batch g's factor f is
    momentum, or for momentum < 0 (torch's None) the cumulative average
    1 / (counter + g + 1), counter being num_batches_tracked before the call.
    running = (1 - f) * running + f * batch, in float64 and rounded once to
    the running statistics' dtype, with the unbiased variance var * bessel.
    If a result is not finite in that dtype, nothing is written, and the
    offending features and their batch are returned; else ([], -1).
    """
    mean = mean.reshape((-1, running_mean.size))
    invstd = invstd.reshape((-1, running_mean.size))
    new_mean = running_mean.copy()
    new_var = running_var.copy()
    for g in range(mean.shape[0]):
        f = momentum if momentum >= 0.0 else 1.0 / (counter + g + 1)
        bad = []
        for c in range(mean.shape[1]):
            # invstd = 1 / sqrt(var + eps) in float64, so 1 / invstd**2 gives
            # var + eps to a few ulp: var to ~1e-15 relative, or to ~1e-15 * eps
            # absolute where var << eps (clipped at 0: only rounding goes below).
            var = 1.0 / (invstd[g, c] * invstd[g, c]) - eps
            if var < 0.0:  # NaN fails the test and propagates
                var = 0.0
            new_mean[c] = (1.0 - f) * np.float64(new_mean[c]) + f * mean[g, c]
            new_var[c] = (1.0 - f) * np.float64(new_var[c]) + f * (var * bessel)
            # A NaN or inf batch statistic survives even f = 0: 0 * inf is NaN.
            if not (np.isfinite(new_mean[c]) and np.isfinite(new_var[c])):
                bad.append(c)
        if bad:
            return bad, g
    running_mean[:] = new_mean
    running_var[:] = new_var
    return [c for c in range(0)], -1


def feature_list(bad: Sequence[int]) -> str:
    """Name the features of the list ``bad`` in a message."""
    shown = ", ".join(str(c) for c in bad[:SHOWN_FEATURES])
    more = f" and {len(bad) - SHOWN_FEATURES} more" if len(bad) > SHOWN_FEATURES else ""
    return f"[{shown}{more}]"


_compile.guard(globals())
