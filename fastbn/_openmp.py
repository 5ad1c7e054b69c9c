"""The OpenMP runtimes mapped in this process: the settings Numba's omp layer changes, kept.

Numba's omp layer calls ``omp_set_num_threads(NUMBA_NUM_THREADS)`` and
``omp_set_nested(1)`` when its thread pool starts. Those calls reach the
runtime the process resolves the GOMP symbols to: in a process that
imported torch, torch's own libgomp (loaded into the global symbol scope),
whose count is torch.get_num_threads(); otherwise the libgomp Numba loads,
which a later ``import torch`` reuses (same soname). Measured (numba 0.68.1,
torch 2.13.0, 2 cores): torch's count went 1 -> 2 after the user's
torch.set_num_threads(1), 2 -> 1 with NUMBA_NUM_THREADS=1, and torch's
runtime's max-active-levels 2147483647 -> 255 (nested regions enabled).

So `settings_kept` reads, in the calling thread (these settings are per
thread in OpenMP), each mapped runtime's settings before the block and
puts back any that changed after it. A runtime the block mapped (Numba's
libgomp, first loaded there) gets what the calling thread would have read
before: its defaults, as a thread that never set them reads them.

Runtimes are found in /proc/self/maps: Linux only. Elsewhere nothing is
found and the block runs as it is (no runtime read, none put back).
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["settings_kept"]

# (getter, setter) of each setting Numba's start changes: the count, and nesting,
# which libgomp since GCC 11 keeps as max-active-levels (older ones: both apart).
_SETTINGS = (
    ("omp_get_max_threads", "omp_set_num_threads"),
    ("omp_get_nested", "omp_set_nested"),
    ("omp_get_max_active_levels", "omp_set_max_active_levels"),
)
# GNU (libgomp), Intel (libiomp5) and LLVM (libomp) runtimes, vendored copies too
# (libgomp-a34b3233.so.1); not libomptarget.
_RUNTIME = re.compile(r"(^|/)lib(gomp|iomp5|omp)([-.][^/]*)?\.so[^/]*$")
_MAPS = "/proc/self/maps"


def _runtimes() -> list[str]:
    """Paths of the OpenMP runtimes mapped in this process (none where it cannot tell)."""
    try:
        with open(_MAPS) as maps:
            paths = [line.split(maxsplit=5)[-1].strip() for line in maps]
    except OSError:  # no /proc: not Linux
        return []
    return list(dict.fromkeys(p for p in paths if _RUNTIME.search(p)))


def _library(path: str) -> ctypes.CDLL | None:
    """The loaded runtime at path (never a new load), or None."""
    try:
        return ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:  # mapped but not loaded by the dynamic loader
        return None


def _read(library: ctypes.CDLL) -> list[int]:
    """Each setting as the calling thread sees it."""
    return [getattr(library, getter)() for getter, _ in _SETTINGS]


def _read_in_new_thread(library: ctypes.CDLL) -> list[int]:
    """The settings a thread that never set them reads: the runtime's defaults."""
    seen: list[list[int]] = []
    reader = threading.Thread(target=lambda: seen.append(_read(library)))
    reader.start()
    reader.join()
    return seen[0]


@contextmanager
def settings_kept() -> Iterator[None]:
    """Put back, after the block, each OpenMP setting the block changed in this thread."""
    before = {}
    for path in _runtimes():
        library = _library(path)
        if library is not None:
            before[path] = _read(library)
    try:
        yield
    finally:
        for path in _runtimes():
            library = _library(path)
            if library is None:
                continue
            wanted = before[path] if path in before else _read_in_new_thread(library)
            for (getter, setter), value in zip(_SETTINGS, wanted, strict=True):
                if getattr(library, getter)() != value:
                    getattr(library, setter)(value)
