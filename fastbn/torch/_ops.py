"""The op: fastbn's kernels on the memory of CPU tensors, for autograd and torch.library.

A tensor is handed to the functional API as a NumPy view of its own memory:
contiguous (N, C, ...) data with axis=1, channels_last (N, C, H, W) and
channels_last_3d (N, C, D, H, W) data as the C-contiguous (N, H, W, C) or
(N, D, H, W, C) permutation with axis=-1. Results come back as tensors over
the kernels' output buffers, permuted back, so the output has the input's
memory format. Any other strides are copied once by the functional API.

Two mechanisms carry the same arithmetic:

- eager calls go through `BatchNormFunction`, a `torch.autograd.Function`
  (the cheapest correct one: a `torch.library.custom_op` costs more per call);
- `torch.compile` graphs take the `fastbn::batch_norm_train`,
  `fastbn::batch_norm_eval` and `fastbn::batch_norm_backward` ops, which are
  functional (nothing mutated) so that their autograd formula and fake
  implementations can be registered.

Double backward: inside a backward, grad mode is on exactly when the caller
asked for ``create_graph=True``; then the gradient is recomputed with
differentiable torch ops (`_torch_batch_norm`), else the kernels compute it.

A ReLU fused after the normalization (``relu=True``) runs in the same
kernels (`fastbn.batch_norm_relu_train`); the compiled graph applies
torch.relu to the op's output instead, which inductor fuses itself.
"""

# No `from __future__ import annotations`: torch.library.custom_op reads the
# annotations of the ops below as objects.
from collections.abc import Callable
from typing import Any, TypeAlias, cast, overload

import numpy as np
import torch
from numpy.typing import NDArray

from fastbn import functional
from fastbn.functional import _Plan

__all__ = ["BatchNormFunction", "eval_arrays", "fast_path", "train_arrays"]

_Array: TypeAlias = NDArray[np.floating]
_Float64: TypeAlias = NDArray[np.float64]
# A batch's float64 (mean, invstd) per channel, which a caller's list `stats` receives.
_Stats: TypeAlias = tuple[_Float64, _Float64]
# Gradients of a forward's inputs, None where none is needed.
_Grads: TypeAlias = tuple[torch.Tensor | None, ...]

_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
# Permutations between (N, C, *spatial) and channels-last memory order, and back.
_TO_LAST = {4: (0, 2, 3, 1), 5: (0, 2, 3, 4, 1)}
_FROM_LAST = {4: (0, 3, 1, 2), 5: (0, 4, 1, 2, 3)}


