"""The crossover: from which size fastbn's kernels beat torch's whole op, per key.

``python -m fastbn.bench.crossover`` times torch's BatchNorm module against
fastbn's forced onto its kernels (``implementation="fastbn"``) on a ladder
of sizes for each key of `fastbn.torch.dispatch.CROSSOVER` (layout, dtype,
mode), at several channel counts (`CHANNELS`: the table is keyed by size
alone, and the winner at one size differs with the channels), interleaved
in rounds in one process, and prints, per key, the smallest size from
which fastbn's median is below torch's at that size and every larger one,
at every channel count: the table that `fastbn.torch.dispatch` ships.

Each round times ``calls`` calls of each module in turn; a size's time is
the median over rounds of the per-call mean, and its spread the range of
the middle half of those rounds. The training key times forward and
backward through autograd; the eval key the forward under ``no_grad``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastbn.torch as fbt
from fastbn.torch import dispatch

# Elements per call: 2**12 (4 Ki) to 2**22 (4 Mi).
LADDER = [2**k for k in range(12, 23, 2)]
# Channel counts of real layers: a stem's, a middle stage's, a last stage's.
CHANNELS = (32, 128, 512)
BATCH = 16  # images per call; a batch-first call has numel // channels rows


def shape_for(layout: str, numel: int, channels: int) -> tuple[int, ...]:
    """An input shape of about numel elements in layout, with channels channels."""
    if layout == "batch_first":
        return (max(2, numel // channels), channels)
    side = max(1, round((numel / (BATCH * channels)) ** 0.5))
    return (BATCH, channels, side, side)


def make_pair(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.nn.Module, ...]:
    """torch's BatchNorm module for shape, and fastbn's forced onto its kernels."""
    cls = torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d
    theirs = cls(shape[1], dtype=dtype)
    ours = fbt.convert(cls(shape[1], dtype=dtype), implementation="fastbn")
    return theirs, ours


def make_input(layout: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(shape, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def call_time(module: torch.nn.Module, x: torch.Tensor, train: bool, calls: int) -> float:
    """Mean seconds per call over calls calls."""
    module.train(train)
    if train:
        x = x.detach().requires_grad_()
        dy = torch.ones_like(x)
        start = time.perf_counter()
        for _ in range(calls):
            module(x).backward(dy)
        return (time.perf_counter() - start) / calls
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(calls):
            module(x)
        return (time.perf_counter() - start) / calls


def measure(
    layout: str, dtype: torch.dtype, train: bool, shape: tuple[int, ...], rounds: int, calls: int
) -> tuple[list[float], list[float]]:
    """Per-round mean seconds per call: (torch's, fastbn's), interleaved, each first in turn."""
    theirs, ours = make_pair(shape, dtype)
    x = make_input(layout, shape, dtype)
    for module in (theirs, ours):  # warm-up: compile, allocator
        call_time(module, x, train, 3)
    times: dict[torch.nn.Module, list[float]] = {theirs: [], ours: []}
    for r in range(rounds):
        for module in (theirs, ours) if r % 2 == 0 else (ours, theirs):
            times[module].append(call_time(module, x, train, calls))
    return times[theirs], times[ours]


def crossover(rows: list[tuple[int, float, float]]) -> int | None:
    """The smallest size from which fastbn's median is below torch's at it and every larger one.

    rows: (numel, torch median, fastbn median) in increasing numel; None if
    fastbn does not win at the largest size.
    """
    found = None
    for numel, torch_median, fastbn_median in reversed(rows):
        if fastbn_median >= torch_median:
            break
        found = numel
    return found


def key_crossover(crossovers: list[int | None]) -> int | None:
    """A key's crossover over its channel counts: where the kernels win at every one."""
    if None in crossovers:
        return None
    return max(c for c in crossovers if c is not None)


def quartiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="float32 only, 7 rounds")
    parser.add_argument("--ladder", type=int, nargs="+", default=LADDER, help="sizes to time")
    args = parser.parse_args(argv)
    rounds = 7 if args.quick else args.rounds
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {rounds} "
        f"rounds of {args.calls} calls, interleaved; ratio torch / fastbn (IQR of rounds)"
    )
    for (layout, dtype_name, mode), shipped in dispatch.CROSSOVER.items():
        if args.quick and dtype_name != "float32":
            continue
        dtype = getattr(torch, dtype_name)
        found = []
        for channels in CHANNELS:
            rows = []
            for numel in sorted(args.ladder):
                shape = shape_for(layout, numel, channels)
                torch_times, fastbn_times = measure(
                    layout, dtype, mode == "train", shape, rounds, args.calls
                )
                theirs, ours = statistics.median(torch_times), statistics.median(fastbn_times)
                ratios = [t / f for t, f in zip(torch_times, fastbn_times, strict=True)]
                low, high = quartiles(ratios)
                rows.append((numel, theirs, ours))
                print(
                    f"  {layout:<14} {dtype_name:<8} {mode:<5} {shape!s:<18} "
                    f"torch {theirs * 1e6:9.1f} us  fastbn {ours * 1e6:9.1f} us  "
                    f"{statistics.median(ratios):5.2f}x [{low:.2f}, {high:.2f}]",
                    flush=True,
                )
            found.append(crossover(rows))
        print(
            f"{layout} {dtype_name} {mode}: crossover {key_crossover(found)} elements "
            f"(by channels {dict(zip(CHANNELS, found, strict=True))}; shipped: {shipped})",
            flush=True,
        )


if __name__ == "__main__":
    main()
