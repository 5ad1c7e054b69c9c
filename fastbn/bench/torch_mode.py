"""The bench's PyTorch mode, ``python -m fastbn.bench --torch``: fastbn.torch's modules vs torch's.

Two peers, each a subprocess of its own (``python -m fastbn.bench.torch_mode
--worker PEER``, JSON jobs on stdin, one a line, JSON lines on stdout):

- ``torch``: torch.nn's BatchNorm1d / BatchNorm2d, and models built of them;
- ``fastbn``: the same modules and models, with the same seed, after
  ``fastbn.torch.convert(copy.deepcopy(...))``.

Rows, SPEC section 8:

- layer rows, for each of SPEC section 10's model shapes and float32 and
  float64: ``train``, one forward and ``y.backward(grad)`` through autograd
  in training mode (the input requires grad, grad is a fixed tensor), and
  ``eval``, one forward under ``torch.no_grad()`` in eval mode;
- model rows, float32: ``step``, one whole training step (zero_grad,
  forward, cross-entropy, backward, SGD step) of a small ResNet-style CNN on
  32x32x3 images (batch 32) and of an MLP 784-1024-1024-10 with BatchNorm1d
  after each hidden linear (batch 256).

Each row's ratio is torch / fastbn (> 1: fastbn faster); the layer rows'
geometric mean and SPEC section 8's three targets follow the table.

How it measures. Each library runs at its default thread count
(torch.get_num_threads(), numba's NUMBA_NUM_THREADS); ``--numba-layer``
sets NUMBA_THREADING_LAYER for the fastbn worker alone. A row's time is the
MEDIAN of all timed calls of its `ROUNDS` rounds: a worker makes one untimed
warm-up call when it builds a row's modules, then in each round timed calls
for budget / ROUNDS seconds (at least one); the rounds alternate between the
peers, and which peer goes first alternates too, so that both sample the same
moments of a shared machine.

FAIRNESS: why a process per peer, not one process alternating call by call.
Measured with scratch scripts (not kept), torch 2.13.0 and numba 0.68.1, on
the 2-core machine shared with other engineers' processes:

- One process is not neutral. Each peer alone in a process of its own, and
  both alternating call by call in a third, the three sampled in 40
  alternating rounds per row (load average 0.6 to 1.6): torch's own
  training step took 1.35x (ResNet) and 1.39x (MLP) its torch-only time
  when the process also ran the converted model (numba's tbb layer; 1.23x
  and 1.44x with omp), while fastbn's step was unchanged (0.98x to 1.02x).
  torch's (1024, 256) BatchNorm1d train took 2.1x under either layer. So
  one process reported the converted steps 1.31x to 1.40x faster where
  separate processes, in the same minutes, gave 0.94x to 1.09x. Numba's
  threads, still spinning after a fastbn call, hold the cores that torch's
  OpenMP threads then wait for; no torch-only program pays that.
- Separate processes cost precision. A/A, torch's BatchNorm against itself
  (load average 2 to 4): in one process the two agreed within 1% on serial
  rows and mostly within 10% (worst 1.7x) on rows with 2-thread regions; in
  two processes alternating 20 or 100 rounds per row, within 2% on serial
  rows but up to 3x apart on parallel rows, the same way round for a whole
  run. Under load a 2-thread region either takes its time (130 us for
  (1024, 256) train) or stalls about 70 ms for a descheduled thread, and two
  processes stall at different rates (4% and 8% of calls in one run, 59%
  and 69% in another).

So each peer has a process of its own, the program its user runs (the fastbn
worker's model rows have numba's pool beside torch's, as a converted model
has), and short alternating rounds share the machine's moments as far as
processes can. On a loaded machine the parallel rows are a lottery either
way: read them from a quiet one (the header gives the load average).
"""

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass

import numba

import fastbn
from fastbn import bench
from fastbn.bench import report

PEERS = ("torch", "fastbn")
LAYER_PASSES = ("train", "eval")
MODELS = ("resnet", "mlp")
MODEL_TEXT = {
    "resnet": "ResNet-style CNN, batch 32 of 3x32x32",
    "mlp": "MLP 784-1024-1024-10, batch 256",
}
LAYOUTS = {
    "bf": "batch-first (N, C), BatchNorm1d",
    "nchw": "(N, C, H, W) contiguous, BatchNorm2d",
    "nhwc": "the same in torch.channels_last memory format",
}
NUMBA_LAYERS = ("omp", "tbb", "workqueue")
ROUNDS = 20
MIN_RUNS = 3  # timed calls per row and peer, at least
SEED = 0
BUDGET = 0.5  # seconds per layer row and peer; the model rows get MODEL_BUDGET_FACTOR times it
QUICK_BUDGET = 0.1
MODEL_BUDGET_FACTOR = 4
LR = 0.01


