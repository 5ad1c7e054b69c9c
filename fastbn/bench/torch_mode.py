"""The bench's PyTorch mode, ``python -m fastbn.bench --torch``: fastbn.torch's modules vs torch's.

Two peers, each a subprocess of its own (``python -m fastbn.bench.torch_mode
--worker PEER``, JSON jobs on stdin, one a line, JSON lines on stdout):

- ``torch``: torch.nn's BatchNorm1d / BatchNorm2d, and models built of them;
- ``fastbn``: the same modules and models, with the same seed, after
  ``fastbn.torch.convert(copy.deepcopy(...))`` with its default settings;

and a third process, `AGAIN`, a second torch worker timing torch's calls
again in the same rounds (not under ``--compile``): torch against itself,
the noise floor of the row's ratio.

Rows (docs/guide/contract.md, Performance targets):

- layer rows, for each of the contract's layer shapes and float32 and
  float64: ``train``, one forward and ``y.backward(grad)`` through autograd
  in training mode (the input requires grad, grad is a fixed tensor), and
  ``eval``, one forward under ``torch.no_grad()`` in eval mode;
- the model table, float32: ``step``, one whole training step
  (``optimizer.zero_grad(set_to_none=True)``, forward, cross-entropy,
  backward, SGD step with momentum 0.9) of each model of `MODELS`
  (`fastbn.bench.models`: a ResNet-18 and a MobileNetV2 as torchvision
  defines them, on batches of 16 64x64 images; the small ResNet-style CNN on
  32 32x32 images; the MLP 784-1024-1024-10 on 256 examples), the image
  models in NCHW and in channels_last (model and input
  ``.to(memory_format=torch.channels_last)``), the MLP on its 2-D input;
- batch norm's share of each step: the same model with every BatchNorm
  replaced by ``nn.Identity`` (built from torch's model, so the same program
  in both workers) is timed in each worker's rounds beside the step, and the
  share is (step - step without BN) / step, for torch's model and for the
  converted one. The two workers' steps without BN are one program timed in
  two processes: how far apart they are is the run's process bias;
- ``--compile``: the model table again with each peer's models (and the
  models without BN) under ``torch.compile(model)``, default mode: the
  model is compiled, the optimizer step stays eager. A peer's compile time
  is the wall time of its first step (dynamo, AOTAutograd, inductor and the
  step itself). Each worker has an inductor cache of its own, empty when the
  run starts (TORCHINDUCTOR_CACHE_DIR, a temporary directory): every compile
  is cold, and both peers pay inductor's one-off costs (its precompiled
  header, its compile workers' start) in their first compiled row. A shared
  cache would hand those to whichever peer compiled second.

Each row's ratio is torch / fastbn (> 1: fastbn faster), and its noise
floor torch / torch again (the A/A column); geometric means and the
contract's targets follow the tables: every layer row >= 1.0x and their
geometric mean >= 1.3x; the small CNN and the MLP faster than torch's;
every model of the model table >= 1.0x in both formats and its geometric
mean >= 1.15x; under ``--compile`` every model >= 1.0x.

How it measures. Each library runs at its default thread count
(torch.get_num_threads(), numba's NUMBA_NUM_THREADS); ``--numba-layer``
sets NUMBA_THREADING_LAYER for the fastbn worker alone. A worker times its
first call of each of a row's calls when it builds the row (under
``--compile`` the compile), makes one more untimed warm-up call, then in
each of the row's `ROUNDS` rounds timed calls for budget / ROUNDS seconds
(at least one); each round runs every worker once, each round another
first, so that all sample the same moments of a shared machine. A round's
time is the median of its calls; a row's time is the MEDIAN over its
rounds, its ratios the median of the round-by-round ratios, each with its
spread (`fastbn.bench.stats`). A row whose ratio's spread is wider than
`report.WIDE` of its median, or whose torch against itself is off 1.0x
beyond its spread, is measured again (`ROUNDS` more rounds, at most
`REMEASURES` times).

The targets on every row (no row slower) take 1.0x within the spread of
torch against itself, as the contract words them, as a band: from the
row's `noise_floor`, the lowest that torch against itself reads within its
spread, to 1.0x. A row is NOT MET only when its ratio's whole spread is
below the band (slower beyond its own noise and torch's against itself),
MET only when it is wholly at or above 1.0x, and WITHIN NOISE otherwise: a
row that torch against itself cannot tell from torch is not called slower,
nor is it called MET, so that a noisy run, whose floor is low, does not
turn a NOT MET of a quiet run into MET (`stats.verdict` with a band).
"Faster than torch's" mirrors it: MET wholly above 1 / the floor, NOT MET
wholly at or below 1.0x. The compiled table, which has no second torch
worker (a third cold compile of every model), holds its rows to 1.0x
within their own spread.

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

The model table keeps this design although issue 18 asked for torch's model
and the converted one interleaved in one process: in one process torch's
step pays for numba's spinning threads, which inflates torch's time and
favours fastbn. Here the fastbn worker's steps pay for numba's threads beside
torch's, as a converted model in a user's program does, and torch's steps do
not, as torch's users' do not.
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
import tempfile
import time
import traceback
from dataclasses import dataclass, replace

import numba

import fastbn
from fastbn import bench
from fastbn.bench import report, stats

PEERS = ("torch", "fastbn")
AGAIN = "torch again"  # the second torch worker: torch against itself
LAYER_PASSES = ("train", "eval")
# name -> (input shape of a step, text for the report); architectures in fastbn.bench.models
MODEL_INPUTS = {
    "resnet18": (
        (16, 3, 64, 64),
        "ResNet-18 (torchvision's: full width, 20 BN), batch 16 of 3x64x64",
    ),
    "mobilenetv2": (
        (16, 3, 64, 64),
        "MobileNetV2 (torchvision's: width 1.0, all 17 blocks, 52 BN, no dropout),"
        " batch 16 of 3x64x64",
    ),
    "cnn": (
        (32, 3, 32, 32),
        "small ResNet-style CNN (16-32-64 channels, 9 BN), batch 32 of 3x32x32",
    ),
    "mlp": ((256, 784), "MLP 784-1024-1024-10 (2 BatchNorm1d), batch 256"),
}
MODELS = tuple(MODEL_INPUTS)
N_CLASSES = 10
LAYOUTS = {
    "bf": "batch-first (N, C), BatchNorm1d",
    "nchw": "(N, C, H, W) contiguous, BatchNorm2d",
    "nhwc": "the same in torch.channels_last memory format",
}
MODEL_CALLS = ("step", "identity")  # the step, and the same step with every BN an nn.Identity
NUMBA_LAYERS = ("omp", "tbb", "workqueue")
ROUNDS = 20
REMEASURES = 1  # times a row is measured again, at most
MIN_RUNS = 3  # timed calls per row and peer, at least
SEED = 0
BUDGET = 0.5  # seconds per layer row and peer; the model rows get MODEL_BUDGET_FACTOR times it
QUICK_BUDGET = 0.1
MODEL_BUDGET_FACTOR = 4
LR = 0.01
MODEL_TABLE_GEOMEAN = 1.15  # the contract's target for the model table's geometric mean


@dataclass(frozen=True)
class TorchCase:
    """One layer input: one of the contract's layer shapes in one layout (a key of `LAYOUTS`)."""

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


