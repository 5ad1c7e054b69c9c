"""fastbn.torch.SyncBatchNorm (the contract's SyncBatchNorm): gloo process groups on 127.0.0.1.

Two groups are spawned, of 2 and 3 processes (one Numba and one torch
thread each), and each runs a list of scenarios (`_sync_worker.py`) in
order; the results come back through files and are checked here against
single-process ``torch.nn.BatchNorm1d/2d/3d`` on the concatenated batch:

- outputs, input gradients, the sum over ranks of the weight and bias
  gradients (what DistributedDataParallel's all-reduce makes of them) and
  the running statistics (bit-identical on every rank) over several steps,
  float64 within 1e-10: uneven batch sizes, a rank with an empty batch, a
  rank with one value per channel, every rank empty, (N, C), (N, C, L),
  channels_last (N, C, H, W), (N, C, D, H, W) contiguous and
  channels_last_3d, momentum 0.1 and None, eval mode without running
  statistics, the torch-ops computation, a BatchNormReLU2d converted by
  convert_sync_batchnorm (torch's BatchNorm2d then ReLU), and bfloat16
  input; float32 on unit-scale data, dx included, within 1e-5;
- float32 global statistics at |mean|/std = 1e3 within the contract's accuracy bounds;
- a non-finite global batch: running statistics kept, a warning on every rank;
- a global count of one value per channel: ValueError on every rank;
- a small CNN in DistributedDataParallel with converted layers: the
  single-process loss curve and parameters;
- a rank whose input fails validation raises without entering a collective,
  and its peer, which calls the layer only after that (a barrier orders
  them), raises the group's (short) timeout error from the all_gather.

Then single-process tests: no group and a group of one behave as fastbn's
BatchNorm, validation happens before any collective, the merge formula,
convert_sync_batchnorm (every class of torch's and fastbn's: what each
computes kept, or a ValueError naming the layer), repr and class relations.
"""

import copy
import datetime
import json
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = torch.distributed
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import _sync_worker as worker  # noqa: E402
from conftest import python_env  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

import fastbn.torch as fbt  # noqa: E402
from fastbn.torch import sync  # noqa: E402
from fastbn.torch.sync import SyncBatchNorm  # noqa: E402

WORKER = pathlib.Path(worker.__file__)
GROUP_SECONDS = 240  # a whole group's run, compiles on a fresh cache included
TOL = 1e-10

# name -> scenario; every rank of a group runs them in this order.
TWO_RANKS = {
    "nc_uneven": {"kind": "steps", "shape": [5], "sizes": [7, 3], "steps": 3},
    "ncl_empty_rank_momentum_none": {
        "kind": "steps", "shape": [4, 6], "sizes": [5, 0], "steps": 3, "momentum": None,
    },
    "nchw_channels_last": {
        "kind": "steps", "shape": [3, 4, 5], "sizes": [2, 3], "steps": 2, "channels_last": True,
    },
    "one_value_on_a_rank": {"kind": "steps", "shape": [4], "sizes": [1, 3], "steps": 2},
    "eval_without_running_stats": {
        "kind": "steps", "shape": [3, 4], "sizes": [3, 2], "affine": False, "track": False,
        "training": False,
    },
    "torch_ops_channels_last": {
        "kind": "steps", "shape": [3, 2, 4], "sizes": [3, 2], "steps": 2, "momentum": None,
        "channels_last": True, "torch_ops": True,
    },
    "bfloat16_input": {
        "kind": "steps", "shape": [4, 5], "sizes": [4, 3], "dtype": "bfloat16",
        "module_dtype": "float32",
    },
    "float32_mean_1e3_ncl": {
        "kind": "steps", "shape": [4, 300], "sizes": [40, 24], "dtype": "float32",
        "offset": 499.0, "momentum": 1.0, "affine": False,
    },
    "float32_mean_1e3_channels_last": {
        "kind": "steps", "shape": [4, 8, 8], "sizes": [20, 12], "dtype": "float32",
        "offset": 499.0, "momentum": 1.0, "affine": False, "channels_last": True,
    },
    "nonfinite_batch": {
        "kind": "steps", "shape": [4], "sizes": [4, 4], "steps": 2, "poison_step": 1,
    },
    "count_one": {"kind": "count_one", "shape": [3], "sizes": [1, 0]},
    "ddp_cnn": {"kind": "ddp", "steps": 6, "batch": 16, "lr": 0.1},
    "ncdhw_uneven": {"kind": "steps", "shape": [3, 2, 3, 4], "sizes": [3, 2], "steps": 2},
    "ncdhw_channels_last_3d_momentum_none": {
        "kind": "steps", "shape": [4, 2, 3, 2], "sizes": [2, 3], "steps": 2, "momentum": None,
        "channels_last": True,
    },
    "float32_nchw_channels_last": {
        "kind": "steps", "shape": [3, 4, 5], "sizes": [3, 2], "steps": 2, "dtype": "float32",
        "channels_last": True,
    },
    "float32_ncl": {"kind": "steps", "shape": [4, 6], "sizes": [5, 3], "dtype": "float32"},
    # A BatchNormReLU2d through convert_sync_batchnorm: the ReLU after the synchronized BN.
    "fused_relu_converted": {
        "kind": "steps", "shape": [3, 4, 5], "sizes": [3, 2], "steps": 2, "momentum": 0.5,
        "channels_last": True, "convert": "BatchNormReLU",
    },
    # Last: it leaves a broken (timed-out) group behind.
    "validation_failure_timeout": {"kind": "timeout", "shape": [3]},
}  # fmt: skip

