"""Cold start of fastbn: ``python bench/cold_start.py``.

In fresh processes, times ``import fastbn`` plus a first float32 train
forward and backward on a (64, 128) array: with a warm compile cache (the
contract, docs/guide/contract.md, asks <= 1.0 s) and with an empty one (the
first-ever compile). The cache is a temporary folder, so no other cache is
touched.
"""

import argparse

from fastbn.bench.cold import format_cold_start, measure_cold_start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--warm-runs", type=int, default=3, help="warm-cache processes to take the median of"
    )
    args = parser.parse_args(argv)
    print(format_cold_start(measure_cold_start(args.warm_runs)))


if __name__ == "__main__":
    main()
