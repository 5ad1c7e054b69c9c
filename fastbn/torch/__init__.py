"""fastbn for PyTorch: drop-in BatchNorm modules and batch_norm on fastbn's kernels.

    import fastbn.torch as fbt
    model = fbt.convert(model)      # every torch BatchNorm1d/2d/3d becomes fastbn's
    y = fbt.batch_norm(x, running_mean, running_var, weight, bias, training=True)

`import fastbn` never imports torch; this subpackage is tested with torch 2.13.0 (the
``torch`` extra) and warns under another release.
"""

import torch

from fastbn.torch import _compat, _threads
from fastbn.torch.functional import batch_norm
from fastbn.torch.modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormReLU1d,
    BatchNormReLU2d,
    BatchNormReLU3d,
    convert,
    revert,
)
from fastbn.torch.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from fastbn.torch.sync import SyncBatchNorm

_compat.warn_if_untested(torch.__version__)
_threads.start_numba_beside_torch()

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormReLU1d",
    "BatchNormReLU2d",
    "BatchNormReLU3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "SyncBatchNorm",
    "batch_norm",
    "convert",
    "revert",
]
