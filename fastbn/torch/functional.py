"""`batch_norm`: torch.nn.functional.batch_norm on fastbn's kernels.

The running statistics follow torch's rule, with one deliberate difference:
a training batch whose statistics are not finite (or would overflow the
buffers' dtype) leaves running_mean, running_var and the modules'
num_batches_tracked unchanged, with a RuntimeWarning naming the features.
Under torch.compile the same rule is computed without branching on data
(`torch.where`), and the warning is left out.

Which mechanism takes a call (`forward`):

- torch's own op, with torch's rule for the running statistics: tensors
  off the CPU or of other dtypes, empty input, tracing for torch.jit or
  ONNX export, torch.func transforms (grad, vmap, jvp, ...) and
  forward-mode AD. These give torch's results by construction.
- under torch.compile (and torch.export): torch's op, which inductor fuses
  with the ops around it, with fastbn's running-statistics rule in torch
  ops (`_compiled`);
- eagerly, with gradients to track: `_ops.BatchNormFunction`;
- eagerly, without: the arrays the Function's forward computes (`_ops.train_arrays`,
  `_ops.eval_arrays`).

A training Function folds its batch into the running statistics before it
returns (`folder`).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import NDArray

from fastbn import _checks, _running
from fastbn.torch import _compat, _ops, dispatch

__all__ = [
    "batch_norm",
    "check_sizes",
    "fold",
    "folder",
    "forward",
    "needs_grad",
    "relu_after",
    "takes_torch_op",
    "torch_op_forward",
    "verify_batch_size",
    "warn_not_taken",
]


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Batch normalization over channel axis 1, as `torch.nn.functional.batch_norm`.

    Parameters
    ----------
    input : Tensor
        ``(N, C, *)`` data.
    running_mean, running_var : Tensor of shape (C,) or None
        Running statistics: used in eval, updated in place in training.
    weight, bias : Tensor of shape (C,), optional
        Scale and shift.
    training : bool
        Whether to normalize with the batch's statistics.
    momentum : float
        Weight of the batch statistics in the running ones.
    eps : float
        Added to the variance.

    Returns
    -------
    Tensor
        The output, of input's shape and dtype; channels-last for
        channels-last input, else contiguous.
    """
    tensors = (input, running_mean, running_var, weight, bias)
    if torch.overrides.has_torch_function(tensors):  # torch.fx proxies, tensor subclasses
        return torch.overrides.handle_torch_function(
            batch_norm, tensors, input, running_mean, running_var, weight=weight, bias=bias,
            training=training, momentum=momentum, eps=eps,
        )  # fmt: skip
    if momentum is None:  # torch's F.batch_norm takes no None (the modules' cumulative average)
        raise TypeError(
            "batch_norm(): argument 'momentum' (position 7) must be float, not NoneType"
        )
    if training:
        verify_batch_size(input.size())
    return forward(
        input, running_mean, running_var, weight, bias, training, momentum, eps, stacklevel=4
    )


def verify_batch_size(size: Sequence[int]) -> None:
    """torch's check: training needs more than one value per channel."""
    if size[0] == 1 and (len(size) == 2 or math.prod(size[2:]) == 1):
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}"
        )


