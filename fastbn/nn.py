"""Mini-batch training in the notes' features-first layout: layers, a loss, optimizers.

Activations A are (n_features, m) arrays, one column per example; labels are
integer class ids of shape (m,). Every layer has the same small interface:

- ``layer(A)`` (or ``layer.forward(A)``) returns the layer's output and keeps
  what its backward pass needs;
- ``layer.backward(dZ)`` takes the gradient of the loss with respect to that
  output and returns the gradient with respect to A, writing the parameter
  gradients into arrays allocated once, so an optimizer built once from
  ``model.parameters()`` stays valid for the whole training;
- ``layer.parameters()`` lists ``(name, param, grad)`` triples.

`fastbn.BatchNorm` (with its default ``axis=0``) is such a layer, used as it is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from fastbn import _checks
from fastbn.layer import BatchNorm

__all__ = [
    "SGD",
    "Adam",
    "Dense",
    "Layer",
    "ReLU",
    "Sequential",
    "SoftmaxCrossEntropy",
    "fold_batch_norm",
    "minibatches",
]


# A learnable parameter as parameters() lists it: (name, param, grad).
_Parameter = tuple[str, NDArray[np.floating], NDArray[np.floating]]


class Layer(Protocol):
    """What Sequential holds: an object with the layers' forward, backward and parameters."""

    def forward(self, A: NDArray[np.floating], /) -> NDArray[np.floating]: ...

    def backward(self, dZ: NDArray[np.floating], /) -> NDArray[np.floating]: ...

    def parameters(self) -> Sequence[_Parameter]: ...


