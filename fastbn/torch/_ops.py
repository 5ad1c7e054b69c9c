"""The op: fastbn's kernels on the memory of CPU tensors, for autograd.

Tensors and arrays
------------------
A tensor is handed to the functional API as a NumPy view of its own memory
(`as_array`): contiguous (N, C, ...) data with axis=1, channels_last
(N, C, H, W) and channels_last_3d (N, C, D, H, W) data as the C-contiguous
(N, H, W, C) or (N, D, H, W, C) permutation with axis=-1. Any other strides
are copied once by the functional API. Outputs (y, and dx in the backward)
are tensors that torch allocates (`empty_output`) in the memory format
torch's own batch norm gives (channels-last for channels-last input, else
contiguous); the kernels write into their memory through the same view. So
an output is never a view made inside an autograd Function, and in-place
ops after batch norm (``ReLU(inplace=True)``, ``out += identity``) work.

Mechanisms
----------
- Eager calls that need gradients go through `BatchNormFunction`, an
  autograd Function whose forward takes ``ctx`` (the cheapest correct
  form, its docstring says why: a ``torch.library.custom_op`` costs more
  per call). What its backward
  needs (input, weight, bias and the float64 mean and invstd) is saved with
  ``save_for_backward``, so autograd's in-place checks, saved-tensor hooks
  and checkpointing see it; the backward takes its arrays from the unpacked
  tensors.
- Calls that need none compute what the Function's forward computes:
  `train_arrays` (training) or `eval_arrays`.
- A training Function folds the batch into the running statistics inside
  its forward, before its tensors are saved, as torch's op does (`Fold`):
  non-reentrant checkpointing stops recomputing there.
- Under `torch.compile` the bridge calls torch's op (`fastbn.torch.functional`
  says why): the kernels are never traced, only this module's torch-op
  helpers (`fold_torch`, `torch_moments`, `channel_shape` and the like).

Double backward: inside a backward, grad mode is on exactly when the caller
asked for ``create_graph=True``; then the gradient is recomputed with
differentiable torch ops (`differentiable_grads` of a formula), else the
kernels compute it. Every Function of the bridge (plain, ghost, renorm,
SyncBatchNorm) uses these helpers.

A ReLU fused after the normalization (``relu=True``) runs in the same
kernels (`fastbn.batch_norm_relu_train`); a compiled graph applies
torch.relu to torch's batch norm instead, which inductor fuses itself.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias, overload

import numpy as np
import torch

from fastbn import _checks, _engine
from fastbn._plan import Plan, plan_for
from fastbn._types import Array, Float64
from fastbn.torch import _compat

__all__ = [
    "BatchNormFunction",
    "accumulation_dtype",
    "as_array",
    "channel_shape",
    "channels_last",
    "differentiable_grads",
    "empty_output",
    "eval_arrays",
    "fast_path",
    "fold_torch",
    "grad_array",
    "input_gradient_arrays",
    "kernel_vector",
    "moments_arrays",
    "out_array",
    "param_grad",
    "param_sums",
    "planned",
    "reduced_dims",
    "torch_moments",
    "torch_output",
    "train_arrays",
    "vector",
]

# Gradients of a Function's inputs, None where none is needed.
Grads: TypeAlias = tuple[torch.Tensor | None, ...]
# What a training Function calls with its batch's float64 (mean, invstd) arrays before it
# returns: the running statistics' update (`fastbn.torch.functional.folder`).
Fold: TypeAlias = Callable[[Float64, Float64], object]

_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
# Permutations from (N, C, *spatial) to channels-last memory order.
_TO_LAST = {4: (0, 2, 3, 1), 5: (0, 2, 3, 4, 1)}


def fast_path(input: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """Whether fastbn's kernels can take this call: CPU float32/float64, parameters alike.

    Everything else (other devices and dtypes, tracing for torch.jit or
    ONNX export) goes to torch's own op.
    """
    dtype = input.dtype
    if not (input.is_cpu and (dtype is torch.float32 or dtype is torch.float64)):
        return False
    for t in tensors:
        if t is not None and (t.dtype is not dtype or not t.is_cpu):
            return False
    return not torch.jit.is_tracing()


def channels_last(input: torch.Tensor) -> bool:
    """Whether input's memory is channels-last (and not also plain contiguous)."""
    fmt = _CHANNELS_LAST.get(input.dim())
    return fmt is not None and not input.is_contiguous() and input.is_contiguous(memory_format=fmt)