THREE_RANKS = {
    "nc_uneven_momentum_none": {
        "kind": "steps", "shape": [5], "sizes": [2, 5, 1], "steps": 3, "momentum": None,
    },
    "ncl_empty_middle_rank": {"kind": "steps", "shape": [3, 7], "sizes": [3, 0, 4], "steps": 2},
    "nchw_channels_last": {
        "kind": "steps", "shape": [4, 3, 3], "sizes": [2, 1, 3], "steps": 2, "channels_last": True,
    },
    "every_rank_empty": {"kind": "steps", "shape": [3, 2], "sizes": [0, 0, 0], "steps": 2},
    "count_one": {"kind": "count_one", "shape": [3], "sizes": [0, 1, 0]},
}  # fmt: skip


def _specs(scenarios):
    specs = []
    for seed, (name, spec) in enumerate(scenarios.items()):
        spec = {"dtype": "float64", "seed": 1000 + seed, **spec, "name": name}
        specs.append(spec)
    return specs


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(world, scenarios, folder, cache_dir):
    """Spawn ``world`` workers on the scenarios; return each rank's results (a list of dicts)."""
    path = folder / "scenarios.json"
    path.write_text(json.dumps(_specs(scenarios)))
    env = python_env(cache_dir, NUMBA_NUM_THREADS=1, OMP_NUM_THREADS=1)
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    port = _free_port()
    procs, logs = [], []
    for rank in range(world):
        log = open(folder / f"rank{rank}.log", "w+")  # closed below
        logs.append(log)
        command = [sys.executable, WORKER, path, folder, rank, world, port]
        procs.append(
            subprocess.Popen(
                [str(arg) for arg in command], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        )
    deadline = time.monotonic() + GROUP_SECONDS
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
    report = "\n".join(
        f"--- rank {r} (exit {p.returncode})\n{out[-4000:]}"
        for r, (p, out) in enumerate(zip(procs, outputs, strict=True))
    )
    assert all(p.returncode == 0 for p in procs), report
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, subprocess_cache):
    return run_group(2, TWO_RANKS, tmp_path_factory.mktemp("sync2"), subprocess_cache)


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory, subprocess_cache):
    return run_group(3, THREE_RANKS, tmp_path_factory.mktemp("sync3"), subprocess_cache)


# ---------------------------------------------------------------- references


def reference_steps(spec):
    """torch's own BatchNorm on the whole batch, step by step: the records a rank makes."""
    weight, bias, steps = worker.make_data(spec)
    dtype = worker.DTYPES[spec["dtype"]]
    ndim = len(spec["shape"]) + 1
    module_type = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[
        ndim
    ]
    relu = spec.get("convert") == "BatchNormReLU"  # torch's BatchNorm, then nn.ReLU
    ref = module_type(
        spec["shape"][0],
        momentum=spec.get("momentum", 0.1),
        affine=spec.get("affine", True),
        track_running_stats=spec.get("track", True),
        dtype=torch.float64,
    )
    if ref.affine:
        with torch.no_grad():
            # The values the ranks' modules hold, in their dtype.
            module_dtype = worker.DTYPES[spec.get("module_dtype", spec["dtype"])]
            ref.weight.copy_(weight.to(module_dtype))
            ref.bias.copy_(bias.to(module_dtype))
    ref.train(spec.get("training", True))
    records = []
    for x_all, dy_all in steps:
        # The values the ranks see, in float64.
        x = x_all.to(dtype).to(torch.float64).requires_grad_()
        y = nn.functional.relu(ref(x)) if relu else ref(x)
        y.backward(dy_all.to(dtype).to(torch.float64))
        record = {"y": y.detach(), "dx": x.grad}
        if ref.affine:
            record["dweight"], record["dbias"] = ref.weight.grad.clone(), ref.bias.grad.clone()
            ref.weight.grad = ref.bias.grad = None
        for name, buffer in ref.named_buffers():
            record[name] = buffer.clone()
        records.append(record)
    return records


