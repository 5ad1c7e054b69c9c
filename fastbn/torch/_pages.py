"""Huge pages for the large outputs the bridge allocates, as NumPy gives its own arrays.

A large allocation is fresh memory from the kernel, and the first write to
each page faults. With transparent huge pages in ``madvise`` mode (the
common default), memory is backed by 4 KiB pages unless the program asks
for 2 MiB ones: NumPy asks (``madvise(MADV_HUGEPAGE)``) for every array of 4
MiB or more; torch's CPU allocator does not. Measured (2 cores, torch
2.13.0): a (32, 64, 56, 56) float64 output (49 MiB) took 12,545 page faults
and 11.2 ms to allocate and fill with 4 KiB pages, 792 faults and 2.6 ms
advised; torch's own eval forward of it 13.2 ms, fastbn's the same until its
outputs were advised. So `empty_output` advises what it allocates at NumPy's
size and under NumPy's switch (``NUMPY_MADVISE_HUGEPAGE``), Linux only; the
memory stays torch's (its allocator allocates and frees it).
"""

from __future__ import annotations

import ctypes
import importlib
import mmap
import sys
from collections.abc import Callable

import torch

__all__ = ["HUGE_PAGE_MIN_BYTES", "advise_huge_pages"]

HUGE_PAGE_MIN_BYTES = 1 << 22  # NumPy's threshold (4 MiB)
_HUGE_PAGE = 1 << 21  # 2 MiB: the span madvise is asked for is aligned to it


def _madvise() -> Callable[[int, int, int], int] | None:
    """libc's madvise where huge pages can be asked for (Linux, NumPy asking too), else None."""
    # NumPy's switch (private, since NumPy 1.20): NUMPY_MADVISE_HUGEPAGE, or its kernel check.
    get = getattr(importlib.import_module("numpy._core.multiarray"), "_get_madvise_hugepage", None)
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    if get is None or not get():
        return None
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_MADVISE = _madvise()


def advise_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """Ask for huge pages under a new tensor's memory if it is large; t itself returned.

    Only the whole 2 MiB pages inside the buffer are advised, so no memory of
    another allocation is touched. A refusal (an old kernel) changes nothing.
    """
    nbytes = t.nbytes
    if _MADVISE is not None and nbytes >= HUGE_PAGE_MIN_BYTES:
        start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (t.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        _MADVISE(start, end - start, mmap.MADV_HUGEPAGE)
    return t
