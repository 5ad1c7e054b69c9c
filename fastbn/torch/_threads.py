"""Numba's thread pool beside torch's: on torch's OpenMP runtime where it serves.

A converted model alternates torch's parallel regions (conv, matmul, ReLU)
with fastbn's, many times a step. After a region GNU OpenMP's idle threads
spin for a while before they sleep, so a second thread pool finds a core of
the two taken: measured (2 cores, torch 2.13.0, numba 0.68.1), fastbn's
(32768, 16) backward took 198 us alone and 432-462 us right after a torch op
under Numba's tbb layer, 227-255 us under its omp layer; a backward then a
torch op, 576-611 us (tbb) against 337-368 us (omp); workqueue 513 us even
alone. Under omp, Numba's regions run on torch's own OpenMP runtime (both
libgomp builds are mapped; the process resolves the GOMP symbols to the one
loaded first, torch's), one team for both libraries. So where torch's ATen
runs on OpenMP (the Linux wheels) and the user chose no layer, `import
fastbn.torch` starts Numba's pool on ``omp``; elsewhere, or with
NUMBA_THREADING_LAYER or numba.config.THREADING_LAYER set, Numba's own
choice stands. A pool already started (fastbn's kernels called before this
import) is left as it is.

The start is fastbn's one start (`fastbn._threading.start_pool`), which
keeps the host's settings: torch's thread count (its OpenMP runtime's),
OpenMP's nesting, and numba.config.THREADING_LAYER as the user left it.
"""

from __future__ import annotations

import sys

import torch

from fastbn._threading import start_pool

__all__ = ["prefers_torchs_openmp", "start_numba_beside_torch"]


def prefers_torchs_openmp() -> bool:
    """Whether Numba's omp layer would share torch's OpenMP runtime (GNU OpenMP on Linux)."""
    return sys.platform.startswith("linux") and (
        "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
    )


def start_numba_beside_torch() -> None:
    """Start Numba's thread pool now, on torch's OpenMP where it serves and no layer was chosen."""
    start_pool("omp" if prefers_torchs_openmp() else None)
