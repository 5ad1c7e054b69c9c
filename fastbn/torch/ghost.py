"""Ghost batch norm for fastbn's BatchNorm1d/2d/3d: the modules' ``virtual_batch_size``.

A training forward with ``virtual_batch_size=k`` normalizes each consecutive
slice of k examples along dimension 0 with its own statistics (see
`fastbn.ghost`), and folds the slices into the running statistics one after
another by torch's rule: unbiased variance, momentum (None: the cumulative
average), num_batches_tracked counting each slice. As for a plain batch, a
slice whose statistics are not finite leaves running_mean, running_var and
num_batches_tracked unchanged, here for the whole batch (all slices or none).

- CPU float32/float64 tensors, eager: `GhostBatchNormFunction`, the ghost
  functional API on NumPy views of the tensors' memory, viewed as `_ops`
  views them (channels_last as the (N, ..., C) permutation with axis=-1),
  and a RuntimeWarning naming the features of a batch not taken.
- Under torch.compile, for other devices or dtypes, when traced, and under
  torch.func transforms or forward-mode AD: `_moments` and `_output`, the same arithmetic
  in torch ops (statistics in float64 on the CPU, else in at least
  float32), and the running-statistics rule without branching on data
  (`fastbn.torch._ops.fold_torch`), without the warning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from fastbn import _checks, ghost
from fastbn.torch import _compat, _ops
from fastbn.torch.functional import check_sizes, folder, needs_grad, takes_torch_op

__all__ = ["GhostBatchNormFunction", "forward"]


def forward(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    virtual_batch_size: int,
    momentum: float | None,
    eps: float,
    num_batches_tracked: torch.Tensor | None = None,
    stacklevel: int = 2,
) -> torch.Tensor:
    """y of a training forward with virtual batches; the running statistics take each slice.

    Parameters
    ----------
    input : Tensor
        (N, C, *) data; k = virtual_batch_size must divide N.
    running_mean, running_var : Tensor of shape (C,) or None
        Updated in place, slice after slice (None: not tracked).
    weight, bias : Tensor of shape (C,) or None
        Scale and shift.
    virtual_batch_size : int
        k, the examples in each virtual batch.
    momentum : float or None
        Weight of each slice's statistics; None (with a counter) the
        cumulative average.
    eps : float
        Added to the variance.
    num_batches_tracked : Tensor, optional
        A module's counter, advanced by the number of slices when they are taken.
    stacklevel : int
        The warning's, counted as `fastbn.torch.functional.forward` counts it.

    Returns
    -------
    Tensor
        The output, of input's shape and dtype, in the memory format of
        `fastbn.torch.batch_norm`'s.
    """
    k = ghost.checked_virtual_batch_size(virtual_batch_size)
    _check_batch(input.shape, k)
    check_sizes(input.shape[1], running_mean, running_var, weight, bias)
    count = math.prod(input.shape[2:]) * k  # values per channel in a slice
    if torch.compiler.is_compiling() or takes_torch_op(
        input, weight, bias, running_mean, running_var
    ):
        x, mean, var = _moments(input, k)
        if running_mean is not None:  # before the output's ops save their tensors (`folder`)
            assert running_var is not None  # given with running_mean
            _ops.fold_torch(
                running_mean, running_var, mean.flatten(1), var.flatten(1),
                momentum, num_batches_tracked, count,
            )  # fmt: skip
        return _output(input, x, mean, var, weight, bias, eps)
    eps = _checks.positive_eps(eps)
    update = None
    if running_mean is not None:
        assert running_var is not None  # given with running_mean
        update = folder(
            running_mean, running_var, eps, momentum, num_batches_tracked, count, stacklevel + 1
        )
    if needs_grad(input, weight, bias):
        return _apply(input, weight, bias, k, eps, update)[0]
    return GhostBatchNormFunction.forward(input, weight, bias, k, eps, update)[0]


def _check_batch(size: Sequence[int], k: int) -> None:
    """k divides the batch size, and each slice has more than one value per channel."""
    if size[0] % k:
        raise ValueError(
            f"virtual_batch_size={k} does not divide the batch size {size[0]} "
            f"(input size {tuple(size)}): use a batch size that is a multiple of {k}"
        )
    if k * math.prod(size[2:]) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size "
            f"{tuple(size)} with virtual_batch_size={k}"
        )


def _moments(input: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, mean, biased var) in torch ops: x the (G, k, C, *) view of input in the accumulation
    dtype, mean and var (G, 1, C, 1...).

    The accumulation dtype is float64 on the CPU, else at least float32.
    """
    x = input.reshape(input.shape[0] // k, k, *input.shape[1:]).to(_ops.accumulation_dtype(input))
    var, mean = torch.var_mean(x, dim=[1, *range(3, x.dim())], correction=0, keepdim=True)
    return x, mean, var


def _output(
    input: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """y in torch ops from `_moments`, in input's shape, dtype and memory format.

    The (G, k, C, *) view of a channels-last tensor is dense, so the
    element-wise results keep its strides.
    """
    y = (x - mean) * torch.rsqrt(var + eps)
    channel = [1, 1, -1] + [1] * (input.dim() - 2)
    if weight is not None:
        y = y * weight.to(x.dtype).view(channel)
    if bias is not None:
        y = y + bias.to(x.dtype).view(channel)
    return y.to(input.dtype).reshape(input.shape)


def _train_arrays(
    input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, k: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ghost kernels: (y, mean, invstd), the last two float64 (G, C)."""
    x, axis, last = _ops.as_array(input)
    y = _ops.empty_output(input, last)
    x, plan = ghost.planned(x, axis, k)
    gamma, beta = (
        _checks.kernel_vector(_ops.vector(t), plan.n_features, x.dtype, default)
        for t, default in ((weight, 1.0), (bias, 0.0))
    )
    _, mean, invstd = ghost.train(x, plan, gamma, beta, eps, _ops.out_array(y, last))
    return y, torch.from_numpy(mean), torch.from_numpy(invstd)


class GhostBatchNormFunction(torch.autograd.Function):
    """Each virtual batch normalized with its own statistics, on fastbn's ghost kernels.

    ``apply(input, weight, bias, virtual_batch_size, eps, fold)`` returns
    (y, mean, invstd), the last two float64 (G, C) tensors, not
    differentiable; ``fold`` (None: nothing to update) takes them into the
    running statistics before the forward returns (`_ops.Fold`). A double
    backward (``create_graph=True``) differentiates `_moments` and `_output` instead.
    """

    @staticmethod
    def forward(
        input: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        virtual_batch_size: int,
        eps: float,
        fold: _ops.Fold | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, mean, invstd = _train_arrays(input, weight, bias, virtual_batch_size, eps)
        if fold is not None:
            fold(mean.numpy(), invstd.numpy())
        return y, mean, invstd

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        input, weight, bias, virtual_batch_size, eps, _ = inputs
        _, mean, invstd = output
        ctx.mark_non_differentiable(mean, invstd)
        ctx.set_materialize_grads(False)  # no zero tensors made for the statistics' gradients
        ctx.save_for_backward(input, weight, bias, mean, invstd)
        ctx.virtual_batch_size, ctx.eps = virtual_batch_size, eps

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None, *_statistics_grads: Any) -> _ops.Grads:
        if grad is None:  # y's gradient undefined (a hook's doing): no gradient flows
            return (None,) * 6
        input, weight, bias, mean, invstd = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: a differentiable gradient
            k, eps = ctx.virtual_batch_size, ctx.eps

            def formula(
                input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
            ) -> torch.Tensor:
                return _output(input, *_moments(input, k), weight, bias, eps)

            grads = _ops.differentiable_grads(needs, grad, formula, input, weight, bias)
            return (*grads, None, None, None)
        x, axis, last = _ops.as_array(input)
        x, plan = ghost.planned(x, axis, ctx.virtual_batch_size)
        dx = _ops.empty_output(input, last)
        gamma = _checks.kernel_vector(_ops.vector(weight), plan.n_features, x.dtype, 1.0)
        _, dgamma, dbeta = ghost.backward(
            _ops.grad_array(grad, last), x, plan, mean.numpy(), invstd.numpy(), gamma,
            _ops.out_array(dx, last),
        )  # fmt: skip
        return (
            dx if needs[0] else None,
            _ops.param_grad(dgamma, x.dtype) if needs[1] else None,
            _ops.param_grad(dbeta, x.dtype) if needs[2] else None,
            None,
            None,
            None,
        )


_apply = _compat.function_apply(GhostBatchNormFunction)
