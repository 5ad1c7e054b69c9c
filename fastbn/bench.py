"""Benchmark fastbn against the NumPy baseline: ``python -m fastbn.bench``.

Times the train forward and the backward of both on each shape, in one
process, as the median of repeated runs (the machines are shared and noisy),
and prints the time and the speedup of fastbn over NumPy.
"""

import argparse
import os
import time

import numba
import numpy as np

import fastbn
from fastbn import reference

QUICK_SHAPES = [((256, 64), 0), ((1024, 256), 0), ((4096, 512), 0), ((512, 4096), 1)]
FULL_SHAPES = [
    *QUICK_SHAPES,
    ((4096, 4096), 0),
    ((64, 262144), 0),
    ((262144, 64), 1),
    ((2, 4194304), 0),
    ((4194304, 2), 1),
    ((32, 64, 56, 56), 1),
    ((32, 56, 56, 64), -1),
]


def median_seconds(fn, budget=0.5, min_runs=5):
    """Median wall time of fn over at least min_runs runs or budget seconds."""
    fn()  # warm-up: compilation, page faults
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < budget:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def measure(shape, axis, dtype, rng, budget):
    """Median seconds of (fastbn, numpy) for train forward and backward."""
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma = np.ones(shape[axis], dtype)
    beta = np.zeros(shape[axis], dtype)
    _, mean, invstd = fastbn.batch_norm_train(x, gamma, beta, axis=axis)
    return {
        "forward": (
            median_seconds(lambda: fastbn.batch_norm_train(x, gamma, beta, axis=axis), budget),
            median_seconds(lambda: reference.batch_norm_train(x, gamma, beta, axis=axis), budget),
        ),
        "backward": (
            median_seconds(
                lambda: fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, axis=axis), budget
            ),
            median_seconds(
                lambda: reference.batch_norm_backward(dy, x, mean, invstd, gamma, axis=axis),
                budget,
            ),
        ),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few small shapes only")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--budget", type=float, default=0.5, help="seconds per measurement")
    args = parser.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    print(
        f"fastbn {fastbn.__version__}, numba {numba.__version__}, numpy {np.__version__}; "
        f"{os.cpu_count()} cores, {numba.get_num_threads()} numba threads; "
        f"{args.dtype}; medians over >= {args.budget} s each"
    )
    header = (
        f"{'shape':>18} {'axis':>4} {'pass':>8} {'fastbn ms':>10} {'numpy ms':>10} {'speedup':>8}"
    )
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(0)
    for shape, axis in shapes:
        for name, (fast, slow) in measure(shape, axis, args.dtype, rng, args.budget).items():
            print(
                f"{shape!s:>18} {axis:>4} {name:>8} {fast * 1e3:>10.3f} {slow * 1e3:>10.3f} "
                f"{slow / fast:>7.1f}x"
            )


if __name__ == "__main__":
    main()
