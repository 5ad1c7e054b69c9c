"""Kernels written once with prange and compiled twice: for many threads and for one.

A small input runs faster on one thread than a parallel region takes to
launch, so every driver exists twice. Rather than write each loop twice, a
module declares its kernels with a `Twins` decorator: the function itself is
compiled as given (``parallel=True`` for the drivers), and so is a copy of it
whose globals say ``prange = range``: the serial twin, with no parallel
region. (Compiled with parallel=True all the same: the same serial loop runs
2.2 times faster that way than in a plain njit function, bit for bit the
same results; measured on the per-feature train loop, (64, 128) float32.)
The copy's globals also name the serial twins of the kernels it calls, so a
serial entry runs serial drivers all the way down. An entry and its twin
are cached by Numba apart: the copy's qualified name ends in ``_serial``,
which names its cache files.

`serial_twin` maps a kernel to its serial twin for the Python callers. A
serial twin compiles without Numba's warning that parallel=True found no
parallel loop (there is none by design).
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from typing import Any

from numba import njit
from numba.core.dispatcher import Dispatcher
from numba.core.errors import NumbaPerformanceWarning

__all__ = ["Twins", "serial_twin"]

# parallel-capable dispatcher -> its serial twin, across modules
_SERIAL: dict[Dispatcher[Any], Dispatcher[Any]] = {}


# serial_twin(kernel): the one-thread twin of a kernel declared with `Twins` (the dict's
# own lookup: a small call pays no Python frame for it).
serial_twin: Callable[[Any], Any] = _SERIAL.__getitem__


def _quiet(compile_for_args):
    """A dispatcher's compile step without Numba's warning that parallel=True found no loop.

    A serial twin has no parallel loop by design; the warning comes when it
    (or an entry twin that calls it) compiles for a new signature.
    """

    def compile_quietly(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=NumbaPerformanceWarning)
            return compile_for_args(*args, **kwargs)

    return compile_quietly


class Twins:
    """The decorator of one module's twinned kernels.

    Usage, in a kernel module::

        twin = Twins(globals())

        @twin(parallel=True)
        def _driver(x, out): ...  # loops with prange

        @twin(entry=True)
        def kernel(x, out): ...  # calls _driver; Python calls it

        twin.finish()  # at the end: serial copies see every module global
    """

    def __init__(self, namespace):
        self._namespace = namespace
        self._serial_globals = {"prange": range}

    def __call__(self, entry=False, serial=False, quiet=False, **options):
        """Decorate a kernel; ``entry=True`` for one that Python calls: only those are cached.

        A cached kernel that calls another cached kernel can be saved, in a
        process that loaded the callee from the cache, with symbol names of
        that process, and crash the next process that loads it (Numba issues
        4807, 8578, 10128; seen here as segmentation faults). So kernels that
        other kernels call are not cached themselves: each entry carries them.

        ``serial=True``: one function only, compiled with the serial globals
        (every twin it calls is a serial twin), under both names: a body
        that parallel loops run once per unit, such as one ghost slice.
        ``quiet=True``: the parallel kernel compiles without Numba's warning
        that parallel=True found no loop, as for an entry that runs serial
        bodies in its loop.
        """

        def decorate(func):
            if serial:
                return self._serial_copy(func, entry, options, func)
            kernel = njit(cache=entry, **options)(func)
            if quiet:
                kernel._compile_for_args = _quiet(kernel._compile_for_args)
            return self._serial_copy(func, entry, options, kernel)

        return decorate

    def _serial_copy(self, func, entry, options, kernel):
        """Compile func's serial copy and register it as kernel's twin; return kernel.

        kernel is func itself for ``serial=True``: then the copy is returned.
        """
        copy = types.FunctionType(
            func.__code__, self._serial_globals, func.__name__, func.__defaults__, func.__closure__
        )
        copy.__qualname__ = f"{func.__qualname__}_serial"
        copy.__module__ = func.__module__
        copy.__doc__ = func.__doc__
        serial = njit(cache=entry, **options)(copy)
        serial._compile_for_args = _quiet(serial._compile_for_args)
        self._serial_globals[func.__name__] = serial
        self._namespace[f"{func.__name__}_serial"] = serial
        if kernel is func:
            kernel = serial
        _SERIAL[kernel] = serial
        return kernel

    def finish(self):
        """Give the serial copies every other global of the module (call at its end)."""
        for name, value in self._namespace.items():
            self._serial_globals.setdefault(name, value)
