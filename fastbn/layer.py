"""The layer: batch normalization with parameters, running statistics and a mode.

`BatchNorm` holds state only. The arithmetic on the data is the functional
API's; the layer adds the running statistics (PyTorch's update rule), the
forward cache for backward, and the no-lost-state rule: a call that fails
leaves every attribute as it was.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from fastbn import _checks, _engine, _running, ghost
from fastbn import renorm as batch_renorm
from fastbn._plan import Plan, plan_for
from fastbn._types import Array, Float64

__all__ = ["BatchNorm"]

_FLOAT64 = np.dtype(np.float64)


class BatchNorm:
    """Batch normalization over every axis but ``axis``, with learnable scale and shift.

    Parameters
    ----------
    num_features : int
        C, the length of the feature axis.
    axis : int, default 0
        The feature axis of the inputs: 0 for the (features, examples) layout,
        1 or -1 for batch-first data, 1 for (N, C, H, W) images, -1 for
        (N, H, W, C) images.
    eps : float, default 1e-5
        Added to the variance before the square root.
    momentum : float or None, default 0.1
        Weight f of the batch statistics in the running statistics,
        ``running = (1 - f) * running + f * batch``. None gives the cumulative
        average, f = 1 / num_batches_tracked.
    affine : bool, default True
        Whether the layer has the learnable gamma and beta.
    track_running_stats : bool, default True
        Whether the layer keeps running statistics and uses them in eval
        mode. Without them it normalizes with batch statistics in both modes,
        and running_mean and running_var are None.
    dtype : {np.float32, np.float64}, default np.float32
        The dtype of the parameters, the statistics and the inputs.
    virtual_batch_size : int or None, default None
        Ghost batch norm (Hoffer et al., 2017; `fastbn.ghost_batch_norm_train`):
        in training mode each consecutive slice of k = virtual_batch_size
        examples along the examples axis (axis 0, or 1 when ``axis`` is 0)
        is normalized with its own statistics, and backward() takes each
        slice's own; k must divide the batch size N (ValueError naming
        both). The running statistics take the G = N / k slices one after
        another, in order, by the rule below, so num_batches_tracked counts
        G: exactly as calling a plain layer on each slice in turn. That is
        the paper's Algorithm 1 (its closed form of G updates), and it keeps
        the running statistics the same however a stream of examples is cut
        into batches. tf.keras 2 instead averages the G slices' moments into
        one update per batch (its comment: "This isn't strictly correct ...
        more efficient"), which weights a batch by momentum rather than
        1 - (1 - momentum)**G; its virtual batches are also the strided
        examples g, g + G, ... rather than consecutive ones. Eval mode is
        plain running-statistics eval. Not with renorm=True.
    renorm : bool, default False
        Batch Renormalization (Ioffe, 2017; see `fastbn.batch_renorm_train`):
        in training mode the output is corrected toward the running
        statistics, ``y = gamma * (x_hat * r + d) + beta`` with
        ``r = clip(sigma_B / sigma, 1 / r_max, r_max)`` and
        ``d = clip((mu_B - mu) / sigma, -d_max, d_max)`` from the running
        statistics before this batch's update, r and d constants for
        backward(). Eval mode is unchanged. Needs track_running_stats=True.
    r_max : float, default 3.0
        The limit of r, >= 1 (1 with d_max = 0 is plain batch norm).
    d_max : float, default 5.0
        The limit of d, >= 0.
    activation : {None, "relu"}, default None
        "relu" fuses a ReLU after the normalization: y = max(y, 0), in the
        same passes over memory (`fastbn.batch_norm_relu_train`); backward()
        recomputes its mask from x. Not with renorm or virtual_batch_size.

    Attributes
    ----------
    gamma, beta : ndarray or None
        The scale (ones) and shift (zeros), shape (C,); None when affine=False.
        step(), optimizers and load_state_dict() update them in place.
    dgamma, dbeta : ndarray or None
        Their gradients, zeros until the first backward(), which overwrites
        them in place; None when affine=False.
    running_mean, running_var : ndarray or None
        Running statistics (zeros and ones), None when track_running_stats=False.
    num_batches_tracked : int
        The number of training batches folded into the running statistics.
    training : bool
        True in training mode (the initial mode), False in eval mode.
    virtual_batch_size : int or None
        The option of that name; each training forward checks it.
    renorm, r_max, d_max : bool, float, float
        The options of the same names. r_max and d_max may be changed between
        training steps (the paper raises them from 1 and 0 over the first
        epochs); each training forward checks them (ValueError, layer unchanged).

    Notes
    -----
    If a call fails, the layer's parameters, gradients, running statistics,
    counter and forward cache are exactly as before it. Batch statistics that
    are not finite (NaN or inf in the data, or a variance that overflows)
    raise FloatingPointError, as do running statistics that would overflow the
    layer's dtype; PyTorch would store them instead.
    """

    def __init__(
        self,
        num_features: int,
        *,
        axis: int = 0,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        dtype: DTypeLike = np.float32,
        virtual_batch_size: int | None = None,
        renorm: bool = False,
        r_max: float = 3.0,
        d_max: float = 5.0,
        activation: Literal["relu"] | None = None,
    ) -> None:
        num_features = _checks.positive_int("num_features", num_features)
        if not _checks.is_int(axis):
            raise TypeError(f"axis must be an int, got {axis!r}")
        eps = _checks.positive_eps(eps)
        if momentum is not None:
            if not _checks.is_real(momentum):
                raise TypeError(f"momentum must be a real number or None, got {momentum!r}")
            if not 0 <= momentum <= 1:
                raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")
        flags = (
            ("affine", affine),
            ("track_running_stats", track_running_stats),
            ("renorm", renorm),
        )
        for name, flag in flags:
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        layer_dtype = _checks.layer_dtype(dtype)
        if virtual_batch_size is not None:
            virtual_batch_size = ghost.checked_virtual_batch_size(virtual_batch_size)
            if renorm:
                raise ValueError("virtual_batch_size and renorm=True do not combine: pick one")
        if renorm and not track_running_stats:
            raise ValueError(
                "renorm=True needs track_running_stats=True: Batch Renormalization "
                "corrects the batch statistics toward the running ones"
            )
        _, r_max, d_max = batch_renorm.clip_limits(r_max, d_max)
        if activation not in (None, "relu"):
            raise ValueError(f'activation must be None or "relu", got {activation!r}')
        if activation is not None and (renorm or virtual_batch_size is not None):
            raise ValueError(
                "activation is fused with plain batch norm only, not with renorm=True or "
                "virtual_batch_size: apply the ReLU after the layer"
            )

        self.num_features = int(num_features)
        self.axis = int(axis)
        self.eps = eps
        self.momentum = None if momentum is None else float(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.dtype = layer_dtype
        self.renorm = bool(renorm)
        self.r_max = r_max
        self.d_max = d_max
        self.virtual_batch_size = virtual_batch_size
        self.activation = activation
        self.training = True

        shape = (self.num_features,)
        if self.affine:
            self.gamma: Array | None = np.ones(shape, layer_dtype)
            self.beta: Array | None = np.zeros(shape, layer_dtype)
            self.dgamma: Array | None = np.zeros(shape, layer_dtype)
            self.dbeta: Array | None = np.zeros(shape, layer_dtype)
        else:
            self.gamma = self.beta = self.dgamma = self.dbeta = None
        if self.track_running_stats:
            self.running_mean: Array | None = np.zeros(shape, layer_dtype)
            self.running_var: Array | None = np.ones(shape, layer_dtype)
        else:
            self.running_mean = self.running_var = None
        self.num_batches_tracked = 0
        # What the last successful forward saved for backward(): x by reference,
        # its plan and the float64 statistics (see `_Saved`), or None.
        self._saved: _Saved | _GhostSaved | _RenormSaved | None = None

    # ------------------------------------------------------------------ modes

    def train(self, mode: bool = True) -> BatchNorm:
        """Set training mode (or eval mode for ``mode=False``).

        Parameters
        ----------
        mode : bool, default True
            True for training mode, False for eval mode.

        Returns
        -------
        BatchNorm
            The layer itself.
        """
        if not isinstance(mode, (bool, np.bool_)):
            raise TypeError(f"mode must be a bool, got {mode!r}")
        self.training = bool(mode)
        return self

    def eval(self) -> BatchNorm:
        """Set eval mode, the same as ``train(False)``.

        Returns
        -------
        BatchNorm
            The layer itself.
        """
        return self.train(False)

    # ---------------------------------------------------------- computation

    def forward(self, x: ArrayLike, out: Array | None = None) -> Array:
        """Normalize a batch.

        Training mode normalizes with the batch statistics and, when tracking,
        folds them into the running statistics; eval mode normalizes with the
        running statistics. Without running statistics both modes use the
        batch statistics. With renorm, training mode corrects the batch
        statistics' output by r and d from the running statistics before
        this batch's update, then folds the batch into them.

        Parameters
        ----------
        x : ndarray
            Input of the layer's dtype, ndim >= 2, with ``num_features``
            along ``axis``. The layer keeps a reference to it for backward(),
            so it should not be modified before then.
        out : ndarray, optional
            Writable array of x's shape and dtype to write y into. It may not
            overlap x, nor the x kept from the previous forward. If the call
            raises FloatingPointError, out holds the rejected output.

        Returns
        -------
        ndarray
            y, x's shape and dtype: out if given, else a new array.

        Raises
        ------
        TypeError
            x of another dtype than the layer's.
        ValueError
            x of the wrong shape, out overlapping x, M == 1 in training,
            r_max < 1 or d_max < 0 in training with renorm, a batch size that
            virtual_batch_size does not divide in training.
        FloatingPointError
            Batch statistics that are not finite, or running statistics that
            would overflow the layer's dtype.
        """
        batch_stats = self.training or not self.track_running_stats
        x = _checks.layer_array(x, "x", self.dtype)
        x, plan = plan_for(x, self.axis, batch_stats)
        if plan.n_features != self.num_features:
            raise ValueError(
                f"x of shape {x.shape} has {plan.n_features} features along axis "
                f"{self.axis}, but the layer has num_features={self.num_features}"
            )
        if out is not None:
            kept = None if self._saved is None else self._saved.x
            for held, what in ((x, "x"), (kept, "the x kept from the previous forward")):
                if held is not None and np.shares_memory(out, held):
                    raise ValueError(
                        f"out overlaps {what}: the layer keeps x for backward(), "
                        "so write y into a separate array"
                    )
            state = ("gamma", "beta", "running_mean", "running_var")
            _checks.output(out, x, (("x", x), *((name, getattr(self, name)) for name in state)))
        saved: _Saved | _GhostSaved | _RenormSaved
        if not batch_stats:
            y, saved = _eval_forward(self, x, plan, out)
        elif self.training and self.virtual_batch_size is not None:
            y, saved = _ghost_forward(self, x, out)
        elif self.training and self.renorm:
            y, saved = _renorm_forward(self, x, plan, out)
        else:
            y, saved = _train_forward(self, x, plan, out)
        self._saved = saved
        return y

    def __call__(self, x: ArrayLike, out: Array | None = None) -> Array:
        """Apply the layer: the same as ``forward(x, out=out)``."""
        return self.forward(x, out=out)

    def backward(self, dy: ArrayLike, out: Array | None = None) -> Array:
        """Backpropagate through the last forward().

        Where that forward used batch statistics, their dependence on x is
        part of the gradient (the training formula); where it used running
        statistics they are constants, dx = gamma * invstd * dy. After a
        renorm forward it is the training formula with r and d constants;
        after one with virtual batches, each slice's training formula with
        its own statistics, dgamma and dbeta summed over the slices in order.
        Sets dgamma and dbeta in place.

        Parameters
        ----------
        dy : ndarray
            Gradient of the loss with respect to y: x's shape, the layer's dtype.
        out : ndarray, optional
            Writable array of x's shape and dtype to write dx into; it may be dy.

        Returns
        -------
        ndarray
            dx: out if given, else a new array.

        Raises
        ------
        RuntimeError
            No forward() preceded this call.
        TypeError
            dy of another dtype than the layer's.
        ValueError
            dy of another shape than x.
        """
        saved = self._saved
        if saved is None:
            raise RuntimeError("backward() needs a forward() first: nothing to backpropagate")
        dy = _checks.layer_array(dy, "dy", self.dtype)
        _checks.same_shape("dy", dy, saved.x)
        if out is not None:
            inputs = (("dy", dy), ("x", saved.x), ("gamma", self.gamma))
            _checks.output(out, saved.x, inputs, may_be=("dy", dy))
        dx, dgamma, dbeta = saved.backward(self, dy, out)
        if self.affine:
            assert self.dgamma is not None and self.dbeta is not None  # affine
            # float64 sums, rounded to the layer's dtype as astype would
            self.dgamma[...] = dgamma
            self.dbeta[...] = dbeta
        return dx

    def fold(self, mean: Float64, invstd: Float64, count: int, what: str) -> None:
        """Fold G batches' (G, C) statistics (or one batch's (C,)) into the running ones.

        In order, all or none; count is the values per feature of each batch. If a result is not
        finite, FloatingPointError naming ``what`` and the features, and the
        layer is unchanged.
        """
        assert self.running_mean is not None and self.running_var is not None  # tracked
        momentum = -1.0 if self.momentum is None else self.momentum
        bad, g = _running.fold_batches(
            self.running_mean, self.running_var, mean, invstd, self.eps, momentum,
            self.num_batches_tracked, count / (count - 1),
        )  # fmt: skip
        if bad:
            where = f" in virtual batch {g}" if mean.ndim == 2 and mean.shape[0] > 1 else ""
            raise FloatingPointError(
                f"the {what} of features {_running.feature_list(bad)}{where} are not finite, "
                f"or overflow {self.dtype} in the running statistics (NaN or inf in x, or "
                "values too large); the layer is unchanged"
            )
        self.num_batches_tracked += 1 if mean.ndim == 1 else mean.shape[0]

    def affine_vectors(self, dtype: np.dtype[Any] | None = None) -> tuple[Array, Array]:
        """gamma and beta as the kernels take them, in dtype (default the layer's).

        Ones and zeros when affine=False.
        """
        dtype = self.dtype if dtype is None else dtype
        n = self.num_features
        return (
            _checks.kernel_vector(self.gamma, n, dtype, 1.0),
            _checks.kernel_vector(self.beta, n, dtype, 0.0),
        )

    def step(self, lr: float) -> None:
        """Take a gradient-descent step: gamma -= lr * dgamma, beta -= lr * dbeta, in place.

        Does nothing when affine=False.

        Parameters
        ----------
        lr : float
            The learning rate, a finite real number.
        """
        if not _checks.is_real(lr):
            raise TypeError(f"lr must be a real number, got {lr!r}")
        if not math.isfinite(lr):
            raise ValueError(f"lr must be finite, got {lr!r}")
        if self.affine:
            assert self.gamma is not None and self.dgamma is not None  # affine
            assert self.beta is not None and self.dbeta is not None
            # A Python float keeps the arithmetic in the layer's dtype.
            lr = float(lr)
            self.gamma -= lr * self.dgamma
            self.beta -= lr * self.dbeta

    def parameters(self) -> list[tuple[str, Array, Array]]:
        """List the learnable parameters with their gradients.

        Returns
        -------
        list of (str, ndarray, ndarray)
            ``[("gamma", gamma, dgamma), ("beta", beta, dbeta)]``, the layer's
            own arrays, or an empty list when affine=False.
        """
        if not self.affine:
            return []
        assert self.gamma is not None and self.dgamma is not None  # affine
        assert self.beta is not None and self.dbeta is not None
        return [("gamma", self.gamma, self.dgamma), ("beta", self.beta, self.dbeta)]

    # ----------------------------------------------------------------- state

    def reset_running_stats(self) -> None:
        """Reset running_mean to 0, running_var to 1 and num_batches_tracked to 0, in place."""
        if self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None  # tracked
            self.running_mean.fill(0)
            self.running_var.fill(1)
            self.num_batches_tracked = 0

    def reset_parameters(self) -> None:
        """Reset the running statistics, gamma to 1 and beta to 0, in place.

        The gradients dgamma and dbeta are left as they are, as in PyTorch.
        """
        self.reset_running_stats()
        if self.affine:
            assert self.gamma is not None and self.beta is not None  # affine
            self.gamma.fill(1)
            self.beta.fill(0)

    def state_dict(self) -> dict[str, Array | int]:
        """Return copies of the layer's state under PyTorch's names.

        Returns
        -------
        dict
            ``weight`` and ``bias`` (gamma and beta, when affine) and
            ``running_mean``, ``running_var`` and ``num_batches_tracked``
            (when tracking running statistics): arrays copied, the counter an int.
        """
        state: dict[str, Array | int] = {}
        if self.affine:
            assert self.gamma is not None and self.beta is not None  # affine
            state["weight"] = self.gamma.copy()
            state["bias"] = self.beta.copy()
        if self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None  # tracked
            state["running_mean"] = self.running_mean.copy()
            state["running_var"] = self.running_var.copy()
            state["num_batches_tracked"] = self.num_batches_tracked
        return state

    def load_state_dict(self, state_dict: Mapping[str, ArrayLike]) -> None:
        """Copy a state into the layer's arrays, in place, all or nothing.

        Parameters
        ----------
        state_dict : mapping
            The keys of state_dict(). The arrays (NumPy arrays, or anything
            ``np.asarray`` takes, such as CPU tensors) must have shape (C,)
            and dtype float32 or float64, converted to the layer's dtype;
            num_batches_tracked a non-negative integer, a 0-d integer array
            included. A PyTorch BatchNorm state_dict converted with
            ``{k: v.numpy() for k, v in sd.items()}`` qualifies.

        Raises
        ------
        ValueError
            Missing or unexpected keys, a wrong shape, a negative counter, or
            finite values that overflow the layer's dtype.
        TypeError
            A dtype other than float32 or float64, or a counter that is not
            an integer.
        """
        expected = list(self.state_dict())
        missing = [key for key in expected if key not in state_dict]
        unexpected = [key for key in state_dict if key not in expected]
        if missing or unexpected:
            raise ValueError(
                f"state_dict does not match the layer: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        arrays = {}
        for key in expected:
            if key != "num_batches_tracked":
                arrays[key] = self._converted_state(key, state_dict[key])
        count = None
        if self.track_running_stats:
            # Also a 0-d int64 array, which is what torch's counter becomes.
            counter = np.asarray(state_dict["num_batches_tracked"])
            if counter.ndim != 0 or counter.dtype.kind not in "iu":
                raise TypeError(
                    "state_dict['num_batches_tracked'] must be an integer, got "
                    f"{state_dict['num_batches_tracked']!r}"
                )
            count = int(counter)
            if count < 0:
                raise ValueError(f"state_dict['num_batches_tracked'] must be >= 0, got {count}")
        # Everything is checked: now copy, into the arrays optimizers may hold.
        targets = {
            "weight": self.gamma,
            "bias": self.beta,
            "running_mean": self.running_mean,
            "running_var": self.running_var,
        }
        for key, value in arrays.items():
            target = targets[key]
            assert target is not None  # state_dict() has the layer's arrays only
            target[...] = value
        if count is not None:
            self.num_batches_tracked = count

    def _converted_state(self, key: str, value: ArrayLike) -> Array:
        """Return a state_dict array checked and converted to the layer's dtype."""
        array = np.asarray(value)
        if array.dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(
                f"state_dict[{key!r}] has dtype {array.dtype}; expected float32 or float64"
            )
        if array.shape != (self.num_features,):
            raise ValueError(
                f"state_dict[{key!r}] has shape {array.shape}; expected ({self.num_features},)"
            )
        with np.errstate(over="ignore"):
            converted = array.astype(self.dtype)
        if not np.array_equal(np.isfinite(converted), np.isfinite(array)):
            raise ValueError(f"state_dict[{key!r}] has values that overflow {self.dtype}")
        return converted

    # ------------------------------------------------------------ plumbing

    def __repr__(self) -> str:
        # The renorm options only when on: a plain layer reads as it always has.
        renorm = f", renorm=True, r_max={self.r_max}, d_max={self.d_max}" if self.renorm else ""
        k = self.virtual_batch_size
        virtual = "" if k is None else f", virtual_batch_size={k}"
        if self.activation is not None:
            renorm += f", activation={self.activation!r}"
        return (
            f"BatchNorm({self.num_features}, axis={self.axis}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, "
            f"dtype=np.{self.dtype}{virtual}{renorm})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # The forward cache references the caller's batch: transient, not the
        # layer's state, so copies and pickles leave it out (as torch modules
        # hold no autograd graph).
        state = self.__dict__.copy()
        state["_saved"] = None
        return state


# ------------------------------------------------------------- the behaviours
# Each forward normalizes a checked x (the layer's dtype and features, and its
# plan) and returns y with what its backward needs; each saved object's
# backward returns (dx, dgamma, dbeta), the sums in float64, for dy and out
# checked by BatchNorm.backward. The running statistics change only through
# BatchNorm.fold, once everything else succeeded: no lost state.


def _relu(layer: BatchNorm) -> bool | None:
    return True if layer.activation == "relu" else None


@dataclasses.dataclass(slots=True)  # not frozen: a frozen one costs ~1 us to make
class _Saved:
    """A plain forward's x, plan and float64 statistics; training: they were the batch's."""

    x: Array
    plan: Plan
    mean: Float64
    invstd: Float64
    training: bool

    def backward(
        self, layer: BatchNorm, dy: Array, out: Array | None
    ) -> tuple[Array, Float64, Float64]:
        gamma, beta = layer.affine_vectors()
        relu = beta if layer.activation == "relu" else None  # the ReLU's mask needs beta
        return _engine.backward(
            self.plan, dy, self.x, self.mean, self.invstd, gamma, self.training, out, relu
        )


def _eval_forward(
    layer: BatchNorm, x: Array, plan: Plan, out: Array | None
) -> tuple[Array, _Saved]:
    """Eval mode: the running statistics, constants for backward."""
    assert layer.running_mean is not None and layer.running_var is not None  # tracked
    gamma, beta = layer.affine_vectors()
    y = _engine.evaluate(
        plan, x, layer.running_mean, layer.running_var, gamma, beta, layer.eps, out,
        _relu(layer),
    )  # fmt: skip
    # Snapshots: the running statistics may change before backward().
    mean = layer.running_mean.astype(np.float64)
    invstd = 1.0 / np.sqrt(layer.running_var.astype(np.float64) + layer.eps)
    return y, _Saved(x, plan, mean, invstd, False)


def _train_forward(
    layer: BatchNorm, x: Array, plan: Plan, out: Array | None
) -> tuple[Array, _Saved]:
    """Batch statistics, folded into the running ones when training and tracking."""
    gamma, beta = layer.affine_vectors()
    y, mean, invstd = _engine.train(plan, x, gamma, beta, layer.eps, out, _relu(layer))
    if layer.training and layer.track_running_stats:
        layer.fold(mean, invstd, plan.count, "batch statistics")
    else:
        _refuse_nonfinite(mean, invstd, "batch statistics", "")
    return y, _Saved(x, plan, mean, invstd, True)


def _refuse_nonfinite(mean: Float64, invstd: Float64, what: str, where: str) -> None:
    """FloatingPointError for statistics that are not finite (the layer keeps its state)."""
    bad = _running.nonfinite_batch_stats(mean, invstd)
    if bad:
        raise FloatingPointError(
            f"the {what} of features {_running.feature_list(bad)}{where} are not finite (NaN "
            "or inf in x, or a variance that overflows); the layer is unchanged"
        )


@dataclasses.dataclass(slots=True)  # not frozen: a frozen one costs ~1 us to make
class _GhostSaved:
    """A ghost forward's x, its plan and each virtual batch's (G, C) float64 statistics."""

    x: Array
    plan: ghost.GhostPlan
    mean: Float64
    invstd: Float64

    def backward(
        self, layer: BatchNorm, dy: Array, out: Array | None
    ) -> tuple[Array, Float64, Float64]:
        gamma, _ = layer.affine_vectors()
        return ghost.backward(dy, self.x, self.plan, self.mean, self.invstd, gamma, out)


def _ghost_forward(layer: BatchNorm, x: Array, out: Array | None) -> tuple[Array, _GhostSaved]:
    """Training with virtual batches (see ``virtual_batch_size``)."""
    assert layer.virtual_batch_size is not None  # forward() chose this
    x, plan = ghost.planned(x, layer.axis, layer.virtual_batch_size)
    gamma, beta = layer.affine_vectors()
    y, mean, invstd = ghost.train(x, plan, gamma, beta, layer.eps, out)
    if layer.track_running_stats:
        layer.fold(mean, invstd, plan.slice_values, "statistics")
    else:
        for g in range(mean.shape[0]):
            _refuse_nonfinite(mean[g], invstd[g], "statistics", f" in virtual batch {g}")
    return y, _GhostSaved(x, plan, mean, invstd)


@dataclasses.dataclass(slots=True)  # not frozen: a frozen one costs ~1 us to make
class _RenormSaved:
    """A renorm forward's x, plan, float64 batch statistics and corrections r and d."""

    x: Array
    plan: Plan
    mean: Float64
    invstd: Float64
    r: Float64
    d: Float64

    def backward(
        self, layer: BatchNorm, dy: Array, out: Array | None
    ) -> tuple[Array, Float64, Float64]:
        gamma, _ = layer.affine_vectors(_FLOAT64)
        return batch_renorm.backward(
            self.plan, dy, self.x, self.mean, self.invstd, self.r, self.d, gamma, out
        )


def _renorm_forward(
    layer: BatchNorm, x: Array, plan: Plan, out: Array | None
) -> tuple[Array, _RenormSaved]:
    """Batch Renormalization: r and d from the running statistics before this batch's fold."""
    assert layer.running_mean is not None and layer.running_var is not None  # tracked
    limits = batch_renorm.clip_limits(layer.r_max, layer.d_max)  # may have changed since
    gamma, beta = layer.affine_vectors(_FLOAT64)
    y, mean, invstd, r, d = batch_renorm.train(
        plan, x, layer.running_mean.astype(np.float64), layer.running_var.astype(np.float64),
        gamma, beta, limits, layer.eps, out,
    )  # fmt: skip
    layer.fold(mean, invstd, plan.count, "batch statistics")
    return y, _RenormSaved(x, plan, mean, invstd, r, d)
