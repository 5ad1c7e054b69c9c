"""Kernel launches: one thread or many, serialized where Numba's threading layer is not safe.

Every kernel call of the package goes through `launch`, which starts Numba's
thread pool before the first one (`start_pool`), then runs the kernel's
one-thread twin for small data and in forked children (below), and the
parallel kernel otherwise, under `kernel_guard`.

fastbn starts the pool itself, before its first kernel of any size (the
one-thread twins are compiled with parallel=True too, and would start it):
the start is where Numba's omp layer sets the OpenMP thread count and
nesting of the calling thread, in the runtime the host uses (torch's, in a
torch process), so `start_pool` runs it inside `_openmp.settings_kept`,
which puts back whatever it changed. After the start `launch` pays one
module global read for it.

Numba's ``workqueue`` layer aborts the process when two Python threads
launch parallel regions at once; ``tbb`` and ``omp`` allow it. The layer is
known once the pool has started: `start_pool` records whether it is
thread-safe, and until then (or under ``workqueue``) parallel calls hold a
module-level lock. Serial calls (small inputs) launch no parallel region and
are never held.

A process forked from one whose Numba thread pool had started cannot use
that pool: GNU OpenMP (the ``omp`` layer) terminates the child at its first
parallel region ("fork() called from a process already using GNU OpenMP"),
and ``tbb`` and ``workqueue`` children hang when the fork came while another
thread was in a parallel region (tbb's own locks; the guard's lock here).
So such a child sets `serial_only`, and every `launch` runs the kernels'
one-thread twins there, which give the same bits: DataLoader workers and
fork-started multiprocessing pools compute correctly, on one thread each.
The parent keeps its pool; a child forked before the pool started starts
its own.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, Literal

import numba

from fastbn._openmp import settings_kept
from fastbn.kernels._twins import serial_twin

__all__ = [
    "SAFE_LAYERS",
    "kernel_guard",
    "launch",
    "layer_is_safe",
    "pool_started",
    "serial_only",
    "start_pool",
]

SAFE_LAYERS = ("tbb", "omp")  # layers that take parallel launches from several threads

_LOCK = threading.Lock()
# None until `start_pool` has run in this process (or its forked parent); then
# whether the active layer is thread-safe. Written under _LOCK; read without it
# (a stale None only costs taking the lock once more).
_safe: bool | None = None
# Whether this process was forked from one whose Numba thread pool had started:
# then every kernel call runs on one thread (read by `launch`).
serial_only = False


def layer_is_safe() -> bool | None:
    """Whether the active threading layer is known to be thread-safe (None: not known yet)."""
    return _safe


def pool_started() -> bool:
    """Whether Numba's thread pool has started in this process (or in its forked parent)."""
    try:
        numba.threading_layer()
    except ValueError:  # raised until the pool has started
        return False
    return True


def start_pool(layer: str | None = None) -> None:
    """Start Numba's thread pool unless it has started, the host's OpenMP settings kept.

    Parameters
    ----------
    layer : str, optional
        The threading layer to start on where the user chose none
        (``numba.config.THREADING_LAYER`` reads ``"default"``); Numba's own
        order where it cannot load. The setting reads ``"default"`` again
        after the start.
    """
    global _safe
    with _LOCK:
        if not pool_started():
            with settings_kept():
                _start(layer)
        _safe = numba.threading_layer() in SAFE_LAYERS


def _start(layer: str | None) -> None:
    config: Any = numba.config  # its settings are set at import: no attributes for mypy
    if layer is not None and config.THREADING_LAYER == "default":
        config.THREADING_LAYER = layer
        try:
            numba.get_num_threads()  # starts the pool
        except ValueError:  # this numba build cannot load the layer: its own order
            pass
        finally:
            config.THREADING_LAYER = "default"
    numba.get_num_threads()  # starts the pool (and picks the layer) if not yet started


class _Unguarded:
    """A no-op context manager, cheaper than contextlib.nullcontext() per call."""

    __slots__ = ()

    def __enter__(self) -> _Unguarded:
        return self

    def __exit__(self, *exc_info: object) -> Literal[False]:
        return False


class _Guarded:
    """Holds the module lock for the call."""

    __slots__ = ()

    def __enter__(self) -> _Guarded:
        _LOCK.acquire()
        return self

    def __exit__(self, *exc_info: object) -> Literal[False]:
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

    The pool is started first if it has not been (`start_pool`). The twin
    runs for small data (``serial``), and in a process forked after the
    parent's thread pool started (`serial_only`), which cannot launch
    parallel regions.
    """
    if _safe is None:  # fastbn has not started the pool: start it, settings kept
        start_pool()
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
    if pool_started():
        serial_only = True  # else the parent never started the pool: this child starts its own


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere there is no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
