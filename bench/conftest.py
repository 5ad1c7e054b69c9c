"""The pytest-benchmark suite: ``pytest bench/ --benchmark-only``.

Not part of the tests: pyproject's ``testpaths`` is ``["tests"]``, so a plain
``pytest`` never collects these; name ``bench/`` to run them. Each case's
data is made once and shared by its benchmarks (a session fixture with one
parameter per case and dtype, so pytest runs them case by case).
"""

import pytest

from fastbn.bench.peers import BENCH_CASES, make_data, out_buffers

SUITE_CASE_LABELS = (
    "256x64 ff",
    "1024x256 bf",
    "4096x512 ff",
    "2048x8000 ff",
    "32x64x56x56 nchw",
    "32x56x56x64 nhwc",
)
SUITE_CASES = [c for c in BENCH_CASES if c.label in SUITE_CASE_LABELS]
DTYPES = ("float32", "float64")


@pytest.fixture(
    scope="session",
    params=[(case, dtype) for case in SUITE_CASES for dtype in DTYPES],
    ids=lambda p: f"{p[0].label.replace(' ', '-')}-{p[1]}",
)
def data(request):
    """One case's arrays (`fastbn.bench.peers.Data`)."""
    case, dtype = request.param
    return make_data(case, dtype)


@pytest.fixture(scope="session")
def buffers(data):
    """One case's output buffers (y, dx) (`fastbn.bench.peers.out_buffers`).

    fastbn-out writes into them and the roofline times its kernels on them,
    as ``python -m fastbn.bench`` does: a floor on other memory is no floor.
    """
    return out_buffers(data)
