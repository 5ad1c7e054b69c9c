"""Which implementation takes a module's call: fastbn's kernels or torch's own op.

A Python autograd node costs about 30 us a layer (forward + backward) however
little it does, and torch's op is a C++ node that costs none of it; torch's
channels-last and batch-first kernels are fast too. So on small inputs
torch's whole op is cheaper than fastbn's kernels plus the bridge, and on
large ones fastbn's kernels win. `CROSSOVER` says from how many elements
the kernels take a call, per (layout, dtype, mode); below it torch's op
does, with fastbn's running-statistics rule (`fastbn.torch.functional`).
The table comes from measurements, not a guess: ``python -m
fastbn.bench.crossover`` (torch's module against fastbn's forced onto its
kernels on a ladder of sizes and three channel counts, interleaved, each
key's crossover printed beside the shipped one); its comment gives the
runs.

A module's ``implementation`` chooses: ``"auto"`` (the default) by the
table, ``"fastbn"`` the kernels always, ``"torch"`` torch's op always.
"""

from __future__ import annotations

from typing import Literal, TypeAlias

import torch

from fastbn.torch import _ops

__all__ = [
    "CROSSOVER",
    "IMPLEMENTATIONS",
    "THRESHOLDS",
    "Implementation",
    "Key",
    "checked",
    "layout",
    "takes_kernels",
    "thresholds",
]

Implementation: TypeAlias = Literal["auto", "fastbn", "torch"]
IMPLEMENTATIONS: tuple[Implementation, ...] = ("auto", "fastbn", "torch")

# (layout, dtype, mode) -> elements from which fastbn's kernels take the call (None: never).
# "train" is a batch-statistics forward (and its backward), "eval" a running-statistics one.
# Measured with `python -m fastbn.bench.crossover` on a quiet 2-core machine of the CI's kind
# (2026-12-07): two runs of the 4 Ki-4 Mi ladder (9 rounds of 10 calls, both dtypes) and one
# of 2-16 Mi (both dtypes, 7 rounds of 5), each size at 32, 128 and 512 channels. Each entry
# is the largest size any run or channel count needed, so that no measured call gets the
# slower side (None: some channel count lost or tied at 16 Mi). What decides it: torch's op
# is fast in every layout but channels-first training, where the kernels win from 256 Ki
# elements (1.13-1.94x; 1.10-2.10x at 2-16 Mi); elsewhere the two are within 0.74-1.36x of
# each other at 2-16 Mi, where each fresh output of either is paid for page by page.
CROSSOVER: dict[tuple[str, str, str], int | None] = {
    ("batch_first", "float32", "train"): 1 << 24,
    ("batch_first", "float32", "eval"): None,
    ("batch_first", "float64", "train"): 1 << 24,
    ("batch_first", "float64", "eval"): None,
    ("channels_first", "float32", "train"): 1 << 18,
    ("channels_first", "float32", "eval"): 1 << 24,
    ("channels_first", "float64", "train"): 1 << 23,
    ("channels_first", "float64", "eval"): None,
    ("channels_last", "float32", "train"): None,
    ("channels_last", "float32", "eval"): 1 << 24,
    ("channels_last", "float64", "train"): 1 << 24,
    ("channels_last", "float64", "eval"): None,
}
Key: TypeAlias = tuple[str, torch.dtype, bool]


def thresholds(table: dict[tuple[str, str, str], int | None]) -> dict[Key, float]:
    """A crossover table keyed by what a call has: (`layout`, dtype, training)."""
    return {
        (where, getattr(torch, dtype_name), mode == "train"): (
            float("inf") if elements is None else elements
        )
        for (where, dtype_name, mode), elements in table.items()
    }


# What `takes_kernels` reads: `CROSSOVER`, keyed by `thresholds`; below SMALLEST every key
# takes torch's op, without the layout's question.
THRESHOLDS = thresholds(CROSSOVER)
SMALLEST = min(THRESHOLDS.values())


def layout(input: torch.Tensor) -> str:
    """The table's layout of an (N, C, *) input: batch_first, channels_last or channels_first."""
    if input.dim() == 2:
        return "batch_first"
    return "channels_last" if _ops.channels_last(input) else "channels_first"


def takes_kernels(implementation: Implementation, input: torch.Tensor, training: bool) -> bool:
    """Whether fastbn's kernels take this call (else torch's op): by the module's choice.

    training says whether the call normalizes with the batch's statistics.
    Only for CPU float32/float64 input (the callers' check).
    """
    if implementation == "auto":
        numel = input.numel()
        return numel >= SMALLEST and numel >= THRESHOLDS[(layout(input), input.dtype, training)]
    return implementation == "fastbn"


def checked(implementation: object) -> Implementation:
    """implementation if it is one of `IMPLEMENTATIONS`, else ValueError naming them."""
    for name in IMPLEMENTATIONS:
        if implementation == name:
            return name
    raise ValueError(
        f"implementation must be one of {', '.join(map(repr, IMPLEMENTATIONS))}, "
        f"got {implementation!r}"
    )
