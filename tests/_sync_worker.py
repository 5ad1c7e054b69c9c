"""One rank of the multi-process SyncBatchNorm tests (tests/test_torch_sync.py).

Run as ``python _sync_worker.py SCENARIOS OUT_DIR RANK WORLD_SIZE PORT``: it
joins a gloo group on 127.0.0.1:PORT, runs every scenario of the JSON file
SCENARIOS in order (all ranks run the same list, so their collectives match)
and writes what it saw to OUT_DIR/rank<RANK>.pt for the parent to check. The
data of each scenario comes from `make_data`, which the parent calls too.

Not a test module (pytest collects test_*.py only).
"""

import datetime
import gc
import json
import sys
import time
import traceback
import warnings

import torch
import torch.distributed as dist

# The default group's timeout: long, since a first kernel compile on a busy
# machine can hold one rank for many seconds; the parent kills a hung group.
GROUP_TIMEOUT = datetime.timedelta(seconds=120)
# The timeout of the group of the validation-failure scenario.
SHORT_TIMEOUT_SECONDS = 2.0

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def channel_view(t, ndim):
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def make_data(spec):
    """(weight, bias, [(x, dy) per step]) of a scenario: the whole batch, float64 or its dtype.

    x has a per-channel offset (``spec["offset"]`` times a random sign, plus
    one in [-1, 1]) and a scale in [0.5, 2]; dy is standard normal. The
    memory format is applied by the caller.
    """
    gen = torch.Generator().manual_seed(spec["seed"])
    c, tail = spec["shape"][0], tuple(spec["shape"][1:])
    n = sum(spec["sizes"])
    f64 = torch.float64
    sign = torch.where(torch.rand(c, generator=gen, dtype=f64) < 0.5, -1.0, 1.0)
    weight = sign * torch.empty(c, dtype=f64).uniform_(0.5, 2.0, generator=gen)
    bias = torch.randn(c, generator=gen, dtype=f64)
    steps = []
    for _ in range(spec.get("steps", 1)):
        shape = (n, c, *tail)
        offset = torch.empty(c, dtype=f64).uniform_(-1, 1, generator=gen)
        offset = offset + spec.get("offset", 0.0) * sign
        scale = torch.empty(c, dtype=f64).uniform_(0.5, 2.0, generator=gen)
        x = torch.randn(shape, generator=gen, dtype=f64) * channel_view(scale, len(shape))
        x = x + channel_view(offset, len(shape))
        dy = torch.randn(shape, generator=gen, dtype=f64)
        if len(steps) == spec.get("poison_step"):
            # NaN in feature 1 and +inf in feature 3, in the last rank's part.
            x[-1, 1] = float("nan")
            x[-1, 3] = float("inf")
        steps.append((x, dy))
    return weight, bias, steps


def local_slice(t, sizes, rank, memory_format=None):
    """This rank's part of the whole batch t, its own tensor in the given memory format."""
    start = sum(sizes[:rank])
    part = t[start : start + sizes[rank]]
    fmt = torch.contiguous_format if memory_format is None else memory_format
    return part.clone().contiguous(memory_format=fmt)


def channels_last_format(ndim):
    """The channels-last memory format of an ndim input (4-D or 5-D)."""
    return torch.channels_last_3d if ndim == 5 else torch.channels_last


def memory_format(spec):
    return channels_last_format(len(spec["shape"]) + 1) if spec.get("channels_last") else None


def make_module(spec, SyncBatchNorm, weight, bias):
    """The scenario's SyncBatchNorm, made directly or converted (``spec["convert"]``).

    ``"convert": "BatchNormReLU"``: fastbn's BatchNormReLU{1,2,3}d of the
    input's dimension, through `SyncBatchNorm.convert_sync_batchnorm`, which
    keeps its ReLU.
    """
    dtype = DTYPES[spec.get("module_dtype", spec["dtype"])]
    make = SyncBatchNorm
    if spec.get("convert") == "BatchNormReLU":
        import fastbn.torch as fbt

        ndim = len(spec["shape"]) + 1
        make = {2: fbt.BatchNormReLU1d, 3: fbt.BatchNormReLU1d, 4: fbt.BatchNormReLU2d}.get(
            ndim, fbt.BatchNormReLU3d
        )
    module = make(
        spec["shape"][0],
        momentum=spec.get("momentum", 0.1),
        affine=spec.get("affine", True),
        track_running_stats=spec.get("track", True),
        dtype=dtype,
    )
    if module.affine:
        with torch.no_grad():
            module.weight.copy_(weight)
            module.bias.copy_(bias)
    module.train(spec.get("training", True))
    if make is not SyncBatchNorm:
        module = SyncBatchNorm.convert_sync_batchnorm(module)
    return module


def run_steps(spec, rank, world):
    """Forward and backward for each step; the rank's outputs, gradients and module state."""
    from fastbn.torch import _ops
    from fastbn.torch.sync import SyncBatchNorm

    weight, bias, steps = make_data(spec)
    module = make_module(spec, SyncBatchNorm, weight, bias)
    dtype, fmt = DTYPES[spec["dtype"]], memory_format(spec)
    fast_path = _ops.fast_path
    if spec.get("torch_ops"):  # the torch-ops computation, on float64 data
        _ops.fast_path = lambda *args: False
    records = []
    try:
        for x_all, dy_all in steps:
            x = local_slice(x_all.to(dtype), spec["sizes"], rank, fmt).requires_grad_()
            dy = local_slice(dy_all.to(dtype), spec["sizes"], rank, fmt)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                y = module(x)
            y.backward(dy)
            record = {
                "y": y.detach().clone(),
                "dx": x.grad.clone(),
                "channels_last": y.dim() >= 4
                and y.is_contiguous(memory_format=channels_last_format(y.dim()))
                and not y.is_contiguous(),
                "module": repr(module),
                "warnings": [str(w.message) for w in caught if w.category is RuntimeWarning],
                "warning_files": [w.filename for w in caught if w.category is RuntimeWarning],
            }
            if module.affine:
                record["dweight"] = module.weight.grad.clone()
                record["dbias"] = module.bias.grad.clone()
                module.weight.grad = module.bias.grad = None
            for name, buffer in module.named_buffers():
                record[name] = buffer.clone()
            records.append(record)
    finally:
        _ops.fast_path = fast_path
    return {"steps": records}