def rank_part(t, sizes, rank):
    start = sum(sizes[:rank])
    return t[start : start + sizes[rank]]


def assert_close(actual, expected, atol, rtol, label):
    torch.testing.assert_close(
        actual, expected, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{label}: {m}"
    )


def check_steps(results, spec, atol, rtol=0.0):
    """Each rank's records against the single-process reference; buffers equal across ranks."""
    expected = reference_steps(spec)
    sizes = spec["sizes"]
    for step, ref in enumerate(expected):
        records = [r[spec["name"]]["steps"][step] for r in results]
        where = f"{spec['name']} step {step}"
        for rank, record in enumerate(records):
            for key in ("y", "dx"):
                part = rank_part(ref[key], sizes, rank)
                assert_close(record[key].double(), part, atol, rtol, f"{where} rank {rank} {key}")
            assert record["y"].shape == (sizes[rank], *spec["shape"])
            assert record["channels_last"] == bool(spec.get("channels_last") and sizes[rank])
        for key in ("dweight", "dbias"):
            if key in ref:
                total = sum(record[key].double() for record in records)
                assert_close(total, ref[key], atol, rtol, f"{where} {key}")
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            if key in ref:
                for record in records[1:]:
                    assert torch.equal(record[key], records[0][key]), f"{where} {key}"
                actual = records[0][key].double()
                assert_close(actual, ref[key].double(), atol, rtol, f"{where} {key}")


def find_spec(scenarios, name):
    return next(spec for spec in _specs(scenarios) if spec["name"] == name)


# ---------------------------------------------------------------- two and three processes

FLOAT64_TWO = [
    name
    for name, spec in TWO_RANKS.items()
    if spec["kind"] == "steps" and spec.get("dtype", "float64") == "float64"
    and "poison_step" not in spec
]  # fmt: skip
FLOAT64_THREE = [name for name, spec in THREE_RANKS.items() if spec["kind"] == "steps"]


@pytest.mark.parametrize("name", FLOAT64_TWO)
def test_two_ranks_match_torch_on_the_concatenated_batch(two_ranks, name):
    check_steps(two_ranks, find_spec(TWO_RANKS, name), TOL)


@pytest.mark.parametrize("name", FLOAT64_THREE)
def test_three_ranks_match_torch_on_the_concatenated_batch(three_ranks, name):
    check_steps(three_ranks, find_spec(THREE_RANKS, name), TOL)


FLOAT32_TWO = ["float32_nchw_channels_last", "float32_ncl"]


@pytest.mark.parametrize("name", FLOAT32_TWO)
def test_two_ranks_float32_match_torch_on_the_concatenated_batch(two_ranks, name):
    """float32 y, dx, parameter gradients and running statistics, unit-scale data.

    The reference is float64 torch on the same float32 values; the ranks'
    results are float32 (about 6e-8 relative each), computed from float64
    statistics: 1e-5, the suite's float32 standard on unit-scale data, with
    the parameter gradients (sums over the 60 or 48 values per channel of
    the whole batch) held to the same absolute bound.
    """
    spec = find_spec(TWO_RANKS, name)
    for result in two_ranks:
        for record in result[name]["steps"]:
            assert record["y"].dtype == record["dx"].dtype == torch.float32
            assert record["dweight"].dtype == record["running_var"].dtype == torch.float32
    check_steps(two_ranks, spec, atol=1e-5, rtol=1e-5)


def test_two_ranks_converted_batchnorm_relu_keeps_its_relu(two_ranks):
    """BatchNormReLU2d through convert_sync_batchnorm: a SyncBatchNorm whose output is ReLU'd.

    Against torch's BatchNorm2d then ReLU on the whole batch in
    `test_two_ranks_match_torch_on_the_concatenated_batch`; here, that the
    ReLU is there on each rank (zeros, and positive values) and the layer
    is a SyncBatchNorm saying so.
    """
    for rank, result in enumerate(two_ranks):
        for step, record in enumerate(result["fused_relu_converted"]["steps"]):
            y = record["y"]
            assert bool((y == 0).any()) and bool((y > 0).any()), (rank, step)
            assert bool((y >= 0).all()), (rank, step)
            assert record["module"].startswith("SyncBatchNorm(3,"), record["module"]
            assert record["module"].endswith("fused_relu=True)"), record["module"]


