"""Numba's thread pool beside torch's: on torch's OpenMP runtime, torch's thread count kept.

Which layer. A converted model alternates torch's parallel regions (conv,
matmul, ReLU) with fastbn's, many times a step. After a region GNU OpenMP's
idle threads spin for a while before they sleep, so a second thread pool
finds a core of the two taken: measured (2 cores, torch 2.13.0, numba
0.68.1), fastbn's (32768, 16) backward took 198 us alone and 432-462 us right
after a torch op under Numba's tbb layer, 227-255 us under its omp layer; a
backward then a torch op, 576-611 us (tbb) against 337-368 us (omp);
workqueue 513 us even alone. Under omp, Numba's regions run on torch's own
OpenMP runtime (both libgomp builds are mapped; the process resolves the
GOMP symbols to the one loaded first, torch's), one team for both
libraries. So where torch's ATen runs on OpenMP (the Linux wheels) and the
user chose no layer, `import fastbn.torch` starts Numba's pool on ``omp``;
elsewhere, or with NUMBA_THREADING_LAYER or numba.config.THREADING_LAYER
set, Numba's own choice stands. A pool already started (fastbn's kernels
called before this import) is left as it is.

Thread count. Numba's ``omp`` layer sets the OpenMP thread count once, when
its pool starts (to NUMBA_NUM_THREADS), and that call reaches torch's
runtime: with NUMBA_NUM_THREADS=1, torch.get_num_threads() read 1 after
fastbn's first kernel call, where it had read 2. So the pool is started
here, torch's count is read before and after, and what was there is put
back. Numba's parallel regions name their thread count themselves, so no
later kernel call changes torch's again.
"""

from __future__ import annotations

import sys
from typing import Any

import numba
import torch

__all__ = ["start_numba_beside_torch"]


def pool_started() -> bool:
    try:
        numba.threading_layer()
    except ValueError:  # raised until the pool has started
        return False
    return True


def prefers_torchs_openmp() -> bool:
    """Whether Numba's omp layer would share torch's OpenMP runtime (GNU OpenMP on Linux)."""
    return sys.platform.startswith("linux") and (
        "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
    )


def start_numba_beside_torch() -> None:
    """Start Numba's thread pool now (on torch's OpenMP where it serves), torch's count kept."""
    threads = torch.get_num_threads()
    config: Any = numba.config  # its settings are set at import: no attributes for mypy
    chosen = config.THREADING_LAYER != "default"
    if not chosen and not pool_started() and prefers_torchs_openmp():
        config.THREADING_LAYER = "omp"
        try:
            numba.get_num_threads()  # starts the pool
        except ValueError:  # this numba build has no omp layer: its own order
            config.THREADING_LAYER = "default"
    numba.get_num_threads()  # starts the pool (and picks the layer) if not yet started
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
