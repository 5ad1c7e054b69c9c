"""fastbn against its peers, one benchmark group per case, dtype and pass.

A group holds one benchmark per peer: fastbn (allocating its outputs),
fastbn-out (preallocated ``out=``), numpy (the `fastbn.reference` baseline),
torch (when importable) and roofline (the kernels that bound the pass, run in
sequence: R + RW for train, RW for eval, R2 + R2W for backward). Unlike
``python -m fastbn.bench``, all peers share this one process and run at
their default thread counts; use it to compare commits, the bench command to
compare peers.
"""

import pytest

from fastbn.bench.peers import PASSES, PEERS, peer_calls, roofline_pass, small_calls


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("pass_name", PASSES)
def test_pass(benchmark, data, pass_name, peer):
    if peer == "torch":
        pytest.importorskip("torch")
    calls = peer_calls(peer, data)
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