def test_bfloat16_input_takes_torch_ops_and_matches_within_its_precision(two_ranks):
    spec = find_spec(TWO_RANKS, "bfloat16_input")
    for result in two_ranks:
        record = result["bfloat16_input"]["steps"][0]
        assert record["y"].dtype == record["dx"].dtype == torch.bfloat16
        assert record["dweight"].dtype == record["running_mean"].dtype == torch.float32
    # bfloat16 keeps 8 significant bits: outputs within a few of its ulps.
    check_steps(two_ranks, spec, atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("name", ["float32_mean_1e3_ncl", "float32_mean_1e3_channels_last"])
def test_float32_global_statistics_meet_the_accuracy_bounds(two_ranks, name):
    """|mean|/std up to 1e3: the global statistics within the accuracy bounds, against float64."""
    spec = find_spec(TWO_RANKS, name)
    _, _, [(x_all, _)] = worker.make_data(spec)
    x = x_all.float().double()  # the float32 values, exactly
    dims = [0, *range(2, x.dim())]
    mean_ref, var_ref = x.mean(dims), x.var(dims, unbiased=False)
    std_ref = var_ref.sqrt()
    ratio = (mean_ref.abs() / std_ref).max()
    assert 5e2 < ratio <= 1.1e3
    n = x.numel() // x.shape[1]
    for result in two_ranks:
        record = result[name]["steps"][0]
        # momentum 1: the running statistics are the global ones, rounded to float32.
        mean = record["running_mean"].double()
        var = record["running_var"].double() * (n - 1) / n
        assert ((mean - mean_ref).abs() <= 1e-6 * (mean_ref.abs() + std_ref)).all()
        assert ((var - var_ref).abs() <= 1e-6 * var_ref).all()
    y_ref = (x - worker.channel_view(mean_ref, x.dim())) / worker.channel_view(
        (var_ref + 1e-5).sqrt(), x.dim()
    )
    for rank, result in enumerate(two_ranks):
        y = result[name]["steps"][0]["y"].double()
        assert (y - rank_part(y_ref, spec["sizes"], rank)).abs().max() <= 1e-4


def test_nonfinite_global_batch_keeps_running_stats_on_every_rank(two_ranks):
    spec = find_spec(TWO_RANKS, "nonfinite_batch")
    expected = reference_steps(spec)
    for rank, result in enumerate(two_ranks):
        before, after = result["nonfinite_batch"]["steps"]
        assert before["warnings"] == []
        # Rank 0's batch is finite, but the global statistics are not: it warns too.
        [message] = after["warnings"]
        assert "[1, 3]" in message and "left unchanged" in message
        assert all(f.endswith("_sync_worker.py") for f in after["warning_files"])
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(after[key], before[key]), key
        # The output is torch's (NaN in the poisoned features), the gradients too.
        for key in ("y", "dx"):
            torch.testing.assert_close(
                after[key], rank_part(expected[1][key], spec["sizes"], rank), atol=TOL,
                rtol=0, equal_nan=True,
            )  # fmt: skip


@pytest.mark.parametrize(("group", "world"), [("two_ranks", 2), ("three_ranks", 3)])
def test_global_count_of_one_raises_on_every_rank(request, group, world):
    results = request.getfixturevalue(group)
    for result in results:
        record = result["count_one"]
        assert record["error"].startswith("Expected more than 1 value per channel when training")
        assert f"got 1 over the {world} processes" in record["error"]
        assert record["counter"] == 0
        assert record["next_shape"] == (3, 3)


def test_ddp_cnn_with_converted_layers_matches_one_process(two_ranks):
    spec = find_spec(TWO_RANKS, "ddp_cnn")
    model = worker.make_cnn(spec["seed"])
    optimizer = torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=0.9)
    losses = []
    for images, labels in worker.cnn_batches(spec):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # Equal per-rank batches: the mean of the ranks' losses is the whole batch's.
    ranks = [result["ddp_cnn"] for result in two_ranks]
    mean_losses = np.mean([r["losses"] for r in ranks], axis=0)
    np.testing.assert_allclose(mean_losses, losses, rtol=0, atol=TOL)
    # Two batches in turn: each one's loss fell as the model learned it.
    assert losses[-2] < losses[0] and losses[-1] < losses[1]
    for r in ranks:
        assert "SyncBatchNorm" in r["types"]
        assert not {"BatchNorm1d", "BatchNorm2d"} & set(r["types"])
        for name, value in model.state_dict().items():
            torch.testing.assert_close(
                r["state"][name], value, atol=TOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}"
            )


