"""fastbn: batch normalization for the CPU, compiled with Numba."""

from fastbn._version import __version__
from fastbn.functional import (
    batch_norm_backward,
    batch_norm_eval,
    batch_norm_relu_backward,
    batch_norm_relu_eval,
    batch_norm_relu_train,
    batch_norm_train,
)
from fastbn.ghost import ghost_batch_norm_backward, ghost_batch_norm_train
from fastbn.layer import BatchNorm
from fastbn.renorm import batch_renorm_backward, batch_renorm_train

__all__ = [
    "BatchNorm",
    "__version__",
    "batch_norm_backward",
    "batch_norm_eval",
    "batch_norm_relu_backward",
    "batch_norm_relu_eval",
    "batch_norm_relu_train",
    "batch_norm_train",
    "batch_renorm_backward",
    "batch_renorm_train",
    "ghost_batch_norm_backward",
    "ghost_batch_norm_train",
]
