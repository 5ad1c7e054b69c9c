"""Which implementation takes a module's call: fastbn's kernels or torch's own op.

A Python autograd node costs about 30 us a layer (forward + backward) however
little it does, and torch's op is a C++ node that costs none of it; torch's
channels-last and batch-first kernels are fast too. So on small inputs
torch's whole op is cheaper than fastbn's kernels plus the bridge, and on
large ones fastbn's kernels win. `CROSSOVER` says from how many elements
the kernels take a call, per (layout, dtype, mode); below it torch's op
does, with fastbn's running-statistics rule (`fastbn.torch.functional`).
The table comes from measurements, not a guess: layer timings on a quiet
machine (its comment). ``python -m fastbn.bench.crossover`` measures it
again: torch's module against fastbn's forced onto its kernels on a ladder
of sizes, interleaved, with each key's crossover printed beside the
shipped one (the guide's "Which implementation runs" says what its runs
on a loaded machine gave).

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
# Set from layer timings on a quiet 2-core machine of the CI's kind (forward + backward,
# torch's module / fastbn's, medians): batch-first (32, 128) 0.64x, (64, 256) 0.64x, (128,
# 512) 0.63-1.02x, (1024, 256) 0.87-1.43x; channels-last (16, 160, 2, 2) 0.60x, (16, 96, 8,
# 8) 0.73x, (16, 576, 4, 4) 0.70x, (16, 32, 32, 32) 1.12x; channels-first (16, 160, 2, 2)
# 1.22x, (16, 96, 8, 8) 1.13x, (16, 576, 4, 4) 0.94x, (16, 32, 32, 32) 1.94x, (8, 512, 7,
# 7) 0.76-1.45x. Where a size's rows disagree, torch's op keeps it (it costs no Python node).
CROSSOVER: dict[tuple[str, str, str], int | None] = {
    ("batch_first", "float32", "train"): 1 << 19,
    ("batch_first", "float32", "eval"): 1 << 18,
    ("batch_first", "float64", "train"): 1 << 19,
    ("batch_first", "float64", "eval"): 1 << 18,
    ("channels_first", "float32", "train"): 1 << 18,
    ("channels_first", "float32", "eval"): 1 << 18,
    ("channels_first", "float64", "train"): 1 << 18,
    ("channels_first", "float64", "eval"): 1 << 18,
    ("channels_last", "float32", "train"): 1 << 19,
    ("channels_last", "float32", "eval"): 1 << 19,
    ("channels_last", "float64", "train"): 1 << 19,
    ("channels_last", "float64", "eval"): 1 << 19,
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


# What `takes_kernels` reads: `CROSSOVER`, keyed by `thresholds`.
THRESHOLDS = thresholds(CROSSOVER)


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
        return input.numel() >= THRESHOLDS[(layout(input), input.dtype, training)]
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
