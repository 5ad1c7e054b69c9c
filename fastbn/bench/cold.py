"""Cold start: import fastbn and run a first train forward and backward, in a fresh process.

Measured twice over, each time in a new Python process whose compile cache
(NUMBA_CACHE_DIR) is a temporary folder of its own: first with the folder
empty (the first-ever compile), then, with the cache that run left, warm
(the start every later process pays; the median of a few runs).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SHAPE = (64, 128)

# Run in the child: times from before `import numpy` to the end of the first backward.
_CHILD = f"""
import json, time
t0 = time.perf_counter()
import numpy as np
import fastbn
t1 = time.perf_counter()
x = np.random.default_rng(0).standard_normal({SHAPE}, dtype=np.float32)
gamma = np.ones({SHAPE[0]}, np.float32)
beta = np.zeros({SHAPE[0]}, np.float32)
y, mean, invstd = fastbn.batch_norm_train(x, gamma, beta)
t2 = time.perf_counter()
fastbn.batch_norm_backward(np.ones_like(x), x, mean, invstd, gamma)
t3 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "forward": t2 - t1, "backward": t3 - t2, "total": t3 - t0}}))
"""


def run_fresh_process(cache_dir):
    """Seconds of import, first forward, first backward and their total in a new process.

    Also "process": the wall time of the whole process, interpreter start
    and exit included.
    """
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True
    )
    times = json.loads(done.stdout.strip().splitlines()[-1])
    times["process"] = time.perf_counter() - start
    return times


def measure_cold_start(warm_runs=3):
    """Cold start with an empty compile cache, then with the warm cache it left.

    Returns
    -------
    dict
        "empty_cache": the times of the first run; "warm_cache": the median of
        each time over ``warm_runs`` later runs, and under "totals" each of
        their totals (the spread of the target's time). Times in seconds.
    """
    with tempfile.TemporaryDirectory(prefix="fastbn-cold-") as cache_dir:
        empty = run_fresh_process(cache_dir)
        warm = [run_fresh_process(cache_dir) for _ in range(warm_runs)]
    return {
        "shape": list(SHAPE),
        "empty_cache": empty,
        "warm_cache": {
            **{key: statistics.median(run[key] for run in warm) for key in empty},
            "totals": [run["total"] for run in warm],
        },
        "warm_runs": warm_runs,
    }


def format_cold_start(result):
    """A title, then a line each for the warm and the empty cache, with the breakdown."""
    lines = [f"cold start: import fastbn + first train forward and backward, {SHAPE} float32"]
    for key, title in (("warm_cache", "warm cache"), ("empty_cache", "empty cache")):
        t = result[key]
        lines.append(
            f"  {title:>11}: {t['total']:6.3f} s = import {t['import']:.3f}"
            f" + first train forward {t['forward']:.3f} + first backward {t['backward']:.3f}"
            f" (whole process {t['process']:.3f} s)"
        )
    return "\n".join(lines)