def check_sizes(
    n_channels: int,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> None:
    """torch's check of the per-channel tensors: its order and its RuntimeError."""
    for name, t in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        if t is not None and t.numel() != n_channels:
            raise RuntimeError(f"{name} should contain {n_channels} elements not {t.numel()}")


def takes_torch_op(input: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """Whether torch's own op must take this call (see the module's docstring).

    ``tensors`` are the call's per-channel tensors.
    """
    return (
        not _ops.fast_path(input, *tensors)
        or input.numel() == 0
        or _compat.transforms_active(input, *tensors)
        or _compat.dual_tensors(input, *tensors)
        or (torch.compiler.is_compiling() and torch.onnx.is_in_onnx_export())
    )


def needs_grad(
    input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> bool:
    """Whether autograd must record this call: grad mode on, and a tensor that requires grad."""
    return torch.is_grad_enabled() and (
        input.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    )


def forward(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked: torch.Tensor | None = None,
    stacklevel: int = 2,
    relu: bool = False,
    implementation: dispatch.Implementation = "fastbn",
) -> torch.Tensor:
    """y of `batch_norm` and the modules; the running statistics take a training batch.

    With ``num_batches_tracked`` (a module's counter) it is incremented when
    the batch is taken, and momentum None means the cumulative average.
    ``stacklevel`` is the warning's, counted from the function that warns
    (`fold`, two levels below this one), so that it names the user's line.
    With ``relu``, y is followed by a ReLU (fused in the kernels).
    ``implementation`` (a module's, `fastbn.torch.dispatch`) says whether
    fastbn's kernels or torch's op (`torch_op_forward`) take an eager call.
    """
    if (running_mean is None) is not (running_var is None):
        raise ValueError(
            "running_mean and running_var must either both be None or neither be None"
        )  # torch's error
    if (not training and running_mean is None) or takes_torch_op(
        input, weight, bias, running_mean, running_var
    ):
        y = _torch_forward(
            input, running_mean, running_var, weight, bias, training, momentum, eps,
            num_batches_tracked,
        )  # fmt: skip
        return relu_after(y) if relu else y
    eps = _checks.positive_eps(eps)
    compiling = torch.compiler.is_compiling()
    if not compiling and not dispatch.takes_kernels(implementation, input, training):
        # torch's op checks the per-channel sizes first, with check_sizes' errors.
        y = torch_op_forward(
            input, running_mean, running_var, weight, bias, training, momentum, eps,
            num_batches_tracked, stacklevel,
        )  # fmt: skip
        return relu_after(y) if relu else y
    check_sizes(input.shape[1], running_mean, running_var, weight, bias)
    if compiling:
        y = _compiled(
            input, running_mean, running_var, weight, bias, training, momentum, eps,
            num_batches_tracked,
        )  # fmt: skip
        return relu_after(y) if relu else y
    grad = needs_grad(input, weight, bias)
    if not training:
        assert running_mean is not None and running_var is not None  # else torch's op took it
        if grad:
            return _ops.apply(input, weight, bias, running_mean, running_var, eps, relu, None)
        return _ops.eval_arrays(input, running_mean, running_var, weight, bias, eps, relu)
    update = None
    if running_mean is not None:
        assert running_var is not None  # given with running_mean
        update = folder(
            running_mean, running_var, eps, momentum, num_batches_tracked,
            input.numel() // input.shape[1], stacklevel + (2 if grad else 1),
        )  # fmt: skip
    if grad:  # the fold is called two levels down: the Function's forward, `train_arrays`
        return _ops.apply(input, weight, bias, None, None, eps, relu, update)
    return _ops.train_arrays(input, weight, bias, eps, relu, update)[0]


def relu_after(y: torch.Tensor) -> torch.Tensor:
    """max(y, 0) in torch ops, after a batch norm that torch's op computed (a new tensor).

    ``threshold(y, 0, 0)`` is ReLU in value and gradient, and its backward
    reads its input, where torch.relu's reads its output: an in-place op on
    the result (``out += identity``) then breaks nothing, as with the fused
    kernels (which recompute the mask from the batch norm's input).
    """
    return torch.nn.functional.threshold(y, 0.0, 0.0)


def fold(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: NDArray[np.float64],
    invstd: NDArray[np.float64],
    eps: float,
    momentum: float | None,
    counter: torch.Tensor | None,
    count: int,
    stacklevel: int,
    what: str = "batch statistics",
) -> bool:
    """Eager running-statistics update in place: every batch, feature and the counter, or nothing.

    mean and invstd are (G, C): G batches' float64 statistics over count
    values per channel each (ghost batches), folded in order, or (C,) for one
    batch. Returns whether they were taken; if not, a RuntimeWarning names
    the features (``what`` the statistics, in its message).
    """
    counter_array = _ops.vector(counter)
    counted = 0 if counter_array is None else counter_array.item()
    if momentum is None:  # the cumulative average (-1: see fold_batches), or 0 without a counter
        momentum = 0.0 if counter_array is None else -1.0
    bad, _ = _running.fold_batches(
        _ops.vector(running_mean), _ops.vector(running_var), mean, invstd, eps, momentum,
        counted, count / (count - 1),
    )  # fmt: skip
    if bad:
        warn_not_taken(bad, running_mean.dtype, stacklevel + 1, what)
        return False
    if counter_array is not None:  # item assignment: an in-place += on a 0-d array costs 10x
        counter_array[()] = counted + (1 if mean.ndim == 1 else mean.shape[0])
    return True


def folder(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    momentum: float | None,
    counter: torch.Tensor | None,
    count: int,
    stacklevel: int,
    what: str = "batch statistics",
) -> _ops.Fold:
    """`fold` with all but the batch's statistics bound, for a Function to call in its forward.

    The Functions fold before they return, as torch's op updates the running
    statistics before it saves its tensors: non-reentrant checkpointing
    stops recomputing a forward once the saved tensors are recomputed, and a
    fold after the Function would then be skipped (the batch counted once
    where torch's module counts it twice). ``stacklevel`` is counted from
    the function that calls the fold.
    """
    return functools.partial(
        fold, running_mean, running_var, eps=eps, momentum=momentum, counter=counter,
        count=count, stacklevel=stacklevel, what=what,
    )  # fmt: skip


def warn_not_taken(bad: Sequence[int], dtype: torch.dtype, stacklevel: int, what: str) -> None:
    """The RuntimeWarning of a batch the running statistics did not take (features ``bad``)."""
    warnings.warn(
        f"the {what} of features {_running.feature_list(bad)} are not finite "
        f"(or overflow {dtype}): running_mean, running_var and num_batches_tracked were "
        "left unchanged",
        RuntimeWarning,
        stacklevel=stacklevel,  # counted from this function
    )


def torch_op_forward(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    counter: torch.Tensor | None,
    stacklevel: int,
) -> torch.Tensor:
    """torch's op (a C++ autograd node) on a CPU float32/float64 call, with fastbn's rule.

    torch's op updates the running statistics itself, before it saves its
    tensors (so checkpointing counts as torch's module does); if the result
    is not finite in the buffers' dtype, the buffers and the counter are put
    back as they were, with `fold`'s RuntimeWarning; so are they when torch's
    op raises (its checks, the per-channel sizes among them, come before it
    updates anything). ``stacklevel`` as `forward` counts it.
    """
    if not training or running_mean is None:
        return torch.batch_norm(
            input, weight, bias, running_mean, running_var, training, 0.0, eps, False
        )
    assert running_var is not None  # given with running_mean
    mean_array, var_array = _ops.vector(running_mean), _ops.vector(running_var)
    saved_mean, saved_var = mean_array.copy(), var_array.copy()
    counter_array = _ops.vector(counter)
    counted = 0 if counter_array is None else int(counter_array)
    if momentum is None:  # the cumulative average, or 0 without a counter
        momentum = 0.0 if counter_array is None else 1.0 / (counted + 1)
    # Counted before torch's op, as torch's module counts: non-reentrant checkpointing stops
    # its recomputation inside the op, and counts the batch twice, as it does torch's.
    if counter_array is not None:  # item assignment: an in-place += on a 0-d array costs 10x
        counter_array[()] = counted + 1
    try:
        y = torch.batch_norm(
            input, weight, bias, running_mean, running_var, True, momentum, eps, False
        )
    except RuntimeError:  # torch's argument checks (the sizes), made before it updates anything
        if counter_array is not None:
            counter_array[()] = counted
        raise
    bad = _running.nonfinite_features(mean_array, var_array)
    if bad:
        mean_array[:], var_array[:] = saved_mean, saved_var
        if counter_array is not None:
            counter_array[()] = counted
        warn_not_taken(bad, running_mean.dtype, stacklevel + 1, "batch statistics")
    return y


def _torch_forward(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    counter: torch.Tensor | None,
) -> torch.Tensor:
    """torch's own op, with torch's rule for the running statistics (the fallback)."""
    if counter is not None:
        counter.add_(1)
        if momentum is None:
            momentum = 1.0 / float(counter)
    return torch.batch_norm(
        input, weight, bias, running_mean, running_var, training, momentum or 0.0, eps, False
    )


def _compiled(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    counter: torch.Tensor | None,
) -> torch.Tensor:
    """Under torch.compile: torch's batch norm, and fastbn's running-statistics rule.

    Inductor decomposes torch's op and fuses it with the ops around it, which
    it cannot do with an opaque custom op. Measured (``python -m fastbn.bench
    --torch --compile``, 2 cores): with fastbn's kernels as torch.library ops
    in the graph a converted MobileNetV2 step took 139.96 ms against torch's
    compiled 62.32 ms (0.45x, channels_last), the small CNN 0.61-0.70x; with
    torch's op, 0.99x and 0.92-0.93x. The rule stays fastbn's: the batch's
    mean and variance (torch's, in the input's dtype) folded in float64, all
    or nothing (`fastbn.torch._ops.fold_torch`, without branching on data).
    """
    if not training:
        return torch.nn.functional.batch_norm(
            input, running_mean, running_var, weight, bias, False, 0.0, eps
        )
    y, mean, invstd = torch.native_batch_norm(input, weight, bias, None, None, True, 0.0, eps)
    if running_mean is not None:
        assert running_var is not None  # given with running_mean
        with torch.no_grad():
            var = (invstd.to(torch.float64).reciprocal().square() - eps).clamp_min(0.0)
        _ops.fold_torch(
            running_mean, running_var, mean.to(torch.float64), var, momentum, counter,
            input.numel() // input.shape[1],
        )  # fmt: skip
    return y