@dataclass(frozen=True)
class TorchCase:
    """One layer input: a SPEC section 10 model shape in one layout (a key of `LAYOUTS`)."""

    shape: tuple
    layout: str

    @property
    def name(self):
        return "x".join(map(str, self.shape))

    @property
    def label(self):
        return f"{self.name} {self.layout}"

    def nbytes(self, dtype):
        return math.prod(self.shape) * (4 if dtype == "float32" else 8)

    def to_json(self):
        return {"shape": list(self.shape), "layout": self.layout}

    @classmethod
    def from_json(cls, d):
        return cls(tuple(d["shape"]), d["layout"])


LAYER_CASES = [
    *(TorchCase(s, "bf") for s in ((32, 128), (256, 64), (128, 512), (1024, 256), (256, 2048))),
    *(
        TorchCase(s, layout)
        for s in ((32, 64, 56, 56), (64, 256, 14, 14), (8, 512, 7, 7), (128, 64, 32, 32))
        for layout in ("nchw", "nhwc")
    ),
]
QUICK_LABELS = ("256x64 bf", "1024x256 bf", "64x256x14x14 nchw", "64x256x14x14 nhwc")


# --- worker side: one peer, one process ------------------------------------------------


def to_peer(peer, module):
    """The module a peer times: torch's own, or fastbn's built from a copy of it."""
    if peer == "torch":
        return module
    import fastbn.torch

    return fastbn.torch.convert(copy.deepcopy(module))


def layer_calls(peer, case, dtype, seed=SEED):
    """A peer's train (forward + backward) and eval (forward, no_grad) calls on one case."""
    import torch

    torch.manual_seed(seed)
    dtype = getattr(torch, dtype)
    n_channels = case.shape[1]
    bn = (torch.nn.BatchNorm1d if len(case.shape) == 2 else torch.nn.BatchNorm2d)(n_channels)
    bn = bn.to(dtype)
    with torch.no_grad():  # a trained layer's state, not the fresh ones and zeros
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_(0.0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    memory_format = torch.channels_last if case.layout == "nhwc" else torch.contiguous_format
    x = torch.randn(case.shape, dtype=dtype).contiguous(memory_format=memory_format)
    grad = torch.randn(case.shape, dtype=dtype).contiguous(memory_format=memory_format)
    x.requires_grad_(True)
    train_module = to_peer(peer, copy.deepcopy(bn).train())
    eval_module = to_peer(peer, copy.deepcopy(bn).eval())
    weight, bias = train_module.weight, train_module.bias

    def train():
        # Fresh gradients each call, as after zero_grad(set_to_none=True): no accumulation.
        x.grad = weight.grad = bias.grad = None
        train_module(x).backward(grad)

    def evaluate():
        with torch.no_grad():
            eval_module(x)

    return {"train": train, "eval": evaluate}


def make_model(name):
    """A fresh torch model: "resnet" (the small CNN) or "mlp"."""
    from torch import nn

    if name == "mlp":
        return nn.Sequential(
            nn.Linear(784, 1024),
            nn.BatchNorm1d(1024),
            nn.ReLU(),
            nn.Linear(1024, 1024),
            nn.BatchNorm1d(1024),
            nn.ReLU(),
            nn.Linear(1024, 10),
        )

    def conv_bn(c_in, c_out, stride=1, kernel=3):
        return [
            nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(c_out),
        ]

    class BasicBlock(nn.Module):
        """conv-BN-ReLU-conv-BN plus the shortcut (1x1 conv-BN where the shape changes), ReLU."""

        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.body = nn.Sequential(
                *conv_bn(c_in, c_out, stride), nn.ReLU(), *conv_bn(c_out, c_out)
            )
            changes = stride != 1 or c_in != c_out
            self.shortcut = (
                nn.Sequential(*conv_bn(c_in, c_out, stride, kernel=1))
                if changes
                else nn.Identity()
            )

        def forward(self, x):
            return (self.body(x) + self.shortcut(x)).relu()

    if name == "resnet":
        return nn.Sequential(
            *conv_bn(3, 16),
            nn.ReLU(),
            BasicBlock(16, 16, 1),
            BasicBlock(16, 32, 2),
            BasicBlock(32, 64, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, 10),
        )
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")


def model_calls(peer, name, seed=SEED):
    """A peer's training step of one model, float32."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    model = to_peer(peer, make_model(name)).train()
    batch = (32, 3, 32, 32) if name == "resnet" else (256, 784)
    inputs = torch.randn(batch)
    labels = torch.randint(0, 10, (batch[0],))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)

    def step():
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), labels).backward()
        optimizer.step()

    return {"step": step}


class Server:
    """A worker's state: the calls of the last row asked for, kept across its rounds."""

    def __init__(self, peer):
        self.peer = peer
        self.key = None
        self.calls = None

    def calls_for(self, job):
        """The calls of the job's row, and whether they were built just now."""
        key = json.dumps({k: job[k] for k in ("kind", "row", "dtype", "seed")}, sort_keys=True)
        new = key != self.key
        if new:
            self.key = self.calls = None  # free the last row's tensors first
            gc.collect()
            if job["kind"] == "layer":
                case = TorchCase.from_json(job["row"])
                self.calls = layer_calls(self.peer, case, job["dtype"], job["seed"])
            else:
                self.calls = model_calls(self.peer, job["row"], job["seed"])
            self.key = key
        return self.calls, new

    def info(self):
        """Versions and threads as this worker sees them (numba's layer after a parallel call)."""
        import torch

        info = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        }
        if self.peer == "fastbn":
            import numpy as np

            import fastbn.torch

            fastbn.batch_norm_train(np.ones((2, 1 << 16), np.float32))  # a parallel call
            info.update(
                numba=numba.__version__,
                threading_layer=numba.threading_layer(),
                numba_threads=numba.get_num_threads(),
                numba_threading_layer_env=os.environ.get("NUMBA_THREADING_LAYER"),
            )
        return info

    def answer(self, job):
        if job["kind"] == "info":
            return self.info()
        calls, new = self.calls_for(job)
        return {
            "times": {
                name: bench.sample_times(fn, job["budget"], job["min_runs"], warm_up=new)
                for name, fn in calls.items()
            }
        }


