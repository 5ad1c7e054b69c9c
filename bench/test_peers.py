"""fastbn against its peers, one benchmark group per case, dtype and pass.

A group holds one benchmark per peer: fastbn (allocating its outputs),
fastbn-out (preallocated ``out=``), numpy (the `fastbn.reference` baseline),
torch (when importable) and roofline (the kernels that bound the pass, run in
sequence: R + RW for train, RW for eval, R2 + R2W for backward). fastbn,
numpy and torch allocate their outputs in each call; fastbn-out and the
roofline allocate none, and write the same buffers (the `buffers` fixture),
as in ``python -m fastbn.bench``: a floor timed on other memory is no floor.
Unlike that command, all peers share this one process and run at their
default thread counts; use it to compare commits, the bench command to
compare peers.
"""

import pytest

from fastbn.bench.peers import (
    PASSES,
    PEERS,
    fastbn_calls,
    peer_calls,
    roofline_calls,
    roofline_pass,
    small_calls,
)


def row_calls(peer, data, buffers):
    """A peer's calls on a case; fastbn-out and roofline on the case's output buffers."""
    if peer == "fastbn-out":
        return fastbn_calls(data, out=buffers)
    if peer == "roofline":
        return roofline_calls(data, out=buffers)
    return peer_calls(peer, data)


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("pass_name", PASSES)
def test_pass(benchmark, data, buffers, pass_name, peer):
    if peer == "torch":
        pytest.importorskip("torch")
    calls = row_calls(peer, data, buffers)
    fn = roofline_pass(calls, pass_name) if peer == "roofline" else calls[pass_name]
    fn()  # compile or load from the cache outside the timing
    benchmark.group = f"{data.case.label} {data.x.dtype} {pass_name}"
    benchmark.extra_info.update(shape=list(data.case.shape), nbytes=data.x.nbytes)
    benchmark(fn)


@pytest.mark.parametrize("call", list(small_calls()))
def test_small(benchmark, call):
    fn = small_calls()[call]
    fn()
    benchmark.group = "small (64, 128) float32"
    benchmark(fn)
