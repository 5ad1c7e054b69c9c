"""Benchmark fastbn against NumPy, PyTorch and the bandwidth roofline: ``python -m fastbn.bench``.

For each bench case (a bench shape in one layout) and dtype it times
train forward, eval forward and backward of each peer: fastbn
allocating its outputs, fastbn writing into preallocated ones (fastbn-out),
the NumPy baseline (`fastbn.reference`) and PyTorch (when it is installed),
and the roofline kernels R, RW, R2, R2W. Then the small (64, 128) case and
the cold start. It prints one table and the contract's targets
(docs/guide/contract.md, Performance targets) as MET / NOT MET.

How it measures:

- each peer runs in a subprocess of its own (``--worker PEER`` answers JSON
  jobs on stdin, one a line, with JSON lines on stdout), so the OpenMP
  runtimes of two libraries never spin in one process; the roofline runs
  in fastbn-out's, on the same arrays, each pass and its floor in turn;
- a case is measured in `ROUNDS` rounds; in each round every peer runs once,
  back to back (so the ratios of a round come from the same moments of a
  shared machine), each round another peer first (so none always follows
  the same one), on arrays each worker allocates afresh for the round: what
  differs between two processes of one program here is the memory its
  arrays get (a streaming pass's bandwidth moves with the physical pages),
  and a fresh allocation samples that without a process start a round;
- a round's time of a call is the median of repeated calls after one
  warm-up call, called for budget / `ROUNDS` seconds and at least once;
- each peer runs at every thread count of ``--threads`` in every round and
  keeps the one of lowest median over the rounds;
- a row's time and ratios are the median over the rounds, each with its
  spread (`fastbn.bench.stats`); a case with a ratio's spread wider than
  `report.WIDE` of its median, or whose columns contradict each other
  beyond the spread (`report.disagreements`: fastbn-out slower than the
  allocating call, a floor slower than the pass it bounds) is measured
  again, `ROUNDS` more rounds, at most `REMEASURES` times;
- a target is MET or NOT MET only when the spreads it rests on are on one
  side of its limit, else WITHIN NOISE.

Why rounds: one window of calls per peer, as the bench took before, read a
row by the moment its window fell in. On this 2-core machine shared with
other processes, one call's round medians spanned 115-306 us in one
process, and the (4096, 512) features-first float32 eval read 1.86x and
1.47x of its floor in two runs minutes apart. And a row can disagree with
itself for a reason of its own, which
more rounds do not remove: fastbn-out's buffers (``np.empty_like`` of
x, a fresh mmap) can start at the same offset in a page as x, where the
allocating call's outputs come from the heap at another; on (256, 1024)
batch-first float32, in one process, out= into buffers at x's page offset
took 259 us (train) and 333 us (backward) against 166 and 253 us 2 KiB
off, 160 and 239 us allocating; the roofline kernels did not care. The
table marks such a row.
"""

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, replace

import numba
import numpy as np

import fastbn
from fastbn.bench import report
from fastbn.bench.cold import measure_cold_start
from fastbn.bench.peers import (
    BENCH_CASES,
    ROOFLINE_FORMS,
    ROOFLINE_OF_PASS,
    WORKERS,
    Case,
    fastbn_calls,
    make_data,
    out_buffers,
    peer_calls,
    roofline_calls,
    small_calls,
)

ROUNDS = 5
REMEASURES = 2  # times a case is measured again, at most
SMALL_BUDGET_FACTOR = 4  # the small case's calls get this times the budget
COLD_WARM_RUNS = 5  # fresh processes timed with a warm compile cache
SEED = 0
QUICK_CASE_LABELS = (
    "256x64 ff",
    "1024x256 ff",
    "1024x256 bf",
    "4096x512 ff",
    "4096x512 bf",
    "32x64x56x56 nchw",
)


# --- worker side: one peer, one process -------------------------------------------------


def sample_times(fn, budget, min_runs=1, warm_up=True):
    """Wall times of repeated calls of fn, after one untimed warm-up call if ``warm_up``.

    Calls for ``budget`` seconds and at least ``min_runs`` times, with the
    garbage collector off.
    """
    if warm_up:
        fn()
    times = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        deadline = time.perf_counter() + budget
        while len(times) < min_runs or time.perf_counter() < deadline:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def thread_counts(peer, requested):
    """The thread counts a peer runs at: the NumPy baseline runs on one (no BLAS calls)."""
    return [1] if peer == "numpy" else requested