def model_formats(name):
    """The formats a model runs in: images NCHW and channels_last, the MLP its 2-D input."""
    return ("bf",) if len(MODEL_INPUTS[name][0]) == 2 else ("nchw", "nhwc")


@dataclass(frozen=True)
class ModelCase:
    """One row of the model table: a model of `MODELS` in one format, eager or compiled."""

    model: str
    format: str
    compiled: bool = False

    @property
    def label(self):
        return f"{self.model} {self.format}" + (" compiled" if self.compiled else "")

    def to_json(self):
        return {"model": self.model, "format": self.format, "compiled": self.compiled}

    @classmethod
    def from_json(cls, d):
        return cls(d["model"], d["format"], d["compiled"])


MODEL_CASES = [ModelCase(m, f) for m in MODELS for f in model_formats(m)]


# --- worker side: one peer, one process ------------------------------------------------


def to_peer(peer, module):
    """The module a peer times: torch's own, or fastbn's built from a copy of it."""
    if peer == "torch":
        return module
    import fastbn.torch

    return fastbn.torch.convert(copy.deepcopy(module))


def implementation_of(case, dtype, row):
    """What a converted layer runs on a layer row's call by default: "fastbn" (its kernels)
    or "torch" (torch's op), as `fastbn.torch.dispatch` chooses."""
    import torch

    from fastbn.torch import dispatch

    memory_format = torch.channels_last if case.layout == "nhwc" else torch.contiguous_format
    x = torch.empty(case.shape, dtype=getattr(torch, dtype), memory_format=memory_format)
    return "fastbn" if dispatch.takes_kernels("auto", x, row["pass"] == "train") else "torch"


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


