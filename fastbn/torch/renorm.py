"""BatchRenorm1d, BatchRenorm2d, BatchRenorm3d: Batch Renormalization (Ioffe, 2017) for PyTorch.

In training mode the output is batch norm's corrected toward the running
statistics, ``y = weight * (x_hat * r + d) + bias`` with

    r = clip(sigma_B / sigma, rmin, rmax),    d = clip((mu_B - mu) / sigma, -dmax, dmax)

from the batch's mean mu_B and biased variance (sigma_B = sqrt(var_B + eps))
and the running statistics before this batch's update (sigma =
sqrt(running_var + eps)); r and d are constants for autograd. Eval mode is
batch norm with the running statistics (`fastbn.torch.batch_norm`).

Three paths compute the training forward:

- eager, CPU float32/float64 tensors (parameters and buffers alike):
  `BatchRenormFunction`, fastbn's functional `batch_renorm_train` and
  `batch_renorm_backward` on NumPy views of the tensors (channels_last
  without copies, as `fastbn.torch._ops` hands tensors to the kernels);
- other devices and dtypes, and graphs under `torch.compile`: the same
  formula in torch ops (`_torch_train`), statistics accumulated in float64
  on the CPU, r and d detached (computed by an op of their own,
  ``fastbn::batch_renorm_corrections``, which torch.compile cannot recompute).

The running statistics follow torch's rule (momentum, or the cumulative
average when momentum is None; the unbiased variance into running_var;
num_batches_tracked), with fastbn's one difference: a batch whose
statistics are not finite leaves them and the counter unchanged (eagerly
with a RuntimeWarning naming the features).

The modules are not scriptable with torch.jit (their forward is Python
that TorchScript does not compile); torch.compile takes them whole.
"""

# No `from __future__ import annotations`: torch.library.custom_op reads the
# annotations of `_corrections` as objects.
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.types import Device

from fastbn import _checks, renorm
from fastbn.torch import _compat, _ops, functional
from fastbn.torch.modules import forward_state, leaf_call

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "BatchRenormFunction"]

_CLIPPING_KEYS = ("rmax", "rmin", "dmax")
# The paper's final limits; rmin None means 1 / rmax, following rmax as it changes.
_DEFAULT_CLIPPING = {"rmax": 3.0, "rmin": None, "dmax": 5.0}
_LIMIT_NAMES = ("rmax", "dmax", "rmin")


def _renorm_limits(rmax: float, rmin: float | None, dmax: float) -> renorm.Limits:
    """(r_min, r_max, d_max) checked by `renorm.clip_limits`, errors naming the attributes."""
    return renorm.clip_limits(rmax, dmax, rmin, names=_LIMIT_NAMES)


class BatchRenormFunction(torch.autograd.Function):
    """Batch Renormalization's training output on fastbn's kernels (CPU float32/float64).

    ``apply(input, weight, bias, running_mean, running_var, eps, limits, fold)``
    returns (y, mean, invstd, r, d): limits is (r_min, r_max, d_max); the
    float64 (C,) batch mean and invstd and the corrections r and d are not
    differentiable. ``fold`` takes the batch statistics into the running
    ones (after r and d are computed from them) before the forward returns
    (`_ops.Fold`).
    """

    @staticmethod
    def forward(
        input: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        eps: float,
        limits: renorm.Limits,
        fold: _ops.Fold,
    ) -> tuple[torch.Tensor, ...]:
        x, plan, last = _ops.planned(input, training=True)
        y = _ops.empty_output(input, last)
        float64 = np.dtype(np.float64)
        running_mean64, running_var64, gamma, beta = (
            _ops.kernel_vector(t, plan, float64, default)
            for t, default in ((running_mean, 0.0), (running_var, 1.0), (weight, 1.0), (bias, 0.0))
        )
        _, mean, invstd, r, d = renorm.train(
            plan, x, running_mean64, running_var64, gamma, beta, limits, eps,
            _ops.out_array(y, last),
        )  # fmt: skip
        fold(mean, invstd)
        return (y, *(torch.from_numpy(a) for a in (mean, invstd, r, d)))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        input, weight, bias, _, _, eps, _, _ = inputs
        _, mean, invstd, r, d = output
        ctx.mark_non_differentiable(mean, invstd, r, d)
        ctx.set_materialize_grads(False)  # no zero tensors made for the constants' gradients
        ctx.save_for_backward(input, weight, bias, mean, invstd, r, d)
        ctx.eps = eps

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None, *_constants_grads: Any) -> _ops.Grads:
        if grad is None:  # y's gradient undefined (a hook's doing): no gradient flows
            return (None,) * 8
        input, weight, bias, mean, invstd, r, d = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: a differentiable gradient
            eps = ctx.eps

            def formula(
                input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
            ) -> torch.Tensor:
                batch_mean, var = _ops.torch_moments(input)
                return _renorm_output(input, weight, bias, batch_mean, var, r, d, eps)

            grads = _ops.differentiable_grads(needs, grad, formula, input, weight, bias)
            return (*grads, None, None, None, None, None)
        x, plan, last = _ops.planned(input, training=True)
        dy = _ops.grad_array(grad, last)
        statistics = (mean.numpy(), invstd.numpy(), r.numpy(), d.numpy())
        dx = None
        if needs[0]:
            dx = _ops.empty_output(input, last)
            gamma = _ops.kernel_vector(weight, plan, np.dtype(np.float64), 1.0)
            _, dgamma, dbeta = renorm.backward(
                plan, dy, x, *statistics, gamma, _ops.out_array(dx, last)
            )
        else:
            dgamma, dbeta = renorm.param_grads(plan, dy, x, *statistics)
        return (
            dx,
            _ops.param_grad(dgamma, x.dtype) if needs[1] else None,
            _ops.param_grad(dbeta, x.dtype) if needs[2] else None,
            None,
            None,
            None,
            None,
            None,
        )