def set_threads(peer, n):
    """Set the threads of the peer's library (NumPy's element-wise calls have none)."""
    if peer == "torch":
        import torch

        torch.set_num_threads(n)
    elif peer != "numpy":
        numba.set_num_threads(n)


def time_calls(peer, calls, threads, budget):
    """Records of one round: the median time of each call at each thread count.

    Each call is called once untimed, then for ``budget`` seconds and at
    least once.
    """
    records = []
    for n in thread_counts(peer, threads):
        set_threads(peer, n)
        for name, fn in calls.items():
            times = sample_times(fn, budget)
            records.append(
                {
                    "call": name,
                    "threads": n,
                    "median": statistics.median(times),
                    "runs": len(times),
                }
            )
    return records


# The data of the last case a worker was asked for, made once: (case, dtype, seed) -> Data.
_made: dict[tuple[Case, str, int], object] = {}


def round_data(case, dtype, seed):
    """A case's data in arrays of their own, allocated for this round: copies of the arrays
    the worker made for the case once (a copy costs a fraction of drawing them again)."""
    key = (case, dtype, seed)
    if key not in _made:
        _made.clear()  # one case's arrays at a time
        _made[key] = make_data(case, dtype, seed)
    d = _made[key]
    return replace(d, x=d.x.copy(), dy=d.dy.copy())


def case_job(peer, job):
    """Each peer's records of one round of a case; the fastbn-out worker also times the
    roofline.

    The arrays are allocated afresh for each job (a round, `round_data`). The roofline runs on
    fastbn-out's own arrays, x, dy and the outputs (see `fastbn.bench.peers`),
    the kernels of each pass's floor right after the pass; their records
    name that pass.
    """
    d = round_data(Case.from_json(job["case"]), job["dtype"], job["seed"])
    if peer != "fastbn-out":
        return {
            "records": {peer: time_calls(peer, peer_calls(peer, d), job["threads"], job["budget"])}
        }
    buffers = out_buffers(d)
    fastbn = fastbn_calls(d, out=buffers)
    floor = roofline_calls(d, out=buffers)
    records = {"fastbn-out": [], "roofline": []}
    for n in job["threads"]:
        for pass_name, kernels in ROOFLINE_OF_PASS.items():
            records["fastbn-out"] += time_calls(
                peer, {pass_name: fastbn[pass_name]}, [n], job["budget"]
            )
            forms = {f: floor[f] for k in kernels for f in ROOFLINE_FORMS[k]}
            timed = time_calls(peer, forms, [n], job["budget"])
            records["roofline"] += [{**r, "pass": pass_name} for r in timed]
    return {"records": records}


def small_job(peer, job):
    return {"records": {peer: time_calls(peer, small_calls(), job["threads"], job["budget"])}}


def info_job(peer, job):
    """Versions and threads as the worker sees them (the threading layer after a parallel call)."""
    info = {"python": platform.python_version(), "numpy": np.__version__}
    if peer == "torch":
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    elif peer != "numpy":
        fastbn.batch_norm_train(np.ones((2, 1 << 16), np.float32))  # a parallel call
        info.update(
            numba=numba.__version__,
            threading_layer=numba.threading_layer(),
            numba_threads=numba.get_num_threads(),
        )
    return info


JOBS = {"case": case_job, "small": small_job, "info": info_job}


def serve(peer):
    """Answer JSON jobs from stdin, one a line, with one JSON line each on stdout."""
    replies = sys.stdout
    sys.stdout = sys.stderr  # a stray print must not corrupt the replies
    if peer == "torch":
        import torch

        torch.set_grad_enabled(False)
    for line in sys.stdin:
        job = json.loads(line)
        try:
            reply = JOBS[job["kind"]](peer, job)
        except Exception:
            reply = {"error": traceback.format_exc()}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


# --- driver side ----------------------------------------------------------------------


class Worker:
    """A peer's subprocess, ``python -m MODULE --worker PEER``, in env (default: ours)."""

    MODULE = "fastbn.bench"

    def __init__(self, peer, env=None):
        self.peer = peer
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.MODULE, "--worker", peer],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def ask(self, job):
        """Send one job and wait for its reply."""
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.peer} worker exited with code {self.process.wait()}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the {self.peer} worker failed:\n{reply['error']}")
        return reply

    def close(self):
        self.process.stdin.close()
        self.process.wait()


