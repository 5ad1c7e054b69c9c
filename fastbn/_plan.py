"""The plan: how arrays of one key (dtype, shape, strides, feature axis) go to the kernels.

Every input is viewed as (P, C, Q): C features, each reduced over P x Q
values. For C-contiguous data the view is free, and a Fortran-ordered array
is the C-contiguous transpose of another, so it is served without a copy
too. Any other memory order (a sliced or permuted view) is copied once into
a C-contiguous buffer, and results are written back into the caller's
layout. Long runs (Q >= ROWS_MIN_RUN) go to the rows family, the rest
(batch-first, channels-last) to the columns family; both families have the
same entries, which take the data, then the family's `Plan.geometry`, then
the same arguments, so a call is written once for both.

A plan is made once per key (`plan_for`): making it checks x and the axis
(`_checks`), which depend on the key alone, so a key is stored only once its
checks have passed, and a small call with a known key does no checking of
its own here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from types import ModuleType
from typing import Any, SupportsIndex, TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

from fastbn import _checks
from fastbn.kernels import columns, rows

__all__ = [
    "MAX_PLANS",
    "PARALLEL_MIN",
    "ROWS_MIN_RUN",
    "Plan",
    "in_caller_layout",
    "output_buffer",
    "plan_cache",
    "plan_for",
]

PARALLEL_MIN = 1 << 15  # values below which one thread beats a parallel launch
ROWS_MIN_RUN = 16  # shorter runs are folded into the columns family's groups
MAX_PLANS = 256  # plans kept; past that the cache starts over

PlanT = TypeVar("PlanT")


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """How arrays of one dtype, shape, strides and feature axis go to the kernels.

    A plan is a value: copies compare equal.

    Attributes
    ----------
    axis, n_features, count : int
        The feature axis in [0, ndim), C, and M, the values per feature.
    transposed : bool
        Whether the C-contiguous form is the transpose (Fortran-ordered x).
    copied : bool
        Whether x is in neither order, so that the kernels take a copy.
    shape : tuple of int
        The shape of the C-contiguous form.
    pcq : tuple of int
        (P, C, Q) of the C-contiguous form.
    lead_axis : bool
        Whether (P, C, Q) is the C-contiguous shape with a leading axis of 1,
        as for features-first (n, m) data.
    family : module
        `fastbn.kernels.rows` or `fastbn.kernels.columns`.
    geometry : tuple of int
        The arguments the family's entries take after the data: () for the
        rows family (its data is the (P, C, Q) view), (C, Q, W) for columns.
    serial : bool
        Whether one thread runs the kernels (small data).
    """

    axis: int
    n_features: int
    count: int
    transposed: bool
    copied: bool
    shape: tuple[int, ...]
    pcq: tuple[int, ...]
    lead_axis: bool
    family: ModuleType
    geometry: tuple[int, ...]
    serial: bool

    @classmethod
    def of(cls, x: NDArray[np.floating], axis: SupportsIndex, training: bool) -> Plan:
        """The plan of x (checked by `_checks.data`) and axis, checking them."""
        axis = _checks.feature_axis(axis, x)
        _checks.counts(x, axis, training)
        flags = x.flags
        transposed = not flags.c_contiguous and flags.f_contiguous
        copied = not (flags.c_contiguous or flags.f_contiguous)
        shape, c_axis = (x.shape[::-1], x.ndim - 1 - axis) if transposed else (x.shape, axis)
        return cls.of_form(shape, c_axis, axis, transposed, copied)

    @classmethod
    def of_form(
        cls,
        shape: tuple[int, ...],
        c_axis: int,
        axis: int | None = None,
        transposed: bool = False,
        copied: bool = False,
    ) -> Plan:
        """The plan of data whose C-contiguous form has shape, features along c_axis.

        No checks: ``axis`` is the caller's feature axis (default c_axis),
        ``transposed`` and ``copied`` as the attributes. Also the plan of one
        ghost slice, from its shape alone.
        """
        if len(shape) == 2:  # the common case, without slicing and multiplying tuples
            pcq = (1, *shape) if c_axis == 0 else (*shape, 1)
        else:
            pcq = (math.prod(shape[:c_axis]), shape[c_axis], math.prod(shape[c_axis + 1 :]))
        n_features, run = pcq[1], pcq[2]
        is_rows = run >= ROWS_MIN_RUN
        return cls(
            axis=c_axis if axis is None else axis,
            n_features=n_features,
            count=pcq[0] * run,
            transposed=transposed,
            copied=copied,
            shape=shape,
            pcq=pcq,
            lead_axis=pcq == (1, *shape),
            family=rows if is_rows else columns,
            geometry=() if is_rows else (n_features, run, columns.group_width(n_features, run)),
            serial=pcq[0] * n_features * run < PARALLEL_MIN,
        )

    def kernel_x(self, x: NDArray[np.floating]) -> NDArray[np.floating]:
        """x (an array of the plan's key) as the kernels take it."""
        if self.transposed:
            x = x.T
        elif self.copied:
            x = np.ascontiguousarray(x)
        x = self.view(x)
        return x if x.flags.writeable else _checks.kernel_input(x)

    def kernel_input(self, a: NDArray[np.floating]) -> NDArray[np.floating]:
        """Another array of x's shape (dy), in any memory order, as the kernels take it."""
        a = np.ascontiguousarray(a.T if self.transposed else a)
        return _checks.kernel_input(self.view(a))

    def view(self, a: NDArray[np.floating]) -> NDArray[np.floating]:
        """A C-contiguous array of `shape` as the family takes it: (P, C, Q) or flat."""
        # Each view costs a good part of a small call: a[None] and ravel (a view
        # of a C-contiguous array) take half the time of reshape.
        if self.family is columns:
            return a.ravel()
        return a[None] if self.lead_axis else a.reshape(self.pcq)

    def output(
        self, out: NDArray[np.floating] | None, dtype: np.dtype[Any]
    ) -> tuple[NDArray[np.floating], bool]:
        """The C-contiguous buffer the kernel writes, and whether it must be copied into out.

        That is out itself (or its transpose) when its layout fits, else a new array.
        """
        if out is None:  # the common case, inline: a small call feels every frame
            return np.empty(self.shape, dtype), False
        return output_buffer(out, dtype, self.shape, self.transposed)

    def result(
        self, buffer: NDArray[np.floating], out: NDArray[np.floating] | None, copy_back: bool
    ) -> NDArray[np.floating]:
        """The result in the caller's layout: out (copied into if need be) or the buffer."""
        if out is None:
            return buffer.T if self.transposed else buffer
        return in_caller_layout(buffer, out, copy_back, self.transposed)


def output_buffer(
    out: NDArray[np.floating] | None,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
    transposed: bool,
) -> tuple[NDArray[np.floating], bool]:
    """The C-contiguous buffer of shape a kernel writes, and whether it must be copied into out.

    That is out itself (or its transpose, for a Fortran-ordered caller) when
    its layout fits, else a new array.
    """
    if out is not None:
        target = out.T if transposed else out
        if target.flags.c_contiguous:
            return target, False
    return np.empty(shape, dtype), out is not None


def in_caller_layout(
    buffer: NDArray[np.floating],
    out: NDArray[np.floating] | None,
    copy_back: bool,
    transposed: bool,
) -> NDArray[np.floating]:
    """A result in the caller's layout: out (copied into if need be) or the buffer."""
    if out is None:
        return buffer.T if transposed else buffer
    if copy_back:
        out[...] = buffer.T if transposed else buffer
    return out


def plan_cache(
    make: Callable[[NDArray[np.floating], SupportsIndex, Any], PlanT], option_type: type
) -> Callable[[ArrayLike, SupportsIndex, Any], tuple[NDArray[np.floating], PlanT]]:
    """Plans made once per key and reused: the function ``(x, axis, option) -> (x, plan)``.

    The key is (dtype, shape, strides, axis, option) of an ndarray x, an int
    axis and an option of type ``option_type`` (bool training, or a ghost
    batch's int k: a True never finds the plan of a 1). The common case
    looks its plan up before any check; a key is stored only once
    ``make(x, axis, option)`` (which checks what the key decides) has
    passed, after x was checked as data (`_checks.data`). Past MAX_PLANS
    the cache starts over. (A closure: a small call pays no method lookup.)
    """
    plans: dict[tuple[Any, ...], PlanT] = {}

    def planned(
        x: ArrayLike, axis: SupportsIndex, option: Any
    ) -> tuple[NDArray[np.floating], PlanT]:
        key = None
        if isinstance(x, np.ndarray) and type(axis) is int and type(option) is option_type:
            key = (x.dtype, x.shape, x.strides, axis, option)
            plan = plans.get(key)
            if plan is not None:
                return x, plan
        x = _checks.data("x", x)
        plan = make(x, axis, option)
        if key is not None:
            if len(plans) >= MAX_PLANS:
                plans.clear()
            plans[key] = plan
        return x, plan

    return planned


# plan_for(x, axis, training): x checked as data and its Plan. Raises the errors of x,
# the axis and the counts of values; training is part of the key because M == 1 is an
# error there only.
plan_for = plan_cache(Plan.of, bool)