def model_input_shape(name, batch=None):
    """A model's input shape, with another batch size if one is given (the tests' tiny runs)."""
    shape = MODEL_INPUTS[name][0]
    return shape if batch is None else (batch, *shape[1:])


def training_step(model, inputs, labels, compiled=False):
    """One SGD training step of the model (under torch.compile if compiled); returns the loss."""
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    forward = torch.compile(model) if compiled else model

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(inputs), labels)
        loss.backward()
        optimizer.step()
        return loss

    return step


def model_calls(peer, case, seed=SEED, batch=None):
    """A peer's training step of one model-table row, and the step of the model without BN.

    Both models start from the same torch model (the seed's weights); the
    one without BN has every BatchNorm replaced by nn.Identity before any
    conversion, so it is the same program for both peers. float32.
    """
    import torch

    from fastbn.bench import models

    torch.manual_seed(seed)
    base = models.make_model(case.model)
    shape = model_input_shape(case.model, batch)
    inputs = torch.randn(shape)
    labels = torch.randint(0, N_CLASSES, (shape[0],))
    memory_format = torch.channels_last if case.format == "nhwc" else torch.contiguous_format
    inputs = inputs.contiguous(memory_format=memory_format)
    built = {
        "step": to_peer(peer, copy.deepcopy(base)),
        "identity": models.without_bn(copy.deepcopy(base)),
    }
    return {
        call: training_step(
            model.train().to(memory_format=memory_format), inputs, labels, case.compiled
        )
        for call, model in built.items()
    }


def first_call_seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Server:
    """A worker's state: the calls of the last row asked for, kept across its rounds."""

    def __init__(self, peer):
        self.peer = peer
        self.key = None
        self.calls = None

    def calls_for(self, job):
        """The calls of the job's row, and whether they were built just now."""
        fields = ("kind", "row", "dtype", "seed", "batch")
        key = json.dumps({k: job.get(k) for k in fields}, sort_keys=True)
        new = key != self.key
        if new:
            self.key = self.calls = None  # free the last row's tensors first
            gc.collect()
            if job["kind"] == "layer":
                case = TorchCase.from_json(job["row"])
                self.calls = layer_calls(self.peer, case, job["dtype"], job["seed"])
            else:
                case = ModelCase.from_json(job["row"])
                if case.compiled:
                    import torch._dynamo

                    torch._dynamo.reset()  # each row compiles from the same state
                self.calls = model_calls(self.peer, case, job["seed"], job.get("batch"))
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
        """A row job's timed calls (those of job["calls"] if it names some); a new row's first
        calls, timed, under "first"."""
        if job["kind"] == "info":
            return self.info()
        calls, new = self.calls_for(job)
        reply = {}
        if new:  # the first call of each (under --compile: the compile), then one warm-up each
            reply["first"] = {name: first_call_seconds(fn) for name, fn in calls.items()}
        names = job.get("calls") or list(calls)
        reply["times"] = {
            name: bench.sample_times(calls[name], job["budget"], job["min_runs"], warm_up=new)
            for name in names
        }
        return reply


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
    """A peer's subprocess, ``python -m fastbn.bench.torch_mode --worker PEER``; ``name``
    tells two workers of one peer apart (default: the peer)."""

    MODULE = "fastbn.bench.torch_mode"

    def __init__(self, peer, env=None, name=None):
        super().__init__(peer, env)
        self.name = name or peer


@dataclass
class Settings:
    """What one run measures: layer cases and dtypes, model-table rows (eager; compiled too
    with ``compile``), budgets, the fastbn worker's numba layer, and a batch size replacing
    every model's own (None: theirs; the tests' tiny runs)."""

    cases: list
    dtypes: list
    models: list
    budget: float
    numba_layer: str | None = None
    rounds: int = ROUNDS
    compile: bool = False
    batch: int | None = None
    remeasures: int = REMEASURES

    def model_rows(self):
        """The model-table rows in the order measured: eager, then compiled."""
        compiled = [replace(c, compiled=True) for c in self.models] if self.compile else []
        return [*self.models, *compiled]


