"""Kernel launches: one thread or many, serialized where Numba's threading layer is not safe.

Every kernel call of the package goes through `launch`, which runs the
kernel's one-thread twin for small data and in forked children (below), and
the parallel kernel otherwise, under `kernel_guard`.

Numba's ``workqueue`` layer aborts the process when two Python threads
launch parallel regions at once; ``tbb`` and ``omp`` allow it. Which layer
runs is only known after the first parallel region, so the first parallel
kernel calls hold a module-level lock, and once ``numba.threading_layer()``
names a thread-safe layer later calls skip it. Serial calls (small inputs)
launch no parallel region and are never held.

A process forked from one whose Numba thread pool had started cannot use
that pool: GNU OpenMP (the ``omp`` layer) terminates the child at its first
parallel region ("fork() called from a process already using GNU OpenMP"),
and ``tbb`` and ``workqueue`` children hang when the fork came while another
thread was in a parallel region (tbb's own locks; the guard's lock here).
The pool starts at the first kernel call of any size (the one-thread twins
are compiled with parallel=True too). So such a child sets `serial_only`,
and every `launch` runs the kernels' one-thread
twins there, which give the same bits: DataLoader workers and fork-started
multiprocessing pools compute correctly, on one thread each. The parent
keeps its pool; a child forked before the pool started starts its own.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, Literal

import numba

from fastbn.kernels._twins import serial_twin

__all__ = ["SAFE_LAYERS", "kernel_guard", "launch", "layer_is_safe", "serial_only"]

SAFE_LAYERS = ("tbb", "omp")  # layers that take parallel launches from several threads

_LOCK = threading.Lock()
# None until the first guarded call has run a parallel region; then whether
# the active layer is thread-safe. Written under _LOCK; read without it (a
# stale None or False only costs taking the lock once more).
_safe: bool | None = None
# Whether this process was forked from one whose Numba thread pool had started:
# then every kernel call runs on one thread (read by `launch`).
serial_only = False


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


def launch(serial: bool, kernel: Callable[..., Any], *args: Any) -> Any:
    """kernel(*args), or its one-thread twin; a parallel launch under `kernel_guard`.

    The twin for small data (``serial``), and in a process forked after the
    parent's thread pool started (`serial_only`), which cannot launch
    parallel regions.
    """
    # No parallel region: the guard would only cost. (Small calls stop at
    # `serial`; the flag costs the parallel ones a module global read.)
    if serial or serial_only:
        return serial_twin(kernel)(*args)
    with kernel_guard(serial):
        return kernel(*args)


def _after_fork_in_child() -> None:
    """In a forked child: one thread for every kernel if the parent's pool had started.

    Also a fresh lock: a parent thread may have held the guard's at the fork,
    and no thread of this process would ever release it.
    """
    global _LOCK, serial_only
    _LOCK = threading.Lock()
    try:
        numba.threading_layer()
    except ValueError:  # the parent never started the pool: this child starts its own
        return
    serial_only = True


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere there is no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