def _array(t: torch.Tensor) -> Array:
    """The memory of a CPU tensor as an array (detached first only if it must be)."""
    return (t.detach() if t.requires_grad else t).numpy()


def as_array(input: torch.Tensor) -> tuple[Array, int, bool]:
    """(array over input's memory, feature axis, whether it is the channels-last permutation)."""
    if channels_last(input):
        return _array(input).transpose(_TO_LAST[input.dim()]), -1, True
    return _array(input), 1, False


def empty_output(input: torch.Tensor, last: bool) -> torch.Tensor:
    """A new tensor of input's shape and dtype in the memory format of torch's batch norm output.

    Channels-last for channels-last input (``last``, as `as_array` says),
    else contiguous: a transposed or sliced input gives a contiguous output,
    as torch's does. Its memory is left to torch's allocator as is: asked onto
    huge pages (``madvise``, as NumPy does for its arrays of 4 MiB and more),
    large outputs made a ResNet-18 224 px training step's batch norm backward
    4x slower (113 ms against 28 ms a step, fresh huge pages faulted in on
    every call), though a layer alone in a loop ran faster so.
    """
    if last or input.is_contiguous():  # empty_like keeps these strides, and is the cheapest
        return torch.empty_like(input)
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def out_array(output: torch.Tensor, last: bool) -> Array:
    """An `empty_output` tensor's memory, arranged as `as_array` arranges the input."""
    array = output.numpy()
    return array.transpose(_TO_LAST[output.dim()]) if last else array


def grad_array(grad: torch.Tensor, last: bool) -> Array:
    """The upstream gradient in the input's arrangement (any strides: the API copies them)."""
    array = _array(grad)
    return array.transpose(_TO_LAST[grad.dim()]) if last else array


@overload
def vector(t: torch.Tensor) -> Array: ...
@overload
def vector(t: torch.Tensor | None) -> Array | None: ...
def vector(t: torch.Tensor | None) -> Array | None:
    """A per-channel tensor's memory as an array (None stays None), cached.

    The same parameters and buffers come back every call, and ``detach()``
    and ``numpy()`` cost about 0.8 us a tensor: the view is kept, keyed by
    the tensor's id and checked against the tensor itself (a weak reference),
    its memory and its size, so a tensor whose data was replaced
    (``.data =``, ``set_``) gets a new view. The cache holds at most
    `MAX_VIEWS` views (each keeps its tensor alive) and then starts over.
    """
    if t is None:
        return None
    entry = _VIEWS.get(id(t))
    if entry is not None:
        ref, pointer, numel, array = entry
        if ref() is t and t.data_ptr() == pointer and t.numel() == numel:
            return array
    array = _array(t)
    if len(_VIEWS) >= MAX_VIEWS:
        _VIEWS.clear()
    _VIEWS[id(t)] = (weakref.ref(t), t.data_ptr(), t.numel(), array)
    return array


MAX_VIEWS = 4096
_VIEWS: dict[int, tuple[weakref.ReferenceType[torch.Tensor], int, int, Array]] = {}


def param_grad(values: Float64, dtype: np.dtype[Any]) -> torch.Tensor:
    """A float64 per-feature array as a tensor of dtype (a NumPy dtype)."""
    return torch.from_numpy(values.astype(dtype, copy=False))


def channel_shape(input: torch.Tensor) -> list[int]:
    """The shape that broadcasts a (C,) vector over input's channel axis 1."""
    return [1, -1] + [1] * (input.dim() - 2)