def worker_env(peer, numba_layer, inductor_cache=None):
    """The environment of a peer's worker: NUMBA_THREADING_LAYER set for fastbn's alone,
    TORCHINDUCTOR_CACHE_DIR when given."""
    env = dict(os.environ)
    if peer == "fastbn" and numba_layer:
        env["NUMBA_THREADING_LAYER"] = numba_layer
    if inductor_cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache
    return env


def measure_rounds(workers, job, rounds, times, first):
    """Rounds of one row: in each every worker in turn, each round another first.

    ``rounds`` are the rounds' numbers. Adds to ``times`` (worker name ->
    call -> a list of each round's timed calls) and to ``first`` (worker
    name -> call -> seconds of its first call, the workers' "first"). The
    `AGAIN` worker times only the calls of the row's ratios,
    ``job["ratio_calls"]``.
    """
    job = {**job, "budget": job["budget"] / len(rounds), "min_runs": -(-MIN_RUNS // len(rounds))}
    for r in rounds:
        start = r % len(workers)
        for worker in workers[start:] + workers[:start]:
            asked = {**job, "calls": job["ratio_calls"]} if worker.name == AGAIN else job
            reply = worker.ask(asked)
            first.setdefault(worker.name, {}).update(reply.get("first", {}))
            for call, t in reply["times"].items():
                times.setdefault(worker.name, {}).setdefault(call, []).append(t)


def measure_row(workers, job, settings):
    """Each worker's timed calls of one row, round by round, with more rounds while
    `remeasure_reasons` holds (at most ``settings.remeasures`` times).

    Returns
    -------
    times : dict
        worker name -> call -> a list per round of its timed calls.
    first : dict
        worker name -> call -> seconds of the first call.
    """
    times, first = {}, {}
    for attempt in range(settings.remeasures + 1):
        rounds = range(attempt * settings.rounds, (attempt + 1) * settings.rounds)
        measure_rounds(workers, job, rounds, times, first)
        rows = make_rows(job["kind"], "", job["dtype"], None, times)
        if not remeasure_reasons([r for r in rows if r["pass"] in job["ratio_calls"]]):
            break
    return times, first


def round_medians(times):
    return [statistics.median(t) for t in times]


def make_rows(kind, label, dtype, nbytes, times):
    """One row per call of torch's: medians over the rounds, runs, the ratio torch / fastbn
    and torch against itself (torch / `AGAIN`, when that worker timed the call), each ratio
    an estimate of the round-by-round ratios (`fastbn.bench.stats`)."""
    rows = []
    for call in times["torch"]:
        rounds = {peer: round_medians(t[call]) for peer, t in times.items() if call in t}
        rows.append(
            {
                "kind": kind,
                "case": label,
                "dtype": dtype,
                "nbytes": nbytes,
                "pass": call,
                "seconds": {peer: statistics.median(r) for peer, r in rounds.items()},
                "rounds": rounds,
                "runs": {peer: sum(map(len, t[call])) for peer, t in times.items() if call in t},
                "ratio": report.ratio(rounds["torch"], rounds["fastbn"]),
                "noise": report.ratio(rounds["torch"], rounds[AGAIN]) if AGAIN in rounds else None,
            }
        )
    return rows


def remeasure_reasons(rows):
    """Why a row is measured again: its ratio's spread is wider than `report.WIDE` of its
    median, or torch against itself is off 1.0x beyond its spread."""
    reasons = []
    for row in rows:
        if stats.relative_spread(row["ratio"]) > report.WIDE:
            reasons.append(f"{row['pass']}: xTorch wide")
        if row["noise"] is not None and not row["noise"]["low"] <= 1.0 <= row["noise"]["high"]:
            reasons.append(f"{row['pass']}: torch against itself off 1.0x")
    return reasons


def make_model_row(case, times, first):
    """The model-table row of one case: the step's row, with the step without BN, batch
    norm's share of the step and the first calls (the compile under --compile) attached."""
    rows = {r["pass"]: r for r in make_rows("model", case.label, "float32", None, times)}
    row = rows["step"]
    row.update(model=case.model, format=case.format, compiled=case.compiled, first_call=first)
    identity = rows.get("identity")
    row["identity_seconds"] = identity["seconds"] if identity else None
    row["bn_share"] = (
        {p: (row["seconds"][p] - s) / row["seconds"][p] for p, s in identity["seconds"].items()}
        if identity
        else None
    )
    return row


def measure(settings, progress=None):
    """Run every measurement: returns "workers" (each peer's info) and "rows"."""
    model_rows = settings.model_rows()
    n_steps = len(settings.cases) * len(settings.dtypes) + len(model_rows)
    progress = progress or bench.Progress(max(n_steps, 1))
    with contextlib.ExitStack() as stack:
        workers = []
        for peer, name in [(peer, peer) for peer in PEERS] + [("torch", AGAIN)]:
            # An inductor cache of its own, empty at the start (see the docstring).
            cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="fastbn-bench-"))
            workers.append(Worker(peer, worker_env(peer, settings.numba_layer, cache), name))
            stack.callback(workers[-1].close)
        infos = {w.name: ask_info(w, settings.numba_layer) for w in workers}
        rows = []
        for case in settings.cases:
            for dtype in settings.dtypes:
                with progress.task(f"{case.label} {dtype}"):
                    job = {"kind": "layer", "row": case.to_json(), "dtype": dtype}
                    job.update(seed=SEED, budget=settings.budget, ratio_calls=list(LAYER_PASSES))
                    times, _ = measure_row(workers, job, settings)
                for row in make_rows("layer", case.label, dtype, case.nbytes(dtype), times):
                    rows.append({**row, "implementation": implementation_of(case, dtype, row)})
        for case in model_rows:
            with progress.task(f"{case.label} training step"):
                job = {"kind": "model", "row": case.to_json(), "dtype": "float32", "seed": SEED}
                job.update(budget=MODEL_BUDGET_FACTOR * settings.budget, batch=settings.batch)
                job.update(ratio_calls=["step"])
                # No second torch worker under torch.compile: a third cold compile of each model.
                row_workers = [w for w in workers if not (case.compiled and w.name == AGAIN)]
                times, first = measure_row(row_workers, job, settings)
            rows.append(make_model_row(case, times, first))
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


