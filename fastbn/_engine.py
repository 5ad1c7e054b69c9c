"""The executors: batch norm's passes over planned data, checking nothing.

Each public function of the package reads "check, then run": it turns the
user's arguments into a `Plan` and validated parameters (`_plan.plan_for`
and `_checks`), then calls one executor here. The layer and the PyTorch
bridge call the executors directly with what they validated themselves.

What an executor takes, and does not check:

- ``plan``: the plan of x (`_plan.plan_for`); x an array of the plan's key;
  dy (where taken) of x's shape and dtype, in any memory order;
- per-feature vectors (gamma, beta, running statistics) as the kernels take
  them: C-contiguous, length C, in x's dtype or float64
  (`_checks.per_feature`); mean, invstd, dgamma, dbeta C-contiguous float64;
- ``out``: None, or a writable array of x's shape and dtype that overlaps no
  input (the backward's may be dy itself) (`_checks.output`);
- ``relu``: None, or True for a ReLU fused after the normalization (the
  backward takes the forward's beta instead: its mask is recomputed from x).

Statistics and parameter gradients come back in float64.
"""

from __future__ import annotations

from fastbn._plan import Plan
from fastbn._threading import launch
from fastbn._types import Array, Float64

__all__ = ["backward", "evaluate", "input_gradient", "moments", "param_sums", "train"]


def train(
    plan: Plan,
    x: Array,
    gamma: Array,
    beta: Array,
    eps: float,
    out: Array | None,
    relu: bool | None = None,
) -> tuple[Array, Float64, Float64]:
    """(y, mean, invstd): batch statistics, then y = gamma * (x - mean) * invstd + beta."""
    buffer, copy_back = plan.output(out, x.dtype)
    mean, invstd = launch(
        plan.serial, plan.family.train_forward, plan.kernel_x(x), *plan.geometry, gamma, beta,
        eps, plan.view(buffer), relu,
    )  # fmt: skip
    return plan.result(buffer, out, copy_back), mean, invstd


def evaluate(
    plan: Plan,
    x: Array,
    running_mean: Array,
    running_var: Array,
    gamma: Array,
    beta: Array,
    eps: float,
    out: Array | None,
    relu: bool | None = None,
) -> Array:
    """y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta."""
    buffer, copy_back = plan.output(out, x.dtype)
    launch(
        plan.serial, plan.family.eval_forward, plan.kernel_x(x), *plan.geometry, running_mean,
        running_var, gamma, beta, eps, plan.view(buffer), relu,
    )  # fmt: skip
    return plan.result(buffer, out, copy_back)


def backward(
    plan: Plan,
    dy: Array,
    x: Array,
    mean: Array,
    invstd: Array,
    gamma: Array,
    training: bool,
    out: Array | None,
    beta: Array | None = None,
) -> tuple[Array, Float64, Float64]:
    """(dx, dgamma, dbeta) of y = gamma * (x - mean) * invstd + beta.

    training: the statistics were the batch's (they depend on x), else
    constants. beta given: through the ReLU fused after the forward.
    """
    buffer, copy_back = plan.output(out, x.dtype)
    dgamma, dbeta = launch(
        plan.serial, plan.family.backward, plan.kernel_input(dy), plan.kernel_x(x),
        *plan.geometry, mean, invstd, gamma, beta, training, plan.view(buffer),
    )  # fmt: skip
    return plan.result(buffer, out, copy_back), dgamma, dbeta


def param_sums(
    plan: Plan, dy: Array, x: Array, mean: Array, invstd: Array
) -> tuple[Float64, Float64]:
    """(sum(dy * x_hat), sum(dy)) per feature, without dx: one pass over dy and x."""
    return launch(
        plan.serial, plan.family.param_grads, plan.kernel_input(dy), plan.kernel_x(x),
        *plan.geometry, mean, invstd,
    )  # fmt: skip


def moments(plan: Plan, x: Array) -> tuple[Float64, Float64]:
    """The mean and biased variance of each feature."""
    return launch(plan.serial, plan.family.moments, plan.kernel_x(x), *plan.geometry)


def input_gradient(
    plan: Plan,
    dy: Array,
    x: Array,
    mean: Array,
    invstd: Array,
    gamma: Array,
    dgamma: Array,
    dbeta: Array,
    count: int,
    out: Array | None,
) -> Array:
    """dx of the training formula from given sums dgamma, dbeta over count values per feature.

    With the sums and count of every process's batch, this is a synchronized
    batch norm's input gradient.
    """
    buffer, copy_back = plan.output(out, x.dtype)
    launch(
        plan.serial, plan.family.train_input_gradient, plan.kernel_input(dy), plan.kernel_x(x),
        *plan.geometry, mean, invstd, gamma, dgamma, dbeta, count, plan.view(buffer),
    )  # fmt: skip
    return plan.result(buffer, out, copy_back)
