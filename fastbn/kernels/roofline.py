"""Roofline kernels: the least work that touches the same memory as batch norm.

The benchmarks divide fastbn's times by these (the contract's roofline,
docs/guide/contract.md). Each works on flat C-contiguous arrays in fixed
chunks under prange, with the same Numba settings as the fused kernels, and
computes in the data's dtype, so it is the fastest honest pass over the
bytes:

- read (R): a sum of x;
- read_write (RW): y = a * x + b;
- read2 (R2): a dot product of x and dy;
- read2_write (R2W): dx = a * dy + b * x + c.
"""

import numpy as np
from numba import njit, prange

from fastbn import _compile
from fastbn.kernels._common import REDUCE_MATH

CHUNK = 16384

# Each chunk's loop runs over unsigned offsets from the chunk's start: with a
# signed index, Numba's negative-index handling can keep LLVM from vectorizing
# (seen on one machine as R at 494 us over 8 MiB against 92 us unsigned).


@njit(inline="always")
def _chunk(k, size):
    """Start and length of chunk k of an array of size values, as unsigned ints."""
    start = k * CHUNK
    return np.uint64(start), np.uint64(min(CHUNK, size - start))


@njit(parallel=True, cache=True, fastmath=REDUCE_MATH)
def read(x):
    """Per-chunk sums of x (R)."""
    n_chunks = -(-x.size // CHUNK)
    partial = np.empty(n_chunks, x.dtype)
    for k in prange(n_chunks):
        o, n = _chunk(k, x.size)
        s = x.dtype.type(0)
        for i in range(n):
            s += x[o + i]
        partial[k] = s
    return partial


@njit(parallel=True, cache=True, fastmath=REDUCE_MATH)
def read_write(x, a, b, out):
    """out = a * x + b (RW)."""
    n_chunks = -(-x.size // CHUNK)
    for k in prange(n_chunks):
        o, n = _chunk(k, x.size)
        for i in range(n):
            out[o + i] = a * x[o + i] + b


@njit(parallel=True, cache=True, fastmath=REDUCE_MATH)
def read2(x, dy):
    """Per-chunk dot products of x and dy (R2)."""
    n_chunks = -(-x.size // CHUNK)
    partial = np.empty(n_chunks, x.dtype)
    for k in prange(n_chunks):
        o, n = _chunk(k, x.size)
        s = x.dtype.type(0)
        for i in range(n):
            s += x[o + i] * dy[o + i]
        partial[k] = s
    return partial


@njit(parallel=True, cache=True, fastmath=REDUCE_MATH)
def read2_write(dy, x, a, b, c, out):
    """out = a * dy + b * x + c (R2W)."""
    n_chunks = -(-x.size // CHUNK)
    for k in prange(n_chunks):
        o, n = _chunk(k, x.size)
        for i in range(n):
            out[o + i] = a * dy[o + i] + b * x[o + i] + c


_compile.guard(globals())