def ratio_rounds(row):
    """A row's torch / fastbn, round by round."""
    return stats.paired_ratios(row["rounds"]["torch"], row["rounds"]["fastbn"])


def geometric_mean(rows):
    """The geometric mean of torch / fastbn over rows, round by round: an estimate, or None."""
    if not rows:
        return None
    return stats.estimate(stats.geometric_mean_rounds([ratio_rounds(r) for r in rows]))


def model_table(rows, compiled=False):
    return [r for r in rows if r["kind"] == "model" and r.get("compiled", False) == compiled]


def noise_floor(row):
    """The lowest torch / fastbn that may still be 1.0x in a row: the lowest that torch
    against itself reads within its spread, either way round (torch / torch again, and the
    inverse), at most 1.0; 1.0 where no second torch worker ran (the compiled rows)."""
    noise = row["noise"]
    if noise is None:
        return 1.0
    return min(1.0, noise["low"], 1 / noise["high"])


def not_slower_band(row):
    """The band of >= 1.0x within the spread of torch against itself: a row is MET wholly
    above 1.0x, NOT MET wholly below its `noise_floor`, WITHIN NOISE in between."""
    return (noise_floor(row), 1.0)


def faster_band(row):
    """The band of > 1.0x beyond the spread of torch against itself: a row is MET wholly
    above 1 / its `noise_floor`, NOT MET wholly at or below 1.0x."""
    return (1.0, 1 / noise_floor(row))


def ratio_of(row):
    return row["ratio"]


def every_row(text, rows):
    """No row slower: each row's torch / fastbn >= 1.0x within the spread of torch against
    itself (`not_slower_band`, `report.ranked_verdicts`)."""
    text = f"{text} >= 1.0x"
    if not rows:
        return report.target(text, None, "not measured in this run")
    met, row = report.ranked_verdicts(rows, ratio_of, ">=", not_slower_band)
    worst = "worst " if met != stats.NOISE else "undecided: "
    measured = f"{worst}{report.format_range(row['ratio'])} ({report.label(row)})"
    if row["noise"] is not None:
        measured += f", torch against itself {report.format_range(row['noise'])}"
    return report.target(text, met, measured)


def geometric_mean_target(text, rows, limit):
    g = geometric_mean(rows)
    measured = f"{report.format_range(g)} over {len(rows)} rows"
    return report.target(text, stats.verdict(g, ">=", limit), measured)


