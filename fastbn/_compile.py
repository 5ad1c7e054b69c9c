"""Numba's cache made safe for processes that share it: saves and loads hold a lock.

Numba writes a cache index per kernel, listing every signature compiled for
it. Saving a new signature reads the index, picks the first free data file
name and rewrites the index. Two processes saving into one cache at the same
moment both read the index before the other wrote it, and may both name the
same data file: a later load can then run one signature's machine code on
another's arguments (seen here as a segmentation fault). So fastbn's cached
kernels read and write their cache holding an exclusive lock on a file in
the cache directory itself, whichever call compiled them and wherever the
cache is (next to the package, NUMBA_CACHE_DIR or a user directory): every
process that shares the directory shares the lock.

Each module with cached kernels ends with ``_compile.guard(globals())``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from numba.core.caching import IndexDataCacheFile

fcntl: ModuleType | None
try:
    import fcntl
except ImportError:  # not POSIX: no cross-process lock, as Numba itself has none
    fcntl = None

__all__ = ["LOCK_NAME", "guard", "lock_path"]

LOCK_NAME = "fastbn-cache.lock"


def lock_path(kernel: Any) -> str:
    """The lock file of a cached kernel's cache directory."""
    return os.path.join(kernel._cache._cache_path, LOCK_NAME)


@contextlib.contextmanager
def _locked(cache_path: str) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    with open(os.path.join(cache_path, LOCK_NAME), "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


class _LockedCacheFile(IndexDataCacheFile):
    """Numba's index and data files, read and written under the cache directory's lock."""

    def save(self, key: Any, data: Any) -> None:
        with _locked(self._cache_path):
            super().save(key, data)

    def load(self, key: Any) -> Any:
        with _locked(self._cache_path):
            return super().load(key)


def guard(namespace: dict[str, Any]) -> None:
    """Make the cached Numba kernels in a module's namespace use the lock."""
    for value in namespace.values():
        cache_file = getattr(getattr(value, "_cache", None), "_cache_file", None)
        if type(cache_file) is IndexDataCacheFile:
            cache_file.__class__ = _LockedCacheFile