def test_validation_failure_raises_there_and_peers_wait_for_the_timeout(two_ranks):
    """By the events each rank recorded, in order (no durations).

    Rank 1 raised its ValueError without entering any collective; rank 0,
    let through a barrier only after that, entered the forward's all_gather,
    which raised the group's timeout error, and the layer passed it on.
    """
    failing = two_ranks[1]["validation_failure_timeout"]
    name, message = failing["error"]
    assert name == "ValueError" and "expected input with 3 channels" in message
    assert failing["events"] == ["forward", "forward raised ValueError", "barrier"]
    waiting = two_ranks[0]["validation_failure_timeout"]
    name, message = waiting["error"]
    assert name in ("RuntimeError", "DistBackendError"), waiting["error"]
    assert "imed out" in message or "imeout" in message, message
    # gloo names the timeout it waited: the short group's, not the default group's.
    assert f"{worker.SHORT_TIMEOUT_SECONDS * 1000:.0f}ms" in message, message
    assert waiting["events"] == [
        "peer raised",
        "forward",
        "all_gather entered",
        f"all_gather raised {name}",
        f"forward raised {name}",
    ]


# ---------------------------------------------------------------- one process

C = 3


def make_input(gen, shape, dtype=torch.float64):
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    offset = torch.empty(shape[1], dtype=torch.float64).uniform_(-1, 1, generator=gen)
    return (x + worker.channel_view(offset, len(shape))).to(dtype)


def run(module, x, dy):
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    grads = {"y": y.detach(), "dx": x.grad}
    if module.affine:
        grads["dweight"], grads["dbias"] = module.weight.grad.clone(), module.bias.grad.clone()
        module.weight.grad = module.bias.grad = None
    return grads


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(20240611)


@pytest.fixture
def no_collectives(monkeypatch):
    """Any exchange fails the test."""

    def fail(*args, **kwargs):
        raise AssertionError("a collective was called")

    monkeypatch.setattr(sync, "_exchange", fail)
    monkeypatch.setattr(sync.dist, "all_reduce", fail)


def assert_same_as_fastbn(gen, momentum, memory_format=torch.contiguous_format):
    ours = SyncBatchNorm(C, momentum=momentum, dtype=torch.float64)
    local = fbt.BatchNorm2d(C, momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        for module in (ours, local):
            module.weight.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(1))
            module.bias.normal_(generator=torch.Generator().manual_seed(2))
    for training in (True, True, False):
        ours.train(training)
        local.train(training)
        x = make_input(gen, (4, C, 3, 5)).contiguous(memory_format=memory_format)
        dy = make_input(gen, x.shape)
        a, b = run(ours, x, dy), run(local, x, dy)
        for key in a:
            assert torch.equal(a[key], b[key]), key
        for key, buffer in local.named_buffers():
            assert torch.equal(getattr(ours, key), buffer), key


@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_a_process_group_it_is_fastbns_batchnorm(gen, no_collectives, momentum):
    assert not dist.is_initialized()
    assert_same_as_fastbn(gen, momentum)
    assert_same_as_fastbn(gen, momentum, torch.channels_last)


@pytest.fixture
def group_of_one(tmp_path):
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp_path / 'store'}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    yield
    dist.destroy_process_group()


def test_in_a_group_of_one_it_is_fastbns_batchnorm(gen, group_of_one, no_collectives):
    assert dist.get_world_size() == 1
    assert_same_as_fastbn(gen, 0.1)


@pytest.fixture
def fake_two_ranks(monkeypatch, no_collectives):
    """torch.distributed that claims a group of two: the sync path runs until its exchange."""
    monkeypatch.setattr(sync.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(sync.dist, "get_world_size", lambda group=None: 2)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: torch.ones(4, C + 1, dtype=torch.float64), ValueError, "3 channels"),
        (lambda: torch.ones(4, C, dtype=torch.int64), TypeError, "floating-point"),
        (lambda: torch.ones(C, dtype=torch.float64), ValueError, "expected at least 2D input"),
        (lambda: torch.ones(4, C, device="meta"), RuntimeError, "runs on CPU tensors"),
    ],
    ids=["channels", "dtype", "ndim", "device"],
)
def test_bad_input_raises_before_any_collective(fake_two_ranks, make, error, message):
    module = SyncBatchNorm(C, dtype=torch.float64)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(error, match=message):
        module(make())
    for key, value in module.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_bad_eps_raises_before_any_collective(fake_two_ranks):
    module = SyncBatchNorm(C, eps=0.0, dtype=torch.float64)
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        module(torch.ones(4, C, dtype=torch.float64))