_apply = _compat.function_apply(BatchRenormFunction)


# ------------------------------------------------------------- torch ops


def _renorm_output(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    r: torch.Tensor,
    d: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """weight * (x_hat * r + d) + bias in input's dtype; mean, var in the accumulation dtype."""
    shape = _ops.channel_shape(input)
    x_hat = (input.to(mean.dtype) - mean.view(shape)) * torch.rsqrt(var + eps).view(shape)
    y = x_hat * r.view(shape) + d.view(shape)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y.to(input.dtype)


# An op of its own, opaque to torch.compile: its partitioner would otherwise
# recompute r and d in the backward from the running statistics, which the
# forward has updated in place by then (wrong gradients; pytorch/pytorch#197039).
@torch.library.custom_op("fastbn::batch_renorm_corrections", mutates_args=())
def _corrections(
    mean: torch.Tensor,
    var: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    r_min: float,
    r_max: float,
    d_max: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """r and d in torch ops, in mean's dtype, from batch and running statistics (constants)."""
    sigma = torch.sqrt(running_var.to(mean.dtype) + eps)
    r = torch.clamp(torch.sqrt(var + eps) / sigma, r_min, r_max)
    d = torch.clamp((mean - running_mean.to(mean.dtype)) / sigma, -d_max, d_max)
    return r, d


@_corrections.register_fake
def _(
    mean: torch.Tensor,
    var: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    r_min: float,
    r_max: float,
    d_max: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(mean), torch.empty_like(mean)


def _torch_train(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    limits: renorm.Limits,
    momentum: float | None,
    counter: torch.Tensor | None,
) -> torch.Tensor:
    """The training forward in torch ops, and the running statistics' update in place."""
    mean, var = _ops.torch_moments(input)
    r, d = _corrections(mean.detach(), var.detach(), running_mean, running_var, eps, *limits)
    count = input.numel() // input.shape[1]
    # Before the output's ops save their tensors (`fastbn.torch.functional.folder`).
    _ops.fold_torch(
        running_mean, running_var, mean.detach(), var.detach(), momentum, counter, count
    )
    return _renorm_output(input, weight, bias, mean, var, r, d, eps)


# --------------------------------------------------------------- modules


class BatchRenormBase(_BatchNorm):
    """torch's _BatchNorm with Batch Renormalization in training mode.

    Parameters
    ----------
    num_features : int
        C, the channels (dimension 1 of the input).
    eps, momentum, affine, track_running_stats, device, dtype
        As for ``torch.nn.BatchNorm2d``; track_running_stats must be True
        (renormalization corrects toward the running statistics).
    renorm_clipping : dict, optional
        Keras's ``BatchNormalization(renorm_clipping=...)``: the keys
        ``"rmax"`` (>= 1), ``"rmin"`` (in [0, 1]) and ``"dmax"`` (>= 0),
        real numbers, inf for no limit. A key left out (all of them for
        None) takes its default, rmax=3, rmin=1/rmax, dmax=5, the paper's
        final limits; Keras sets it to inf, 0, inf instead (no clipping).
        Keras's separate ``renorm_momentum`` has no counterpart: the running
        statistics are the module's own, updated with ``momentum``.
    **kwargs
        Other keyword arguments of torch's constructor (``bias=`` in the
        torch versions that have it).

    Attributes
    ----------
    rmax, rmin, dmax : float, float or None, float
        The limits of r (``[rmin, rmax]``, rmin None meaning 1 / rmax) and
        of d (``[-dmax, dmax]``). They may be changed between training steps
        (the paper raises them from 1 and 0 over the first epochs); each
        training forward checks them.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Device = None,
        dtype: torch.dtype | None = None,
        *,
        renorm_clipping: Mapping[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not track_running_stats:
            raise ValueError(
                "Batch Renormalization needs track_running_stats=True: it corrects "
                "the batch statistics toward the running ones"
            )
        if renorm_clipping is None:
            renorm_clipping = {}
        elif not isinstance(renorm_clipping, Mapping):
            raise TypeError(
                f"renorm_clipping must be a dict or None, got {type(renorm_clipping).__name__}"
            )
        unknown = sorted(str(key) for key in renorm_clipping if key not in _CLIPPING_KEYS)
        if unknown:
            raise ValueError(
                f"renorm_clipping has unknown keys {unknown}; its keys are 'rmax', 'rmin', 'dmax'"
            )
        # The user's values, of any type: _renorm_limits checks them.
        clipping: dict[str, Any] = {**_DEFAULT_CLIPPING, **renorm_clipping}
        r_min, r_max, d_max = _renorm_limits(clipping["rmax"], clipping["rmin"], clipping["dmax"])
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs
        )
        self.rmax = r_max
        self.rmin = None if clipping["rmin"] is None else r_min
        self.dmax = d_max

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rmax={self.rmax}, rmin={self.rmin}, dmax={self.dmax}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.fx.Proxy):
            return leaf_call(self, input)
        self._check_input_dim(input)
        weight, bias, running_mean, running_var, counter, momentum = forward_state(self)
        if not self.training:
            return functional.forward(
                input, running_mean, running_var, weight, bias, False, momentum, self.eps
            )
        # Tracked: the constructor requires track_running_stats=True.
        assert running_mean is not None and running_var is not None
        limits = _renorm_limits(self.rmax, self.rmin, self.dmax)
        functional.verify_batch_size(input.size())
        functional.check_sizes(input.shape[1], running_mean, running_var, weight, bias)
        if torch.compiler.is_compiling() or functional.takes_torch_op(
            input, weight, bias, running_mean, running_var
        ):
            return _torch_train(
                input, weight, bias, running_mean, running_var, self.eps, limits, momentum, counter
            )
        eps = _checks.positive_eps(self.eps)
        update = functional.folder(
            running_mean, running_var, eps, momentum, counter,
            input.numel() // input.shape[1], stacklevel=6,
        )  # fmt: skip
        args = (input, weight, bias, running_mean, running_var, eps, limits, update)
        if functional.needs_grad(input, weight, bias):
            return _apply(*args)[0]
        return BatchRenormFunction.forward(*args)[0]


class BatchRenorm1d(BatchRenormBase):
    """Batch Renormalization of (N, C) and (N, C, L) input.

    torch.nn.BatchNorm1d's arguments plus ``renorm_clipping``, and the
    attributes rmax, rmin, dmax: see `BatchRenormBase`.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchRenorm2d(BatchRenormBase):
    """Batch Renormalization of (N, C, H, W) input, contiguous or channels_last.

    torch.nn.BatchNorm2d's arguments plus ``renorm_clipping``, and the
    attributes rmax, rmin, dmax: see `BatchRenormBase`.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchRenorm3d(BatchRenormBase):
    """Batch Renormalization of (N, C, D, H, W) input, contiguous or channels_last_3d.

    torch.nn.BatchNorm3d's arguments plus ``renorm_clipping``, and the
    attributes rmax, rmin, dmax: see `BatchRenormBase`.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")
