"""What the benchmarks time: the bench cases and each peer's calls on one case.

Shared by ``python -m fastbn.bench``, which runs each peer in a subprocess of
its own, and by the pytest-benchmark suite in ``bench/``. A peer's calls are
zero-argument functions, one per pass (train forward, eval forward,
backward); the roofline peer has one per kernel (R, RW, R2, R2W) instead,
and `ROOFLINE_OF_PASS` says which of them bound each pass.

The bench times the roofline in the fastbn-out process, on the same x, dy
and output buffers (`out_buffers`): the bandwidth of a streaming pass here
varies up to 2x with the physical pages an allocation gets (the RW kernel
over four fresh 128 MiB pairs of arrays in one process: 3.7 to 7.3 ms), so
a floor timed on other memory is no floor.
"""

import math
from dataclasses import dataclass

import numpy as np

import fastbn
from fastbn import reference
from fastbn.kernels import roofline

PASSES = ("train", "eval", "backward")
PEERS = ("fastbn", "fastbn-out", "numpy", "torch", "roofline")
WORKERS = ("fastbn", "fastbn-out", "numpy", "torch")  # fastbn-out's also times the roofline
ROOFLINE_OF_PASS = {"train": ("R", "RW"), "eval": ("RW",), "backward": ("R2", "R2W")}
# The calls of the roofline peer that are forms of each kernel.
ROOFLINE_FORMS = {k: (k, f"{k} numpy") for k in ("R", "RW", "R2", "R2W")}
# Bytes a pass must move: each of x, y, dy, dx read or written once.
ARRAYS_MOVED = {"train": 2, "eval": 2, "backward": 3}
MOMENTUM = 0.1
EPS = 1e-5
SMALL_SHAPE = (64, 128)

LAYOUTS = {
    "ff": "features-first (n, m), axis=0",
    "bf": "batch-first (m, n), axis=1",
    "nchw": "images (N, C, H, W), axis=1",
    "nhwc": "images (N, H, W, C), axis=-1",
}


@dataclass(frozen=True)
class Case:
    """One bench input: a bench shape in one layout.

    Attributes
    ----------
    name : str
        The shape's name, "n x m" for matrices, e.g. "4096x512".
    layout : str
        A key of `LAYOUTS`.
    shape : tuple of int
        The array's shape: (m, n) for batch-first.
    axis : int
        The feature axis.
    """

    name: str
    layout: str
    shape: tuple
    axis: int

    @property
    def label(self):
        return f"{self.name} {self.layout}"

    def nbytes(self, dtype):
        return math.prod(self.shape) * np.dtype(dtype).itemsize

    def to_json(self):
        return {
            "name": self.name,
            "layout": self.layout,
            "shape": list(self.shape),
            "axis": self.axis,
        }

    @classmethod
    def from_json(cls, d):
        return cls(d["name"], d["layout"], tuple(d["shape"]), d["axis"])


def matrix_cases(n, m, layouts=("ff", "bf")):
    """The (n, m) features-first and (m, n) batch-first cases of one bench shape."""
    forms = {"ff": ((n, m), 0), "bf": ((m, n), 1)}
    return [Case(f"{n}x{m}", layout, *forms[layout]) for layout in layouts]


def image_cases():
    """(32, 64, 56, 56) channels first and (32, 56, 56, 64) channels last."""
    return [
        Case("32x64x56x56", "nchw", (32, 64, 56, 56), 1),
        Case("32x56x56x64", "nhwc", (32, 56, 56, 64), -1),
    ]


# The contract's bench shapes, plus (2048, 8000): features-first rows that fit in L2.
BENCH_CASES = [
    *(
        case
        for n, m in ((256, 64), (1024, 256), (4096, 512), (4096, 4096), (64, 262144), (2, 4194304))
        for case in matrix_cases(n, m)
    ),
    *matrix_cases(2048, 8000, layouts=("ff",)),
    *image_cases(),
]


@dataclass
class Data:
    """The arrays of one case: x, dy and the per-feature vectors, all of x's dtype."""

    case: Case
    x: np.ndarray
    dy: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray


def make_data(case, dtype, seed=0):
    """Random unit-scale data for a case, the same in every process for one seed."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    n_features = case.shape[case.axis]
    return Data(
        case,
        x=rng.standard_normal(case.shape, dtype=dtype),
        dy=rng.standard_normal(case.shape, dtype=dtype),
        gamma=rng.uniform(0.5, 1.5, n_features).astype(dtype),
        beta=rng.standard_normal(n_features).astype(dtype),
        running_mean=(0.1 * rng.standard_normal(n_features)).astype(dtype),
        running_var=rng.uniform(0.5, 1.5, n_features).astype(dtype),
    )


def out_buffers(d):
    """(y, dx): output buffers of x's shape and dtype, allocated once."""
    return np.empty_like(d.x), np.empty_like(d.x)


def fastbn_calls(d, out=None):
    """fastbn's three passes; with ``out=(y, dx)`` (`out_buffers`) into those buffers."""
    axis = d.case.axis
    y, dx = (None, None) if out is None else out
    _, mean, invstd = fastbn.batch_norm_train(d.x, d.gamma, d.beta, axis=axis)
    return {
        "train": lambda: fastbn.batch_norm_train(d.x, d.gamma, d.beta, axis=axis, eps=EPS, out=y),
        "eval": lambda: fastbn.batch_norm_eval(
            d.x, d.running_mean, d.running_var, d.gamma, d.beta, axis=axis, eps=EPS, out=y
        ),
        "backward": lambda: fastbn.batch_norm_backward(
            d.dy, d.x, mean, invstd, d.gamma, axis=axis, out=dx
        ),
    }