def test_eval_with_running_stats_needs_no_collective(gen, fake_two_ranks):
    ours = SyncBatchNorm(C, dtype=torch.float64).eval()
    local = fbt.BatchNorm1d(C, dtype=torch.float64).eval()
    x = make_input(gen, (6, C))
    assert torch.equal(ours(x), local(x))


def test_merge_is_chans_formula_in_rank_order(gen):
    """Rows (count, mean, M2) of uneven and empty parts give the union's statistics."""
    sizes = [5, 0, 1, 12, 3]
    x = make_input(gen, (sum(sizes), 4))
    rows = []
    for rank in range(len(sizes)):
        part = rank_part(x, sizes, rank)
        mean = part.mean(0) if len(part) else torch.zeros(4, dtype=torch.float64)
        m2 = ((part - mean) ** 2).sum(0) if len(part) else torch.zeros(4, dtype=torch.float64)
        rows.append(torch.cat([torch.tensor([float(len(part))], dtype=torch.float64), mean, m2]))
    gathered = torch.stack(rows).numpy()
    count, mean, var = sync._merge(gathered)
    assert count == sum(sizes)
    np.testing.assert_allclose(mean, x.mean(0).numpy(), rtol=0, atol=1e-14)
    np.testing.assert_allclose(var, x.var(0, unbiased=False).numpy(), rtol=1e-14, atol=0)
    again = sync._merge(gathered.copy())
    assert all(np.array_equal(a, b) for a, b in zip((count, mean, var), again, strict=True))


def test_classes_and_repr():
    module = SyncBatchNorm(5, eps=1e-3, momentum=None, affine=False)
    assert isinstance(module, _BatchNorm)
    assert not isinstance(module, nn.SyncBatchNorm)
    assert not isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
    assert repr(module) == repr(nn.SyncBatchNorm(5, eps=1e-3, momentum=None, affine=False))
    assert list(module.state_dict()) == list(nn.SyncBatchNorm(5, affine=False).state_dict())
    assert module.process_group is None


def test_constructor_arguments_as_torchs():
    group = object()
    ours = SyncBatchNorm(4, 1e-3, 0.2, True, True, group, None, torch.float64)
    theirs = nn.SyncBatchNorm(4, 1e-3, 0.2, True, True, None, None, torch.float64)
    for name in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.process_group is group
    assert ours.weight.dtype == ours.running_mean.dtype == torch.float64


def test_convert_sync_batchnorm_keeps_state(gen):
    model = nn.Sequential(
        nn.Conv2d(2, C, 1),
        nn.BatchNorm2d(C, momentum=0.3),
        nn.Sequential(nn.Flatten(), nn.BatchNorm1d(C * 4, eps=1e-3, affine=False)),
        fbt.BatchNorm2d(C, momentum=None),
        nn.SyncBatchNorm(C, track_running_stats=False),
        nn.BatchNorm3d(C),
    ).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1, generator=gen)
        model[1].num_batches_tracked.fill_(7)
        model[3].weight.uniform_(0.5, 2, generator=gen)
    model[1].weight.requires_grad_(False)
    model[2][1].eval()
    layers = [model[1], model[2][1], model[3], model[4], model[5]]
    params = [[p for p in layer._parameters.values()] for layer in layers]
    buffers = [[b for b in layer._buffers.values()] for layer in layers]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    group = object()

    converted = SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    assert converted is model
    new_layers = [model[1], model[2][1], model[3], model[4], model[5]]
    for old, new, old_params, old_buffers in zip(layers, new_layers, params, buffers, strict=True):
        assert type(new) is SyncBatchNorm and new.process_group is group
        for name in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            assert getattr(new, name) == getattr(old, name), name
        assert new.training == old.training
        assert all(a is b for a, b in zip(new._parameters.values(), old_params, strict=True))
        assert all(a is b for a, b in zip(new._buffers.values(), old_buffers, strict=True))
    assert not model[1].weight.requires_grad and model[1].bias.requires_grad
    assert not model[2][1].training
    assert list(model.state_dict()) == list(state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key

    single = SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm1d(4))
    assert type(single) is SyncBatchNorm