def reduced_dims(input: torch.Tensor) -> list[int]:
    """Every dimension of input but the channel axis 1."""
    return [0, *range(2, input.dim())]


def accumulation_dtype(input: torch.Tensor) -> torch.dtype:
    """float64 on the CPU, as fastbn's statistics; elsewhere at least float32 (MPS: no float64)."""
    if input.is_cpu:
        return torch.float64
    return torch.promote_types(input.dtype, torch.float32)


def torch_moments(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and biased variance per channel in torch ops (differentiable).

    In `accumulation_dtype`, two passes (mean, then the centred squares).
    """
    x = input.to(accumulation_dtype(input))
    dims = reduced_dims(input)
    mean = x.mean(dims)
    var = (x - mean.view(channel_shape(input))).square().mean(dims)
    return mean, var


def torch_output(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    relu: bool = False,
) -> torch.Tensor:
    """weight * (input - mean) * invstd + bias (then a ReLU) in torch ops, in input's dtype."""
    shape = channel_shape(input)
    y = (input.to(mean.dtype) - mean.view(shape)) * invstd.view(shape)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    y = y.to(input.dtype)
    return torch.relu(y) if relu else y


def differentiable_grads(
    needs: Sequence[bool],
    grad: torch.Tensor,
    formula: Callable[..., torch.Tensor],
    *inputs: torch.Tensor | None,
) -> Grads:
    """A Function's input gradients for ``create_graph=True``: autograd through torch ops.

    ``formula(*inputs)`` recomputes the output differentiably; the gradient
    of each input whose ``needs`` is true is returned (else None).
    """
    wanted = [t for t, need in zip(inputs, needs, strict=True) if need and t is not None]
    found = iter(torch.autograd.grad(formula(*inputs), wanted, grad, create_graph=True))
    return tuple(next(found) if need else None for need in needs)


def fold_torch(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    momentum: float | None,
    counter: torch.Tensor | None,
    count: int,
) -> torch.Tensor:
    """torch's running-statistics rule in torch ops, all or nothing, without branching on data.

    mean and var are the batch's (biased variance), shape (C,), or (G, C)
    for G batches folded in turn (ghost batches). With momentum None the
    factor is the cumulative average over ``counter``. If any result is not
    finite in the buffers' dtype, the buffers and the counter are left
    unchanged (fastbn's rule); else the counter advances by G (or 1).
    Returns the (C,) bool tensor of the channels whose results are finite.
    """
    with torch.no_grad():
        unbiased = var * (count / (count - 1))
        # One batch folds its (C,) tensors as they are: indexed (mean[None][0]) they changed
        # inductor's fusion, and a compiled small CNN's forward + backward ran at 0.94x of
        # torch's compiled one, against 1.00x so (medians of 5 and 10 runs, 2 cores).
        if mean.dim() == 1:
            batches = [(mean, unbiased)]
        else:
            batches = [(mean[g], unbiased[g]) for g in range(mean.shape[0])]
        new_mean, new_var = running_mean, running_var
        for g, (batch_mean, batch_var) in enumerate(batches):
            if momentum is None:
                factor: Any = 0.0
                if counter is not None:
                    factor = 1.0 / (counter + (g + 1)).to(torch.float64)
            else:
                factor = momentum
            new_mean = ((1.0 - factor) * new_mean.to(torch.float64) + factor * batch_mean).to(
                running_mean.dtype
            )
            new_var = ((1.0 - factor) * new_var.to(torch.float64) + factor * batch_var).to(
                running_var.dtype
            )
        # A batch that is not finite leaves NaN or inf in every later result.
        finite = torch.isfinite(new_mean) & torch.isfinite(new_var)
        taken = finite.all()
        running_mean.copy_(torch.where(taken, new_mean, running_mean))
        running_var.copy_(torch.where(taken, new_var, running_var))
        if counter is not None:
            counter.add_(taken.to(counter.dtype) * len(batches))
    return finite


def planned(input: torch.Tensor, training: bool) -> tuple[Array, Plan, bool]:
    """(array over input's memory, its plan, whether it is the channels-last permutation).

    The plan checks what torch's checks left (one value per channel, for
    training, is checked by the callers with torch's error).
    """
    x, axis, last = as_array(input)
    x, plan = plan_for(x, axis, training)
    return x, plan, last


def kernel_vector(
    t: torch.Tensor | None, plan: Plan, dtype: np.dtype[Any], default: float
) -> Array:
    """A (C,) tensor (None: ``default``s) as the kernels take it, in dtype (checked by torch)."""
    return _checks.kernel_vector(vector(t), plan.n_features, dtype, default)


def train_arrays(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    relu: bool,
    fold: Fold | None,
) -> tuple[torch.Tensor, Float64, Float64]:
    """Batch-statistics forward on the kernels: (y, mean, invstd), the last two float64 (C,).

    ``fold`` (None: nothing to update) takes the batch's statistics into the
    running ones before this returns.
    """
    x, plan, last = planned(input, training=True)
    y = empty_output(input, last)
    gamma = kernel_vector(weight, plan, x.dtype, 1.0)
    beta = kernel_vector(bias, plan, x.dtype, 0.0)
    _, mean, invstd = _engine.train(
        plan, x, gamma, beta, eps, out_array(y, last), True if relu else None
    )
    if fold is not None:
        fold(mean, invstd)
    return y, mean, invstd


def eval_arrays(
    input: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    relu: bool = False,
) -> torch.Tensor:
    """Running-statistics forward on the kernels: y."""
    x, plan, last = planned(input, training=False)
    y = empty_output(input, last)
    dtype = x.dtype
    _engine.evaluate(
        plan, x, kernel_vector(running_mean, plan, dtype, 0.0),
        kernel_vector(running_var, plan, dtype, 1.0), kernel_vector(weight, plan, dtype, 1.0),
        kernel_vector(bias, plan, dtype, 0.0), eps, out_array(y, last), True if relu else None,
    )  # fmt: skip
    return y


def _running_invstd(
    running_mean: torch.Tensor, running_var: torch.Tensor, eps: float
) -> tuple[Float64, Float64]:
    """The float64 (mean, invstd) that running statistics normalize with: new arrays."""
    mean = vector(running_mean).astype(np.float64)
    invstd = 1.0 / np.sqrt(vector(running_var).astype(np.float64) + eps)
    return mean, invstd


def _backward_arrays(
    grad: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    training: bool,
    needs: Sequence[bool],
    relu: bool = False,
) -> Grads:
    """(dx, dweight, dbias) on the kernels, each only where ``needs`` asks (else None).

    mean and invstd are the float64 statistics the forward normalized with;
    training says whether they were the batch's (they depend on the input).
    With relu, through the fused ReLU, whose mask the kernels recompute from
    the input, the statistics, weight and bias.
    """
    need_input, need_weight, need_bias = needs
    x, plan, last = planned(input, training=False)
    dy, mean64, invstd64 = grad_array(grad, last), mean.numpy(), invstd.numpy()
    dx = None
    if need_input or relu:
        dx = empty_output(input, last)
        beta = kernel_vector(bias, plan, x.dtype, 0.0) if relu else None
        _, dgamma, dbeta = _engine.backward(
            plan, dy, x, mean64, invstd64, kernel_vector(weight, plan, x.dtype, 1.0), training,
            out_array(dx, last), beta,
        )  # fmt: skip
    else:
        dgamma, dbeta = _engine.param_sums(plan, dy, x, mean64, invstd64)
    return (
        dx if need_input else None,
        param_grad(dgamma, x.dtype) if need_weight else None,
        param_grad(dbeta, x.dtype) if need_bias else None,
    )


def param_sums(
    grad: torch.Tensor, input: torch.Tensor, mean: Float64, invstd: Float64
) -> tuple[Float64, Float64]:
    """The float64 per-channel sums of grad * x_hat and of grad, on the kernels."""
    x, plan, last = planned(input, training=False)
    return _engine.param_sums(plan, grad_array(grad, last), x, mean, invstd)


def moments_arrays(input: torch.Tensor) -> tuple[Float64, Float64]:
    """The float64 mean and biased variance per channel of input, on the kernels."""
    x, plan, _ = planned(input, training=True)
    return _engine.moments(plan, x)


def input_gradient_arrays(
    grad: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    mean: Float64,
    invstd: Float64,
    dgamma: Float64,
    dbeta: Float64,
    count: int,
) -> torch.Tensor:
    """dx of the training formula from given float64 sums over count values per channel.

    With the sums and count of every process's batch, this is a synchronized
    batch norm's input gradient; mean and invstd are the statistics the
    forward normalized with.
    """
    x, plan, last = planned(input, training=False)
    dx = empty_output(input, last)
    _engine.input_gradient(
        plan, grad_array(grad, last), x, mean, invstd, kernel_vector(weight, plan, x.dtype, 1.0),
        dgamma, dbeta, count, out_array(dx, last),
    )  # fmt: skip
    return dx


class BatchNormFunction(torch.autograd.Function):
    """y = weight * (input - mean) * invstd + bias, with batch or running statistics.

    ``apply(input, weight, bias, running_mean, running_var, eps, relu, fold)``
    returns y: normalized with the batch's statistics when running_mean is
    None (``fold``, None or `Fold`, takes them into the running ones before
    the forward returns), with the running statistics (constants) otherwise.
    With relu, y is max(y, 0).

    The forward takes ``ctx`` (the form without ``setup_context``): it saves
    the float64 mean and invstd it computed, which are not outputs. Measured
    through the C entry (`fastbn.torch._compat.function_apply`), forward and
    backward of an empty Function of three outputs (y and the two
    statistics, non-differentiable) cost 9-11 us more than one of one output
    ((32, 128) float32, 2 cores); this form costs 1-2 us more than the
    latter.
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        eps: float,
        relu: bool,
        fold: Fold | None,
    ) -> torch.Tensor:
        if running_mean is None:
            y, mean, invstd = train_arrays(input, weight, bias, eps, relu, fold)
        else:
            assert running_var is not None  # given with running_mean
            y = eval_arrays(input, running_mean, running_var, weight, bias, eps, relu)
            mean, invstd = _running_invstd(running_mean, running_var, eps)
        ctx.set_materialize_grads(False)  # a hook may undefine y's gradient: no zeros made
        statistics = torch.from_numpy(mean), torch.from_numpy(invstd)
        ctx.save_for_backward(input, weight, bias, *statistics)
        ctx.eps, ctx.relu, ctx.training = eps, relu, running_mean is None
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None) -> Grads:
        if grad is None:  # y's gradient undefined (a hook's doing): no gradient flows
            return (None,) * 8
        input, weight, bias, mean, invstd = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: a differentiable gradient
            training, eps, relu = ctx.training, ctx.eps, ctx.relu

            def formula(
                input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
            ) -> torch.Tensor:
                if not training:
                    return torch_output(input, weight, bias, mean, invstd, relu)
                batch_mean, var = torch_moments(input)
                return torch_output(input, weight, bias, batch_mean, torch.rsqrt(var + eps), relu)

            grads = differentiable_grads(needs, grad, formula, input, weight, bias)
        else:
            grads = _backward_arrays(
                grad, input, weight, bias, mean, invstd, ctx.training, needs, ctx.relu
            )
        return (*grads, None, None, None, None, None)


# `BatchNormFunction.apply`, straight to the C entry: the bridge never calls it under
# torch.func transforms (they take torch's own op), where the Python wrapper matters.
apply: Callable[..., torch.Tensor]
apply = _compat.function_apply(BatchNormFunction)