def evaluate_targets(rows):
    """The contract's fastbn.torch targets: MET (True), NOT MET (False), `stats.NOISE` (the
    spread holds the limit) or not measured (None).

    The rows' targets (`every_row`): every row >= 1.0x within the spread of
    torch against itself, layer rows, the model table eager and compiled.
    The geometric means: the layer rows' >= 1.3x and the eager model
    table's >= 1.15x, over the whole table only (a subset is not measured).
    The original step target: the small CNN (NCHW) and the MLP faster than
    torch's beyond the spread of torch against itself (`faster_band`).
    """
    layer = [r for r in rows if r["kind"] == "layer"]
    eager = model_table(rows)
    compiled = model_table(rows, compiled=True)
    text = "layer rows, geometric mean of torch / fastbn >= 1.3x"
    geomean = (
        geometric_mean_target(text, layer, 1.3)
        if layer
        else report.target(text, None, "not measured in this run")
    )
    text = "training step faster than torch's, small CNN (nchw) and MLP (> 1.0x)"
    steps_of = {r["case"]: r for r in eager}
    originals = [steps_of.get(c.label) for c in (ModelCase("cnn", "nchw"), ModelCase("mlp", "bf"))]
    if all(originals):
        steps = report.target(
            text,
            stats.every(stats.verdict(r["ratio"], ">", faster_band(r)) for r in originals),
            ", ".join(f"{r['case']} {report.format_range(r['ratio'])}" for r in originals),
        )
    else:
        steps = report.target(text, None, "not measured in this run")
    text = f"model table, geometric mean of torch / fastbn >= {MODEL_TABLE_GEOMEAN}x"
    if len(eager) == len(MODEL_CASES):
        table_geomean = geometric_mean_target(text, eager, MODEL_TABLE_GEOMEAN)
    else:
        table_geomean = report.target(
            text, None, f"not measured: {len(eager)} of the {len(MODEL_CASES)} rows in this run"
        )
    return [
        every_row("layer rows, every row torch / fastbn", layer),
        geomean,
        steps,
        every_row("model table, every model and format", eager),
        table_geomean,
        every_row("model table under torch.compile, every model and format", compiled),
    ]


def format_header(results):
    m = results["machine"]
    s = results["settings"]
    env_layer = m.get("numba_threading_layer_env")
    chosen = f"NUMBA_THREADING_LAYER={env_layer}" if env_layer else "numba's default choice"
    models = [f"{k} = {text}" for k, (_, text) in MODEL_INPUTS.items()]
    batch = s.get("batch")
    if batch is not None:
        models.append(f"here every model at batch {batch}")
    return "\n".join(
        [
            f"fastbn {m['fastbn']} benchmark, PyTorch mode: fastbn.torch vs torch.nn;"
            f" all times are MEDIANS over {s['rounds']} rounds (more for a row measured"
            " again) of each round's median of repeated calls (per row and peer a first call"
            f" and a warm-up call, then rounds of >= {s['budget'] / s['rounds']:.3g} s of calls"
            f" ({MODEL_BUDGET_FACTOR}x for models), >= {MIN_RUNS} calls in all); ±: the farther"
            f" end of the median's {stats.CONFIDENCE:.0%} interval (times in %), ratios taken"
            " round by round",
            f"machine: {m['cpu_count']} CPUs ({m['cpu_model']}); python {m['python']},"
            f" torch {m['torch']} (torch.get_num_threads() = {m['torch_threads']}),"
            f" numba {m['numba']} (numba.threading_layer() = {m['threading_layer']}, {chosen};"
            f" {m['numba_threads']} threads)",
            "peers: torch = torch.nn's layers; fastbn = fastbn.torch.convert(copy.deepcopy(...))"
            " of the same; torch again = torch's in a second worker (none for compiled rows);"
            " each in a subprocess of its own at its library's default threads, each round of"
            f" a row through all of them, another first each round; run took {s['seconds']:.0f} s,"
            f" load average {s['load_average'][0]:.2f} before, {s['load_average'][1]:.2f} after"
            " (the machine's other processes stall 2-thread regions)",
            "passes: train = forward + y.backward(grad) through autograd, training mode, input"
            " requires grad; eval = forward under torch.no_grad(); step = zero_grad(set_to_none"
            "=True), forward, cross-entropy, backward, SGD step (momentum 0.9)",
            "layouts: " + "; ".join(f"{k} = {v}" for k, v in LAYOUTS.items()),
            "models (float32; nchw and nhwc = model and input in that memory format, bf = the"
            " MLP's 2-D input): " + "; ".join(models),
            "BN share = (step - the same step with every BatchNorm an nn.Identity, timed in the"
            " same worker) / step; compiled = torch.compile(model), default mode, the optimizer"
            " eager; compile = a peer's first step, inductor cache empty at the run's start",
            "xTorch = torch / fastbn (> 1: fastbn faster); A/A = torch / torch again, torch"
            " against itself: the noise floor, a row counts as >= 1.0x down to the lowest A/A"
            " reads in its spread (either way round); runs = timed calls, torch/fastbn",
        ]
    )