def _fused_sync(**kwargs):
    """A SyncBatchNorm made from a BatchNormReLU2d: converting it again keeps its ReLU."""
    return SyncBatchNorm.convert_sync_batchnorm(fbt.BatchNormReLU2d(C, **kwargs))


# name -> (make the layer, input shape, whether a ReLU follows its normalization)
CONVERTED = {
    "torch_BatchNorm1d": (lambda: nn.BatchNorm1d(C, momentum=0.5), (6, C), False),
    "torch_BatchNorm2d": (lambda: nn.BatchNorm2d(C, eps=1e-3), (3, C, 4, 5), False),
    "torch_BatchNorm3d": (lambda: nn.BatchNorm3d(C, affine=False), (2, C, 2, 3, 2), False),
    "torch_SyncBatchNorm": (lambda: nn.SyncBatchNorm(C, momentum=None), (3, C, 4, 5), False),
    "fastbn_BatchNorm1d": (
        lambda: fbt.BatchNorm1d(C, track_running_stats=False),
        (4, C, 5),
        False,
    ),
    "fastbn_BatchNorm2d": (lambda: fbt.BatchNorm2d(C, momentum=None), (3, C, 4, 5), False),
    "fastbn_BatchNorm3d": (lambda: fbt.BatchNorm3d(C), (2, C, 2, 3, 2), False),
    "fastbn_SyncBatchNorm": (lambda: SyncBatchNorm(C, momentum=0.3), (5, C, 2), False),
    "BatchNormReLU1d": (lambda: fbt.BatchNormReLU1d(C, momentum=0.5), (4, C, 5), True),
    "BatchNormReLU2d": (lambda: fbt.BatchNormReLU2d(C, affine=False), (3, C, 4, 5), True),
    "BatchNormReLU3d": (lambda: fbt.BatchNormReLU3d(C, momentum=None), (2, C, 2, 3, 2), True),
    "SyncBatchNorm_fused_relu": (lambda: _fused_sync(eps=1e-3), (3, C, 4, 5), True),
}


@pytest.mark.parametrize("name", CONVERTED)
def test_convert_sync_batchnorm_keeps_what_each_layer_computes(gen, no_collectives, name):
    """No process group (SyncBatchNorm is then the local layer): the converted layer's
    outputs, gradients and buffers are the original's over two training steps and eval
    (float64, 1e-10); a BatchNormReLU's ReLU is kept (zeros in the output) and shown."""
    make, shape, relu = CONVERTED[name]
    original = make().double()
    if original.affine:
        with torch.no_grad():
            original.weight.uniform_(0.5, 2, generator=gen)
            original.bias.normal_(generator=gen)
    if original.track_running_stats:
        with torch.no_grad():
            original.running_mean.uniform_(-1, 1, generator=gen)
            original.running_var.uniform_(0.5, 2, generator=gen)
    expected_module = copy.deepcopy(original)  # the conversion shares parameters and buffers
    converted = SyncBatchNorm.convert_sync_batchnorm(original)
    assert type(converted) is SyncBatchNorm
    assert converted.fused_relu is relu
    assert repr(converted).endswith(", fused_relu=True)") is relu
    for training in (True, True, False):
        converted.train(training)
        expected_module.train(training)
        x, dy = make_input(gen, shape), make_input(gen, shape)
        mine, expected = run(converted, x, dy), run(expected_module, x, dy)
        assert mine.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(
                mine[key], value, atol=TOL, rtol=0, msg=f"{key}, {training}"
            )
        for key, buffer in expected_module.named_buffers():
            actual = getattr(converted, key)
            torch.testing.assert_close(actual, buffer, atol=TOL, rtol=0, msg=key)
        y = mine["y"]
        # Not vacuous: the ReLU cuts values, and without one there are negative outputs.
        assert bool((y < 0).any()) is not relu and bool((y > 0).any()), (name, training)


