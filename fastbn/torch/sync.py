"""SyncBatchNorm: batch norm over the union of every process's batch, on the CPU.

PyTorch's own ``torch.nn.SyncBatchNorm`` refuses CPU tensors, and
``DistributedDataParallel`` refuses any ``torch.nn.SyncBatchNorm`` in a CPU
module. This one is built on ``torch.distributed`` (gloo, or any backend
whose collectives take CPU tensors) and fastbn's kernels:

- forward: each rank reduces its batch to (count, mean, M2) per channel in
  float64 (`_ops.moments_arrays`), the ranks exchange them in one
  ``all_gather``, and every rank merges them in rank order with the
  parallel-variance formula (Chan et al.), so every rank holds bit-identical
  global statistics; the output is normalized with them (`_ops.eval_arrays`);
- backward: each rank's per-channel sums of dy and dy * x_hat (from the
  global statistics), one ``all_reduce``, and dx from the global sums and
  count (`_ops.input_gradient_arrays`). The weight and bias gradients are
  the rank's own sums, as in torch: DistributedDataParallel averages them.

The module subclasses ``torch.nn.modules.batchnorm._BatchNorm``, not
``torch.nn.SyncBatchNorm``, so that DistributedDataParallel takes it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeAlias

import numpy as np
import torch
import torch.distributed as dist
from numpy.typing import NDArray
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm
from torch.types import Device

from fastbn import _checks, _engine
from fastbn.torch import _ops, functional
from fastbn.torch.modules import FastBatchNorm, forward_state
from fastbn.torch.renorm import BatchRenormBase

__all__ = ["SyncBatchNorm"]

_Float64: TypeAlias = NDArray[np.float64]


def _exchange(
    count: int,
    mean: _Float64,
    var: _Float64,
    group: dist.ProcessGroup | None,
    world_size: int,
) -> _Float64:
    """All ranks' (count, mean, M2) per channel: a (world_size, 1 + 2C) float64 array, rank order.

    One ``all_gather`` of a flat float64 tensor ``[count, mean..., M2...]``
    (gloo has no ``all_gather_into_tensor``; the outputs are rows of one buffer).
    """
    c = mean.shape[0]
    local = torch.empty(1 + 2 * c, dtype=torch.float64)
    values = local.numpy()
    values[0] = count
    values[1 : 1 + c] = mean
    np.multiply(var, count, out=values[1 + c :])
    gathered = torch.empty(world_size, 1 + 2 * c, dtype=torch.float64)
    dist.all_gather(list(gathered.unbind(0)), local, group=group)
    return gathered.numpy()


def _merge(gathered: _Float64) -> tuple[int, _Float64, _Float64]:
    """(count, mean, biased var) of the union, merged in rank order (Chan et al.).

    Every rank runs this on the same gathered values in the same order, with
    IEEE operations only, so every rank gets the same bits. Ranks with no
    values contribute nothing.
    """
    c = (gathered.shape[1] - 1) // 2
    n, mean, m2 = 0.0, np.zeros(c), np.zeros(c)
    for row in gathered:
        n_b = row[0]
        if n_b == 0.0:
            continue
        mean_b, m2_b = row[1 : 1 + c], row[1 + c :]
        if n == 0.0:
            n, mean, m2 = n_b, mean_b.copy(), m2_b.copy()
            continue
        total = n + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / total)
        m2 = m2 + m2_b + delta * delta * (n * n_b / total)
        n = total
    var = m2 / n if n > 0.0 else m2
    return int(n), mean, var


class _SyncBatchNormFunction(torch.autograd.Function):
    """y with the global statistics.

    ``apply(input, weight, bias, eps, group, world_size, fast, fold)``
    returns (y, mean, invstd, count): the global float64 (C,) statistics and
    the global count of values per channel (zeros and 0 when every rank's
    batch is empty), which ``fold`` (None: nothing to update) takes into the
    running statistics before the forward returns, as the plain Function
    does (`fastbn.torch.functional.folder` says why). ``fast``: fastbn's
    kernels (CPU float32/float64, parameters of the input's dtype); else
    torch ops in float64 (other CPU dtypes, mixed dtypes). What the backward
    needs is saved with ``save_for_backward``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        group: dist.ProcessGroup | None,
        world_size: int,
        fast: bool,
        fold: Callable[[torch.Tensor, torch.Tensor, int], None] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        c = input.shape[1]
        local_count = input.numel() // c if c else 0
        if local_count > 1 and fast:
            mean, var = _ops.moments_arrays(input)
        elif local_count > 0:  # torch ops (the kernels refuse one value per channel in training)
            mean_t, var_t = _ops.torch_moments(input.detach())
            mean, var = mean_t.numpy(), var_t.numpy()
        else:
            mean, var = np.zeros(c), np.zeros(c)

        count, mean, var = _merge(_exchange(local_count, mean, var, group, world_size))
        if count == 1:
            # Every rank sees the same gathered counts: all raise, none waits.
            raise ValueError(
                "Expected more than 1 value per channel when training, got "
                f"{count} over the {world_size} processes of the group "
                f"(input size {tuple(input.shape)} on this one)"
            )
        invstd = 1.0 / np.sqrt(var + eps)
        mean_t, invstd_t = torch.from_numpy(mean), torch.from_numpy(invstd)
        if fold is not None:
            fold(mean_t, invstd_t, count)
        ctx.mark_non_differentiable(mean_t, invstd_t)
        ctx.save_for_backward(input, weight, mean_t, invstd_t)
        ctx.param_dtypes = tuple(None if p is None else p.dtype for p in (weight, bias))
        ctx.sync = (group, count, fast, local_count == 0)
        if count == 0 or local_count == 0:
            # An empty batch gives an empty output, as torch's BatchNorm gives.
            return torch.empty_like(input), mean_t, invstd_t, count
        if fast:
            x, plan, last = _ops.planned(input, training=False)
            y = _ops.empty_output(input, last)
            _engine.evaluate(
                plan, x, mean, var, _ops.kernel_vector(weight, plan, x.dtype, 1.0),
                _ops.kernel_vector(bias, plan, x.dtype, 0.0), eps, _ops.out_array(y, last),
            )  # fmt: skip
            return y, mean_t, invstd_t, count
        with torch.no_grad():
            y = _ops.torch_output(input, weight, bias, mean_t, invstd_t)
        return y, mean_t, invstd_t, count

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor, *_statistics_grads: Any) -> tuple[Any, ...]:
        input, weight, mean_t, invstd_t = ctx.saved_tensors
        group, count, fast, empty = ctx.sync
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        c = input.shape[1]
        mean, invstd = mean_t.numpy(), invstd_t.numpy()
        if empty:
            dgamma, dbeta = np.zeros(c), np.zeros(c)
        elif fast:
            dgamma, dbeta = _ops.param_sums(grad, input, mean, invstd)
        else:
            dims, shape = _ops.reduced_dims(input), _ops.channel_shape(input)
            dy = grad.to(torch.float64)
            x_hat = (input.to(torch.float64) - mean_t.view(shape)) * invstd_t.view(shape)
            dgamma, dbeta = (dy * x_hat).sum(dims).numpy(), dy.sum(dims).numpy()

        dx = None
        if need_input and count == 0:
            dx = torch.empty_like(input)
        elif need_input:
            # Every rank whose input needs a gradient joins; like torch's, a rank
            # whose input needs none skips it, so the ranks must agree on that.
            sums = torch.from_numpy(np.stack([dgamma, dbeta]))
            dist.all_reduce(sums, group=group)
            total_dgamma, total_dbeta = sums.numpy()
            if empty:
                dx = torch.empty_like(input)
            elif fast:
                dx = _ops.input_gradient_arrays(
                    grad, input, weight, mean, invstd, total_dgamma, total_dbeta, count
                )
            else:
                # dx = gamma * invstd * (dy - sum(dy) / n - x_hat * sum(dy * x_hat) / n)
                scale = invstd_t
                if weight is not None:
                    scale = scale * weight.detach().to(torch.float64)
                k_mean = torch.from_numpy(total_dbeta / count).view(shape)
                k_xhat = torch.from_numpy(total_dgamma / count).view(shape)
                dx = (scale.view(shape) * (dy - k_mean - x_hat * k_xhat)).to(input.dtype)

        weight_dtype, bias_dtype = ctx.param_dtypes
        dweight = torch.from_numpy(dgamma).to(weight_dtype) if need_weight else None
        dbias = torch.from_numpy(dbeta).to(bias_dtype) if need_bias else None
        return dx, dweight, dbias, None, None, None, None, None