def run_count_one(spec, rank, world):
    """A global batch of one value per channel, then a good step: every rank raises, none hangs."""
    from fastbn.torch.sync import SyncBatchNorm

    module = SyncBatchNorm(spec["shape"][0], dtype=torch.float64)
    x = torch.ones((spec["sizes"][rank], *spec["shape"]), dtype=torch.float64)
    result = {}
    try:
        module(x)
        result["error"] = None
    except ValueError as error:
        result["error"] = str(error)
    result["counter"] = int(module.num_batches_tracked)
    # The group still works: the next step runs on every rank.
    y = module(torch.randn(3, spec["shape"][0], dtype=torch.float64))
    result["next_shape"] = tuple(y.shape)
    return result


def run_timeout(spec, rank, world):
    """Rank 1 passes input with the wrong channel count; rank 0 waits for the group's timeout.

    Ordered by events, not by time: rank 1 calls the layer (which raises)
    and then enters a barrier of the default group; rank 0 passes that
    barrier only after it, then calls its layer, whose all_gather on a
    group with a short timeout waits for a peer that never comes. Each rank
    records its events in order, including every collective the layer
    enters (torch.distributed's all_gather and all_reduce, wrapped for the
    call) and how it ended.
    """
    from fastbn.torch.sync import SyncBatchNorm

    group = dist.new_group(
        list(range(world)), timeout=datetime.timedelta(seconds=SHORT_TIMEOUT_SECONDS)
    )
    c = spec["shape"][0]
    module = SyncBatchNorm(c, process_group=group, dtype=torch.float64)
    failing = rank == 1
    x = torch.randn(4, c + 1 if failing else c, dtype=torch.float64)
    events = []

    def recording(name, collective):
        def call(*args, **kwargs):
            events.append(f"{name} entered")
            try:
                result = collective(*args, **kwargs)
            except Exception as caught:
                events.append(f"{name} raised {type(caught).__name__}")
                raise
            events.append(f"{name} returned")
            return result

        return call

    if not failing:
        dist.barrier()  # passed once rank 1 has raised and entered it
        events.append("peer raised")
    originals = {name: getattr(dist, name) for name in ("all_gather", "all_reduce")}
    error = None
    try:
        for name, collective in originals.items():
            setattr(dist, name, recording(name, collective))
        events.append("forward")
        module(x)
        events.append("forward returned")
    except Exception as caught:
        error = (type(caught).__name__, str(caught)[:500])
        events.append(f"forward raised {type(caught).__name__}")
    finally:
        for name, collective in originals.items():
            setattr(dist, name, collective)
    if failing:
        events.append("barrier")
        dist.barrier()
    dist.barrier()  # the default group is intact
    return {"error": error, "events": events}


def run_ddp(spec, rank, world):
    """A small CNN with converted layers in DistributedDataParallel: losses and final state."""
    from torch.nn.parallel import DistributedDataParallel

    from fastbn.torch.sync import SyncBatchNorm

    model = make_cnn(spec["seed"])
    model = SyncBatchNorm.convert_sync_batchnorm(model)
    types = sorted({type(m).__name__ for m in model.modules()})
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=spec["lr"], momentum=0.9)
    losses = []
    for images, labels in cnn_batches(spec):
        per_rank = images.shape[0] // world
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(ddp(images[part]), labels[part])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"losses": losses, "state": model.state_dict(), "types": types}


def make_cnn(seed):
    """conv-BN-ReLU twice, pooling, a linear layer and a BatchNorm1d: float64, seeded."""
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10, bias=False),
        nn.BatchNorm1d(10),
    ).double()


def cnn_batches(spec):
    """Seeded 8x8 single-channel images and labels: the whole (all ranks') batch of each step.

    Two batches, taken in turn: the loss falls as the model learns them.
    """
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    batches = [
        (
            torch.randn(spec["batch"], 1, 8, 8, generator=gen, dtype=torch.float64),
            torch.randint(0, 10, (spec["batch"],), generator=gen),
        )
        for _ in range(2)
    ]
    for step in range(spec["steps"]):
        yield batches[step % 2]


RUNNERS = {"steps": run_steps, "count_one": run_count_one, "timeout": run_timeout, "ddp": run_ddp}


def main():
    scenarios_path, out_dir, rank, world, port = sys.argv[1:]
    rank, world = int(rank), int(world)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=GROUP_TIMEOUT,
    )
    with open(scenarios_path) as f:
        scenarios = json.load(f)
    results = {}
    for spec in scenarios:
        start = time.perf_counter()
        try:
            results[spec["name"]] = RUNNERS[spec["kind"]](spec, rank, world)
        except Exception:
            # The other ranks may now wait in a collective: the parent's timeout ends them.
            results[spec["name"]] = {"failed": traceback.format_exc()}
            torch.save(results, f"{out_dir}/rank{rank}.pt")
            raise
        results[spec["name"]]["wall"] = time.perf_counter() - start
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    gc.collect()  # DDP's reducer (reference cycles) goes while the group lives, not at exit
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