def fast_path(input: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """Whether fastbn's kernels take this call: CPU float32/float64, parameters alike.

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


def _channels_last(input: torch.Tensor) -> bool:
    """Whether input's memory is channels-last (and not also plain contiguous)."""
    fmt = _CHANNELS_LAST.get(input.dim())
    return fmt is not None and not input.is_contiguous() and input.is_contiguous(memory_format=fmt)


def _as_array(input: torch.Tensor) -> tuple[_Array, int, bool]:
    """(array over input's memory, feature axis, whether it is the channels-last permutation)."""
    x = input.detach()
    if _channels_last(x):
        return x.permute(_TO_LAST[x.dim()]).numpy(), -1, True
    return x.numpy(), 1, False


def _as_tensor(array: _Array, last: bool) -> torch.Tensor:
    """A tensor over array, permuted back to (N, C, ...) if it is channels-last."""
    t = torch.from_numpy(array)
    return t.permute(_FROM_LAST[t.dim()]) if last else t


def _grad_array(grad: torch.Tensor, last: bool) -> _Array:
    """The upstream gradient in the same arrangement as the input's array."""
    if grad.requires_grad:
        grad = grad.detach()
    return grad.permute(_TO_LAST[grad.dim()]).numpy() if last else grad.numpy()


@overload
def vector(t: torch.Tensor) -> _Array: ...
@overload
def vector(t: torch.Tensor | None) -> _Array | None: ...
def vector(t: torch.Tensor | None) -> _Array | None:
    """A (C,) tensor's memory as an array (None stays None)."""
    if t is None:
        return None
    return t.detach().numpy() if t.requires_grad else t.numpy()


def train_arrays(
    input: torch.Tensor, gamma: _Array | None, beta: _Array | None, eps: float, relu: bool = False
) -> tuple[torch.Tensor, _Float64, _Float64, _Plan, _Array, bool]:
    """Batch-statistics forward: (y tensor, mean, invstd float64 arrays, plan, x array, last).

    gamma and beta are the weight's and bias's arrays (`vector`); relu fuses a ReLU.
    """
    x, axis, last = _as_array(input)
    x, plan = functional._planned(x, axis, training=True)
    y, mean, invstd = functional._train(x, plan, gamma, beta, eps, None, relu=relu)
    return _as_tensor(y, last), mean, invstd, plan, x, last


def eval_arrays(
    input: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    relu: bool = False,
) -> tuple[torch.Tensor, _Plan, _Array, bool]:
    """Running-statistics forward: (y tensor, plan, x array, last); relu fuses a ReLU."""
    x, axis, last = _as_array(input)
    x, plan = functional._planned(x, axis, training=False)
    y = functional._eval(
        x, plan, vector(running_mean), vector(running_var), vector(weight), vector(bias),
        eps, None, relu=relu,
    )  # fmt: skip
    return _as_tensor(y, last), plan, x, last


def backward_arrays(
    grad: torch.Tensor,
    x: _Array,
    plan: _Plan,
    last: bool,
    mean: _Float64,
    invstd: _Float64,
    gamma: _Array | None,
    training: bool,
    input_grad: bool = True,
    relu: bool = False,
    beta: _Array | None = None,
) -> tuple[torch.Tensor | None, _Float64, _Float64]:
    """(dx tensor or None, dgamma, dbeta float64 arrays) from the kernels; gamma an array or None.

    Without ``input_grad`` dx is not computed (None). With relu, through the
    fused ReLU, beta the bias's array (`vector`) or None.
    """
    dx, dgamma, dbeta = functional._backward(
        _grad_array(grad, last), x, mean, invstd, gamma, plan.axis, training, None,
        forward_plan=plan, input_grad=input_grad, relu=relu, beta=beta,
    )  # fmt: skip
    return (None if dx is None else _as_tensor(dx, last)), dgamma, dbeta


def moments_arrays(input: torch.Tensor) -> tuple[_Float64, _Float64, int, _Plan, _Array, bool]:
    """(mean, biased var float64 arrays, values per channel, plan, x array, last) of input."""
    x, axis, last = _as_array(input)
    x, plan = functional._planned(x, axis, training=True)
    mean, var = functional._moments(x, plan)
    return mean, var, x.size // plan.n_features, plan, x, last


def input_gradient_arrays(
    grad: torch.Tensor,
    x: _Array,
    plan: _Plan,
    last: bool,
    mean: _Float64,
    invstd: _Float64,
    gamma: _Array | None,
    dgamma: _Float64,
    dbeta: _Float64,
    count: int,
) -> torch.Tensor:
    """dx tensor of the training formula from given float64 sums over count values per channel.

    With the sums and count of every process's batch, this is a synchronized
    batch norm's input gradient; mean and invstd are the statistics used in
    the forward, gamma the weight's array (`vector`) or None.
    """
    dx = functional._train_input_gradient(
        _grad_array(grad, last), x, plan, mean, invstd, gamma, dgamma, dbeta, count
    )
    return _as_tensor(dx, last)


def _param_grad(values: _Float64, dtype: np.dtype[Any]) -> torch.Tensor:
    """A float64 per-feature array as a tensor of dtype (a NumPy dtype)."""
    return torch.from_numpy(values.astype(dtype, copy=False))


def _torch_batch_norm(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    eps: float,
    relu: bool = False,
) -> torch.Tensor:
    """y with differentiable torch ops: batch statistics if running_mean is None."""
    reduce = [0, *range(2, input.dim())]
    shape = _channel_shape(input)
    if running_mean is None:
        mean = input.mean(reduce, keepdim=True)
        var = (input - mean).square().mean(reduce, keepdim=True)
    else:
        assert running_var is not None  # given with running_mean
        mean, var = running_mean.view(shape), running_var.view(shape)
    y = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return torch.relu(y) if relu else y


def _double_backward_grads(ctx: Any, grad: torch.Tensor) -> _Grads:
    """Differentiable gradients (create_graph=True): torch's ops on the saved inputs."""
    input, weight, bias, running_mean, running_var = ctx.saved_tensors
    wanted = [
        t for t, need in zip((input, weight, bias), ctx.needs_input_grad[:3], strict=True) if need
    ]
    y = _torch_batch_norm(input, weight, bias, running_mean, running_var, ctx.eps, ctx.relu)
    found = iter(torch.autograd.grad(y, wanted, grad, create_graph=True, allow_unused=True))
    return tuple(next(found) if need else None for need in ctx.needs_input_grad[:3])


class BatchNormFunction(torch.autograd.Function):
    # apply() itself, less the Python wrapper's per-argument work for functorch
    # transforms (see `apply`), which costs microseconds per call.

    """y = weight * (input - mean) * invstd + bias, with batch or running statistics.

    ``apply(input, weight, bias, running_mean, running_var, eps, stats, relu)``:
    batch statistics when running_mean is None, and then the float64 mean
    and invstd are appended to the list ``stats`` for the caller's
    running-statistics update; running statistics otherwise (constants).
    With relu, max(y, 0).
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
        stats: list[_Stats] | None,
        relu: bool,
    ) -> torch.Tensor:
        gamma, beta = vector(weight), vector(bias)
        if running_mean is None:
            y, mean, invstd, plan, x, last = train_arrays(input, gamma, beta, eps, relu)
            assert stats is not None  # given with batch statistics
            stats.append((mean, invstd))
        else:
            assert running_var is not None  # given with running_mean
            y, plan, x, last = eval_arrays(
                input, running_mean, running_var, weight, bias, eps, relu
            )
            mean = running_mean.numpy().astype(np.float64)
            invstd = 1.0 / np.sqrt(running_var.numpy().astype(np.float64) + eps)
        ctx.save_for_backward(input, weight, bias, running_mean, running_var)
        ctx.eps = eps
        ctx.relu = relu
        ctx.arrays = (x, plan, last, mean, invstd, gamma, beta, running_mean is None)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> _Grads:
        if torch.is_grad_enabled():
            return (*_double_backward_grads(ctx, grad), None, None, None, None, None)
        x, plan, last, mean, invstd, gamma, beta, training = ctx.arrays
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        dx, dgamma, dbeta = backward_arrays(
            grad, x, plan, last, mean, invstd, gamma, training, need_input, ctx.relu, beta
        )
        return (
            dx if need_input else None,
            _param_grad(dgamma, x.dtype) if need_weight else None,
            _param_grad(dbeta, x.dtype) if need_bias else None,
            None,
            None,
            None,
            None,
            None,
        )


# ----------------------------------------------------------- torch.library ops
# Functional ops for torch.compile and torch.export: nothing is mutated, so
# autograd and fake (meta) implementations can be registered.


@torch.library.custom_op("fastbn::batch_norm_train", mutates_args=(), device_types="cpu")
def batch_norm_train(
    input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, invstd) with batch statistics; mean and invstd float64, shape (C,)."""
    y, mean, invstd, _, _, _ = train_arrays(input, vector(weight), vector(bias), eps)
    return y, torch.from_numpy(mean), torch.from_numpy(invstd)


@torch.library.custom_op("fastbn::batch_norm_eval", mutates_args=(), device_types="cpu")
def batch_norm_eval(
    input: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """y with running statistics."""
    return eval_arrays(input, running_mean, running_var, weight, bias, eps)[0]


@torch.library.custom_op("fastbn::batch_norm_backward", mutates_args=(), device_types="cpu")
def batch_norm_backward(
    grad: torch.Tensor,
    input: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias); mean and invstd float64, the batch's or the running ones."""
    x, axis, last = _as_array(input)
    x, plan = functional._planned(x, axis, training=False)
    mean64 = mean.detach().numpy()
    invstd64 = invstd.detach().numpy()
    dx, dgamma, dbeta = backward_arrays(
        grad, x, plan, last, mean64, invstd64, vector(weight), training
    )
    assert dx is not None  # input_grad: dx is computed
    return dx, _param_grad(dgamma, x.dtype), _param_grad(dbeta, x.dtype)


def _stat_like(input: torch.Tensor) -> torch.Tensor:
    return input.new_empty((input.shape[1],), dtype=torch.float64)


@batch_norm_train.register_fake
def _(
    input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(input), _stat_like(input), _stat_like(input)


@batch_norm_eval.register_fake
def _(
    input: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    return torch.empty_like(input)


@batch_norm_backward.register_fake
def _(
    grad: torch.Tensor,
    input: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c = input.shape[1]
    return torch.empty_like(input), input.new_empty((c,)), input.new_empty((c,))


def _setup_train(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    input, weight, _, _ = inputs
    _, mean, invstd = output
    ctx.save_for_backward(input, weight, mean, invstd)


def _backward_train(
    ctx: Any, grad: torch.Tensor, grad_mean: torch.Tensor | None, grad_invstd: torch.Tensor | None
) -> _Grads:
    input, weight, mean, invstd = ctx.saved_tensors
    dx, dweight, dbias = batch_norm_backward(grad, input, mean, invstd, weight, True)
    if ctx.needs_input_grad[0] and (grad_mean is not None or grad_invstd is not None):
        dx = dx + _statistics_grad(input, mean, invstd, grad_mean, grad_invstd)
    return (*_needed(ctx, dx, dweight, dbias), None)


def _statistics_grad(
    input: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    grad_mean: torch.Tensor | None,
    grad_invstd: torch.Tensor | None,
) -> torch.Tensor:
    """The input gradient through the outputs mean and invstd (a caller that used them).

    d mean / dx = 1 / M and d invstd / dx = -invstd**3 * (x - mean) / M, per channel.
    """
    count = input.numel() // input.shape[1]
    shape = _channel_shape(input)
    total = torch.zeros((), dtype=torch.float64)
    if grad_mean is not None:
        total = total + grad_mean.view(shape) / count
    if grad_invstd is not None:
        centered = input.to(torch.float64) - mean.view(shape)
        total = total - (grad_invstd * invstd.pow(3)).view(shape) * centered / count
    return total.to(input.dtype)


def _channel_shape(input: torch.Tensor) -> list[int]:
    """The shape that broadcasts a (C,) vector over input's channel axis 1."""
    return [1, -1] + [1] * (input.dim() - 2)


def _torch_backward(
    grad: torch.Tensor,
    input: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`batch_norm_backward` in differentiable torch ops (for its own gradient)."""
    reduce = [0, *range(2, input.dim())]
    shape = _channel_shape(input)
    x_hat = (input - mean.view(shape)) * invstd.view(shape)
    dbias = grad.sum(reduce, dtype=torch.float64)
    dweight = (grad * x_hat).sum(reduce)
    scale = invstd.view(shape) if weight is None else (weight.view(shape) * invstd.view(shape))
    if training:
        count = input.numel() // input.shape[1]
        dx = scale * (grad - dbias.view(shape) / count - x_hat * (dweight.view(shape) / count))
    else:
        dx = scale * grad
    return dx.to(input.dtype), dweight.to(input.dtype), dbias.to(input.dtype)


def _setup_backward(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    grad, input, mean, invstd, weight, training = inputs
    ctx.save_for_backward(grad, input, mean, invstd, weight)
    ctx.training = training


def _backward_backward(
    ctx: Any,
    grad_dx: torch.Tensor | None,
    grad_dweight: torch.Tensor | None,
    grad_dbias: torch.Tensor | None,
) -> _Grads:
    """The gradient of `batch_norm_backward` (double backward), by torch.func.vjp."""
    grad, input, mean, invstd, weight = ctx.saved_tensors
    primals = (grad, input, mean, invstd) + (() if weight is None else (weight,))

    def formula(
        grad: torch.Tensor,
        input: torch.Tensor,
        mean: torch.Tensor,
        invstd: torch.Tensor,
        weight: torch.Tensor | None = None,  # not a primal when None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _torch_backward(grad, input, mean, invstd, weight, ctx.training)

    # Without has_aux, vjp returns (outputs, vjp function); its annotation allows the aux too.
    outputs, vjp = cast("tuple[Any, Callable[..., Any]]", torch.func.vjp(formula, *primals))
    cotangents = tuple(
        torch.zeros_like(o) if g is None else g
        for o, g in zip(outputs, (grad_dx, grad_dweight, grad_dbias), strict=True)
    )
    grads = vjp(cotangents)
    return (*grads, *((None,) if weight is None else ()), None)


def _setup_eval(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    input, running_mean, running_var, weight, _, eps = inputs
    ctx.save_for_backward(input, running_mean, running_var, weight)
    ctx.eps = eps


def _backward_eval(ctx: Any, grad: torch.Tensor) -> _Grads:
    input, running_mean, running_var, weight = ctx.saved_tensors
    mean = running_mean.to(torch.float64)
    invstd = torch.rsqrt(running_var.to(torch.float64) + ctx.eps)
    dx, dweight, dbias = batch_norm_backward(grad, input, mean, invstd, weight, False)
    dx, dweight, dbias = _needed(ctx, dx, dweight, dbias, first=(0, 3, 4))
    return dx, None, None, dweight, dbias, None


def _needed(
    ctx: Any,
    dx: torch.Tensor,
    dweight: torch.Tensor,
    dbias: torch.Tensor,
    first: tuple[int, int, int] = (0, 1, 2),
) -> _Grads:
    """The gradients of the inputs at positions ``first`` that need one, else None."""
    needs = ctx.needs_input_grad
    return tuple(g if needs[i] else None for g, i in zip((dx, dweight, dbias), first, strict=True))


batch_norm_train.register_autograd(_backward_train, setup_context=_setup_train)
batch_norm_eval.register_autograd(_backward_eval, setup_context=_setup_eval)
batch_norm_backward.register_autograd(_backward_backward, setup_context=_setup_backward)


_apply_function = torch._C._FunctionBase.__dict__["apply"].__get__(None, BatchNormFunction)


def apply(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    eps: float,
    stats: list[_Stats] | None,
    relu: bool = False,
) -> torch.Tensor:
    """`BatchNormFunction.apply`, straight to the C entry when no functorch transform runs."""
    args = (input, weight, bias, running_mean, running_var, eps, stats, relu)
    if torch._C._are_functorch_transforms_active():
        return BatchNormFunction.apply(*args)
    return _apply_function(*args)
