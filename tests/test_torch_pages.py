"""Large outputs of fastbn.torch are backed by huge pages, as NumPy's arrays are.

fastbn/torch/_pages.py: torch's allocator leaves fresh memory on 4 KiB pages
(in transparent-huge-page ``madvise`` mode), and the first write to each page
faults; the bridge advises MADV_HUGEPAGE over the outputs it allocates of 4
MiB or more. Read back from /proc/self/smaps: the mapping that holds the
output is THP-eligible, where the one holding a tensor torch allocated alone
is not (so the check can fail). Linux with THP in madvise mode only.
"""

import importlib
import mmap
import pathlib
import re

import pytest

torch = pytest.importorskip("torch")

import fastbn.torch as fbt  # noqa: E402
from fastbn.torch import _pages  # noqa: E402

THP = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
# NumPy's own switch (NUMPY_MADVISE_HUGEPAGE, or its kernel check), which the bridge follows.
NUMPY_ADVISES = getattr(
    importlib.import_module("numpy._core.multiarray"), "_get_madvise_hugepage", lambda: False
)()
pytestmark = pytest.mark.skipif(
    not THP.exists() or "[madvise]" not in THP.read_text() or not NUMPY_ADVISES,
    reason="needs Linux with transparent huge pages in madvise mode and NumPy's advice on",
)


def test_the_bridge_advises_where_numpy_does():
    assert _pages._MADVISE is not None


def thp_eligible(address):
    """THPeligible of the /proc/self/smaps mapping that holds address."""
    lines = pathlib.Path("/proc/self/smaps").read_text().splitlines()
    inside = False
    for line in lines:
        span = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            inside = int(span.group(1), 16) <= address < int(span.group(2), 16)
        elif inside and line.startswith("THPeligible:"):
            return line.split()[1] == "1"
    raise AssertionError(f"no mapping holds {address:#x}")


def middle(t):
    return t.data_ptr() + t.nbytes // 2


# 40 MiB of float64: above glibc's largest mmap threshold (32 MiB), so every such
# tensor is a mapping of its own, never heap memory that an earlier output advised.
SHAPE = (10, 16, 128, 256)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_large_outputs_are_advised_and_torchs_own_are_not(memory_format):
    x = torch.randn(SHAPE, dtype=torch.float64).contiguous(memory_format=memory_format)
    plain = torch.empty_like(x)
    assert not thp_eligible(middle(plain))  # torch's allocation alone: 4 KiB pages
    bn = fbt.BatchNorm2d(SHAPE[1], dtype=torch.float64)
    xg = x.clone().requires_grad_()
    y = bn(xg)
    assert thp_eligible(middle(y))
    y.backward(torch.ones_like(y))
    assert thp_eligible(middle(xg.grad))  # dx: the backward's output
    with torch.no_grad():
        assert thp_eligible(middle(bn.eval()(x)))
    torch.testing.assert_close(
        y,
        torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True),
        rtol=0,
        atol=1e-12,
    )


@pytest.mark.parametrize("offset", [0, 64, 4096 + 16])
def test_only_whole_huge_pages_inside_a_large_buffer_are_advised(monkeypatch, offset):
    calls = []
    monkeypatch.setattr(_pages, "_MADVISE", lambda *args: calls.append(args) or 0)
    small = torch.empty(_pages.HUGE_PAGE_MIN_BYTES // 8 - 1, dtype=torch.float64)
    assert _pages.advise_huge_pages(small) is small and calls == []
    base = torch.empty(3 * (1 << 20) + offset // 4, dtype=torch.float32)  # 12 MiB and more
    large = base[offset // 4 :]
    assert _pages.advise_huge_pages(large) is large
    ((start, length, advice),) = calls
    assert start % (1 << 21) == 0 and length % (1 << 21) == 0 and length > 0
    assert large.data_ptr() <= start and start + length <= large.data_ptr() + large.nbytes
    assert start - large.data_ptr() < 1 << 21  # no whole page inside left out
    assert large.data_ptr() + large.nbytes - (start + length) < 1 << 21
    assert advice == mmap.MADV_HUGEPAGE
