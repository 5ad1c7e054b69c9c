"""Batch norm + ReLU, fused against unfused: ``pytest bench/test_relu.py --benchmark-only``.

One benchmark group per case and pass (train forward, eval forward,
backward), one benchmark per peer:

- fused: ``fastbn.batch_norm_relu_*``, into preallocated outputs;
- unfused: fastbn's plain pass, then a separate ReLU pass over its output
  (``np.maximum(y, 0, out=y)``), or for backward the ReLU's mask applied to
  dy first (into preallocated buffers), then the plain backward;
- torch: ``native_batch_norm`` then ``torch.relu``; backward
  ``threshold_backward`` then ``native_batch_norm_backward``;
- roofline: the kernels that bound the pass on the fused peer's arrays
  (`fastbn.bench.peers.ROOFLINE_OF_PASS`: R + RW, RW, R2 + R2W). The fused
  pass is to stay near it: the ReLU adds no pass over memory.
"""

import numpy as np
import pytest

import fastbn
from fastbn.bench.peers import (
    EPS,
    MOMENTUM,
    PASSES,
    Case,
    image_cases,
    make_data,
    roofline_calls,
    roofline_pass,
    torch_view,
)

RELU_CASES = [image_cases()[0], Case("2048x256", "bf", (256, 2048), 1)]  # NCHW, batch-first
RELU_PEERS = ("fused", "unfused", "torch", "roofline")
DTYPE = "float32"


def fused_calls(d, y, dx):
    """fastbn's fused passes, writing y and dx."""
    axis = d.case.axis
    _, mean, invstd = fastbn.batch_norm_relu_train(d.x, d.gamma, d.beta, axis=axis)
    return {
        "train": lambda: fastbn.batch_norm_relu_train(d.x, d.gamma, d.beta, axis=axis, out=y),
        "eval": lambda: fastbn.batch_norm_relu_eval(
            d.x, d.running_mean, d.running_var, d.gamma, d.beta, axis=axis, out=y
        ),
        "backward": lambda: fastbn.batch_norm_relu_backward(
            d.dy, d.x, mean, invstd, d.gamma, d.beta, axis=axis, out=dx
        ),
    }


def unfused_calls(d, y, dx):
    """fastbn's plain passes and a separate ReLU pass, writing y and dx.

    The backward masks dy where the plain forward's y (kept) is not
    positive, into a preallocated buffer, then runs the plain backward.
    """
    axis = d.case.axis
    y_kept, mean, invstd = fastbn.batch_norm_train(d.x, d.gamma, d.beta, axis=axis)
    passed = np.empty(d.x.shape, bool)
    dz = np.empty_like(d.dy)

    def train():
        fastbn.batch_norm_train(d.x, d.gamma, d.beta, axis=axis, out=y)
        np.maximum(y, 0, out=y)

    def evaluate():
        fastbn.batch_norm_eval(
            d.x, d.running_mean, d.running_var, d.gamma, d.beta, axis=axis, out=y
        )
        np.maximum(y, 0, out=y)

    def backward():
        np.greater(y_kept, 0, out=passed)
        np.multiply(d.dy, passed, out=dz)
        fastbn.batch_norm_backward(dz, d.x, mean, invstd, d.gamma, axis=axis, out=dx)

    return {"train": train, "eval": evaluate, "backward": backward}


def torch_calls(d):
    """torch's ops: native_batch_norm then relu; threshold_backward then the batch norm's."""
    import torch

    x = torch_view(d.x, d.case.layout)
    dy = torch_view(d.dy, d.case.layout)
    w, b = torch.from_numpy(d.gamma), torch.from_numpy(d.beta)
    rm, rv = torch.from_numpy(d.running_mean), torch.from_numpy(d.running_var)
    rm_train, rv_train = rm.clone(), rv.clone()  # training updates them in place
    y, save_mean, save_invstd = torch.native_batch_norm(
        x, w, b, rm_train, rv_train, True, MOMENTUM, EPS
    )
    y = torch.relu(y)
    mask = [True, True, True]

    def train():
        return torch.relu(
            torch.native_batch_norm(x, w, b, rm_train, rv_train, True, MOMENTUM, EPS)[0]
        )

    def evaluate():
        return torch.relu(torch.native_batch_norm(x, w, b, rm, rv, False, MOMENTUM, EPS)[0])

    def backward():
        dz = torch.ops.aten.threshold_backward(dy, y, 0)
        return torch.ops.aten.native_batch_norm_backward(
            dz, x, w, rm_train, rv_train, save_mean, save_invstd, True, EPS, mask
        )

    return {"train": train, "eval": evaluate, "backward": backward}


def relu_calls(peer, d, y, dx):
    """The calls of one of `RELU_PEERS`; y and dx are the fastbn peers' output buffers."""
    if peer == "fused":
        return fused_calls(d, y, dx)
    if peer == "unfused":
        return unfused_calls(d, y, dx)
    if peer == "torch":
        return torch_calls(d)
    if peer == "roofline":
        calls = roofline_calls(d, out=(y, dx))
        return {name: roofline_pass(calls, name) for name in PASSES}
    raise ValueError(f"unknown peer {peer!r}; expected one of {RELU_PEERS}")


@pytest.fixture(scope="module", params=RELU_CASES, ids=lambda c: c.label.replace(" ", "-"))
def relu_data(request):
    """One case's arrays (`fastbn.bench.peers.Data`) and the output buffers (y, dx)."""
    d = make_data(request.param, DTYPE)
    return d, np.empty_like(d.x), np.empty_like(d.x)


@pytest.mark.parametrize("peer", RELU_PEERS)
@pytest.mark.parametrize("pass_name", PASSES)
def test_relu_pass(benchmark, relu_data, pass_name, peer):
    if peer == "torch":
        pytest.importorskip("torch")
    d, y, dx = relu_data
    fn = relu_calls(peer, d, y, dx)[pass_name]
    fn()  # compile or load from the cache outside the timing
    benchmark.group = f"relu {d.case.label} {d.x.dtype} {pass_name}"
    benchmark.extra_info.update(shape=list(d.case.shape), nbytes=d.x.nbytes)
    benchmark(fn)