COLUMNS = (
    ("case", "<20"),
    ("dtype", "<7"),
    ("MiB", ">6"),
    ("pass", "<5"),
    ("torch", ">12"),
    ("fastbn", ">12"),
    ("xTorch", ">10"),
    ("A/A", ">10"),
    ("runs", ">9"),
    ("impl", "<6"),
)


def time_cells(row):
    """torch's and fastbn's times, each with its spread, and the ratios torch / fastbn and
    torch / torch again (A/A), each with its spread."""
    rounds = row["rounds"]
    return (
        report.format_time_spread(stats.estimate(rounds["torch"])),
        report.format_time_spread(stats.estimate(rounds["fastbn"])),
        report.format_ratio(row["ratio"]),
        report.format_ratio(row["noise"]),
    )


def table_cells(row):
    runs = row["runs"]
    return (
        row["case"],
        row["dtype"],
        "-" if row["nbytes"] is None else f"{row['nbytes'] / (1 << 20):.2f}",
        row["pass"],
        *time_cells(row),
        f"{runs['torch']}/{runs['fastbn']}",
        row.get("implementation", "-"),
    )


MODEL_COLUMNS = (
    ("model", "<12"),
    ("format", "<6"),
    ("torch", ">12"),
    ("fastbn", ">12"),
    ("xTorch", ">10"),
    ("A/A", ">10"),
    ("runs", ">7"),
)
COMPILE_COLUMNS = (("compile torch", ">13"), ("compile fastbn", ">14"))


def model_cells(row):
    runs = row["runs"]
    cells = (
        row["model"],
        row["format"],
        *time_cells(row),
        f"{runs['torch']}/{runs['fastbn']}",
    )
    if row["compiled"]:
        first = row["first_call"]
        cells += tuple(f"{first[peer]['step']:.1f}s" for peer in PEERS)
    return cells


def format_model_table(rows):
    """The model table: one line per model and format, a blank line between models."""
    compiled = rows[0]["compiled"]
    columns = MODEL_COLUMNS + (COMPILE_COLUMNS if compiled else ())
    title = "model table, training steps" + (
        " under torch.compile (compile = the first step's wall time)" if compiled else ""
    )
    head = report.format_line([name for name, _ in columns], columns)
    lines = [title + ":", head, "-" * len(head)]
    for i, row in enumerate(rows):
        if i and row["model"] != rows[i - 1]["model"]:
            lines.append("")
        lines.append(report.format_line(model_cells(row), columns))
    n = f"{len(rows)} rows" if len(rows) > 1 else "1 row"
    lines += [
        "",
        f"geometric mean of xTorch over the {n}: {report.format_range(geometric_mean(rows))}",
    ]
    lines.append(format_noise_floor(rows))
    return "\n".join(lines)


def format_noise_floor(rows):
    """The line of torch against itself over a table's rows: the A/A column's range."""
    noise = [r["noise"] for r in rows if r["noise"] is not None]
    if not noise:
        return "torch against itself: not measured (no second torch worker for these rows)"
    low = min(n["low"] for n in noise)
    high = max(n["high"] for n in noise)
    medians = sorted(n["median"] for n in noise)
    return (
        f"torch against itself (A/A) over the {len(noise)} rows: medians"
        f" {medians[0]:.2f}-{medians[-1]:.2f}x, spreads within {low:.2f}-{high:.2f}x"
    )


