"""First calls of a kernel take turns across processes: Numba's cache has no lock.

Numba writes a cache index per kernel, listing every signature compiled for
it. Two processes that compile different signatures of one kernel into the
same cache at the same moment each rewrite the index from what they read
before the other wrote, and may both name the same data file: a later load
can then run one signature's machine code on the other's arguments (seen
here as a segmentation fault). So the first call of each kernel and dtype in
a process, which is when Numba compiles or loads and saves, holds an
exclusive lock on a file shared by every process of the machine; later calls
take no lock.
"""

import os
import tempfile
import threading

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process lock, as Numba itself has none
    fcntl = None

LOCK_PATH = os.path.join(tempfile.gettempdir(), "fastbn-compile.lock")

_called = set()  # (kernel, dtype) pairs called before in this process
_thread_lock = threading.Lock()


def call(kernel, dtype, *args):
    """kernel(*args), holding the machine-wide lock if this is its first call for dtype."""
    if (kernel, dtype) in _called:
        return kernel(*args)
    with _thread_lock:
        if fcntl is None:
            result = kernel(*args)
        else:
            with open(LOCK_PATH, "a") as lock_file:
                fcntl.flock(lock_file, fcntl.LOCK_EX)
                try:
                    result = kernel(*args)
                finally:
                    fcntl.flock(lock_file, fcntl.LOCK_UN)
        _called.add((kernel, dtype))
    return result
