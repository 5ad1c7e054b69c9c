"""BatchNorm1d, BatchNorm2d, BatchNorm3d on fastbn's kernels; `convert` and `revert`.

Each is a subclass of torch's module of the same name, with the same
constructor, parameters, buffers, state_dict, repr and input checks: only
`forward` differs, and only where fastbn's kernels take the call (CPU
float32/float64 tensors, not traced by torch.jit or ONNX export). Scripting
with torch.jit scripts torch's own module over the same parameters and
buffers (`__prepare_scriptable__`).
"""

import torch

from fastbn.torch import functional

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert", "revert"]


class _FastBatchNorm:
    """The forward shared by the three modules: torch's module logic on `functional.forward`."""

    def forward(self, input):
        self._check_input_dim(input)
        # The dicts, not attributes: Module.__getattr__ costs ~0.5 us a tensor.
        parameters, buffers = self._parameters, self._buffers
        running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
        counter = None
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            counter = buffers.get("num_batches_tracked")
            if counter is not None:
                momentum = self.momentum
        batch_stats = self.training or (running_mean is None and running_var is None)
        if self.training and not self.track_running_stats:
            running_mean = running_var = None
        if batch_stats:
            functional.verify_batch_size(input.size())
        return functional.forward(
            input,
            running_mean,
            running_var,
            parameters.get("weight"),
            parameters.get("bias"),
            batch_stats,
            momentum,
            self.eps,
            counter,
        )[0]

    def __prepare_scriptable__(self):
        # torch.jit.script compiles torch's module, sharing this one's tensors.
        scripted = _swapped(self, _TORCH[type(self)], copy=True)
        return scripted


class BatchNorm1d(_FastBatchNorm, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on fastbn's kernels: (N, C) and (N, C, L) input."""


class BatchNorm2d(_FastBatchNorm, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on fastbn's kernels: (N, C, H, W), contiguous or channels_last."""


class BatchNorm3d(_FastBatchNorm, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on fastbn's kernels: (N, C, D, H, W), any of its two layouts."""


_FAST = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}
_TORCH = {fast: theirs for theirs, fast in _FAST.items()}


def _swapped(module, cls, copy=False):
    """module as an instance of cls: in place, or a new module sharing its tensors and hooks."""
    if not copy:
        module.__class__ = cls
        return module
    other = cls.__new__(cls)
    other.__dict__.update(module.__dict__)
    return other


def _replace(module, table):
    swapped = table.get(type(module))
    if swapped is not None:
        return _swapped(module, swapped)
    for child in module.children():
        _replace(child, table)
    return module


def convert(module):
    """Make every torch BatchNorm1d/2d/3d in module fastbn's, in place; return module.

    Layers are converted in place (their class changes), so parameters,
    buffers, requires_grad, the training mode, hooks and the optimizers that
    hold the parameters are all kept; a BatchNorm passed as the module itself
    comes back converted. Subclasses of torch's classes (SyncBatchNorm,
    fastbn's own, anyone else's) are left alone.

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    torch.nn.Module
        module itself.
    """
    return _replace(module, _FAST)


def revert(module):
    """Make every fastbn BatchNorm1d/2d/3d in module torch's own again, in place; return module."""
    return _replace(module, _TORCH)
