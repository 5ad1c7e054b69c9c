"""Serialize kernel launches where Numba's threading layer is not thread-safe.

Numba's ``workqueue`` layer aborts the process when two Python threads
launch parallel regions at once; ``tbb`` and ``omp`` allow it. Which layer
runs is only known after the first parallel region, so the first parallel
kernel calls hold a module-level lock, and once ``numba.threading_layer()``
names a thread-safe layer later calls skip it. Serial calls (small inputs)
launch no parallel region and are never held.

Usage, around each kernel call::

    with kernel_guard(plan.serial):
        rows.train_forward(...)
"""

from __future__ import annotations

import threading
from typing import Literal

import numba

__all__ = ["SAFE_LAYERS", "kernel_guard", "layer_is_safe"]

SAFE_LAYERS = ("tbb", "omp")  # layers that take parallel launches from several threads

_LOCK = threading.Lock()
# None until the first guarded call has run a parallel region; then whether
# the active layer is thread-safe. Written under _LOCK; read without it (a
# stale None or False only costs taking the lock once more).
_safe: bool | None = None


def layer_is_safe() -> bool | None:
    """Whether the active threading layer is known to be thread-safe (None: not known yet)."""
    return _safe


def _check_layer() -> None:
    global _safe
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel region has run yet: ask again next time
        return
    _safe = layer in SAFE_LAYERS


class _Unguarded:
    """A no-op context manager, cheaper than contextlib.nullcontext() per call."""

    __slots__ = ()

    def __enter__(self) -> _Unguarded:
        return self

    def __exit__(self, *exc_info: object) -> Literal[False]:
        return False


class _Guarded:
    """Holds the module lock for the call; learns the layer after the first one."""

    __slots__ = ()

    def __enter__(self) -> _Guarded:
        _LOCK.acquire()
        return self

    def __exit__(self, *exc_info: object) -> Literal[False]:
        try:
            if _safe is None:
                _check_layer()
        finally:
            _LOCK.release()
        return False


_UNGUARDED = _Unguarded()
_GUARDED = _Guarded()


def kernel_guard(serial: bool) -> _Unguarded | _Guarded:
    """A context manager to run one kernel call under.

    Parameters
    ----------
    serial : bool
        Whether the call runs on one thread (no parallel region): then, and
        once the active layer is known to be thread-safe (tbb or omp), the
        guard does nothing. Otherwise it holds a lock for the call, so that
        the workqueue layer never sees two parallel launches at once.
    """
    if serial or _safe:
        return _UNGUARDED
    return _GUARDED
