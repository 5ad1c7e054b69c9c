"""fastbn: batch normalization for the CPU, compiled with Numba."""

from fastbn._version import __version__
from fastbn.functional import batch_norm_backward, batch_norm_eval, batch_norm_train
from fastbn.layer import BatchNorm

__all__ = [
    "BatchNorm",
    "__version__",
    "batch_norm_backward",
    "batch_norm_eval",
    "batch_norm_train",
]