class Dense:
    """A fully connected layer, Z = W A + b.

    Parameters
    ----------
    n_in, n_out : int
        The number of input and output features.
    bias : bool, default True
        Whether the layer adds the learnable b. A Dense followed by batch norm
        needs none: the batch norm's beta takes its place.
    rng : numpy.random.Generator, optional
        Draws the initial W (He initialisation: normal with variance 2 / n_in,
        suited to a ReLU after the layer); a fresh unseeded generator if None.
    dtype : {np.float32, np.float64}, default np.float32
        The dtype of the parameters and of the inputs.

    Attributes
    ----------
    W : ndarray, shape (n_out, n_in)
        The weights.
    b : ndarray of shape (n_out,), or None
        The bias (zeros initially), None when bias=False.
    dW, db : ndarray or None
        Their gradients, zeros until the first backward(), which overwrites
        them in place.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        bias: bool = True,
        *,
        rng: np.random.Generator | None = None,
        dtype: DTypeLike = np.float32,
    ) -> None:
        self.n_in = _checks.positive_int("n_in", n_in)
        self.n_out = _checks.positive_int("n_out", n_out)
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"bias must be a bool, got {bias!r}")
        if rng is None:
            rng = np.random.default_rng()
        elif not isinstance(rng, np.random.Generator):
            raise TypeError(
                f"rng must be a numpy.random.Generator, got {rng!r}: "
                "pass np.random.default_rng(seed)"
            )
        self.dtype = _checks.layer_dtype(dtype)
        he_std = math.sqrt(2.0 / self.n_in)
        self.W: NDArray[np.floating] = (
            he_std * rng.standard_normal((self.n_out, self.n_in))
        ).astype(self.dtype)
        self.dW = np.zeros_like(self.W)
        self.b: NDArray[np.floating] | None
        self.db: NDArray[np.floating] | None
        if bias:
            self.b = np.zeros(self.n_out, self.dtype)
            self.db = np.zeros_like(self.b)
        else:
            self.b = self.db = None
        # The input of the last forward, by reference: backward needs it for dW.
        self._A: NDArray[np.floating] | None = None

    def __call__(self, A: ArrayLike) -> NDArray[np.floating]:
        return self.forward(A)

    def forward(self, A: ArrayLike) -> NDArray[np.floating]:
        """Return Z = W A + b.

        Parameters
        ----------
        A : ndarray, shape (n_in, m)
            The input, of the layer's dtype. The layer keeps a reference to it
            for backward(), so it should not be modified before then.

        Returns
        -------
        ndarray, shape (n_out, m)
            A new array of the layer's dtype.
        """
        A = _checks.layer_array(A, "A", self.dtype)
        if A.ndim != 2 or A.shape[0] != self.n_in:
            raise ValueError(
                f"A has shape {A.shape}, but the layer expects (n_in, m) = ({self.n_in}, m)"
            )
        Z = self.W @ A
        if self.b is not None:
            Z += self.b[:, None]
        self._A = A
        return Z

    def backward(self, dZ: ArrayLike) -> NDArray[np.floating]:
        """Return dA = W^T dZ; overwrite dW = dZ A^T and db = the row sums of dZ.

        Parameters
        ----------
        dZ : ndarray, shape (n_out, m)
            The gradient of the loss with respect to the last forward's output.

        Returns
        -------
        ndarray, shape (n_in, m)
            The gradient with respect to the last forward's input.
        """
        if self._A is None:
            raise RuntimeError("backward() needs a forward() first: nothing to backpropagate")
        dZ = _checks.layer_array(dZ, "dZ", self.dtype)
        expected = (self.n_out, self._A.shape[1])
        if dZ.shape != expected:
            raise ValueError(f"dZ has shape {dZ.shape}; the last forward's output has {expected}")
        np.matmul(dZ, self._A.T, out=self.dW)
        if self.b is not None:
            np.sum(dZ, axis=1, out=self.db)
        return self.W.T @ dZ

    def parameters(self) -> list[_Parameter]:
        """List the learnable parameters with their gradients.

        Returns
        -------
        list of (str, ndarray, ndarray)
            ``[("W", W, dW), ("b", b, db)]``, without b when bias=False.
        """
        params = [("W", self.W, self.dW)]
        if self.b is not None and self.db is not None:
            params.append(("b", self.b, self.db))
        return params

    def __repr__(self) -> str:
        return (
            f"Dense({self.n_in}, {self.n_out}, bias={self.b is not None}, dtype=np.{self.dtype})"
        )


class ReLU:
    """The rectified linear unit, max(Z, 0), elementwise; no parameters."""

    def __init__(self) -> None:
        # Where the last forward's input was positive: the only units dZ passes through.
        self._positive: NDArray[np.bool_] | None = None

    def __call__(self, Z: ArrayLike) -> NDArray[np.floating]:
        return self.forward(Z)

    def forward(self, Z: ArrayLike) -> NDArray[np.floating]:
        """Return max(Z, 0) as a new array of Z's dtype.

        Parameters
        ----------
        Z : ndarray
            The pre-activations, float32 or float64.

        Returns
        -------
        ndarray
            A, Z's shape and dtype.
        """
        Z = np.asarray(Z)
        if Z.dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"Z has dtype {Z.dtype}: convert it with Z.astype(np.float32)")
        self._positive = Z > 0
        return np.maximum(Z, 0)

    def backward(self, dA: ArrayLike) -> NDArray[np.floating]:
        """Return dZ = dA where the last forward's input was positive, 0 elsewhere.

        Parameters
        ----------
        dA : ndarray
            The gradient with respect to the last forward's output.

        Returns
        -------
        ndarray
            The gradient with respect to its input, dA's dtype.
        """
        if self._positive is None:
            raise RuntimeError("backward() needs a forward() first: nothing to backpropagate")
        dA = np.asarray(dA)
        if dA.shape != self._positive.shape:
            raise ValueError(
                f"dA has shape {dA.shape}; the last forward's output has {self._positive.shape}"
            )
        return dA * self._positive

    def parameters(self) -> list[_Parameter]:
        """Return an empty list: ReLU learns nothing.

        Returns
        -------
        list
            ``[]``.
        """
        return []

    def __repr__(self) -> str:
        return "ReLU()"


class Sequential:
    """Layers applied one after the other; backward runs them in reverse.

    Parameters
    ----------
    *layers
        Objects with forward/backward/parameters, such as Dense, ReLU,
        fastbn.BatchNorm or another Sequential. They are held, not copied.

    Attributes
    ----------
    layers : list
        The layers, in order; also reachable as ``model[i]``.
    training : bool
        The mode last set with train() or eval(); True initially.
    """

    def __init__(self, *layers: Layer) -> None:
        for index, layer in enumerate(layers):
            missing = [
                method
                for method in ("forward", "backward", "parameters")
                if not callable(getattr(layer, method, None))
            ]
            if missing:
                raise TypeError(f"layer {index} ({layer!r}) has no method {', '.join(missing)}")
        self.layers = list(layers)
        self.training = True

    def __call__(self, A: NDArray[np.floating]) -> NDArray[np.floating]:
        return self.forward(A)

    def forward(self, A: NDArray[np.floating]) -> NDArray[np.floating]:
        """Return the last layer's output, each layer taking the previous one's.

        Parameters
        ----------
        A : ndarray, shape (n_features, m)
            The input of the first layer.

        Returns
        -------
        ndarray
            The output of the last layer.
        """
        for layer in self.layers:
            A = layer.forward(A)
        return A

    def backward(self, dZ: NDArray[np.floating]) -> NDArray[np.floating]:
        """Backpropagate through every layer in reverse, setting their gradients.

        Parameters
        ----------
        dZ : ndarray
            The gradient of the loss with respect to the last forward's output.

        Returns
        -------
        ndarray
            The gradient with respect to the last forward's input.
        """
        for layer in reversed(self.layers):
            dZ = layer.backward(dZ)
        return dZ

    def parameters(self) -> list[_Parameter]:
        """List every layer's parameters, each name prefixed with its layer's index.

        Returns
        -------
        list of (str, ndarray, ndarray)
            Such as ``("0.W", W, dW)`` and ``("1.gamma", gamma, dgamma)``: the
            layers' own arrays.
        """
        return [
            (f"{index}.{name}", param, grad)
            for index, layer in enumerate(self.layers)
            for name, param, grad in layer.parameters()
        ]

    def train(self, mode: bool = True) -> Sequential:
        """Set training mode (or eval mode for ``mode=False``) on every layer that has modes.

        Parameters
        ----------
        mode : bool, default True
            True for training mode (batch statistics), False for eval mode
            (running statistics).

        Returns
        -------
        Sequential
            The model itself.
        """
        if not isinstance(mode, (bool, np.bool_)):
            raise TypeError(f"mode must be a bool, got {mode!r}")
        for layer in self.layers:
            set_mode = getattr(layer, "train", None)
            if callable(set_mode):
                set_mode(bool(mode))
        self.training = bool(mode)
        return self

    def eval(self) -> Sequential:
        """Set eval mode on every layer that has modes, the same as ``train(False)``.

        Returns
        -------
        Sequential
            The model itself.
        """
        return self.train(False)

    def __getitem__(self, index: int) -> Layer:
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __repr__(self) -> str:
        inner = "".join(f"\n  ({i}): {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential({inner}\n)"


class SoftmaxCrossEntropy:
    """Softmax over the class axis followed by the cross-entropy, averaged over the batch."""

    def __call__(self, logits: ArrayLike, labels: ArrayLike) -> tuple[float, NDArray[np.floating]]:
        """Return the mean loss and its gradient with respect to the logits.

        Parameters
        ----------
        logits : ndarray, shape (n_classes, m)
            Unnormalized class scores, float32 or float64, one column per example.
        labels : ndarray of int, shape (m,)
            The class of each example, in [0, n_classes).

        Returns
        -------
        loss : float
            -mean(log softmax(logits)[labels, range(m)]).
        dlogits : ndarray, shape (n_classes, m)
            (softmax(logits) - one_hot(labels)) / m, in the logits' dtype.
        """
        logits = np.asarray(logits)
        if logits.dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(
                f"logits has dtype {logits.dtype}: convert it with logits.astype(np.float32)"
            )
        labels = np.asarray(labels)
        if logits.ndim != 2 or logits.shape[1] == 0:
            raise ValueError(
                f"logits must have shape (n_classes, m) with m > 0, got {logits.shape}"
            )
        n_classes, m = logits.shape
        if labels.shape != (m,):
            raise ValueError(
                f"labels has shape {labels.shape}; expected ({m},) for logits {logits.shape}"
            )
        if labels.dtype.kind not in "iu":
            raise TypeError(f"labels has dtype {labels.dtype}: class ids must be integers")
        if labels.min() < 0 or labels.max() >= n_classes:
            raise ValueError(
                f"labels must be in [0, {n_classes}), got values in "
                f"[{labels.min()}, {labels.max()}]"
            )
        # Shifting each column by its maximum keeps exp() from overflowing and
        # leaves the softmax unchanged; log of the sum is then at least 0.
        shifted = logits - logits.max(axis=0)
        exp = np.exp(shifted)
        sum_exp = exp.sum(axis=0)
        columns = np.arange(m)
        loss = float(np.mean(np.log(sum_exp) - shifted[labels, columns], dtype=np.float64))
        dlogits = exp / sum_exp
        dlogits[labels, columns] -= 1
        dlogits /= m
        return loss, dlogits

    def __repr__(self) -> str:
        return "SoftmaxCrossEntropy()"


def _optimizer_params(
    params: Iterable[_Parameter],
) -> tuple[list[NDArray[np.floating]], list[NDArray[np.floating]]]:
    """Check ``model.parameters()``-style triples; return (params, grads) lists."""
    params = list(params)
    if not params:
        raise ValueError("params is empty: pass model.parameters()")
    values, grads = [], []
    for entry in params:
        if len(entry) != 3:
            raise TypeError(f"params must hold (name, param, grad) triples, got {entry!r}")
        name, param, grad = entry
        if not isinstance(param, np.ndarray) or not isinstance(grad, np.ndarray):
            raise TypeError(f"param {name!r} and its grad must be ndarrays")
        if param.shape != grad.shape or param.dtype != grad.dtype:
            raise ValueError(
                f"param {name!r} is {param.dtype} {param.shape} but its grad is "
                f"{grad.dtype} {grad.shape}"
            )
        values.append(param)
        grads.append(grad)
    return values, grads


def _learning_rate(lr: float) -> float:
    if not _checks.is_real(lr):
        raise TypeError(f"lr must be a real number, got {lr!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be positive and finite, got {lr!r}")
    return float(lr)


class SGD:
    """Stochastic gradient descent with momentum, in PyTorch's form.

    Each step: ``v = momentum * v + grad; param -= lr * v`` (with momentum 0,
    ``param -= lr * grad``), in place.

    Parameters
    ----------
    params : list of (str, ndarray, ndarray)
        ``model.parameters()``: the arrays to update and their gradients.
    lr : float
        The learning rate, positive.
    momentum : float, default 0.0
        In [0, 1).
    """

    def __init__(self, params: Iterable[_Parameter], lr: float, momentum: float = 0.0) -> None:
        self._params, self._grads = _optimizer_params(params)
        self.lr = _learning_rate(lr)
        if not _checks.is_real(momentum):
            raise TypeError(f"momentum must be a real number, got {momentum!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self._velocities = [np.zeros_like(p) for p in self._params] if self.momentum else None

    def step(self) -> None:
        """Update every parameter in place from its current gradient."""
        if self._velocities is None:
            for param, grad in zip(self._params, self._grads, strict=True):
                param -= self.lr * grad
            return
        for param, grad, velocity in zip(self._params, self._grads, self._velocities, strict=True):
            velocity *= self.momentum
            velocity += grad
            param -= self.lr * velocity


class Adam:
    """Adam (Kingma and Ba), in PyTorch's form, without weight decay.

    Each step t: ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g**2``,
    ``param -= lr * (m / (1 - b1**t)) / (sqrt(v / (1 - b2**t)) + eps)``, in place.

    Parameters
    ----------
    params : list of (str, ndarray, ndarray)
        ``model.parameters()``: the arrays to update and their gradients.
    lr : float, default 1e-3
        The learning rate, positive.
    betas : (float, float), default (0.9, 0.999)
        b1 and b2, each in [0, 1).
    eps : float, default 1e-8
        Added to the denominator, positive.
    """

    def __init__(
        self,
        params: Iterable[_Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self._params, self._grads = _optimizer_params(params)
        self.lr = _learning_rate(lr)
        beta1, beta2 = betas
        for name, beta in (("betas[0]", beta1), ("betas[1]", beta2)):
            if not _checks.is_real(beta):
                raise TypeError(f"{name} must be a real number, got {beta!r}")
            if not 0 <= beta < 1:
                raise ValueError(f"{name} must be in [0, 1), got {beta!r}")
        if not _checks.is_real(eps):
            raise TypeError(f"eps must be a real number, got {eps!r}")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be positive and finite, got {eps!r}")
        self.betas = (float(beta1), float(beta2))
        self.eps = float(eps)
        self.steps = 0
        self._first_moments = [np.zeros_like(p) for p in self._params]
        self._second_moments = [np.zeros_like(p) for p in self._params]

    def step(self) -> None:
        """Update every parameter in place from its current gradient."""
        beta1, beta2 = self.betas
        self.steps += 1
        step_size = self.lr / (1 - beta1**self.steps)
        sqrt_correction = math.sqrt(1 - beta2**self.steps)
        for param, grad, first, second in zip(
            self._params, self._grads, self._first_moments, self._second_moments, strict=True
        ):
            first *= beta1
            first += (1 - beta1) * grad
            second *= beta2
            second += (1 - beta2) * grad * grad
            param -= step_size * first / (np.sqrt(second) / sqrt_correction + self.eps)


def minibatches(
    X: ArrayLike,
    Y: ArrayLike,
    batch_size: int,
    rng: np.random.Generator | None,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[tuple[NDArray[Any], NDArray[Any]]]:
    """Yield the mini-batches of one epoch: ``(X[:, idx], Y[idx])``.

    Parameters
    ----------
    X : ndarray, shape (n_features, m)
        The examples, one per column.
    Y : ndarray, shape (m,)
        Their labels.
    batch_size : int
        Examples per batch; the last batch is smaller when it does not divide m.
    rng : numpy.random.Generator or None
        Draws the order of the examples when shuffling (None only without).
    shuffle : bool, default True
        Whether to visit the examples in a random order.
    drop_last : bool, default False
        Whether to leave out a last, smaller batch. A batch of one example
        cannot be normalized in training mode, so drop it when m % batch_size == 1.

    Yields
    ------
    (ndarray, ndarray)
        The columns of X and the entries of Y of one batch, as new arrays.
    """
    X = np.asarray(X)
    Y = np.asarray(Y)
    if X.ndim != 2:
        raise ValueError(f"X must have shape (n_features, m), got {X.shape}")
    m = X.shape[1]
    if Y.shape[:1] != (m,):
        raise ValueError(f"Y has shape {Y.shape}; expected ({m}, ...) for X of shape {X.shape}")
    batch_size = _checks.positive_int("batch_size", batch_size)
    if shuffle:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(
                f"shuffling needs rng, a numpy.random.Generator, got {rng!r}: "
                "pass np.random.default_rng(seed)"
            )
        order = rng.permutation(m)
    else:
        order = np.arange(m)
    stop = m - m % batch_size if drop_last else m
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield X[:, idx], Y[idx]


def fold_batch_norm(dense: Dense, bn: BatchNorm) -> Dense:
    """Return one Dense that computes ``bn(dense(A))`` with bn in eval mode.

    With s = gamma / sqrt(running_var + eps), eval-mode batch norm of
    Z = W A + b is s (Z - running_mean) + beta = (s W) A + s (b - running_mean)
    + beta: a Dense with weights s W and that bias. Inference then skips the
    normalization. The arithmetic is done in float64 and rounded once to the
    layers' dtype.

    Parameters
    ----------
    dense : Dense
        The layer before the batch norm (with or without bias).
    bn : fastbn.BatchNorm
        Features-first (axis=0), with running statistics, of dense's dtype and
        with num_features == dense.n_out. Its mode does not matter: the fold is
        of its eval-mode computation.

    Returns
    -------
    Dense
        A new layer with bias; dense and bn are left unchanged.
    """
    if not isinstance(dense, Dense):
        raise TypeError(f"dense must be a fastbn.nn.Dense, got {dense!r}")
    if not isinstance(bn, BatchNorm):
        raise TypeError(f"bn must be a fastbn.BatchNorm, got {bn!r}")
    if bn.dtype != dense.dtype:
        raise TypeError(
            f"bn has dtype {bn.dtype} but dense has {dense.dtype}: build both with the same dtype"
        )
    if bn.num_features != dense.n_out:
        raise ValueError(
            f"bn has num_features={bn.num_features} but dense has n_out={dense.n_out}"
        )
    if bn.axis != 0:
        raise ValueError(
            f"bn must normalize the features-first layout (axis=0), got axis={bn.axis}"
        )
    if not bn.track_running_stats:
        raise ValueError(
            "bn has no running statistics (track_running_stats=False): it normalizes "
            "with batch statistics in eval mode too, which no Dense can compute"
        )
    assert bn.running_mean is not None and bn.running_var is not None  # tracked
    running_mean = bn.running_mean.astype(np.float64)
    scale = 1.0 / np.sqrt(bn.running_var.astype(np.float64) + bn.eps)
    shift = np.zeros(dense.n_out)
    if bn.affine:
        assert bn.gamma is not None and bn.beta is not None  # affine
        scale *= bn.gamma
        shift += bn.beta
    bias = np.zeros(dense.n_out) if dense.b is None else dense.b.astype(np.float64)
    folded = Dense(dense.n_in, dense.n_out, bias=True, dtype=dense.dtype)
    folded.W[...] = scale[:, None] * dense.W
    assert folded.b is not None  # built with bias=True
    folded.b[...] = scale * (bias - running_mean) + shift
    return folded