def serve(peer):
    """Answer JSON jobs from stdin, one a line, with one JSON line each on stdout."""
    import torch  # first, as in a user's program: torch's OpenMP is loaded before numba's

    replies = sys.stdout
    sys.stdout = sys.stderr  # a stray print must not corrupt the replies
    torch.manual_seed(SEED)
    server = Server(peer)
    for line in sys.stdin:
        try:
            reply = server.answer(json.loads(line))
        except Exception:
            reply = {"error": traceback.format_exc()}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


# --- driver side ----------------------------------------------------------------------


class Worker(bench.Worker):
    """A peer's subprocess, ``python -m fastbn.bench.torch_mode --worker PEER``."""

    MODULE = "fastbn.bench.torch_mode"


@dataclass
class Settings:
    """What one run measures."""

    cases: list
    dtypes: list
    models: list
    budget: float
    numba_layer: str | None = None
    rounds: int = ROUNDS


def worker_env(peer, numba_layer):
    """The environment of a peer's worker: NUMBA_THREADING_LAYER set for fastbn's alone."""
    env = dict(os.environ)
    if peer == "fastbn" and numba_layer:
        env["NUMBA_THREADING_LAYER"] = numba_layer
    return env


def measure_row(workers, job, rounds):
    """Each peer's timed calls of one row, pooled over rounds that alternate between the peers."""
    times = {w.peer: {} for w in workers}
    job = {**job, "budget": job["budget"] / rounds, "min_runs": -(-MIN_RUNS // rounds)}
    for r in range(rounds):
        for worker in workers if r % 2 == 0 else workers[::-1]:
            for call, t in worker.ask(job)["times"].items():
                times[worker.peer].setdefault(call, []).extend(t)
    return times


def make_rows(kind, label, dtype, nbytes, times):
    """One row per call from each peer's pooled times: medians, runs and torch / fastbn."""
    rows = []
    for call in times["torch"]:
        seconds = {peer: statistics.median(t[call]) for peer, t in times.items()}
        rows.append(
            {
                "kind": kind,
                "case": label,
                "dtype": dtype,
                "nbytes": nbytes,
                "pass": call,
                "seconds": seconds,
                "runs": {peer: len(t[call]) for peer, t in times.items()},
                "quartiles": {
                    peer: statistics.quantiles(t[call], n=4)[::2] if len(t[call]) > 1 else None
                    for peer, t in times.items()
                },
                "ratio": seconds["torch"] / seconds["fastbn"],
            }
        )
    return rows


def measure(settings, progress=None):
    """Run every measurement: returns "workers" (each peer's info) and "rows"."""
    n_steps = len(settings.cases) * len(settings.dtypes) + len(settings.models)
    progress = progress or bench.Progress(max(n_steps, 1))
    with contextlib.ExitStack() as stack:
        workers = []
        for peer in PEERS:
            workers.append(Worker(peer, worker_env(peer, settings.numba_layer)))
            stack.callback(workers[-1].close)
        infos = {w.peer: ask_info(w, settings.numba_layer) for w in workers}
        rows = []
        for case in settings.cases:
            for dtype in settings.dtypes:
                with progress.task(f"{case.label} {dtype}"):
                    job = {"kind": "layer", "row": case.to_json(), "dtype": dtype}
                    job.update(seed=SEED, budget=settings.budget)
                    times = measure_row(workers, job, settings.rounds)
                rows += make_rows("layer", case.label, dtype, case.nbytes(dtype), times)
        for name in settings.models:
            with progress.task(f"{name} training step"):
                job = {"kind": "model", "row": name, "dtype": "float32", "seed": SEED}
                job["budget"] = MODEL_BUDGET_FACTOR * settings.budget
                times = measure_row(workers, job, settings.rounds)
            rows += make_rows("model", name, "float32", None, times)
    progress.close()
    return {"workers": infos, "rows": rows}


def ask_info(worker, numba_layer):
    try:
        return worker.ask({"kind": "info"})
    except RuntimeError as e:
        if worker.peer == "fastbn" and numba_layer == "tbb":
            raise RuntimeError(
                f"{e}\nThe tbb threading layer needs libtbb.so.12 on the loader's path: with"
                " the tbb wheel in a venv, LD_LIBRARY_PATH=$VIRTUAL_ENV/lib"
            ) from None
        raise


# --- the results ----------------------------------------------------------------------


def geometric_mean(ratios):
    return math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None


def evaluate_targets(rows):
    """SPEC section 8's fastbn.torch targets: MET (True), NOT MET (False), not measured (None)."""
    layer = [r for r in rows if r["kind"] == "layer"]
    models = {r["case"]: r for r in rows if r["kind"] == "model"}
    g = geometric_mean([r["ratio"] for r in layer])
    text = "layer rows, geometric mean of torch / fastbn >= 1.3x"
    geomean = (
        report.target(text, g >= 1.3, f"{g:.2f}x over {len(layer)} rows")
        if layer
        else report.target(text, None, "not measured in this run")
    )
    text = "training step faster than torch's, both models (> 1.0x)"
    if set(models) == set(MODELS):
        steps = report.target(
            text,
            all(r["ratio"] > 1.0 for r in models.values()),
            ", ".join(f"{name} {models[name]['ratio']:.2f}x" for name in MODELS),
        )
    else:
        steps = report.target(text, None, "not measured in this run")
    return [
        report.worst_row("layer rows, every row torch / fastbn", layer, ratio_of, ">=", 1.0),
        geomean,
        steps,
    ]


def ratio_of(row):
    return row["ratio"]


def format_header(results):
    m = results["machine"]
    s = results["settings"]
    env_layer = m.get("numba_threading_layer_env")
    chosen = f"NUMBA_THREADING_LAYER={env_layer}" if env_layer else "numba's default choice"
    return "\n".join(
        [
            f"fastbn {m['fastbn']} benchmark, PyTorch mode: fastbn.torch vs torch.nn;"
            " all times are MEDIANS of repeated calls (per row and peer one warm-up call,"
            f" then {s['rounds']} rounds of >= {s['budget'] / s['rounds']:.3g} s of calls"
            f" ({MODEL_BUDGET_FACTOR}x for models), >= {MIN_RUNS} calls in all)",
            f"machine: {m['cpu_count']} CPUs ({m['cpu_model']}); python {m['python']},"
            f" torch {m['torch']} (torch.get_num_threads() = {m['torch_threads']}),"
            f" numba {m['numba']} (numba.threading_layer() = {m['threading_layer']}, {chosen};"
            f" {m['numba_threads']} threads)",
            "peers: torch = torch.nn's layers; fastbn = fastbn.torch.convert(copy.deepcopy(...))"
            " of the same; each in a subprocess of its own at its library's default threads,"
            f" the rounds of a row alternating between them; run took {s['seconds']:.0f} s,"
            f" load average {s['load_average'][0]:.2f} before, {s['load_average'][1]:.2f} after"
            " (the machine's other processes stall 2-thread regions)",
            "passes: train = forward + y.backward(grad) through autograd, training mode, input"
            " requires grad; eval = forward under torch.no_grad(); step = zero_grad, forward,"
            " cross-entropy, backward, SGD step",
            "layouts: " + "; ".join(f"{k} = {v}" for k, v in LAYOUTS.items()),
            "models (float32): " + "; ".join(f"{k} = {v}" for k, v in MODEL_TEXT.items()),
            "xTorch = torch / fastbn (> 1: fastbn faster); runs = timed calls, torch/fastbn",
        ]
    )


COLUMNS = (
    ("case", "<20"),
    ("dtype", "<7"),
    ("MiB", ">6"),
    ("pass", "<5"),
    ("torch", ">9"),
    ("fastbn", ">9"),
    ("xTorch", ">6"),
    ("runs", ">9"),
)


def table_cells(row):
    seconds, runs = row["seconds"], row["runs"]
    return (
        row["case"],
        row["dtype"],
        "-" if row["nbytes"] is None else f"{row['nbytes'] / (1 << 20):.2f}",
        row["pass"],
        report.format_time(seconds["torch"]),
        report.format_time(seconds["fastbn"]),
        report.format_ratio(row["ratio"]),
        f"{runs['torch']}/{runs['fastbn']}",
    )


def format_report(results):
    layer = [r["ratio"] for r in results["rows"] if r["kind"] == "layer"]
    g = geometric_mean(layer)
    geomean = (
        f"geometric mean of xTorch over the {len(layer)} layer rows: {g:.2f}x"
        if layer
        else "no layer rows in this run"
    )
    return "\n\n".join(
        [
            format_header(results),
            report.format_table(results["rows"], COLUMNS, table_cells),
            geomean,
            report.format_targets(results["targets"]),
        ]
    )


# --- the command ----------------------------------------------------------------------


def select(cases, models, shapes):
    """The layer cases and models named by a comma-separated filter (None: all of them).

    Tokens: shapes (32x128), layouts (bf, nchw, nhwc), shape:layout
    (64x256x14x14:nhwc), model names (resnet, mlp) or "models".
    """
    if shapes is None:
        return cases, models
    tokens = {t.strip() for t in shapes.split(",") if t.strip()}
    chosen = [c for c in cases if tokens & {c.name, c.layout, c.label.replace(" ", ":")}]
    chosen_models = [m for m in models if tokens & {m, "models"}]
    if not chosen and not chosen_models:
        names = ", ".join([*(c.label.replace(" ", ":") for c in LAYER_CASES), *MODELS])
        raise SystemExit(f"--shapes {shapes!r} matches no torch-mode row; they are: {names}")
    return chosen, chosen_models


def settings_from(args):
    cases = [c for c in LAYER_CASES if c.label in QUICK_LABELS] if args.quick else LAYER_CASES
    cases, models = select(cases, list(MODELS), args.shapes)
    dtype = args.dtype or ("float32" if args.quick else "both")
    return Settings(
        cases=cases,
        dtypes=["float32", "float64"] if dtype == "both" else [dtype],
        models=models,
        budget=args.budget or (QUICK_BUDGET if args.quick else BUDGET),
        numba_layer=args.numba_layer,
    )


def machine_info(workers):
    info = {"fastbn": fastbn.__version__, "cpu_count": os.cpu_count()}
    info["cpu_model"] = report.cpu_model()
    info.update(workers["torch"])
    info.update(workers["fastbn"])  # the same python and torch; numba's threads and layer
    return info


def run(args):
    """``python -m fastbn.bench --torch`` with bench's parsed arguments: print, write JSON."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise SystemExit("--torch needs torch: pip install -e '.[torch]'")
    settings = settings_from(args)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    results = measure(settings)
    results["machine"] = machine_info(results.pop("workers"))
    results["settings"] = {
        "cases": [c.to_json() for c in settings.cases],
        "dtypes": settings.dtypes,
        "models": settings.models,
        "budget": settings.budget,
        "rounds": settings.rounds,
        "min_runs": MIN_RUNS,
        "numba_layer": settings.numba_layer,
        "seconds": time.perf_counter() - started,
        "load_average": [load_before, os.getloadavg()[0]],
    }
    layer = [r["ratio"] for r in results["rows"] if r["kind"] == "layer"]
    results["geometric_mean"] = geometric_mean(layer)
    results["targets"] = evaluate_targets(results["rows"])
    print(format_report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastbn.bench.torch_mode")
    parser.add_argument("--worker", choices=PEERS, required=True)
    serve(parser.parse_args(argv).worker)


if __name__ == "__main__":
    main()