def format_bn_share(row):
    """A row's line of batch norm's share of the step, torch's model and the converted one."""
    if row["bn_share"] is None:
        return f"{row['case']}: BN share not measured"
    parts = [
        f"{peer} {row['bn_share'][peer]:.0%} ({report.format_time(row['seconds'][peer])},"
        f" {report.format_time(row['identity_seconds'][peer])} without BN)"
        for peer in PEERS
    ]
    return f"{row['case']}: BN share of the step: " + ", ".join(parts)


def format_report(results):
    rows = results["rows"]
    layer_rows = [r for r in rows if r["kind"] == "layer"]
    parts = [format_header(results)]
    if layer_rows:
        g = report.format_range(geometric_mean(layer_rows))
        parts += [
            report.format_table(layer_rows, COLUMNS, table_cells),
            f"geometric mean of xTorch over the {len(layer_rows)} layer rows: {g}\n"
            + format_noise_floor(layer_rows),
        ]
    else:
        parts.append("no layer rows in this run")
    for table in (model_table(rows), model_table(rows, compiled=True)):
        if table:
            parts += [
                format_model_table(table),
                "batch norm's share of each step (the steps without BN are one program in"
                " both workers: their gap is the run's process bias):\n"
                + "\n".join(format_bn_share(r) for r in table),
            ]
    parts.append(report.format_targets(results["targets"]))
    return "\n\n".join(parts)


# --- the command ----------------------------------------------------------------------


def select(cases, models, shapes):
    """The layer cases and model-table rows named by a comma-separated filter (None: all).

    Tokens: shapes (32x128), layouts (bf, nchw, nhwc), shape:layout
    (64x256x14x14:nhwc), model names (resnet18, mobilenetv2, cnn, mlp),
    model:format (resnet18:nhwc) or "models" (the whole model table).
    Layouts select layer cases only.
    """
    if shapes is None:
        return cases, models
    tokens = {t.strip() for t in shapes.split(",") if t.strip()}
    chosen = [c for c in cases if tokens & {c.name, c.layout, c.label.replace(" ", ":")}]
    chosen_models = [m for m in models if tokens & {m.model, f"{m.model}:{m.format}", "models"}]
    if not chosen and not chosen_models:
        names = ", ".join(
            [
                *(c.label.replace(" ", ":") for c in LAYER_CASES),
                *MODELS,
                *(f"{m.model}:{m.format}" for m in MODEL_CASES),
                "models",
            ]
        )
        raise SystemExit(f"--shapes {shapes!r} matches no torch-mode row; they are: {names}")
    return chosen, chosen_models


def settings_from(args):
    cases = [c for c in LAYER_CASES if c.label in QUICK_LABELS] if args.quick else LAYER_CASES
    cases, models = select(cases, list(MODEL_CASES), args.shapes)
    dtype = args.dtype or ("float32" if args.quick else "both")
    return Settings(
        cases=cases,
        dtypes=["float32", "float64"] if dtype == "both" else [dtype],
        models=models,
        budget=args.budget or (QUICK_BUDGET if args.quick else BUDGET),
        numba_layer=args.numba_layer,
        compile=args.compile,
    )


def machine_info(workers):
    info = {"fastbn": fastbn.__version__, "cpu_count": os.cpu_count()}
    info["cpu_model"] = report.cpu_model()
    info.update(workers["torch"])
    info.update(workers["fastbn"])  # the same python and torch; numba's threads and layer
    return info


def run(args, settings=None):
    """``python -m fastbn.bench --torch`` with bench's parsed arguments: print, write JSON.

    ``settings`` replaces the ones the arguments make (the tests' tiny runs).
    """
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise SystemExit("--torch needs torch: pip install -e '.[torch]'")
    settings = settings or settings_from(args)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    results = measure(settings)
    results["machine"] = machine_info(results.pop("workers"))
    results["settings"] = {
        "cases": [c.to_json() for c in settings.cases],
        "dtypes": settings.dtypes,
        "models": [c.to_json() for c in settings.models],
        "compile": settings.compile,
        "batch": settings.batch,
        "budget": settings.budget,
        "rounds": settings.rounds,
        "remeasures": settings.remeasures,
        "min_runs": MIN_RUNS,
        "numba_layer": settings.numba_layer,
        "seconds": time.perf_counter() - started,
        "load_average": [load_before, os.getloadavg()[0]],
    }
    results["geometric_mean"] = geometric_mean(
        [r for r in results["rows"] if r["kind"] == "layer"]
    )
    results["model_geometric_mean"] = geometric_mean(model_table(results["rows"]))
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