def test_convert_sync_batchnorm_keeps_the_relus_convert_fused(gen, no_collectives):
    """A model fused by fbt.convert(fuse_relu=True), then converted: torch's BN + ReLU model."""
    with torch.random.fork_rng():
        torch.manual_seed(5)
        theirs = nn.Sequential(
            nn.Conv2d(2, C, 1),
            nn.BatchNorm2d(C, momentum=0.5),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(C * 4 * 4, 5),
            nn.BatchNorm1d(5),
            nn.ReLU(inplace=True),
        ).double()
    model = SyncBatchNorm.convert_sync_batchnorm(
        fbt.convert(copy.deepcopy(theirs), fuse_relu=True)
    )
    kinds = [type(layer) for layer in model]
    assert kinds == [
        nn.Conv2d,
        SyncBatchNorm,
        nn.Identity,
        nn.Flatten,
        nn.Linear,
        SyncBatchNorm,
        nn.Identity,
    ]
    assert model[1].fused_relu and model[5].fused_relu
    for step in range(3):
        x = make_input(gen, (6, 2, 4, 4))
        dy = make_input(gen, (6, 5))
        mine, expected = run_model(model, x, dy), run_model(theirs, x, dy)
        for key, value in expected.items():
            torch.testing.assert_close(mine[key], value, atol=TOL, rtol=0, msg=f"{key}, {step}")
        assert float(mine["y"].min()) == 0.0 and bool((mine["y"] > 0).any())
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=TOL, rtol=0, msg=key)


def run_model(model, x, dy):
    """Forward and backward through a model: output, input gradient, every parameter's."""
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.backward(dy)
    grads = {f"d{name}": p.grad for name, p in model.named_parameters()}
    return {"y": y.detach(), "dx": x.grad, **grads}


# name -> (the layer, what the error says about it)
REFUSED = {
    "BatchRenorm1d": (lambda: fbt.BatchRenorm1d(C), "Batch Renormalization"),
    "BatchRenorm2d": (lambda: fbt.BatchRenorm2d(C, momentum=None), "Batch Renormalization"),
    "BatchRenorm3d": (lambda: fbt.BatchRenorm3d(C), "Batch Renormalization"),
    "ghost_BatchNorm2d": (
        lambda: fbt.BatchNorm2d(C, virtual_batch_size=2),
        "virtual_batch_size=2 (ghost",
    ),
    "ghost_BatchNormReLU1d": (
        lambda: fbt.BatchNormReLU1d(C, virtual_batch_size=4),
        "virtual_batch_size=4 (ghost",
    ),
}


@pytest.mark.parametrize("name", REFUSED)
def test_convert_sync_batchnorm_refuses_renorm_and_ghost_layers(name):
    """A ValueError naming the layer's path, class and what it computes; nothing converted."""
    make, reason = REFUSED[name]
    layer = make()
    model = nn.Sequential(nn.BatchNorm2d(C), nn.Sequential(nn.ReLU(), layer), fbt.BatchNorm1d(C))
    before = [type(m) for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cls_name = type(layer).__name__
    with pytest.raises(ValueError) as raised:
        SyncBatchNorm.convert_sync_batchnorm(model)
    message = str(raised.value)
    assert f"layer '1.1' is a {cls_name}, which has no synchronized form" in message, message
    assert reason in message and message.endswith("Nothing was converted"), message
    assert [type(m) for m in model.modules()] == before  # not even the layers before it
    assert model[1][1] is layer
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    with pytest.raises(ValueError, match=f"the module itself is a {cls_name}"):
        SyncBatchNorm.convert_sync_batchnorm(layer)


def test_a_ghost_layer_without_virtual_batches_converts(gen, no_collectives):
    """virtual_batch_size set back to None: a plain batch norm, which converts."""
    layer = fbt.BatchNorm2d(C, virtual_batch_size=2, dtype=torch.float64)
    layer.virtual_batch_size = None
    expected_module = copy.deepcopy(layer)
    converted = SyncBatchNorm.convert_sync_batchnorm(layer)
    assert type(converted) is SyncBatchNorm
    x, dy = make_input(gen, (4, C, 2, 3)), make_input(gen, (4, C, 2, 3))
    mine, expected = run(converted, x, dy), run(expected_module, x, dy)
    for key, value in expected.items():
        assert torch.equal(mine[key], value), key


def test_converted_model_trains_as_torchs_in_one_process(gen):
    """No process group: a converted model steps like torch's (float64, 1e-10)."""
    theirs = worker.make_cnn(seed=3)
    ours = SyncBatchNorm.convert_sync_batchnorm(worker.make_cnn(seed=3))
    images = torch.randn(6, 1, 8, 8, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 10, (6,), generator=gen)
    for model in (theirs, ours):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
    for name, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value, atol=TOL, rtol=0)


def test_exported_from_fastbn_torch():
    assert fbt.SyncBatchNorm is SyncBatchNorm
    assert "SyncBatchNorm" in fbt.__all__
