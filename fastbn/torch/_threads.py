"""fastbn leaves torch's thread count as the user set it.

Numba's ``omp`` threading layer sets the OpenMP thread count once, when its
thread pool starts (to NUMBA_NUM_THREADS). In a torch process two GNU
OpenMP runtimes are mapped (torch's bundled one and the system's), and
that call binds to torch's: with NUMBA_NUM_THREADS=1, torch.get_num_threads()
read 1 after fastbn's first kernel call, where it had read 2, and torch's own
ops ran on one thread. So `import fastbn.torch` starts Numba's pool itself
(``numba.get_num_threads()`` does), reads torch's count before and after,
and puts back what was there. Numba's parallel regions name their thread
count themselves, so no later kernel call changes torch's again.
"""

from __future__ import annotations

import numba
import torch

__all__ = ["start_numba_keeping_torch_threads"]


def start_numba_keeping_torch_threads() -> None:
    """Start Numba's thread pool now, with torch's thread count as it was before."""
    threads = torch.get_num_threads()
    numba.get_num_threads()  # starts the pool (and picks the threading layer)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