def _fold(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    count: int,
    *,
    eps: float,
    momentum: float | None,
    counter: torch.Tensor | None,
) -> None:
    """Fold the global statistics into the running ones: all features and the counter, or nothing.

    torch's rule (momentum None: the cumulative average over
    num_batches_tracked) with the global unbiased variance; non-finite
    results leave everything unchanged with a RuntimeWarning. The inputs are
    the same on every rank, so every rank takes the same decision. No values
    on any rank (count 0) only advance the counter, as torch's rule does.
    """
    if count == 0:
        if counter is not None:
            counter.add_(1)
        return
    what = "global batch statistics"
    # The user's line, counted from the function that warns: _fold, the Function's forward
    # and apply, the module's _sync_forward and forward, and torch's Module.__call__ (two
    # frames) stand between.
    stacklevel = 9
    if running_mean.dtype in (torch.float32, torch.float64) and running_mean.is_cpu:
        functional.fold(
            running_mean, running_var, mean.numpy(), invstd.numpy(), eps, momentum,
            counter, count, stacklevel=stacklevel, what=what,
        )  # fmt: skip
        return
    # float16, bfloat16 buffers: the same rule in torch ops
    var = (invstd.reciprocal().square() - eps).clamp_min(0.0)
    finite = _ops.fold_torch(running_mean, running_var, mean, var, momentum, counter, count)
    if not finite.all():
        functional.warn_not_taken(
            torch.nonzero(~finite).flatten().tolist(), running_mean.dtype, stacklevel, what
        )