class Progress:
    """A plain-text progress bar on stderr: one redrawn line, or a line a task off a terminal."""

    WIDTH = 30

    def __init__(self, total, stream=sys.stderr):
        self.total = total
        self.done = 0
        self.stream = stream
        self.start = time.perf_counter()
        self.redraw = stream.isatty()

    @contextlib.contextmanager
    def task(self, what, counted=True):
        """Show the task while it runs; a task not counted (a case measured again) adds no step."""
        filled = self.WIDTH * self.done // self.total
        elapsed = time.perf_counter() - self.start
        line = (
            f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {self.done}/{self.total}"
            f" {elapsed:5.0f} s  {what}"
        )
        if self.redraw:
            self.stream.write(f"\r{line:<100}")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        yield
        self.done += counted

    def close(self):
        if self.redraw:
            self.stream.write(f"\r{'':<100}\r")
            self.stream.flush()


@dataclass
class Settings:
    """What one run measures."""

    cases: list
    dtypes: list
    threads: list
    budget: float  # seconds per call and thread count, over all its rounds
    peers: list  # the workers' peers (`WORKERS`)
    rounds: int = ROUNDS
    remeasures: int = REMEASURES


def ask_rounds(workers, job, rounds, records):
    """Rounds of a job: in each every worker in turn, each round another first.

    ``rounds`` are the rounds' numbers; each reply's records are added to
    ``records`` (peer -> list), each with its round's number.
    """
    for r in rounds:
        first = r % len(workers)
        for worker in workers[first:] + workers[:first]:
            for peer, peer_records in worker.ask(job)["records"].items():
                records.setdefault(peer, []).extend({**rec, "round": r} for rec in peer_records)


def remeasure_reasons(rows):
    """Why a case's rows are measured again: their ratios' spread is wide, or their columns
    disagree beyond it (`report.disagreements`); empty when neither."""
    disagree = [f"{row['pass']}: {r}" for row in rows for r in report.disagreements(row)]
    return disagree + [f"{row['pass']} {k} wide" for row in rows for k in report.wide_ratios(row)]


def measure_case(workers, case, dtype, settings, progress):
    """The rows of one case and dtype: its rounds, and more while `remeasure_reasons` holds,
    at most ``settings.remeasures`` times."""
    job = {
        "kind": "case",
        "case": case.to_json(),
        "dtype": dtype,
        "threads": settings.threads,
        "budget": settings.budget / settings.rounds,
        "seed": SEED,
    }
    records = {}
    what = f"{case.label} {dtype}"
    for attempt in range(settings.remeasures + 1):
        first = attempt * settings.rounds
        with progress.task(what, counted=attempt == 0):
            ask_rounds(workers, job, range(first, first + settings.rounds), records)
        rows = report.case_rows(case, dtype, records)
        reasons = remeasure_reasons(rows)
        if not reasons:
            break
        more = f" and {len(reasons) - 1} more" if len(reasons) > 1 else ""
        what = f"{case.label} {dtype} again ({reasons[0]}{more})"
    return rows


def measure(settings):
    """Run every measurement of a run.

    Returns
    -------
    dict
        "workers" (each peer's versions and threads), "rows" (one per case,
        dtype and pass), "small" and "cold_start".
    """
    n_steps = len(settings.cases) * len(settings.dtypes) + 2
    progress = Progress(n_steps)
    with contextlib.ExitStack() as stack:
        workers = {}
        for peer in settings.peers:
            workers[peer] = Worker(peer)
            stack.callback(workers[peer].close)
        infos = {peer: w.ask({"kind": "info"}) for peer, w in workers.items()}
        rows = [
            row
            for case in settings.cases
            for dtype in settings.dtypes
            for row in measure_case(list(workers.values()), case, dtype, settings, progress)
        ]
        with progress.task("small (64, 128) float32: fastbn"):
            budget = SMALL_BUDGET_FACTOR * settings.budget / settings.rounds
            job = {"kind": "small", "threads": settings.threads, "budget": budget}
            records = {}
            ask_rounds([workers["fastbn"]], job, range(settings.rounds), records)
            small = report.best_times(records["fastbn"])
    with progress.task("cold start (empty, then warm compile cache)"):
        cold = measure_cold_start(COLD_WARM_RUNS)
    progress.close()
    return {"workers": infos, "rows": rows, "small": small, "cold_start": cold}


def torch_installed():
    return importlib.util.find_spec("torch") is not None


def parse_threads(text):
    threads = sorted({int(t) for t in text.split(",")})
    limit = numba.config.NUMBA_NUM_THREADS
    if not threads or threads[0] < 1 or threads[-1] > limit:
        raise argparse.ArgumentTypeError(
            f"thread counts must be between 1 and NUMBA_NUM_THREADS={limit}, got {text!r}"
        )
    return threads


