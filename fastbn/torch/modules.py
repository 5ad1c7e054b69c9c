"""BatchNorm1d, BatchNorm2d, BatchNorm3d on fastbn's kernels; `convert` and `revert`.

Each is a subclass of torch's module of the same name, with the same
constructor, parameters, buffers, state_dict, repr and input checks: only
`forward` differs, and only where fastbn's kernels take the call (CPU
float32/float64 tensors, not traced by torch.jit or ONNX export). Scripted
with torch.jit, a module runs torch's own forward.
"""

import torch

from fastbn.torch import functional

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert", "forward_state", "revert"]


class _FastBatchNorm:
    """The forward shared by the three modules: torch's module logic on `functional.forward`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(input)
        return self._fast_forward(input)

    def _scripted_forward(self, input: torch.Tensor) -> torch.Tensor:
        """torch's module forward, which torch.jit.script compiles in place of fastbn's."""
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            momentum = self.momentum
            factor = 1.0 / float(self.num_batches_tracked) if momentum is None else momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        tracked = not self.training or self.track_running_stats
        return torch.nn.functional.batch_norm(
            input,
            self.running_mean if tracked else None,
            self.running_var if tracked else None,
            self.weight,
            self.bias,
            batch_stats,
            factor,
            self.eps,
        )

    @torch.jit.unused
    def _fast_forward(self, input):
        self._check_input_dim(input)
        weight, bias, running_mean, running_var, counter, momentum = forward_state(self)
        batch_stats = self.training or (running_mean is None and running_var is None)
        if self.training and not self.track_running_stats:
            running_mean = running_var = None
        if batch_stats:
            functional.verify_batch_size(input.size())
        return functional.forward(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            batch_stats,
            momentum,
            self.eps,
            counter,
            stacklevel=7,  # the caller of the module, through torch's Module.__call__
        )[0]


def forward_state(module):
    """A BatchNorm module's tensors for a forward, by torch's module rule.

    Returns (weight, bias, running_mean, running_var, counter, momentum):
    counter is num_batches_tracked when this forward may fold the batch into
    the running statistics (training and tracking), else None, and momentum
    None (the cumulative average) only then. Read from the module's dicts,
    not its attributes: Module.__getattr__ costs about 0.5 us a tensor.
    """
    parameters, buffers = module._parameters, module._buffers
    counter = None
    momentum = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats:
        counter = buffers.get("num_batches_tracked")
        if counter is not None:
            momentum = module.momentum
    return (
        parameters.get("weight"),
        parameters.get("bias"),
        buffers.get("running_mean"),
        buffers.get("running_var"),
        counter,
        momentum,
    )


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


def _replace(module, table):
    swapped = table.get(type(module))
    if swapped is not None:
        module.__class__ = swapped
        return module
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