class SyncBatchNorm(FastBatchNorm, _BatchNorm):
    """Batch norm synchronized across the processes of a torch.distributed group, on CPUs.

    ``torch.nn.SyncBatchNorm``'s constructor and semantics, for CPU tensors:

    - in training (and whenever batch statistics are used: also in eval mode
      without running statistics) with an initialized process group
      (``process_group``, else the default one) of more than one rank, the
      input is normalized with the mean and biased variance of the union of
      all ranks' batches. That costs one collective per forward (an
      ``all_gather`` of (count, mean, M2) per channel) and one per backward
      (an ``all_reduce`` of the sums of dy and dy * x_hat; skipped, as in
      torch, when the input needs no gradient, so the ranks must agree on
      that). Ranks may hold different batch sizes, zero included: an empty
      batch gives an empty output, and its rank still takes part in both
      collectives. A global count of one value per channel raises
      ValueError on every rank; if every rank's batch is empty, the outputs
      are empty and the running statistics are left as torch leaves them
      for an empty batch (num_batches_tracked counts it).
    - The running statistics take the global mean and unbiased variance by
      torch's rule (momentum None: the cumulative average) and are
      identical on every rank; a batch whose global statistics are not
      finite leaves them and num_batches_tracked unchanged with a
      RuntimeWarning, on every rank (fastbn.torch's rule: docs/guide/contract.md).
    - The weight and bias gradients are the rank's own sums, as in torch:
      DistributedDataParallel averages them. Double backward is not
      supported (the backward is marked once-differentiable).
    - Otherwise (eval mode with running statistics, a group of one rank, no
      initialized group) it is fastbn's BatchNorm (`fastbn.torch.BatchNorm2d`
      and its siblings): no collective.

    Input dimension (ndim >= 2), channel count (must be num_features), dtype
    (floating), device (CPU) and eps are checked before any collective, and
    raise on the rank that got the bad input. Its peers cannot know: they
    wait in the forward's all_gather until the group's timeout
    (``init_process_group``'s ``timeout``; gloo's default is 30 minutes) and
    raise there, as with torch's SyncBatchNorm.

    CPU float32/float64 input with parameters of the same dtype takes
    fastbn's kernels; other CPU floating dtypes (float16, bfloat16) or mixed
    dtypes fall back to the same computation in torch ops with float64
    accumulation and the same two collectives. Tensors off the CPU raise
    RuntimeError (use ``torch.nn.SyncBatchNorm`` on GPUs).

    Parameters
    ----------
    num_features : int
        C, the channels (dimension 1 of the input).
    eps, momentum, affine, track_running_stats, device, dtype
        As for ``torch.nn.BatchNorm2d``.
    process_group : torch.distributed.ProcessGroup, optional
        The group to synchronize over (default: the default group). Its
        backend must take CPU tensors (gloo does).

    Attributes
    ----------
    fused_relu : bool
        False, unless `convert_sync_batchnorm` made the layer from one of
        fastbn's BatchNormReLU modules: then a ReLU follows the
        normalization (synchronized or local), and the repr says so.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        buffers = self._buffers
        batch_stats = self.training or (
            buffers.get("running_mean") is None and buffers.get("running_var") is None
        )
        if batch_stats and dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD if self.process_group is None else self.process_group
            world_size = dist.get_world_size(group)
            if world_size > 1:
                return self._sync_forward(input, group, world_size)
        return self._fast_forward(input)

    def _sync_forward(
        self, input: torch.Tensor, group: dist.ProcessGroup | None, world_size: int
    ) -> torch.Tensor:
        """The synchronized forward: checks first, then the op, then the running statistics."""
        weight, bias, running_mean, running_var, counter, momentum = forward_state(self)
        if self.training and not self.track_running_stats:
            running_mean = running_var = None

        # Everything that can fail on one rank only fails here, before the collective.
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"expected input with {self.num_features} channels (dimension 1), "
                f"got input of size {tuple(input.shape)}"
            )
        if not input.is_floating_point():
            raise TypeError(f"expected a floating-point input, got dtype {input.dtype}")
        if not input.is_cpu:
            raise RuntimeError(
                f"fastbn.torch.SyncBatchNorm runs on CPU tensors, got input on {input.device}; "
                "use torch.nn.SyncBatchNorm on GPUs"
            )
        eps = _checks.positive_eps(self.eps)
        fast = _ops.fast_path(input, weight, bias)

        update = None
        if running_mean is not None:
            assert running_var is not None  # given with running_mean
            update = functools.partial(
                _fold, running_mean, running_var, eps=eps, momentum=momentum, counter=counter
            )
        y = _SyncBatchNormFunction.apply(
            input, weight, bias, eps, group, world_size, fast, update
        )[0]
        # A BatchNormReLU's conversion: its ReLU after the synchronized normalization.
        return torch.relu(y) if self.fused_relu else y

    def extra_repr(self) -> str:
        return super().extra_repr() + (", fused_relu=True" if self.fused_relu else "")

    @classmethod
    def convert_sync_batchnorm(
        cls, module: torch.nn.Module, process_group: dist.ProcessGroup | None = None
    ) -> torch.nn.Module:
        """Replace every BatchNorm layer in module with a SyncBatchNorm; return the result.

        What each layer computes is kept, or nothing is converted:

        - torch's BatchNorm1d/2d/3d and SyncBatchNorm, fastbn's
          BatchNorm1d/2d/3d and SyncBatchNorm (and any other ``_BatchNorm``
          subclass, as torch's own conversion takes them) become plain
          SyncBatchNorm layers;
        - fastbn's BatchNormReLU1d/2d/3d (made directly or by
          ``fastbn.torch.convert(model, fuse_relu=True)``) become
          SyncBatchNorm layers with ``fused_relu=True`` (shown in their
          repr): the ReLU follows the normalization, synchronized or local;
        - fastbn's BatchRenorm1d/2d/3d, and any layer with a
          ``virtual_batch_size`` (ghost batch norm), raise ValueError naming
          the layer's path and class, before any layer is converted: Batch
          Renormalization's corrections r and d have no synchronized form
          here, and ghost batch norm normalizes each slice of
          ``virtual_batch_size`` examples with that slice's own statistics,
          which is not what a synchronized layer computes.

        The new layers take the old ones' parameters (the same objects, so
        requires_grad and optimizers holding them are kept), buffers
        (running statistics, num_batches_tracked), eps, momentum and training
        mode. As with torch's, a BatchNorm passed as the module itself comes
        back as a new object: use the return value.

        Parameters
        ----------
        module : torch.nn.Module
        process_group : torch.distributed.ProcessGroup, optional
            The group the new layers synchronize over (default: the default group).

        Returns
        -------
        torch.nn.Module

        Raises
        ------
        ValueError
            If module holds a BatchRenorm layer or a ghost batch norm layer
            (module is then unchanged).
        """
        for name, layer in module.named_modules():
            reason = _unsupported(layer)
            if reason is not None:
                where = "the module itself" if not name else f"layer {name!r}"
                raise ValueError(
                    f"SyncBatchNorm.convert_sync_batchnorm: {where} is a "
                    f"{type(layer).__name__}, which has no synchronized form: {reason}. "
                    "Nothing was converted"
                )
        return cls._converted(module, process_group)

    @classmethod
    def _converted(
        cls, module: torch.nn.Module, process_group: dist.ProcessGroup | None
    ) -> torch.nn.Module:
        """`convert_sync_batchnorm` once its layers are known to convert."""
        if isinstance(module, _BatchNorm):
            converted = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
                device="meta",  # placeholders, replaced below: nothing allocated
            )
            # Parameters: the same objects (optimizers keep them); buffers likewise.
            for name, param in module._parameters.items():
                converted._parameters[name] = param
            for name, buffer in module._buffers.items():
                converted._buffers[name] = buffer
            converted.training = module.training
            if getattr(module, "fused_relu", False):  # fastbn's BatchNormReLU, or a converted one
                converted.fused_relu = True
            if hasattr(module, "qconfig"):
                converted.qconfig = module.qconfig
            for name, child in module.named_children():
                converted.add_module(name, cls._converted(child, process_group))
            return converted
        for name, child in module.named_children():
            new_child = cls._converted(child, process_group)
            if new_child is not child:
                setattr(module, name, new_child)
        return module


def _unsupported(layer: torch.nn.Module) -> str | None:
    """Why `SyncBatchNorm.convert_sync_batchnorm` refuses layer, or None if it converts it."""
    if isinstance(layer, BatchRenormBase):
        return (
            "Batch Renormalization corrects the batch statistics toward the running ones "
            "(r and d), which a SyncBatchNorm does not do; replace it with a BatchNorm layer "
            "to synchronize it, or convert the parts of the model without it"
        )
    k = layer.__dict__.get("virtual_batch_size") if isinstance(layer, _BatchNorm) else None
    if k is not None:
        return (
            f"virtual_batch_size={k} (ghost batch norm) normalizes each slice of {k} "
            "examples with that slice's own statistics, not with the statistics of every "
            "process's batch; set virtual_batch_size = None to synchronize it as a plain "
            "batch norm, or convert the parts of the model without it"
        )
    return None
