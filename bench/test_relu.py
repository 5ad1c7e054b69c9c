"""Batch norm + ReLU, fused against unfused: ``pytest bench/test_relu.py --benchmark-only``.

One benchmark group per case and pass (train forward, eval forward,
backward), one benchmark per peer. No peer allocates an input-sized array in
a timed call: each writes y or dx into the same preallocated buffers of the
case (`relu_data`), and an intermediate input-sized array into a buffer of
its own made before the timing, so that allocation and first-touch page
faults are nobody's cost, as for the roofline:

- fused: ``fastbn.batch_norm_relu_*`` with ``out=``;
- unfused: fastbn's plain pass with ``out=``, then a separate ReLU pass over
  its output (``np.maximum(y, 0, out=y)``), or for backward the ReLU's mask
  applied to dy first (into buffers), then the plain backward;
- torch: the out= variants of its ops, ``native_batch_norm.out`` then
  ``relu_`` in place; backward ``threshold_backward.grad_input`` into a
  buffer, then ``native_batch_norm_backward.out``;
- roofline: the kernels that bound the pass on the same x, dy and output
  buffers (`fastbn.bench.peers.ROOFLINE_OF_PASS`: R + RW, RW, R2 + R2W). The
  fused pass is to stay near it: the ReLU adds no pass over memory.

Per-feature outputs (statistics, dgamma, dbeta) are C values: fastbn
allocates them, torch writes preallocated ones; either way a negligible cost.
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
    out_buffers,
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


def torch_calls(d, y, dx):
    """torch's ops into y and dx: batch norm then relu_; threshold_backward, then batch norm's.

    Every output is preallocated (the ops' out= variants): y and dx are the
    tensors over the fastbn peers' buffers, dz (dy masked by the ReLU) a buffer
    of its own, as the unfused peer's.
    """
    import torch

    aten = torch.ops.aten
    layout = d.case.layout
    x, dy = torch_view(d.x, layout), torch_view(d.dy, layout)
    y_t, dx_t = torch_view(y, layout), torch_view(dx, layout)
    w, b = torch.from_numpy(d.gamma), torch.from_numpy(d.beta)
    rm, rv = torch.from_numpy(d.running_mean), torch.from_numpy(d.running_var)
    rm_train, rv_train = rm.clone(), rv.clone()  # training updates them in place
    y_kept, save_mean, save_invstd = torch.native_batch_norm(
        x, w, b, rm_train.clone(), rv_train.clone(), True, MOMENTUM, EPS
    )
    y_kept = torch.relu(y_kept)  # the forward's output, whose mask the backward applies
    batch_mean, batch_invstd = torch.empty_like(w), torch.empty_like(w)
    no_mean, no_invstd = torch.empty(0, dtype=w.dtype), torch.empty(0, dtype=w.dtype)  # eval's
    dz = torch.empty_like(dy)
    dgamma, dbeta = torch.empty_like(w), torch.empty_like(w)
    mask = [True, True, True]

    def train():
        aten.native_batch_norm.out(
            x, w, b, rm_train, rv_train, True, MOMENTUM, EPS,
            out=y_t, save_mean=batch_mean, save_invstd=batch_invstd,
        )  # fmt: skip
        torch.relu_(y_t)

    def evaluate():
        aten.native_batch_norm.out(
            x, w, b, rm, rv, False, MOMENTUM, EPS,
            out=y_t, save_mean=no_mean, save_invstd=no_invstd,
        )  # fmt: skip
        torch.relu_(y_t)

    def backward():
        aten.threshold_backward.grad_input(dy, y_kept, 0, grad_input=dz)
        aten.native_batch_norm_backward.out(
            dz, x, w, rm_train, rv_train, save_mean, save_invstd, True, EPS, mask,
            out0=dx_t, out1=dgamma, out2=dbeta,
        )  # fmt: skip

    return {"train": train, "eval": evaluate, "backward": backward}


def relu_calls(peer, d, y, dx):
    """The calls of one of `RELU_PEERS`; y and dx are the output buffers every peer writes."""
    if peer == "fused":
        return fused_calls(d, y, dx)
    if peer == "unfused":
        return unfused_calls(d, y, dx)
    if peer == "torch":
        return torch_calls(d, y, dx)
    if peer == "roofline":
        calls = roofline_calls(d, out=(y, dx))
        return {name: roofline_pass(calls, name) for name in PASSES}
    raise ValueError(f"unknown peer {peer!r}; expected one of {RELU_PEERS}")


@pytest.fixture(scope="module", params=RELU_CASES, ids=lambda c: c.label.replace(" ", "-"))
def relu_data(request):
    """One case's arrays (`fastbn.bench.peers.Data`) and every peer's output buffers (y, dx)."""
    d = make_data(request.param, DTYPE)
    return d, *out_buffers(d)


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
