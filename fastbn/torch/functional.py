"""`batch_norm`: torch.nn.functional.batch_norm on fastbn's kernels.

The running statistics follow torch's rule, with one deliberate difference:
a training batch whose statistics are not finite (or would overflow the
buffers' dtype) leaves running_mean, running_var and the modules'
num_batches_tracked unchanged, with a RuntimeWarning naming the features.
Under torch.compile the same rule is computed without branching on data
(`torch.where`), and the warning is left out.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import NDArray

from fastbn import _running
from fastbn.torch import _ops

__all__ = ["batch_norm"]


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Batch normalization over channel axis 1, as `torch.nn.functional.batch_norm`.

    Parameters
    ----------
    input : Tensor
        (N, C, *) data.
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
        The output, of input's shape, dtype and memory format.
    """
    if training:
        verify_batch_size(input.size())
    return forward(
        input, running_mean, running_var, weight, bias, training, momentum, eps, stacklevel=4
    )[0]


def verify_batch_size(size: Sequence[int]) -> None:
    """torch's check: training needs more than one value per channel."""
    if size[0] == 1 and (len(size) == 2 or math.prod(size[2:]) == 1):
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}"
        )


def _check_sizes(
    n_channels: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
) -> None:
    """torch's check of the per-channel tensors, with its RuntimeError."""
    for name, t in (
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        if t is not None and t.numel() != n_channels:
            raise RuntimeError(f"{name} should contain {n_channels} elements not {t.numel()}")


def _needs_grad(
    input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> bool:
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
) -> tuple[torch.Tensor, bool | torch.Tensor]:
    """(y, whether the running statistics took the batch) for `batch_norm` and the modules.

    With ``num_batches_tracked`` (a module's counter) it is incremented when
    the batch is taken, and momentum None means the cumulative average. The
    second result is a bool, or a bool tensor under torch.compile.
    ``stacklevel`` is the warning's, counted from the function that warns
    (two levels below this one), so that it names the user's line. With
    ``relu``, y is followed by a ReLU (fused in the kernels).
    """
    taken: bool | torch.Tensor
    if (running_mean is None) is not (running_var is None):
        raise ValueError(
            "running_mean and running_var must either both be None or neither be None"
        )  # torch's error
    compiling = torch.compiler.is_compiling()
    # fast_path first: under torch.jit.trace, numel() would warn of a traced value.
    if (
        not _ops.fast_path(input, weight, bias, running_mean, running_var)
        or input.numel() == 0
        or not (training or running_mean is not None)
        or (compiling and torch.onnx.is_in_onnx_export())
    ):
        y, taken = _torch_forward(
            input, running_mean, running_var, weight, bias, training, momentum, eps,
            num_batches_tracked,
        )  # fmt: skip
        return (torch.relu(y) if relu else y), taken
    _check_sizes(input.shape[1], weight, bias, running_mean, running_var)
    if compiling:
        y, taken = _compiled(
            input, running_mean, running_var, weight, bias, training, momentum, eps,
            num_batches_tracked,
        )  # fmt: skip
        return (torch.relu(y) if relu else y), taken
    grad = _needs_grad(input, weight, bias)
    if not training:
        if grad:
            y = _ops.apply(input, weight, bias, running_mean, running_var, eps, None, relu)
        else:  # torch's op took the call if running_mean is None; running_var comes with it
            assert running_mean is not None and running_var is not None
            y = _ops.eval_arrays(input, running_mean, running_var, weight, bias, eps, relu)[0]
        return y, False
    if grad:
        stats: list[_ops._Stats] = []
        y = _ops.apply(input, weight, bias, None, None, eps, stats, relu)
        mean, invstd = stats[0]
    else:
        y, mean, invstd, _, _, _ = _ops.train_arrays(
            input, _ops.vector(weight), _ops.vector(bias), eps, relu
        )
    if running_mean is None:
        return y, False
    assert running_var is not None  # given with running_mean
    taken = _fold(
        running_mean, running_var, mean, invstd, eps, momentum, num_batches_tracked,
        input.numel() // input.shape[1], stacklevel,
    )  # fmt: skip
    return y, taken


def _fold(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: NDArray[np.float64],
    invstd: NDArray[np.float64],
    eps: float,
    momentum: float | None,
    counter: torch.Tensor | None,
    count: int,
    stacklevel: int,
) -> bool:
    """Eager running-statistics update in place: all features and the counter, or nothing."""
    counter_array = None if counter is None else counter.numpy()
    if momentum is None:
        momentum = 0.0 if counter_array is None else 1.0 / (int(counter_array) + 1)
    bad = _running.fold_batch_stats(
        running_mean.numpy(), running_var.numpy(), mean, invstd, eps, momentum, count / (count - 1)
    )
    if bad:
        warnings.warn(
            f"the batch statistics of features {_running.feature_list(bad)} are not finite "
            f"(or overflow {running_mean.dtype}): running_mean, running_var and "
            "num_batches_tracked were left unchanged",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
        return False
    if counter_array is not None:
        counter_array += 1
    return True


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
) -> tuple[torch.Tensor, bool]:
    """torch's own op, with torch's rule for the running statistics (the fallback)."""
    if counter is not None:
        counter.add_(1)
        if momentum is None:
            momentum = 1.0 / float(counter)
    y = torch.batch_norm(
        input, weight, bias, running_mean, running_var, training, momentum or 0.0, eps, False
    )
    return y, True


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
) -> tuple[torch.Tensor, bool | torch.Tensor]:
    """The torch.library ops, and the running-statistics rule without data-dependent branches."""
    if not training:
        y = torch.ops.fastbn.batch_norm_eval(input, running_mean, running_var, weight, bias, eps)
        return y, False
    y, mean, invstd = torch.ops.fastbn.batch_norm_train(input, weight, bias, eps)
    if running_mean is None:
        return y, False
    assert running_var is not None  # given with running_mean
    count = input.numel() // input.shape[1]
    with torch.no_grad():
        var = (invstd.reciprocal().square() - eps).clamp_min(0.0) * (count / (count - 1))
        if momentum is None:
            factor = 0.0 if counter is None else 1.0 / (counter + 1).to(torch.float64)
        else:
            factor = momentum
        new_mean = ((1.0 - factor) * running_mean.to(torch.float64) + factor * mean).to(
            running_mean.dtype
        )
        new_var = ((1.0 - factor) * running_var.to(torch.float64) + factor * var).to(
            running_var.dtype
        )
        taken = torch.isfinite(new_mean).all() & torch.isfinite(new_var).all()
        running_mean.copy_(torch.where(taken, new_mean, running_mean))
        running_var.copy_(torch.where(taken, new_var, running_var))
        if counter is not None:
            counter.add_(taken.to(counter.dtype))
    return y, taken
