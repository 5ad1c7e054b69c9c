"""The bench's PyTorch mode, ``python -m fastbn.bench --torch``: fastbn.torch's modules vs torch's.

Two peers, each in subprocesses of its own (``python -m fastbn.bench.torch_mode
--worker PEER``, JSON jobs on stdin, one a line, JSON lines on stdout):

- ``torch``: torch.nn's BatchNorm1d / BatchNorm2d / BatchNorm3d, and models
  built of them;
- ``fastbn``: the same modules and models, with the same seed, after
  ``fastbn.torch.convert(copy.deepcopy(...))`` with its default settings.

Rows (docs/guide/contract.md, Performance targets):

- layer rows, for each of the contract's layer shapes and float32 and
  float64: ``train``, one forward and ``y.backward(grad)`` through autograd
  in training mode (the input requires grad, grad is a fixed tensor), and
  ``eval``, one forward under ``torch.no_grad()`` in eval mode; each row
  names the implementation a converted layer's call takes;
- the model table, float32: ``step``, one whole training step
  (``optimizer.zero_grad(set_to_none=True)``, forward, cross-entropy,
  backward, SGD step with momentum 0.9) of each row of `MODEL_CASES`
  (`fastbn.bench.models`). The 64 px rows: a ResNet-18, a MobileNetV2 and
  a VGG11-BN as torchvision defines them on batches of 16 64x64 images, the
  small ResNet-style CNN on 32 32x32 images, the MLP 784-1024-1024-10 on 256
  examples. The large-layer rows (``large``): VGG11-BN at 128x128, ResNet-18
  and MobileNetV2 at 224x224, batch 8, and the R3D-18 video net on 2 clips
  of 8 frames of 112x112 (the batches the measurements behind the
  contract's large-layer target took). The image models run in NCHW and in
  channels_last (model and input ``.to(memory_format=...)``,
  channels_last_3d for the 3-D net), the MLP on its 2-D input;
- batch norm's share of each step: the same model with every BatchNorm
  replaced by ``nn.Identity`` (built from torch's model, so the same program
  in both peers' processes) is timed in each process after the step, and
  the share is (step - step without BN) / step, for torch's model and for
  the converted one. The two peers' steps without BN are one program timed
  in different processes: how far apart they are is the run's process bias;
- which implementation each converted layer took: the fastbn processes
  count, on their first step, the BatchNorm calls that
  `fastbn.torch.dispatch` gives fastbn's kernels and those it gives torch's
  op;
- ``--compile``: the model table again with each peer's models (and the
  models without BN) under ``torch.compile(model)``, default mode: the
  model is compiled, the optimizer step stays eager. A peer's compile time
  is the wall time of its first step (dynamo, AOTAutograd, inductor and the
  step itself) in its first process. Each peer's processes share an
  inductor cache of their own, empty when the run starts
  (TORCHINDUCTOR_CACHE_DIR, a temporary directory): each peer's first
  compile of a model is cold, and both peers pay inductor's one-off costs
  (its precompiled header) in their first compiled row. A cache shared
  between the peers would hand those to whichever compiled second.

Each row's ratio is torch / fastbn (> 1: fastbn faster), and its noise
floor torch / torch again (the A/A column); geometric means and the
contract's targets follow the tables: every layer row >= 1.0x and their
geometric mean >= 1.3x; the small CNN and the MLP faster than torch's;
every model row >= 1.0x, the 64 px rows' geometric mean >= 1.0x, the
large-layer rows' >= 1.15x and VGG11-BN large >= 1.15x in each format;
under ``--compile`` every model >= 1.0x.

How the layer rows are measured. Each library runs at its default thread
count (torch.get_num_threads(), numba's NUMBA_NUM_THREADS);
``--numba-layer`` sets NUMBA_THREADING_LAYER for the fastbn processes
alone. Three long-lived workers, torch's, fastbn's and `AGAIN` (a second
torch worker timing torch's calls again: torch against itself), each make
an untimed first call and one more untimed warm-up call of each of a
row's calls when they build the row, then in each of the row's `ROUNDS`
rounds timed calls for budget / ROUNDS seconds (at least one); each round
runs every worker once, each round another first, so that all sample the
same moments of a shared machine. A round's time is the median of its
calls; a row's time is the MEDIAN over its rounds, its ratios the median
of the round-by-round ratios, each with its spread (`fastbn.bench.stats`).
A row whose ratio's spread is wider than `report.WIDE` of its median, or
whose torch against itself is off 1.0x beyond its spread, is measured
again (`ROUNDS` more rounds, at most `REMEASURES` times).

How the model rows are measured: as a user meets them, one model in a
process. `PAIRS` pairs of fresh processes, after the layer workers are
closed: in each pair one process builds torch's model, takes `WARM_UP`
steps and then `STEPS` timed steps, and reports the median wall time and
the median CPU time (time.process_time, every thread) of its timed steps
(the large-layer rows `LARGE_WARM_UP` and `LARGE_STEPS`), and in the first
pair the same for the model without BN; another process does the same with
the converted model. Torch's process runs first in even pairs, the
converted one in odd pairs. After every `AGAIN_EVERY`-th pair, two more
fresh torch processes (the step alone) give torch against itself by the
same procedure, the first's time over the second's and the inverse every
other time (none under ``--compile``: a third and fourth compile of every
model). A row's times are the medians over its processes, its
ratios (wall and CPU) the median of the pairs' ratios with its spread.

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
wholly at or below 1.0x. The compiled table, which has no torch against
itself, holds its rows to 1.0x within their own spread.

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
processes have numba's pool beside torch's, as a converted model has), and
the layer rows' short alternating rounds share the machine's moments as far
as processes can. On a loaded machine the parallel rows are a lottery either
way: read them from a quiet one (the header gives the load average).

The model table goes further: a process per model, as a user runs one. In
one process torch's step pays for numba's spinning threads, which inflates
torch's time and favours fastbn; and a process holding two models is not
neutral either way (issue 27 measured torch's MobileNetV2 channels-last
step at 40-44 ms beside a converted copy and 51-80 ms alone). Separate
processes pay in precision (one process's step time moves by +-15% on this
host), so the model rows take pairs in both orders and report torch
against torch beside every row, by wall and by CPU time.
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
# (name, large) -> (input shape of a step, text for the report); architectures in
# fastbn.bench.models. The large-layer rows' batches (8, and 2 for the 3-D net) are those the
# measurements behind the contract's large-layer target took (issue 27).
MODEL_INPUTS = {
    ("resnet18", False): (
        (16, 3, 64, 64),
        "ResNet-18 (torchvision's: full width, 20 BN), batch 16 of 3x64x64",
    ),
    ("mobilenetv2", False): (
        (16, 3, 64, 64),
        "MobileNetV2 (torchvision's: width 1.0, all 17 blocks, 52 BN, no dropout),"
        " batch 16 of 3x64x64",
    ),
    ("vgg11_bn", False): (
        (16, 3, 64, 64),
        "VGG11-BN (torchvision's conv body, 8 BN; global average pool and one linear"
        " layer, not the 4096-wide classifier), batch 16 of 3x64x64",
    ),
    ("cnn", False): (
        (32, 3, 32, 32),
        "small ResNet-style CNN (16-32-64 channels, 9 BN), batch 32 of 3x32x32",
    ),
    ("mlp", False): ((256, 784), "MLP 784-1024-1024-10 (2 BatchNorm1d), batch 256"),
    ("vgg11_bn", True): ((8, 3, 128, 128), "VGG11-BN large: batch 8 of 3x128x128"),
    ("resnet18", True): ((8, 3, 224, 224), "ResNet-18 large: batch 8 of 3x224x224"),
    ("mobilenetv2", True): ((8, 3, 224, 224), "MobileNetV2 large: batch 8 of 3x224x224"),
    ("r3d18", True): (
        (2, 3, 8, 112, 112),
        "R3D-18 large (torchvision's r3d_18 video net, 20 BatchNorm3d): batch 2 of 8 frames"
        " of 3x112x112",
    ),
}
MODELS = tuple(dict.fromkeys(name for name, _ in MODEL_INPUTS))
N_CLASSES = 10
LAYOUTS = {
    "bf": "batch-first (N, C), BatchNorm1d",
    "nchw": "(N, C, H, W) contiguous, BatchNorm2d",
    "nhwc": "the same in torch.channels_last memory format",
}
NUMBA_LAYERS = ("omp", "tbb", "workqueue")
ROUNDS = 20
REMEASURES = 1  # times a row is measured again, at most
MIN_RUNS = 3  # timed calls per row and peer, at least
SEED = 0
BUDGET = 0.5  # seconds per layer row and peer
QUICK_BUDGET = 0.1
# A model row: PAIRS pairs of fresh processes, each WARM_UP untimed steps (the first of them
# timed apart: the first call) and then STEPS timed ones. 8 pairs give the median pair ratio
# an interval from the 2nd to the 7th pair (93%); 10 steps a process's median within a few
# percent of its steps' (one process's step time moves by +-15% on a shared 2-core host).
PAIRS = 8
STEPS = 10
WARM_UP = 3
QUICK_PAIRS = 4
# The large-layer rows' steps take 1.4-4 s each on 2 cores: fewer of them a process (their
# times move less from step to step than the 64 px rows' do).
LARGE_STEPS = 4
LARGE_WARM_UP = 2
AGAIN_EVERY = 2  # torch against itself after every other pair
LR = 0.01
# The contract's targets for the model table: the 64 px rows' geometric mean, the large-layer
# rows' geometric mean, and VGG11-BN large in each format.
SMALL_GEOMEAN = 1.0
LARGE_GEOMEAN = 1.15
VGG_LARGE = 1.15


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


def model_formats(name, large=False):
    """The formats a model runs in: images NCHW and channels_last, the MLP its 2-D input."""
    return ("bf",) if len(MODEL_INPUTS[name, large][0]) == 2 else ("nchw", "nhwc")


def memory_format(fmt, ndim):
    """torch's memory format of a format name for an input of ndim dimensions: "nhwc" is
    channels_last (channels_last_3d for a 5-D input), anything else contiguous."""
    import torch

    if fmt != "nhwc":
        return torch.contiguous_format
    return torch.channels_last_3d if ndim == 5 else torch.channels_last


@dataclass(frozen=True)
class ModelCase:
    """One row of the model table: a model of `MODELS` in one format, at its 64 px size or
    its large one (``large``, the contract's large-layer rows), eager or compiled."""

    model: str
    format: str
    large: bool = False
    compiled: bool = False

    @property
    def label(self):
        return (
            f"{self.model} {self.format}"
            + (" large" if self.large else "")
            + (" compiled" if self.compiled else "")
        )

    def to_json(self):
        return {
            "model": self.model,
            "format": self.format,
            "large": self.large,
            "compiled": self.compiled,
        }

    @classmethod
    def from_json(cls, d):
        return cls(d["model"], d["format"], large=d["large"], compiled=d["compiled"])


MODEL_CASES = [
    ModelCase(name, fmt, large)
    for large in (False, True)
    for (name, is_large) in MODEL_INPUTS
    if is_large == large
    for fmt in model_formats(name, large)
]


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


def model_input_shape(case, batch=None, size=None):
    """A model row's input shape, with another batch size and another image size (height and
    width; the frames stay) where given (the tests' tiny runs)."""
    shape = MODEL_INPUTS[case.model, case.large][0]
    if batch is not None:
        shape = (batch, *shape[1:])
    if size is not None and len(shape) >= 4:
        shape = (*shape[:-2], size, size)
    return shape


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


def model_step(peer, case, seed=SEED, batch=None, size=None, identity=False):
    """A peer's training step of one model-table row, and the model it trains. float32.

    The model is built from the seed's torch model; with ``identity``, it is
    that model with every BatchNorm replaced by nn.Identity, before any
    conversion: one program for both peers, whose step less the row's step
    is batch norm's share.
    """
    import torch

    from fastbn.bench import models

    torch.manual_seed(seed)
    base = models.make_model(case.model)
    model = models.without_bn(base) if identity else to_peer(peer, base)
    shape = model_input_shape(case, batch, size)
    inputs = torch.randn(shape)
    labels = torch.randint(0, N_CLASSES, (shape[0],))
    fmt = memory_format(case.format, len(shape))
    inputs = inputs.contiguous(memory_format=fmt)
    model = model.train().to(memory_format=fmt)
    return training_step(model, inputs, labels, case.compiled), model


def implementations_taken(model, step):
    """Run one step, counting the BatchNorm layers' calls by the implementation that took them:
    "fastbn" (the kernels) or "torch" (torch's op), as `fastbn.torch.dispatch` decides from
    each module's choice and the call's input (a forward pre-hook on each layer)."""
    from fastbn.bench import models
    from fastbn.torch import dispatch

    kernels = []

    def record(module, args):
        implementation = getattr(module, "implementation", "auto")
        kernels.append(dispatch.takes_kernels(implementation, args[0], module.training))

    handles = [m.register_forward_pre_hook(record) for m in models.batch_norms(model)]
    try:
        step()
    finally:
        for handle in handles:
            handle.remove()
    return {"fastbn": sum(kernels), "torch": len(kernels) - sum(kernels)}


def time_steps(step, warm_up, steps, first=None):
    """A model's steps in this process: the first (``first``, default ``step``: the same step
    with something recorded) timed alone, ``warm_up - 1`` more untimed, then ``steps`` timed
    steps with the garbage collector off, each by wall time and by CPU time (time.process_time,
    every thread of the process).

    Returns {"first": seconds, "wall": [seconds a step], "cpu": [seconds a step]}.
    """
    first_seconds = first_call_seconds(first or step)
    for _ in range(warm_up - 1):
        step()
    wall, cpu = [], []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(steps):
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            step()
            cpu.append(time.process_time() - cpu_start)
            wall.append(time.perf_counter() - wall_start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {"first": first_seconds, "wall": wall, "cpu": cpu}


def time_model(peer, job):
    """A fresh process's measurement of one model row (a "model" job): the peer's step
    (`time_steps`), then, with job["identity"], the step of the model without BN, built after
    the first is freed; the fastbn peer's eager rows also count which implementation took its
    layers' calls on the first step (`implementations_taken`).

    Returns {"step": times, "identity": times (with job["identity"]), "implementations":
    {"fastbn": layers, "torch": layers} (fastbn's eager rows)}.
    """
    case = ModelCase.from_json(job["row"])
    built = (job["seed"], job["batch"], job["size"])
    step, model = model_step(peer, case, *built)
    reply = {}
    first = None
    if peer == "fastbn" and not case.compiled:

        def first():
            reply["implementations"] = implementations_taken(model, step)

    reply["step"] = time_steps(step, job["warm_up"], job["steps"], first)
    if job["identity"]:
        del step, model  # the user's program holds one model; so does this process
        gc.collect()
        step, _ = model_step(peer, case, *built, identity=True)
        reply["identity"] = time_steps(step, job["warm_up"], job["steps"])
    return reply


def first_call_seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Server:
    """A worker's state: the calls of the last layer row asked for, kept across its rounds."""

    def __init__(self, peer):
        self.peer = peer
        self.key = None
        self.calls = None

    def calls_for(self, job):
        """The calls of the job's layer row, and whether they were built just now."""
        fields = ("row", "dtype", "seed")
        key = json.dumps({k: job.get(k) for k in fields}, sort_keys=True)
        new = key != self.key
        if new:
            self.key = self.calls = None  # free the last row's tensors first
            gc.collect()
            case = TorchCase.from_json(job["row"])
            self.calls = layer_calls(self.peer, case, job["dtype"], job["seed"])
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
        """An info job's info, a model job's measurement (`time_model`), or a layer job's timed
        calls (a new row's first call of each untimed, then one warm-up each)."""
        if job["kind"] == "info":
            return self.info()
        if job["kind"] == "model":
            return time_model(self.peer, job)
        calls, new = self.calls_for(job)
        if new:
            for fn in calls.values():
                fn()
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
    """A peer's subprocess, ``python -m fastbn.bench.torch_mode --worker PEER``; ``name``
    tells two workers of one peer apart (default: the peer)."""

    MODULE = "fastbn.bench.torch_mode"

    def __init__(self, peer, env=None, name=None):
        super().__init__(peer, env)
        self.name = name or peer


@dataclass
class Settings:
    """What one run measures: layer cases and dtypes with their budget and rounds; model-table
    rows (eager; compiled too with ``compile``) with their pairs of processes, warm-up and
    timed steps; the fastbn worker's numba layer; and a batch size and an image size
    replacing every model's own (None: theirs; the tests' tiny runs)."""

    cases: list
    dtypes: list
    models: list
    budget: float
    numba_layer: str | None = None
    rounds: int = ROUNDS
    compile: bool = False
    batch: int | None = None
    size: int | None = None
    remeasures: int = REMEASURES
    pairs: int = PAIRS
    steps: int = STEPS
    warm_up: int = WARM_UP
    large_steps: int = LARGE_STEPS
    large_warm_up: int = LARGE_WARM_UP

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


# --- driver side: layer rows, rounds through long-lived workers -------------------------


def measure_rounds(workers, job, rounds, times):
    """Rounds of one layer row: in each every worker in turn, each round another first.

    ``rounds`` are the rounds' numbers. Adds to ``times`` (worker name ->
    call -> a list of each round's timed calls).
    """
    job = {**job, "budget": job["budget"] / len(rounds), "min_runs": -(-MIN_RUNS // len(rounds))}
    for r in rounds:
        start = r % len(workers)
        for worker in workers[start:] + workers[:start]:
            for call, t in worker.ask(job)["times"].items():
                times.setdefault(worker.name, {}).setdefault(call, []).append(t)


def measure_row(workers, job, settings):
    """Each worker's timed calls of one layer row, round by round, with more rounds while
    `remeasure_reasons` holds (at most ``settings.remeasures`` times).

    Returns worker name -> call -> a list per round of its timed calls.
    """
    times = {}
    for attempt in range(settings.remeasures + 1):
        rounds = range(attempt * settings.rounds, (attempt + 1) * settings.rounds)
        measure_rounds(workers, job, rounds, times)
        if not remeasure_reasons(make_rows(job["kind"], "", job["dtype"], None, times)):
            break
    return times


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


# --- driver side: model rows, pairs of fresh processes ----------------------------------


def model_process(peer, job, env):
    """One fresh process's answer to a model job (`time_model`): a worker of its own, closed
    after it answers."""
    worker = Worker(peer, env)
    try:
        return worker.ask(job)
    finally:
        worker.close()


def model_job(case, settings, identity=True):
    """The job of a model row's processes; ``identity``: time the model without BN too."""
    return {
        "kind": "model",
        "row": case.to_json(),
        "seed": SEED,
        "batch": settings.batch,
        "size": settings.size,
        "warm_up": settings.large_warm_up if case.large else settings.warm_up,
        "steps": settings.large_steps if case.large else settings.steps,
        "identity": identity,
    }


def measure_model_row(case, settings, envs, run=model_process):
    """One model row from ``settings.pairs`` pairs of fresh processes (``run(peer, job,
    env)``; ``envs``: each peer's environment).

    Pair i runs torch's process, then fastbn's, for even i; fastbn's first for
    odd i; the first pair's processes also time the model without BN (batch
    norm's share: one pair's, which halves a row's time). After every
    `AGAIN_EVERY`-th pair, but for compiled rows (a third and fourth compile of
    every model), a pair of two fresh torch processes, torch against itself,
    whose ratio is the first's time over the second's, the two taken in the
    other order every other time: the same procedure, the noise floor of the
    row. Large-layer rows take `settings.large_steps` timed steps and
    `settings.large_warm_up` warm-up ones (a step of seconds).
    """
    job = model_job(case, settings)
    pairs, again = [], []
    for i in range(settings.pairs):
        order = PEERS if i % 2 == 0 else PEERS[::-1]
        pair_job = job if i == 0 else {**job, "identity": False}
        pairs.append({peer: run(peer, pair_job, envs[peer]) for peer in order})
        if not case.compiled and i % AGAIN_EVERY == 0:
            aa = [run("torch", {**job, "identity": False}, envs["torch"]) for _ in range(2)]
            again.append(aa if len(again) % 2 == 0 else aa[::-1])
    shape = model_input_shape(case, settings.batch, settings.size)
    return make_model_row(case, shape, pairs, again)


def process_median(reply, call="step", clock="wall"):
    """A process's time of a step: the median of its timed steps, by wall or CPU time."""
    return statistics.median(reply[call][clock])


def make_model_row(case, shape, pairs, again):
    """The model-table row of one case from its processes' replies.

    ``pairs``: per pair, peer -> reply; ``again``: per pair of torch against
    itself, [numerator's reply, denominator's reply] (none for compiled rows).
    A peer's time is the median over its processes of each one's median step
    (``rounds``: one value a pair); the ratios torch / fastbn, by wall and by
    CPU time, and torch against itself (A/A) are estimates of the pairs'
    ratios (`fastbn.bench.stats`). Batch norm's share of each peer's step is
    (step - the step without BN) / step, of those medians; the first calls
    (the compile under --compile) are the first pair's.
    """
    rounds, cpu = (
        {p: [process_median(pair[p], clock=clock) for pair in pairs] for p in PEERS}
        for clock in ("wall", "cpu")
    )
    seconds = {p: statistics.median(r) for p, r in rounds.items()}

    def torch_against_itself(clock):
        if not again:
            return None
        a, b = ([process_median(aa[k], clock=clock) for aa in again] for k in (0, 1))
        return report.ratio(a, b)

    identity = None
    timed = [pair for pair in pairs if all("identity" in pair[p] for p in PEERS)]
    if timed:
        identity = {
            p: statistics.median(process_median(pair[p], "identity") for pair in timed)
            for p in PEERS
        }
    first = pairs[0]
    return {
        "kind": "model",
        "case": case.label,
        "dtype": "float32",
        "nbytes": None,
        "pass": "step",
        "model": case.model,
        "format": case.format,
        "large": case.large,
        "compiled": case.compiled,
        "input": list(shape),
        "seconds": seconds,
        "cpu_seconds": {p: statistics.median(r) for p, r in cpu.items()},
        "rounds": rounds,
        "cpu_rounds": cpu,
        "runs": {p: sum(len(pair[p]["step"]["wall"]) for pair in pairs) for p in PEERS},
        "pairs": len(pairs),
        "ratio": report.ratio(rounds["torch"], rounds["fastbn"]),
        "cpu_ratio": report.ratio(cpu["torch"], cpu["fastbn"]),
        "noise": torch_against_itself("wall"),
        "cpu_noise": torch_against_itself("cpu"),
        "identity_seconds": identity,
        "bn_share": (
            {p: (seconds[p] - s) / seconds[p] for p, s in identity.items()} if identity else None
        ),
        "first_call": {
            p: {call: first[p][call]["first"] for call in ("step", "identity") if call in first[p]}
            for p in PEERS
        },
        "implementations": first["fastbn"].get("implementations"),
    }


def measure(settings, progress=None, run=model_process):
    """Run every measurement: returns "workers" (each peer's info) and "rows".

    The layer rows go through long-lived workers (`measure_row`), closed
    before the model rows' processes start (`measure_model_row`, ``run``).
    """
    model_rows = settings.model_rows()
    n_steps = len(settings.cases) * len(settings.dtypes) + len(model_rows)
    progress = progress or bench.Progress(max(n_steps, 1))
    rows = []
    with contextlib.ExitStack() as stack:
        workers = []
        for peer, name in [(peer, peer) for peer in PEERS] + [("torch", AGAIN)]:
            workers.append(Worker(peer, worker_env(peer, settings.numba_layer), name))
            stack.callback(workers[-1].close)
        infos = {w.name: ask_info(w, settings.numba_layer) for w in workers}
        for case in settings.cases:
            for dtype in settings.dtypes:
                with progress.task(f"{case.label} {dtype}"):
                    job = {"kind": "layer", "row": case.to_json(), "dtype": dtype}
                    job.update(seed=SEED, budget=settings.budget)
                    times = measure_row(workers, job, settings)
                for row in make_rows("layer", case.label, dtype, case.nbytes(dtype), times):
                    rows.append({**row, "implementation": implementation_of(case, dtype, row)})
    with contextlib.ExitStack() as stack:
        # Each peer's processes share an inductor cache of their own, empty at the start: the
        # first process of each compiled row compiles cold (see the docstring).
        envs = {
            peer: worker_env(
                peer,
                settings.numba_layer,
                stack.enter_context(tempfile.TemporaryDirectory(prefix="fastbn-bench-")),
            )
            for peer in PEERS
        }
        for case in model_rows:
            with progress.task(f"{case.label} training step"):
                rows.append(measure_model_row(case, settings, envs, run))
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


def model_table(rows, compiled=False, large=None):
    """The model rows, eager or compiled; with ``large`` True or False, the large-layer rows
    or the 64 px ones alone."""
    return [
        r
        for r in rows
        if r["kind"] == "model"
        and r["compiled"] == compiled
        and (large is None or r["large"] == large)
    ]


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


def whole_table_geometric_mean(text, rows, limit, large):
    """A geometric mean target over the whole 64 px or large-layer table (a part of it is not
    measured)."""
    table = [c for c in MODEL_CASES if c.large == large]
    if len(rows) < len(table):
        return report.target(
            text, None, f"not measured: {len(rows)} of the {len(table)} rows in this run"
        )
    return geometric_mean_target(text, rows, limit)


def evaluate_targets(rows):
    """The contract's fastbn.torch targets: MET (True), NOT MET (False), `stats.NOISE` (the
    spread holds the limit) or not measured (None).

    The rows' targets (`every_row`): every row >= 1.0x within the spread of
    torch against itself, layer rows, the model table eager (64 px and
    large-layer rows) and compiled. The geometric means: the layer rows' >=
    1.3x, the 64 px model rows' >= `SMALL_GEOMEAN` and the large-layer rows'
    >= `LARGE_GEOMEAN`, each over its whole table only (a subset is not
    measured); VGG11-BN large >= `VGG_LARGE` in each format. The original
    step target: the small CNN (NCHW) and the MLP faster than torch's beyond
    the spread of torch against itself (`faster_band`).
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
    steps_of = {r["case"]: r for r in eager}
    text = "training step faster than torch's, small CNN (nchw) and MLP (> 1.0x)"
    originals = [steps_of.get(c.label) for c in (ModelCase("cnn", "nchw"), ModelCase("mlp", "bf"))]
    if all(originals):
        steps = report.target(
            text,
            stats.every(stats.verdict(r["ratio"], ">", faster_band(r)) for r in originals),
            ", ".join(f"{r['case']} {report.format_range(r['ratio'])}" for r in originals),
        )
    else:
        steps = report.target(text, None, "not measured in this run")
    text = f"model table, VGG11-BN large, each format torch / fastbn >= {VGG_LARGE}x"
    vgg = [steps_of.get(ModelCase("vgg11_bn", f, large=True).label) for f in ("nchw", "nhwc")]
    if all(vgg):
        vgg_large = report.target(
            text,
            stats.every(stats.verdict(r["ratio"], ">=", VGG_LARGE) for r in vgg),
            ", ".join(f"{r['case']} {report.format_range(r['ratio'])}" for r in vgg),
        )
    else:
        vgg_large = report.target(text, None, "not measured in this run")
    return [
        every_row("layer rows, every row torch / fastbn", layer),
        geomean,
        steps,
        every_row("model table, every model and format", eager),
        whole_table_geometric_mean(
            f"model table, 64 px rows, geometric mean of torch / fastbn >= {SMALL_GEOMEAN}x",
            model_table(rows, large=False),
            SMALL_GEOMEAN,
            large=False,
        ),
        whole_table_geometric_mean(
            f"model table, large-layer rows, geometric mean of torch / fastbn >= {LARGE_GEOMEAN}x",
            model_table(rows, large=True),
            LARGE_GEOMEAN,
            large=True,
        ),
        vgg_large,
        every_row("model table under torch.compile, every model and format", compiled),
    ]


def format_header(results):
    m = results["machine"]
    s = results["settings"]
    env_layer = m.get("numba_threading_layer_env")
    chosen = f"NUMBA_THREADING_LAYER={env_layer}" if env_layer else "numba's default choice"
    models = [
        f"{name}{' large' if large else ''} = {text}"
        for (name, large), (_, text) in MODEL_INPUTS.items()
    ]
    for key, what in (("batch", "batch"), ("size", "image size")):
        if s.get(key) is not None:
            models.append(f"here every model at {what} {s[key]}")
    return "\n".join(
        [
            f"fastbn {m['fastbn']} benchmark, PyTorch mode: fastbn.torch vs torch.nn;"
            f" layer rows: times are MEDIANS over {s['rounds']} rounds (more for a row measured"
            " again) of each round's median of repeated calls (per row and peer a first call"
            f" and a warm-up call, then rounds of >= {s['budget'] / s['rounds']:.3g} s of calls,"
            f" >= {MIN_RUNS} calls in all), ratios taken round by round; model rows:"
            f" {s['pairs']} pairs of fresh processes, torch's model and the converted one, the"
            " order alternating pair by pair, each process building its model, taking"
            f" {s['warm_up']} warm-up steps and {s['steps']} timed ones, its time the median of"
            " its timed steps; a time is the median over the processes, a ratio the median of"
            " the pairs' ratios; ±: the farther end of the median's"
            f" {stats.CONFIDENCE:.0%} interval (times in %)",
            f"machine: {m['cpu_count']} CPUs ({m['cpu_model']}); python {m['python']},"
            f" torch {m['torch']} (torch.get_num_threads() = {m['torch_threads']}),"
            f" numba {m['numba']} (numba.threading_layer() = {m['threading_layer']}, {chosen};"
            f" {m['numba_threads']} threads)",
            "peers: torch = torch.nn's layers; fastbn = fastbn.torch.convert(copy.deepcopy(...))"
            " of the same; each in subprocesses of its own at its library's default threads;"
            " layer rows: torch again = torch's in a second worker, each round of a row through"
            " the three workers, another first each round; model rows: torch against torch ="
            " pairs of two fresh torch processes, the same procedure (none for compiled rows);"
            f" run took {s['seconds']:.0f} s, load average {s['load_average'][0]:.2f} before,"
            f" {s['load_average'][1]:.2f} after (the machine's other processes stall 2-thread"
            " regions)",
            "passes: train = forward + y.backward(grad) through autograd, training mode, input"
            " requires grad; eval = forward under torch.no_grad(); step = zero_grad(set_to_none"
            "=True), forward, cross-entropy, backward, SGD step (momentum 0.9)",
            "layouts: " + "; ".join(f"{k} = {v}" for k, v in LAYOUTS.items()),
            "models (float32; nchw and nhwc = model and input contiguous or channels_last,"
            " channels_last_3d for the 3-D net; bf = the MLP's 2-D input; large = the contract's"
            " large-layer rows, at the batches its measurements took): " + "; ".join(models),
            "BN share = (step - the same step with every BatchNorm an nn.Identity, timed in the"
            " same process after the step) / step; compiled = torch.compile(model), default"
            " mode, the optimizer eager; compile = a peer's first step in its first process,"
            " inductor cache empty at the run's start",
            "xTorch = torch / fastbn by wall time (> 1: fastbn faster), CPU = the same by CPU"
            " time (time.process_time, all threads); A/A = torch / torch again, torch against"
            " itself: the noise floor, a row counts as >= 1.0x down to the lowest A/A reads in"
            " its spread (either way round); runs = timed calls, torch/fastbn; impl = the"
            " converted model's BatchNorm calls on fastbn's kernels, of all (the others on"
            " torch's op, fastbn.torch.dispatch)",
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
    ("input", "<15"),
    ("torch", ">12"),
    ("fastbn", ">12"),
    ("xTorch", ">10"),
    ("A/A", ">10"),
    ("CPU", ">10"),
    ("CPU A/A", ">10"),
    ("impl", ">12"),
    ("runs", ">7"),
)
COMPILE_COLUMNS = (("compile torch", ">13"), ("compile fastbn", ">14"))


def format_implementations(counts):
    """A row's count of BatchNorm calls on fastbn's kernels, of all: "12/20 kernels"."""
    if counts is None:
        return "-"
    return f"{counts['fastbn']}/{counts['fastbn'] + counts['torch']} kernels"


def model_cells(row):
    runs = row["runs"]
    cells = (
        row["model"],
        row["format"],
        "x".join(map(str, row["input"])),
        *time_cells(row),
        report.format_ratio(row["cpu_ratio"]),
        report.format_ratio(row["cpu_noise"]),
        format_implementations(row["implementations"]),
        f"{runs['torch']}/{runs['fastbn']}",
    )
    if row["compiled"]:
        first = row["first_call"]
        cells += tuple(f"{first[peer]['step']:.1f}s" for peer in PEERS)
    return cells


def format_model_table(rows):
    """A model table (64 px or large-layer rows, eager or compiled): one line per model and
    format, a blank line between models, then the geometric means and torch against itself."""
    compiled = rows[0]["compiled"]
    columns = MODEL_COLUMNS + (COMPILE_COLUMNS if compiled else ())
    title = "model table, " + ("large-layer rows" if rows[0]["large"] else "64 px rows")
    title += ", training steps" + (
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
        return "torch against itself: not measured (no second torch peer for these rows)"
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
    for compiled in (False, True):
        for large in (False, True):
            table = model_table(rows, compiled, large)
            if table:
                parts += [
                    format_model_table(table),
                    "batch norm's share of each step (the steps without BN are one program in"
                    " both peers' processes: their gap is the run's process bias):\n"
                    + "\n".join(format_bn_share(r) for r in table),
                ]
    parts.append(report.format_targets(results["targets"]))
    return "\n\n".join(parts)


# --- the command ----------------------------------------------------------------------


def select(cases, models, shapes):
    """The layer cases and model-table rows named by a comma-separated filter (None: all).

    Tokens: shapes (32x128), layouts (bf, nchw, nhwc), shape:layout
    (64x256x14x14:nhwc), model names (resnet18, mobilenetv2, vgg11_bn,
    r3d18, cnn, mlp: the model's 64 px and large-layer rows), model:format
    (resnet18:nhwc), "small" (the 64 px rows), "large" (the large-layer
    rows) or "models" (the whole model table). Layouts select layer cases
    only.
    """
    if shapes is None:
        return cases, models
    tokens = {t.strip() for t in shapes.split(",") if t.strip()}
    chosen = [c for c in cases if tokens & {c.name, c.layout, c.label.replace(" ", ":")}]
    chosen_models = [
        m
        for m in models
        if tokens & {m.model, f"{m.model}:{m.format}", "large" if m.large else "small", "models"}
    ]
    if not chosen and not chosen_models:
        names = ", ".join(
            [
                *(c.label.replace(" ", ":") for c in LAYER_CASES),
                *MODELS,
                *dict.fromkeys(f"{m.model}:{m.format}" for m in MODEL_CASES),
                "small",
                "large",
                "models",
            ]
        )
        raise SystemExit(f"--shapes {shapes!r} matches no torch-mode row; they are: {names}")
    return chosen, chosen_models


def settings_from(args):
    """The run's settings from bench's arguments; --quick: four layer cases, float32, and the
    64 px model rows in `QUICK_PAIRS` pairs."""
    cases = [c for c in LAYER_CASES if c.label in QUICK_LABELS] if args.quick else LAYER_CASES
    models = [c for c in MODEL_CASES if not c.large] if args.quick else list(MODEL_CASES)
    cases, models = select(cases, models, args.shapes)
    dtype = args.dtype or ("float32" if args.quick else "both")
    return Settings(
        cases=cases,
        dtypes=["float32", "float64"] if dtype == "both" else [dtype],
        models=models,
        budget=args.budget or (QUICK_BUDGET if args.quick else BUDGET),
        numba_layer=args.numba_layer,
        compile=args.compile,
        pairs=QUICK_PAIRS if args.quick else PAIRS,
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
        "size": settings.size,
        "pairs": settings.pairs,
        "warm_up": settings.warm_up,
        "steps": settings.steps,
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
    results["model_geometric_mean"] = {
        size: geometric_mean(model_table(results["rows"], large=large))
        for size, large in (("small", False), ("large", True))
    }
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