def select_cases(cases, shapes):
    """The cases named by a comma-separated filter: shape names, array shapes or layouts."""
    if shapes is None:
        return cases
    tokens = {t.strip() for t in shapes.split(",") if t.strip()}
    chosen = [
        c
        for c in cases
        if tokens & {c.name, "x".join(map(str, c.shape)), c.layout, c.label.replace(" ", ":")}
    ]
    if not chosen:
        names = ", ".join(c.label.replace(" ", ":") for c in BENCH_CASES)
        raise SystemExit(f"--shapes {shapes!r} matches no bench case; they are: {names}")
    return chosen


def parse_args(argv):
    default_threads = ",".join(map(str, sorted({1, numba.config.NUMBA_NUM_THREADS})))
    parser = argparse.ArgumentParser(
        prog="python -m fastbn.bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few shapes, float32, short budgets: 2-4 minutes",
    )
    parser.add_argument(
        "--shapes",
        help="comma-separated filter: shape names (4096x512), array shapes (512x4096), "
        "layouts (ff, bf, nchw, nhwc) or name:layout (4096x512:bf); with --torch: shapes"
        " (32x128), layouts (bf, nchw, nhwc), shape:layout, model names (resnet18, mobilenetv2,"
        " vgg11_bn, r3d18, cnn, mlp), model:format (resnet18:nhwc), models (the whole model"
        " table), small (its 64 px rows), large (its large-layer rows)",
    )
    parser.add_argument(
        "--dtype", choices=["float32", "float64", "both"], help="default: both (float32 --quick)"
    )
    parser.add_argument(
        "--threads",
        type=parse_threads,
        default=default_threads,
        help=f"comma-separated thread counts each peer runs at (default {default_threads})",
    )
    parser.add_argument(
        "--budget",
        type=float,
        help="seconds per call and thread count, over all its rounds (default 0.2, 0.05"
        " --quick; --torch: 0.5, 0.1 --quick, 4x for the models)",
    )
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument(
        "--plot", metavar="PATH", help="plot GB/s against size per pass (needs matplotlib)"
    )
    parser.add_argument(
        "--torch",
        action="store_true",
        help="PyTorch mode, a table of its own: fastbn.torch's modules vs torch.nn's BatchNorm"
        " (autograd train forward + backward, no_grad eval) and the model table, whole training"
        " steps of four models in NCHW and channels_last, each library at its default thread"
        " count (--threads and --plot do not apply)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="with --torch: the model table again under torch.compile(model), both peers,"
        " with each peer's compile time (a minute or more per model and format)",
    )
    parser.add_argument(
        "--numba-layer",
        choices=["omp", "tbb", "workqueue"],
        help="with --torch: NUMBA_THREADING_LAYER of the fastbn worker (default: numba's"
        " choice); tbb needs libtbb.so.12 of the tbb wheel on the loader's path:"
        f" LD_LIBRARY_PATH must contain {sys.prefix}/lib",
    )
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.numba_layer and not args.torch:
        parser.error("--numba-layer applies to --torch only")
    if args.compile and not args.torch:
        parser.error("--compile applies to --torch only")
    return args


def settings_from(args):
    if args.quick:
        cases = [c for c in BENCH_CASES if c.label in QUICK_CASE_LABELS]
    else:
        cases = BENCH_CASES
    dtype = args.dtype or ("float32" if args.quick else "both")
    peers = [p for p in WORKERS if p != "torch" or torch_installed()]
    return Settings(
        cases=select_cases(cases, args.shapes),
        dtypes=["float32", "float64"] if dtype == "both" else [dtype],
        threads=args.threads,
        budget=args.budget or (0.05 if args.quick else 0.2),
        peers=peers,
    )


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        serve(args.worker)
        return
    if args.torch:
        from fastbn.bench import torch_mode

        torch_mode.run(args)
        return
    settings = settings_from(args)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    results = measure(settings)
    results["machine"] = report.machine_info(results.pop("workers"), settings)
    results["settings"] = {
        "cases": [c.to_json() for c in settings.cases],
        "dtypes": settings.dtypes,
        "threads": settings.threads,
        "budget": settings.budget,
        "rounds": settings.rounds,
        "remeasures": settings.remeasures,
        "peers": settings.peers,
        "seconds": time.perf_counter() - started,
        "load_average": [load_before, os.getloadavg()[0]],
    }
    results["targets"] = report.evaluate_targets(results)
    print(report.format_report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.plot:
        report.plot(results["rows"], args.plot)
