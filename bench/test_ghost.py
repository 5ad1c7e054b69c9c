"""Ghost batch norm against the Python loop over its slices: ``pytest bench/test_ghost.py``.

One benchmark group per case and pass, two members: ``ghost`` is one call of
`fastbn.ghost_batch_norm_train` (or `ghost_batch_norm_backward`), which
runs every slice in one parallel kernel call; ``loop`` is what one would
write without it, `fastbn.batch_norm_train` (or `batch_norm_backward`) on
each slice of k examples in turn, each writing its slice of one output
allocated per call (as the ghost call allocates its own). The loop's slices
are contiguous blocks, so it pays no copies: only a call per slice.
"""

from dataclasses import dataclass

import numpy as np
import pytest

import fastbn


@dataclass(frozen=True)
class Case:
    label: str
    shape: tuple
    axis: int
    k: int


CASES = (
    Case("4096x512 bf k=32", (4096, 512), 1, 32),
    Case("4096x512 bf k=256", (4096, 512), 1, 256),
    Case("256x14x14x64 nhwc k=32", (256, 14, 14, 64), -1, 32),
)
PASSES = ("train", "backward")
MEMBERS = ("ghost", "loop")


@dataclass(frozen=True)
class Data:
    case: Case
    x: np.ndarray
    dy: np.ndarray
    mean: np.ndarray  # (G, C), the ghost forward's
    invstd: np.ndarray


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.label.replace(" ", "-"))
def data(request):
    case = request.param
    rng = np.random.default_rng(0)
    x = rng.standard_normal(case.shape, dtype=np.float32)
    dy = rng.standard_normal(case.shape, dtype=np.float32)
    _, mean, invstd = fastbn.ghost_batch_norm_train(x, virtual_batch_size=case.k, axis=case.axis)
    return Data(case, x, dy, mean, invstd)


def calls(data):
    """{(member, pass): zero-argument call} on one case's arrays."""
    x, dy, mean, invstd = data.x, data.dy, data.mean, data.invstd
    k, axis = data.case.k, data.case.axis
    starts = range(0, x.shape[0], k)

    def ghost_train():
        return fastbn.ghost_batch_norm_train(x, virtual_batch_size=k, axis=axis)

    def ghost_backward():
        return fastbn.ghost_batch_norm_backward(
            dy, x, mean, invstd, virtual_batch_size=k, axis=axis
        )

    def loop_train():
        y = np.empty_like(x)
        stats = [
            fastbn.batch_norm_train(x[s : s + k], axis=axis, out=y[s : s + k])[1:] for s in starts
        ]
        return y, stats

    def loop_backward():
        dx = np.empty_like(x)
        dgamma = dbeta = 0.0
        for g, s in enumerate(starts):
            _, slice_dgamma, slice_dbeta = fastbn.batch_norm_backward(
                dy[s : s + k], x[s : s + k], mean[g], invstd[g], axis=axis, out=dx[s : s + k]
            )
            dgamma = dgamma + slice_dgamma
            dbeta = dbeta + slice_dbeta
        return dx, dgamma, dbeta

    return {
        ("ghost", "train"): ghost_train,
        ("ghost", "backward"): ghost_backward,
        ("loop", "train"): loop_train,
        ("loop", "backward"): loop_backward,
    }


@pytest.mark.parametrize("member", MEMBERS)
@pytest.mark.parametrize("pass_name", PASSES)
def test_ghost(benchmark, data, pass_name, member):
    fn = calls(data)[member, pass_name]
    fn()  # compile or load from the cache outside the timing
    benchmark.group = f"ghost {data.case.label} float32 {pass_name}"
    benchmark.extra_info.update(shape=list(data.case.shape), k=data.case.k)
    benchmark(fn)