def numpy_calls(d):
    """The NumPy baseline's three passes (`fastbn.reference`)."""
    axis = d.case.axis
    _, mean, invstd = reference.batch_norm_train(d.x, d.gamma, d.beta, axis=axis)
    return {
        "train": lambda: reference.batch_norm_train(d.x, d.gamma, d.beta, axis=axis, eps=EPS),
        "eval": lambda: reference.batch_norm_eval(
            d.x, d.running_mean, d.running_var, d.gamma, d.beta, axis=axis, eps=EPS
        ),
        "backward": lambda: reference.batch_norm_backward(
            d.dy, d.x, mean, invstd, d.gamma, axis=axis
        ),
    }


def torch_view(a, layout):
    """The tensor torch is handed for a case's array: same memory, channels on axis 1.

    Features-first (n, m) becomes (1, n, m); channels-last (N, H, W, C)
    becomes the (N, C, H, W) permuted view, in torch's channels_last format.
    """
    import torch

    t = torch.from_numpy(a)
    if layout == "ff":
        return t[None]
    if layout == "nhwc":
        return t.permute(0, 3, 1, 2)
    return t


def torch_calls(d):
    """PyTorch's native_batch_norm (train and eval) and native_batch_norm_backward."""
    import torch

    x = torch_view(d.x, d.case.layout)
    dy = torch_view(d.dy, d.case.layout)
    w, b = torch.from_numpy(d.gamma), torch.from_numpy(d.beta)
    # Training updates its running statistics in place: give it copies.
    rm, rv = torch.from_numpy(d.running_mean), torch.from_numpy(d.running_var)
    rm_train, rv_train = rm.clone(), rv.clone()
    _, save_mean, save_invstd = torch.native_batch_norm(
        x, w, b, rm_train, rv_train, True, MOMENTUM, EPS
    )
    mask = [True, True, True]
    return {
        "train": lambda: torch.native_batch_norm(x, w, b, rm_train, rv_train, True, MOMENTUM, EPS),
        "eval": lambda: torch.native_batch_norm(x, w, b, rm, rv, False, MOMENTUM, EPS),
        "backward": lambda: torch.ops.aten.native_batch_norm_backward(
            dy, x, w, rm, rv, save_mean, save_invstd, True, EPS, mask
        ),
    }


def roofline_calls(d, out=None):
    """Every honest form of the roofline kernels on the flat data, into out (y, dx).

    Each kernel (R, RW, R2, R2W) has a Numba form (`fastbn.kernels.roofline`)
    and a NumPy form that moves the same bytes in one call; the report takes
    the faster as the floor (`ROOFLINE_FORMS`). RW writes where fastbn writes
    y, R2W where it writes dx (`out_buffers`, allocated here if not given).
    """
    x = d.x.reshape(-1)
    dy = d.dy.reshape(-1)
    y, dx = (a.reshape(-1) for a in (out_buffers(d) if out is None else out))
    a, b, c = (d.x.dtype.type(v) for v in (1.5, -0.5, 0.25))
    return {
        "R": lambda: roofline.read(x),
        "RW": lambda: roofline.read_write(x, a, b, y),
        "R2": lambda: roofline.read2(x, dy),
        "R2W": lambda: roofline.read2_write(dy, x, a, b, c, dx),
        "R numpy": lambda: np.add.reduce(x),
        "RW numpy": lambda: np.multiply(x, a, out=y),
        "R2 numpy": lambda: np.dot(x, dy),
        "R2W numpy": lambda: np.multiply(dy, x, out=dx),
    }


def peer_calls(peer, d):
    """The calls of one of `PEERS` on a case's data."""
    if peer == "fastbn":
        return fastbn_calls(d)
    if peer == "fastbn-out":
        return fastbn_calls(d, out=out_buffers(d))
    if peer == "numpy":
        return numpy_calls(d)
    if peer == "torch":
        return torch_calls(d)
    if peer == "roofline":
        return roofline_calls(d)
    raise ValueError(f"unknown peer {peer!r}; expected one of {PEERS}")


def small_calls(seed=0):
    """The small case, (64, 128) float32: the functional passes, layer forward + backward."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SMALL_SHAPE, dtype=np.float32)
    dy = rng.standard_normal(SMALL_SHAPE, dtype=np.float32)
    gamma = np.ones(SMALL_SHAPE[0], np.float32)
    beta = np.zeros(SMALL_SHAPE[0], np.float32)
    running_mean = np.zeros(SMALL_SHAPE[0], np.float32)
    running_var = np.ones(SMALL_SHAPE[0], np.float32)
    _, mean, invstd = fastbn.batch_norm_train(x, gamma, beta)
    bn = fastbn.BatchNorm(SMALL_SHAPE[0])

    def layer_forward_backward():
        bn(x)
        bn.backward(dy)

    return {
        "functional train forward": lambda: fastbn.batch_norm_train(x, gamma, beta),
        "functional eval forward": lambda: fastbn.batch_norm_eval(
            x, running_mean, running_var, gamma, beta
        ),
        "functional backward": lambda: fastbn.batch_norm_backward(dy, x, mean, invstd, gamma),
        "layer forward + backward": layer_forward_backward,
    }


def roofline_pass(calls, pass_name):
    """One function running the roofline kernels that bound a pass, in sequence."""
    kernels = [calls[k] for k in ROOFLINE_OF_PASS[pass_name]]

    def run():
        for kernel in kernels:
            kernel()

    return run
