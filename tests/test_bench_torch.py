"""The plumbing of ``python -m fastbn.bench --torch`` (fastbn/bench/torch_mode.py), not speed.

Rows, ratios and their spreads, torch against itself, the geometric means,
batch norm's shares and the contract's targets (MET, NOT MET, WITHIN NOISE)
come from fake timings; the layer rows' rounds (and a row measured again)
run against fake workers, the model rows' pairs of processes against a fake
process runner (the order alternating). With torch: the bench's models build
as described and train, each converted model's loss matches torch's in both
memory formats (the large models at tiny sizes), a model process times its
steps and compiles compiled rows (a stand-in for torch.compile: a real
compile takes a minute a model), its count of the layers on fastbn's
kernels matches each layer's own node, and a tiny end-to-end run (one layer
row through the workers; the MLP's row at batch 4 in two pairs of
processes) prints the report.
"""

import importlib.util
import json
import math

import pytest

from fastbn import bench
from fastbn.bench import report, stats
from fastbn.bench import torch_mode as bt

needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="torch is not installed"
)


# Each round's factor on the fastbn worker's and the second torch worker's times (torch's
# own are exact): round by round, torch / fastbn and torch / torch again scatter by 2%, and
# their medians are exact (the factors' median is 1.0).
SCATTER = (1.0, 1.02, 0.98, 1.01, 0.99)
CALLS_A_ROUND = 3


def fake_times(torch_s, fastbn_s, calls=("train", "eval"), again=True):
    """Each worker's times, a list of calls per round (`SCATTER`), around the given medians;
    the second torch worker's (torch again) too, unless not ``again`` (compiled rows)."""
    seconds = {"torch": torch_s, "fastbn": fastbn_s, bt.AGAIN: torch_s}
    shift = {"torch": None, "fastbn": 0, bt.AGAIN: 2}
    if not again:
        del seconds[bt.AGAIN]

    def factor(peer, r):
        return 1.0 if shift[peer] is None else SCATTER[(r + shift[peer]) % len(SCATTER)]

    return {
        peer: {
            c: [[s[c] * factor(peer, r)] * CALLS_A_ROUND for r in range(len(SCATTER))]
            for c in calls
        }
        for peer, s in seconds.items()
    }


def layer_rows(ratios):
    """Layer rows with the given torch / fastbn ratios (fastbn at 1 ms)."""
    rows = []
    for i, r in enumerate(ratios):
        times = fake_times({"train": r * 1e-3}, {"train": 1e-3}, calls=("train",))
        rows += bt.make_rows("layer", f"{i}x8 bf", "float32", 32, times)
    return rows


def fake_reply(wall, identity=None, first=30.0, cpu_factor=2.0):
    """A model process's reply: its timed steps around ``wall`` (median ``wall``), CPU times
    ``cpu_factor`` times them, and the step without BN at ``identity`` if given."""

    def times(seconds):
        wall_times = [0.5 * seconds, seconds, 3 * seconds]
        return {"wall": wall_times, "cpu": [cpu_factor * t for t in wall_times]}

    reply = {"step": {"first": first, **times(wall)}}
    if identity is not None:
        reply["identity"] = {"first": 20.0, **times(identity)}
    return reply


IMPLEMENTATIONS = {"fastbn": 12, "torch": 8}


def model_row(case, ratio, share=(0.2, 0.1)):
    """A model-table row of the case (a ModelCase) from `SCATTER`'s five pairs of fake
    processes: fastbn's step at 10 ms times each pair's factor, torch's at ratio times 10 ms;
    CPU times twice the wall times for torch, four times for fastbn (CPU ratio half the wall
    one); each peer's step without BN at (1 - its share) of its step; torch against itself
    (none under compile) torch's step over it times a factor of `SCATTER` shifted by two;
    first calls (the compile) torch 30 s, fastbn 31 s."""
    shares = dict(zip(bt.PEERS, share, strict=True))
    steps = {"torch": ratio * 1e-2, "fastbn": 1e-2}
    pairs, again = [], []
    for i, f in enumerate(SCATTER):
        fastbn = fake_reply(f * steps["fastbn"], (1 - shares["fastbn"]) * 1e-2, 31.0, 4.0)
        if not case.compiled:
            fastbn["implementations"] = IMPLEMENTATIONS
        pairs.append(
            {
                "torch": fake_reply(steps["torch"], (1 - shares["torch"]) * steps["torch"]),
                "fastbn": fastbn,
            }
        )
        if not case.compiled:
            shifted = SCATTER[(i + 2) % len(SCATTER)]
            again.append([fake_reply(steps["torch"]), fake_reply(shifted * steps["torch"])])
    return bt.make_model_row(case, bt.model_input_shape(case), pairs, again)


def model_rows(ratios, compiled=False, cases=bt.MODEL_CASES):
    """The whole model table (``cases``): a ratio per row, or one number for all."""
    if not isinstance(ratios, list):
        ratios = [ratios] * len(cases)
    cases = [bt.ModelCase(c.model, c.format, c.large, compiled) for c in cases]
    return [model_row(c, r) for c, r in zip(cases, ratios, strict=True)]


def statuses(rows):
    return [t["met"] for t in bt.evaluate_targets(rows)]


def test_rows_are_medians_and_ratios_with_their_spreads():
    times = fake_times({"train": 4e-3, "eval": 1e-3}, {"train": 2e-3, "eval": 2e-3})
    rows = bt.make_rows("layer", "32x128 bf", "float64", 32768, times)
    assert [r["pass"] for r in rows] == ["train", "eval"]
    train, evaluate = rows
    # The medians over the rounds of each round's median.
    assert train["seconds"] == {"torch": 4e-3, "fastbn": 2e-3, bt.AGAIN: 4e-3}
    assert train["rounds"]["fastbn"] == [2e-3 * f for f in SCATTER]
    # torch / fastbn round by round: its median, and its interval (5 rounds: the range).
    assert train["ratio"] == pytest.approx(
        {"median": 2.0, "low": 2 / 1.02, "high": 2 / 0.98, "n": 5}
    )
    assert evaluate["ratio"]["median"] == pytest.approx(0.5)
    assert train["noise"] == pytest.approx(
        {"median": 1.0, "low": 1 / 1.02, "high": 1 / 0.98, "n": 5}
    )
    assert train["runs"] == {peer: 5 * CALLS_A_ROUND for peer in times}
    assert (train["kind"], train["case"], train["dtype"]) == ("layer", "32x128 bf", "float64")
    # Without a second torch worker (the compiled rows): no noise floor, 1.0x.
    bare = bt.make_rows(
        "layer", "c", "float32", 1, fake_times({"train": 1}, {"train": 1}, ("train",), again=False)
    )
    assert bare[0]["noise"] is None and bt.noise_floor(bare[0]) == 1.0
    # The floor: the lowest torch against itself reads, either way round (1 / 1.0204).
    assert bt.noise_floor(train) == pytest.approx(0.98)


def test_geometric_mean_is_taken_round_by_round():
    g = bt.geometric_mean(layer_rows([2.0, 0.5]))
    assert g == pytest.approx(stats.estimate([1 / f for f in SCATTER]))
    assert bt.geometric_mean(layer_rows([1.5, 1.5, 1.5]))["median"] == pytest.approx(1.5)
    assert bt.geometric_mean([]) is None
    assert stats.geometric_mean_rounds([[2.0, 8.0], [0.5, 2.0, 9.0]]) == pytest.approx([1.0, 4.0])


SMALL_CASES = [c for c in bt.MODEL_CASES if not c.large]
LARGE_CASES = [c for c in bt.MODEL_CASES if c.large]
VGG_LARGE = ["vgg11_bn nchw large", "vgg11_bn nhwc large"]


def test_model_table_is_every_model_in_its_formats_at_two_sizes():
    assert [c.label for c in bt.MODEL_CASES] == [
        *("resnet18 nchw", "resnet18 nhwc", "mobilenetv2 nchw", "mobilenetv2 nhwc"),
        *("vgg11_bn nchw", "vgg11_bn nhwc", "cnn nchw", "cnn nhwc", "mlp bf"),
        *VGG_LARGE,
        *("resnet18 nchw large", "resnet18 nhwc large"),
        *("mobilenetv2 nchw large", "mobilenetv2 nhwc large"),
        *("r3d18 nchw large", "r3d18 nhwc large"),
    ]
    case = bt.ModelCase("r3d18", "nhwc", large=True, compiled=True)
    assert case.label == "r3d18 nhwc large compiled"
    assert bt.ModelCase.from_json(json.loads(json.dumps(case.to_json()))) == case
    shapes = {c.label: bt.model_input_shape(c) for c in bt.MODEL_CASES}
    assert shapes["resnet18 nchw"] == shapes["vgg11_bn nhwc"] == (16, 3, 64, 64)
    assert shapes["vgg11_bn nchw large"] == (8, 3, 128, 128)
    assert shapes["resnet18 nhwc large"] == shapes["mobilenetv2 nchw large"] == (8, 3, 224, 224)
    assert shapes["r3d18 nhwc large"] == (2, 3, 8, 112, 112)  # 8 frames
    # The tests' tiny runs: another batch and image size; the frames and the MLP's input stay.
    assert bt.model_input_shape(case, batch=1, size=32) == (1, 3, 8, 32, 32)
    assert bt.model_input_shape(bt.ModelCase("mlp", "bf"), batch=4, size=32) == (4, 784)


@needs_torch
def test_nhwc_is_channels_last_in_two_and_three_dimensions():
    import torch

    assert bt.memory_format("nhwc", 4) == torch.channels_last
    assert bt.memory_format("nhwc", 5) == torch.channels_last_3d
    assert bt.memory_format("nchw", 5) == torch.contiguous_format


def test_model_row_is_the_median_of_the_pairs_ratios_with_its_spread():
    row = model_row(bt.ModelCase("resnet18", "nhwc", large=True), 1.25, share=(0.3, 0.1))
    assert (row["kind"], row["case"], row["pass"]) == ("model", "resnet18 nhwc large", "step")
    assert (row["model"], row["format"], row["large"], row["compiled"]) == (
        *("resnet18", "nhwc"),
        *(True, False),
    )
    assert row["input"] == [8, 3, 224, 224]
    # A process's time is the median of its steps; a peer's the median over its processes.
    assert row["rounds"]["fastbn"] == pytest.approx([1e-2 * f for f in SCATTER])
    assert row["seconds"] == pytest.approx({"torch": 1.25e-2, "fastbn": 1e-2})
    # torch / fastbn pair by pair: its median, and its interval (5 pairs: the range).
    pair_ratios = [1.25 / f for f in SCATTER]
    assert row["ratio"] == pytest.approx(stats.estimate(pair_ratios))
    assert row["ratio"] == pytest.approx(
        {"median": 1.25, "low": 1.25 / 1.02, "high": 1.25 / 0.98, "n": 5}
    )
    # By CPU time: fastbn's processes spend twice the CPU per wall second torch's do.
    assert row["cpu_ratio"] == pytest.approx(stats.estimate([r / 2 for r in pair_ratios]))
    assert row["cpu_seconds"] == pytest.approx({"torch": 2 * 1.25e-2, "fastbn": 4e-2})
    # Torch against itself: the first process of each A/A pair over the second.
    assert row["noise"] == pytest.approx(
        {"median": 1.0, "low": 1 / 1.02, "high": 1 / 0.98, "n": 5}
    )
    assert row["cpu_noise"] == pytest.approx(row["noise"])
    assert bt.noise_floor(row) == pytest.approx(0.98)
    assert row["runs"] == {"torch": 15, "fastbn": 15} and row["pairs"] == 5
    assert row["identity_seconds"]["torch"] == pytest.approx(0.7 * 1.25e-2)
    assert row["bn_share"] == pytest.approx({"torch": 0.3, "fastbn": 0.1})
    assert row["first_call"] == {
        "torch": {"step": 30.0, "identity": 20.0},
        "fastbn": {"step": 31.0, "identity": 20.0},
    }
    assert row["implementations"] == IMPLEMENTATIONS
    assert bt.format_bn_share(row) == (
        "resnet18 nhwc large: BN share of the step: torch 30% (12.50ms, 8.75ms without BN),"
        " fastbn 10% (10.00ms, 9.00ms without BN)"
    )
    # Processes that did not time the step without BN: no share, and the line says so.
    bare = {"torch": fake_reply(1e-2), "fastbn": fake_reply(1e-2)}
    row = bt.make_model_row(bt.ModelCase("mlp", "bf"), (4, 784), [bare], [])
    assert row["bn_share"] is None and row["identity_seconds"] is None
    assert row["noise"] is None and row["implementations"] is None
    assert bt.format_bn_share(row) == "mlp bf: BN share not measured"


class FakeProcesses:
    """Fake fresh processes for `measure_model_row`: each run logs its peer and job, and
    answers with its step at the run's number in seconds (the n-th run: n s)."""

    def __init__(self):
        self.log = []

    def __call__(self, peer, job, env):
        self.log.append((peer, job["identity"], env["peer"]))
        reply = fake_reply(len(self.log), identity=0.5 if job["identity"] else None)
        if peer == "fastbn":
            reply["implementations"] = IMPLEMENTATIONS
        return reply


ENVS = {peer: {"peer": peer} for peer in bt.PEERS}


def test_model_rows_are_pairs_of_fresh_processes_whose_order_alternates():
    run = FakeProcesses()
    settings = bt.Settings(cases=[], dtypes=[], models=[], budget=1.0, pairs=4, batch=2)
    row = bt.measure_model_row(bt.ModelCase("cnn", "nchw"), settings, ENVS, run)
    pair = [("torch", False, "torch"), ("fastbn", False, "fastbn")]
    first = [("torch", True, "torch"), ("fastbn", True, "fastbn")]  # with the step without BN
    aa = [("torch", False, "torch")] * 2  # torch against itself: no step without BN
    assert bt.AGAIN_EVERY == 2
    assert run.log == first + aa + pair[::-1] + pair + aa + pair[::-1]
    # Run n took n s: pairs (torch, fastbn) (1, 2), (6, 5), (7, 8), (12, 11); torch against
    # itself (3, 4), then (9, 10) taken the other way round.
    assert row["rounds"] == {"torch": [1, 6, 7, 12], "fastbn": [2, 5, 8, 11]}
    assert row["ratio"] == pytest.approx(stats.estimate([1 / 2, 6 / 5, 7 / 8, 12 / 11]))
    assert row["noise"] == pytest.approx(stats.estimate([3 / 4, 10 / 9]))
    assert row["input"] == [2, 3, 32, 32] and row["implementations"] == IMPLEMENTATIONS
    # Batch norm's share from the first pair alone (the fake's step without BN: 0.5 s).
    assert row["identity_seconds"] == {"torch": 0.5, "fastbn": 0.5}
    # The job: the row, the settings' steps, batch and size; the large rows' own steps.
    job = bt.model_job(bt.ModelCase("cnn", "nchw"), settings)
    assert (job["warm_up"], job["steps"], job["batch"], job["size"]) == (
        *(bt.WARM_UP, bt.STEPS),
        *(2, None),
    )
    job = bt.model_job(bt.ModelCase("vgg11_bn", "nchw", large=True), settings)
    assert (job["warm_up"], job["steps"]) == (bt.LARGE_WARM_UP, bt.LARGE_STEPS)
    assert bt.LARGE_STEPS < bt.STEPS
    # Compiled rows: no torch against itself (a third cold compile of every model).
    run = FakeProcesses()
    row = bt.measure_model_row(bt.ModelCase("cnn", "nchw", compiled=True), settings, ENVS, run)
    assert run.log == first + pair[::-1] + pair + pair[::-1] and row["noise"] is None


def test_targets_all_met():
    targets = bt.evaluate_targets(layer_rows([1.2, 1.4, 1.5]) + model_rows(1.2))
    assert [t["met"] for t in targets] == [True] * 7 + [None]
    layer = layer_rows([1.2])[0]
    assert targets[0]["measured"] == (
        f"worst {report.format_range(layer['ratio'])} (0x8 bf float32 train),"
        f" torch against itself {report.format_range(layer['noise'])}"
    )
    assert targets[0]["measured"].startswith("worst 1.20x (1.18-1.22)")
    g = (1.2 * 1.4 * 1.5) ** (1 / 3)
    assert (
        targets[1]["measured"].startswith(f"{g:.2f}x (")
        and "over 3 rows" in targets[1]["measured"]
    )
    assert targets[2]["measured"] == "cnn nchw 1.20x (1.18-1.22), mlp bf 1.20x (1.18-1.22)"
    assert targets[3]["measured"].startswith(
        "worst 1.20x (1.18-1.22) (resnet18 nchw float32 step)"
    )
    assert targets[4]["measured"] == f"1.20x (1.18-1.22) over {len(SMALL_CASES)} rows"
    assert targets[5]["measured"] == f"1.20x (1.18-1.22) over {len(LARGE_CASES)} rows"
    assert targets[6]["measured"] == ", ".join(f"{c} 1.20x (1.18-1.22)" for c in VGG_LARGE)
    compiled = bt.evaluate_targets(model_rows(1.2) + model_rows(1.05, compiled=True))
    assert compiled[7]["met"] is True
    # No torch against itself under compile: the row's own spread against 1.0x.
    assert (
        compiled[7]["measured"] == "worst 1.05x (1.03-1.07) (resnet18 nchw compiled float32 step)"
    )


def test_a_row_slower_within_the_spread_of_torch_against_itself_is_not_called_slower():
    # torch against itself reads 0.98-1.02x in these rows: 0.99x (0.97-1.01) is within it.
    assert statuses(layer_rows([0.99, 2.0, 2.0]) + model_rows(1.2))[0] == stats.NOISE
    # Beyond it, the row is slower: the every-row target fails, the geometric mean holds.
    assert statuses(layer_rows([0.9, 2.0, 2.0]) + model_rows(1.2)) == [
        *(False, True),
        *(True,) * 5,
        None,
    ]
    # Equal to torch is never MET, nor NOT MET: the run cannot tell.
    assert statuses(layer_rows([1.0, 1.0]) + model_rows(1.2))[:2] == [stats.NOISE, False]
    # A wide floor does not turn a row MET: 0.9x against torch against itself 0.5-2x.
    row = layer_rows([0.9])[0]
    row["noise"] = {"median": 1.0, "low": 0.5, "high": 2.0, "n": 5}
    assert bt.evaluate_targets([row])[0]["met"] == stats.NOISE
    row["ratio"] = {"median": 0.4, "low": 0.38, "high": 0.45, "n": 5}
    assert bt.evaluate_targets([row])[0]["met"] is False  # slower beyond even that
    # The same band for a model row: 0.99x (0.97-1.01) is parity, 0.95x is slower.
    assert statuses(model_rows(0.99))[3] == stats.NOISE
    assert statuses(model_rows(0.95))[3] is False


def test_model_table_targets_not_met():
    ratios = [1.5] * len(bt.MODEL_CASES)
    ratios[1] = 0.9  # resnet18 nhwc: the every-row target fails, the geometric means hold
    targets = bt.evaluate_targets(model_rows(ratios))
    assert [t["met"] for t in targets[3:7]] == [False, True, True, True]
    assert targets[3]["measured"].startswith(
        "worst 0.90x (0.88-0.92) (resnet18 nhwc float32 step)"
    )
    # Every row at least 1.0x: the 64 px rows' mean holds at 1.1x, the large rows' fails.
    targets = bt.evaluate_targets(model_rows(1.1))
    assert [t["met"] for t in targets[3:7]] == [True, True, False, False]
    assert targets[5]["measured"] == f"1.10x (1.08-1.12) over {len(LARGE_CASES)} rows"
    # The 64 px rows' mean below 1.0x beyond its spread, the large rows' above 1.15x.
    targets = bt.evaluate_targets(
        model_rows(0.9, cases=SMALL_CASES) + model_rows(1.3, cases=LARGE_CASES)
    )
    assert [t["met"] for t in targets[3:7]] == [False, False, True, True]
    # VGG11-BN large: each format >= 1.15x; one format at 1.1x fails it, the mean holds.
    ratios = [1.3] * len(LARGE_CASES)
    ratios[1] = 1.1  # vgg11_bn nhwc large
    targets = bt.evaluate_targets(
        model_rows(1.2, cases=SMALL_CASES) + model_rows(ratios, cases=LARGE_CASES)
    )
    assert [t["met"] for t in targets[3:7]] == [True, True, True, False]
    assert targets[6]["measured"] == (
        "vgg11_bn nchw large 1.30x (1.27-1.33), vgg11_bn nhwc large 1.10x (1.08-1.12)"
    )
    # Within its spread of 1.15x: the run cannot tell.
    ratios[1] = 1.16
    targets = bt.evaluate_targets(model_rows(ratios, cases=LARGE_CASES))
    assert targets[6]["met"] == stats.NOISE
    # Under torch.compile: one compiled row below 1.0x fails the compiled target alone.
    compiled = model_rows(1.3, compiled=True)
    compiled[8] = model_row(bt.ModelCase("mlp", "bf", compiled=True), 0.5)
    targets = bt.evaluate_targets(model_rows(1.3) + compiled)
    assert [t["met"] for t in targets[3:]] == [True, True, True, True, False]
    assert targets[7]["measured"] == "worst 0.50x (0.49-0.51) (mlp bf compiled float32 step)"
    # A fast compiled table does not make up for a slow eager one.
    assert statuses(model_rows(0.9) + model_rows(2.0, compiled=True))[3:] == [
        *(False, False, False, False),
        True,
    ]


def test_the_original_step_target_is_the_cnn_and_the_mlp():
    def rows(cnn, mlp):
        return [
            model_row(bt.ModelCase("cnn", "nchw"), cnn),
            model_row(bt.ModelCase("cnn", "nhwc"), 0.5),  # not in this target
            model_row(bt.ModelCase("mlp", "bf"), mlp),
        ]

    assert statuses(rows(1.1, 1.5))[2] is True
    # Faster beyond the spread of torch against itself (0.98-1.02x): 1.01x is not.
    assert statuses(rows(1.5, 1.01))[2] == stats.NOISE
    assert statuses(rows(1.5, 0.95))[2] is False  # wholly at or below 1.0x: not faster
    assert statuses(rows(0.9, 1.5))[2] is False
    assert statuses(rows(1.5, 1.5)[:2])[2] is None  # no MLP row


def test_targets_not_measured():
    assert statuses([]) == [None] * 8
    # Layer rows alone: the model targets are not measured, not failed.
    assert statuses(layer_rows([2.0])) == [True, True] + [None] * 6
    # Part of the model table: every row measured counts; the geometric means are not
    # measured, the 64 px one without its whole table, the large one without its own.
    targets = bt.evaluate_targets(model_rows(1.5)[:3])
    assert [t["met"] for t in targets] == [None, None, None, True] + [None] * 4
    assert targets[4]["measured"] == f"not measured: 3 of the {len(SMALL_CASES)} rows in this run"
    assert targets[5]["measured"] == f"not measured: 0 of the {len(LARGE_CASES)} rows in this run"
    # The large table alone: its mean and VGG11-BN's measured, the 64 px rows' not.
    assert statuses(model_rows(1.5, cases=LARGE_CASES))[3:] == [True, None, True, True, None]


def fake_results(rows):
    return {
        "machine": {
            "fastbn": "0",
            "cpu_count": 2,
            "cpu_model": "cpu",
            "python": "3",
            "torch": "2",
            "torch_threads": 2,
            "numba": "0.6",
            "threading_layer": "tbb",
            "numba_threads": 2,
            "numba_threading_layer_env": "tbb",
        },
        "settings": {
            **{"rounds": 4, "budget": 0.5, "seconds": 3.0, "load_average": [0.5, 1.25]},
            **{"pairs": 5, "warm_up": 3, "steps": 3},
        },
        "rows": rows,
        "targets": bt.evaluate_targets(rows),
    }


def status(text):
    """A target line's status column, as `report.format_targets` prints it."""
    return f"{text:<12} "


def test_report_prints_tables_geometric_means_shares_and_targets():
    ratios = [1.3, 0.9, 1.2, 1.2, 1.1, 1.1, 1.1, 1.0, 0.8] + [1.2] * len(LARGE_CASES)
    rows = layer_rows([2.0, 0.5]) + model_rows(ratios)
    text = bt.format_report(fake_results(rows))
    assert "numba.threading_layer() = tbb, NUMBA_THREADING_LAYER=tbb" in text
    assert "torch.get_num_threads() = 2" in text
    assert "load average 0.50 before, 1.25 after" in text
    assert "model rows: 5 pairs of fresh processes" in text
    assert "taking 3 warm-up steps and 3 timed ones" in text
    assert "geometric mean of xTorch over the 2 layer rows: 1.00x (0.98-1.02)" in text
    assert "torch against itself (A/A) over the 2 rows: medians 1.00-1.00x" in text
    lines = text.splitlines()
    assert any(line.startswith("0x8 bf") and "2.00x±0.04" in line for line in lines)
    # The 64 px table: model, format, input, torch, fastbn, xTorch, A/A, the CPU ratios,
    # impl, runs, each time and ratio with its spread; a blank line between models.
    start = lines.index("model table, 64 px rows, training steps:")
    head = ["model", "format", "input", "torch", "fastbn", "xTorch", "A/A", "CPU", "CPU"]
    head += ["A/A", "impl", "runs"]
    assert lines[start + 1].split() == head
    resnet = rows[2]
    assert lines[start + 3].split() == [
        *("resnet18", "nchw", "16x3x64x64", "13.00ms±0%", "10.00ms±2%"),
        *(report.format_ratio(resnet["ratio"]), report.format_ratio(resnet["noise"])),
        *(report.format_ratio(resnet["cpu_ratio"]), report.format_ratio(resnet["cpu_noise"])),
        *("12/20", "kernels", "15/15"),
    ]
    assert report.format_ratio(resnet["ratio"]) == "1.30x±0.03"
    assert report.format_ratio(resnet["cpu_ratio"]) == "0.65x±0.01"
    assert lines[start + 4].split()[:2] == ["resnet18", "nhwc"]
    assert lines[start + 5] == ""
    assert lines[start + 6].split()[:2] == ["mobilenetv2", "nchw"]
    assert lines[start + 15].split()[:2] == ["mlp", "bf"]
    assert lines[start + 15].split()[5] == "0.80x±0.02"
    g = math.prod(ratios[:9]) ** (1 / 9)
    assert f"geometric mean of xTorch over the 9 rows: {g:.2f}x (" in text
    # The large-layer table after it, its rows and its geometric mean.
    start = lines.index("model table, large-layer rows, training steps:")
    assert lines[start + 3].split()[:3] == ["vgg11_bn", "nchw", "8x3x128x128"]
    assert lines[start + 13].split()[:3] == ["r3d18", "nhwc", "2x3x8x112x112"]
    assert "geometric mean of xTorch over the 8 rows: 1.20x (1.18-1.22)" in text
    # A line per model and format of batch norm's share, torch's and fastbn's.
    shares = [line for line in lines if "BN share of the step" in line]
    assert [line.split(":")[0] for line in shares] == [c.label for c in bt.MODEL_CASES]
    assert shares[0].startswith("resnet18 nchw: BN share of the step: torch 20% (13.00ms")
    assert "fastbn 10% (10.00ms, 9.00ms without BN)" in shares[0]
    assert "under torch.compile" not in text.split(bt.report.TARGETS_HEADING)[0]
    assert status("NOT MET") + "model table, every model and format >= 1.0x" in text
    assert "worst 0.80x (0.78-0.82) (mlp bf float32 step)" in text
    assert status("MET") + "model table, 64 px rows, geometric mean" in text
    assert status("MET") + "model table, large-layer rows, geometric mean" in text
    assert status("-") + "model table under torch.compile" in text


def test_report_prints_the_compiled_table_with_compile_times():
    rows = model_rows(1.2, cases=SMALL_CASES) + model_rows(0.9, True, SMALL_CASES)
    text = bt.format_report(fake_results(rows))
    lines = text.splitlines()
    assert "no layer rows in this run" in text
    assert "model table, large-layer rows" not in text.split(bt.report.TARGETS_HEADING)[0]
    start = lines.index(
        "model table, 64 px rows, training steps under torch.compile (compile = the first"
        " step's wall time):"
    )
    assert lines[start + 1].split()[-4:] == ["compile", "torch", "compile", "fastbn"]
    assert lines[start + 3].split() == [
        *("resnet18", "nchw", "16x3x64x64", "9.00ms±0%", "10.00ms±2%", "0.90x±0.02", "-"),
        *("0.45x±0.01", "-", "-", "15/15"),
        *("30.0s", "31.0s"),  # each peer's first step in its first process
    ]
    assert "torch against itself: not measured (no second torch peer for these rows)" in text
    assert "resnet18 nchw compiled: BN share of the step: torch 20%" in text
    assert status("NOT MET") + "model table under torch.compile, every model and format" in text
    assert status("MET") + "model table, every model and format >= 1.0x" in text


class FakeWorker:
    """Answers a layer row job with its calls' times: logs the order of the asks, the budget
    and min_runs.

    ``seconds`` gives each call's time, scaled each round by ``scatter`` (a factor a round
    in turn); None: the time is the ask's number.
    """

    def __init__(self, name, log, seconds=None, scatter=(1.0,)):
        self.name = name
        self.log = log
        self.seconds = seconds
        self.scatter = scatter
        self.asks = 0

    def ask(self, job):
        self.log.append((self.name, job["budget"], job["min_runs"]))
        calls = ["train", "eval"]
        if self.seconds is None:
            reply = {"times": {c: [len(self.log)] for c in calls}}
        else:
            f = self.scatter[self.asks % len(self.scatter)]
            reply = {"times": {c: [self.seconds * f] for c in calls}}
        self.asks += 1
        return reply


LAYER_JOB = {"kind": "layer", "row": {}, "dtype": "float32", "seed": 0, "budget": 1.0}


def test_rounds_go_through_every_worker_and_keep_their_times_by_round():
    log = []
    workers = [FakeWorker(name, log) for name in ("torch", "fastbn", bt.AGAIN)]
    settings = bt.Settings(cases=[], dtypes=[], models=[], budget=1.0, rounds=4, remeasures=0)
    times = bt.measure_row(workers, LAYER_JOB, settings)
    order = [name for name, *_ in log]
    # Each round another worker first.
    assert order[:9] == [
        *("torch", "fastbn", bt.AGAIN),
        *("fastbn", bt.AGAIN, "torch"),
        *(bt.AGAIN, "torch", "fastbn"),
    ]
    assert len(order) == 12
    assert {budget for _, budget, _ in log} == {0.25}  # the budget is split over the rounds
    assert 4 * log[0][2] >= bt.MIN_RUNS  # at least MIN_RUNS calls in all
    assert times["torch"]["train"] == [[1], [6], [8], [10]]  # a list of calls per round
    assert times["fastbn"]["eval"] == [[2], [4], [9], [11]]


def measured_rounds(torch_scatter, again_scatter, fastbn=1.0):
    """measure_row against fake workers at 1.0 (fastbn at ``fastbn``): the rounds it took."""
    log = []
    workers = [
        FakeWorker("torch", log, 1.0, torch_scatter),
        FakeWorker("fastbn", log, fastbn),
        FakeWorker(bt.AGAIN, log, 1.0, again_scatter),
    ]
    settings = bt.Settings(cases=[], dtypes=[], models=[], budget=1.0, rounds=5)
    times = bt.measure_row(workers, LAYER_JOB, settings)
    return len(times["torch"]["train"])


def test_a_row_whose_ratio_is_wide_or_whose_torch_disagrees_with_itself_is_measured_again():
    steady = (1.0, 1.01, 0.99)
    assert measured_rounds(steady, steady) == 5
    # torch / fastbn from 0.8 to 1.25 round by round: wide, measured again (once at most).
    assert measured_rounds((1.0, 1.25, 0.8), (1.0, 1.25, 0.8)) == 10
    # torch against itself 1.1x beyond its spread: the two torch workers disagree.
    assert measured_rounds(steady, tuple(f / 1.1 for f in steady)) == 10
    assert bt.REMEASURES == 1


def test_worker_environment(monkeypatch):
    monkeypatch.delenv("NUMBA_THREADING_LAYER", raising=False)
    assert bt.worker_env("fastbn", "tbb")["NUMBA_THREADING_LAYER"] == "tbb"
    assert "NUMBA_THREADING_LAYER" not in bt.worker_env("torch", "tbb")
    assert "NUMBA_THREADING_LAYER" not in bt.worker_env("fastbn", None)
    assert bt.worker_env("torch", None, "/cache")["TORCHINDUCTOR_CACHE_DIR"] == "/cache"


def test_arguments():
    args = bench.parse_args(["--torch", "--numba-layer", "workqueue", "--quick"])
    settings = bt.settings_from(args)
    assert settings.numba_layer == "workqueue"
    assert settings.dtypes == ["float32"]
    assert [c.label for c in settings.cases] == list(bt.QUICK_LABELS)
    assert settings.models == SMALL_CASES  # --quick: the 64 px rows, fewer pairs
    assert settings.pairs == bt.QUICK_PAIRS
    assert settings.budget == bt.QUICK_BUDGET
    assert not settings.compile and settings.model_rows() == SMALL_CASES
    full = bt.settings_from(bench.parse_args(["--torch"]))
    assert len(full.cases) == 13 and full.dtypes == ["float32", "float64"]
    assert full.models == bt.MODEL_CASES and full.pairs == bt.PAIRS
    assert (full.steps, full.warm_up, full.batch, full.size) == (bt.STEPS, bt.WARM_UP, None, None)
    compiled = bt.settings_from(bench.parse_args(["--torch", "--shapes", "mlp", "--compile"]))
    assert [c.label for c in compiled.model_rows()] == ["mlp bf", "mlp bf compiled"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--numba-layer", "omp"])  # without --torch
    with pytest.raises(SystemExit):
        bench.parse_args(["--compile"])  # without --torch
    with pytest.raises(SystemExit):
        bench.parse_args(["--torch", "--numba-layer", "gomp"])


def test_shape_filter():
    shapes = "32x128,64x256x14x14:nhwc,mlp,resnet18:nhwc"
    cases, models = bt.select(bt.LAYER_CASES, bt.MODEL_CASES, shapes)
    assert [c.label for c in cases] == ["32x128 bf", "64x256x14x14 nhwc"]
    assert [m.label for m in models] == ["resnet18 nhwc", "mlp bf", "resnet18 nhwc large"]
    cases, models = bt.select(bt.LAYER_CASES, bt.MODEL_CASES, "mobilenetv2")
    assert cases == [] and [m.label for m in models] == [
        *("mobilenetv2 nchw", "mobilenetv2 nhwc"),
        *("mobilenetv2 nchw large", "mobilenetv2 nhwc large"),
    ]
    cases, models = bt.select(bt.LAYER_CASES, bt.MODEL_CASES, "nchw")  # layouts: layer rows
    assert len(cases) == 4 and all(c.layout == "nchw" for c in cases) and models == []
    assert bt.select(bt.LAYER_CASES, bt.MODEL_CASES, "models") == ([], bt.MODEL_CASES)
    assert bt.select(bt.LAYER_CASES, bt.MODEL_CASES, "large") == ([], LARGE_CASES)
    assert bt.select(bt.LAYER_CASES, bt.MODEL_CASES, "small") == ([], SMALL_CASES)
    _, models = bt.select(bt.LAYER_CASES, bt.MODEL_CASES, "large,cnn:nhwc")
    assert [m.label for m in models] == ["cnn nhwc", *(c.label for c in LARGE_CASES)]
    with pytest.raises(SystemExit, match="matches no torch-mode row"):
        bt.select(bt.LAYER_CASES, bt.MODEL_CASES, "4096x512")
    with pytest.raises(SystemExit, match=r"r3d18:nhwc, .*small, large, models"):
        bt.select(bt.LAYER_CASES, bt.MODEL_CASES, "resnet")  # the message lists the names


def test_case_bytes_and_json():
    case = bt.TorchCase((8, 512, 7, 7), "nhwc")
    assert case.label == "8x512x7x7 nhwc"
    assert case.nbytes("float64") == 8 * 512 * 49 * 8
    assert bt.TorchCase.from_json(json.loads(json.dumps(case.to_json()))) == case


# --- with torch ---------------------------------------------------------------------------


@pytest.fixture
def one_torch_thread():
    """torch at one thread for the test, restored after: on a loaded 2-core machine torch's
    2-thread regions stall (a ResNet-18 step at batch 4 took 1-4 s instead of 0.2 s), and
    these tests check results, not speed."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# name -> (whether its row is a large-layer one, batch, image size) of the tests' tiny steps
TINY = {
    "resnet18": (False, 4, None),
    "mobilenetv2": (False, 4, None),
    "vgg11_bn": (False, 4, 32),
    "r3d18": (True, 2, 32),
    "cnn": (False, 4, None),
    "mlp": (False, 4, None),
}


@needs_torch
@pytest.mark.usefixtures("one_torch_thread")
def test_models_are_built_as_described():
    import torch
    from torch import nn

    from fastbn.bench import models

    assert set(TINY) == set(bt.MODELS)
    torch.manual_seed(0)
    n_bn = {"resnet18": 20, "mobilenetv2": 52, "vgg11_bn": 8, "r3d18": 20, "cnn": 9, "mlp": 2}
    for name in bt.MODELS:
        model = models.make_model(name)
        assert models.count_bn(model) == n_bn[name]
        large, _, size = TINY[name]
        assert str(n_bn[name]) in bt.MODEL_INPUTS[name, large][1]
        x = torch.randn(bt.model_input_shape(bt.ModelCase(name, "nchw", large), 2, size))
        assert model(x).shape == (2, bt.N_CLASSES)
        without = models.without_bn(model)
        assert models.count_bn(without) == 0
        assert without(x).shape == (2, bt.N_CLASSES)
    resnet = models.make_model("resnet18")
    assert sum(p.numel() for p in resnet.parameters()) == 11_181_642  # torchvision's, 10 classes
    blocks = [m for m in resnet.modules() if isinstance(m, models.BasicBlock)]
    assert len(blocks) == 8 and sum(b.downsample is not None for b in blocks) == 3
    assert all(b.relu.inplace for b in blocks)
    mobile = models.make_model("mobilenetv2")
    assert sum(p.numel() for p in mobile.parameters()) == 2_236_682  # torchvision's, 10 classes
    blocks = [m for m in mobile.modules() if isinstance(m, models.InvertedResidual)]
    assert len(blocks) == 17 and sum(b.use_res_connect for b in blocks) == 10
    relu6 = [m for m in mobile.modules() if isinstance(m, nn.ReLU6)]
    assert len(relu6) == 35 and all(m.inplace for m in relu6)
    vgg = models.make_model("vgg11_bn")
    # torchvision's vgg11_bn (132,868,840) less its classifier (25088-4096-4096-1000:
    # 123,642,856), plus Linear(512, 10).
    assert sum(p.numel() for p in vgg.parameters()) == 132_868_840 - 123_642_856 + 5130
    convs = [m for m in vgg.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [v for v in models.VGG11_LAYERS if v != "M"]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in vgg.modules()) == 5
    kinds = [type(m) for m in vgg[0]]
    assert kinds[:4] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]
    assert all(m.inplace for m in vgg.modules() if isinstance(m, nn.ReLU))
    assert vgg[-1].in_features == 512 and vgg[-1].out_features == bt.N_CLASSES
    r3d = models.make_model("r3d18")
    # torchvision's r3d_18 (33,371,472 with its 400 classes: fc 205,200), 10 classes here.
    assert sum(p.numel() for p in r3d.parameters()) == 33_371_472 - 205_200 + 5130
    assert all(isinstance(m, nn.BatchNorm3d) for m in models.batch_norms(r3d))
    stem = r3d.stem[0]
    assert (stem.kernel_size, stem.stride, stem.padding) == ((3, 7, 7), (1, 2, 2), (1, 3, 3))
    blocks = [m for m in r3d.modules() if isinstance(m, models.BasicBlock3d)]
    assert len(blocks) == 8 and sum(b.downsample is not None for b in blocks) == 3
    assert [b.conv1[0].stride for b in blocks[::2]] == [(1, 1, 1), *[(2, 2, 2)] * 3]
    assert all(m.inplace for m in r3d.modules() if isinstance(m, nn.ReLU))
    with pytest.raises(ValueError, match="unknown model"):
        models.make_model("resnet")


@needs_torch
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("name", bt.MODELS)
def test_converted_models_train_as_torchs_do_in_both_formats(name):
    """Two steps at a tiny batch and size (`TINY`): the first loss (forward only) equal to
    torch's to float32 rounding; the second (after an SGD step) off float64 torch's by no
    more than a few times torch's own float32 error in either format. MobileNetV2 is
    ill-conditioned here (its last BNs see 16 values a channel): torch's two formats differ
    by 0.6% after one step."""
    import torch

    import fastbn.torch as fbt
    from fastbn.bench import models

    large, batch, size = TINY[name]
    torch.manual_seed(bt.SEED)  # as model_step: the model's weights, then the data
    reference = models.make_model(name).double()
    shape = bt.model_input_shape(bt.ModelCase(name, "nchw", large), batch, size)
    inputs = torch.randn(shape).double()
    labels = torch.randint(0, bt.N_CLASSES, (batch,))
    step = bt.training_step(reference.train(), inputs, labels)
    exact = [step().item() for _ in range(2)]
    losses = {}
    for fmt in bt.model_formats(name, large):
        case = bt.ModelCase(name, fmt, large)
        for peer in bt.PEERS:
            step, model = bt.model_step(peer, case, batch=batch, size=size)
            losses[fmt, peer] = [step().item() for _ in range(2)]
        if fmt == "nhwc":  # the model and its input in channels-last memory
            weights = [p for p in model.parameters() if p.dim() == len(shape)]
            assert weights and all(
                w.is_contiguous(memory_format=bt.memory_format(fmt, len(shape))) for w in weights
            )
        step, model = bt.model_step("fastbn", case, batch=batch, size=size, identity=True)
        assert step().item() > 0 and models.count_bn(model) == 0  # the model without BN trains
    for fmt in bt.model_formats(name, large):
        assert losses[fmt, "fastbn"][0] == pytest.approx(losses[fmt, "torch"][0], rel=1e-5)
    torch_error = max(
        abs(loss[1] - exact[1]) for (_, peer), loss in losses.items() if peer == "torch"
    )
    for fmt in bt.model_formats(name, large):
        assert abs(losses[fmt, "fastbn"][1] - exact[1]) <= max(4 * torch_error, 1e-5 * exact[1])
    # The models are fastbn's: every BN converted in the fastbn peer, none in torch's.
    converted = bt.to_peer("fastbn", models.make_model(name))
    norms = models.batch_norms(converted)
    assert norms and all(type(m).__module__.startswith("fastbn.torch") for m in norms)
    assert isinstance(norms[0], fbt.BatchNorm1d | fbt.BatchNorm2d | fbt.BatchNorm3d)


def test_a_process_times_its_first_step_warm_up_and_timed_steps():
    calls = []
    times = bt.time_steps(lambda: calls.append("step"), 3, 4, first=lambda: calls.append("first"))
    assert calls == ["first"] + ["step"] * 6  # the first, 2 more warm-up steps, 4 timed
    assert len(times["wall"]) == len(times["cpu"]) == 4 and times["first"] >= 0
    calls.clear()
    bt.time_steps(lambda: calls.append("step"), 1, 2)
    assert calls == ["step"] * 3


def tiny_job(case, identity=True):
    settings = bt.Settings([], [], [], 0.0, batch=4, warm_up=2, steps=3)
    return bt.model_job(case, settings, identity)


@needs_torch
@pytest.mark.usefixtures("one_torch_thread")
def test_a_model_process_times_the_step_and_the_step_without_bn():
    reply = bt.time_model("fastbn", tiny_job(bt.ModelCase("mlp", "bf")))
    assert set(reply) == {"step", "identity", "implementations"}
    for call in ("step", "identity"):
        assert len(reply[call]["wall"]) == len(reply[call]["cpu"]) == 3
    assert sum(reply["implementations"].values()) == 2  # the MLP's two layers, one step
    # torch's process, and torch against itself's (no step without BN): no implementations.
    reply = bt.time_model("torch", tiny_job(bt.ModelCase("mlp", "bf"), identity=False))
    assert set(reply) == {"step"}


@needs_torch
@pytest.mark.usefixtures("one_torch_thread")
def test_a_model_process_compiles_compiled_rows(monkeypatch):
    import torch

    compiled = []

    def fake_compile(model):
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    reply = bt.time_model("fastbn", tiny_job(bt.ModelCase("mlp", "bf", compiled=True)))
    assert len(compiled) == 2  # the step's model and the model without BN
    assert set(reply) == {"step", "identity"}  # no implementations counted under compile
    bt.time_model("fastbn", tiny_job(bt.ModelCase("mlp", "bf")))  # eager: no compile
    assert len(compiled) == 2


@needs_torch
@pytest.mark.auto_dispatch  # the shipped crossover, as the bench's fastbn processes run it
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize(("name", "batch"), [("cnn", None), ("mlp", 384)])
def test_the_implementation_counts_are_the_converted_layers_own(name, batch):
    """Each layer's own output says which implementation ran (torch's op leaves torch's node).
    The small CNN at its batch of 32 32x32 images: its 16-channel layers (2^19 elements) on
    the kernels by the shipped crossover, its 64-channel ones (2^17) on torch's op. The MLP
    at batch 384: (384, 1024) is on torch's op in training, the kernels' side in eval. The
    first layer of each is forced onto torch's op."""
    from fastbn.bench import models

    case = bt.ModelCase(name, bt.model_formats(name)[0])
    step, model = bt.model_step("fastbn", case, batch=batch)
    layers = models.batch_norms(model)
    layers[0].implementation = "torch"
    nodes = []

    def node(module, args, output):
        nodes.append(type(output.grad_fn).__name__)

    handles = [m.register_forward_hook(node) for m in layers]
    counts = bt.implementations_taken(model, step)
    for handle in handles:
        handle.remove()
    on_torch = sum(n == "NativeBatchNormBackward0" for n in nodes)
    assert len(nodes) == len(layers) == {"cnn": 9, "mlp": 2}[name]
    assert counts == {"fastbn": len(layers) - on_torch, "torch": on_torch}
    assert bt.format_implementations(counts) == f"{len(layers) - on_torch}/{len(layers)} kernels"
    if name == "cnn":
        assert counts["fastbn"] and counts["torch"] > 1  # both sides of the crossover


@needs_torch
def test_each_peer_runs_a_layer():
    for peer in bt.PEERS:
        calls = bt.layer_calls(peer, bt.TorchCase((4, 3, 5, 5), "nhwc"), "float64")
        for fn in calls.values():
            fn()


@needs_torch
@pytest.mark.auto_dispatch  # the shipped crossover, as the bench's fastbn worker runs it
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_layer_rows_name_the_implementation_a_converted_layer_runs(dtype):
    import torch

    import fastbn.torch as fbt

    found = set()
    for case in bt.LAYER_CASES:
        for call in bt.LAYER_PASSES:
            bn = (torch.nn.BatchNorm1d if len(case.shape) == 2 else torch.nn.BatchNorm2d)(
                case.shape[1], dtype=getattr(torch, dtype)
            )
            layer = fbt.convert(bn).train(call == "train")
            fmt = torch.channels_last if case.layout == "nhwc" else torch.contiguous_format
            x = torch.zeros(case.shape, dtype=getattr(torch, dtype)).contiguous(memory_format=fmt)
            node = type(layer(x.requires_grad_()).grad_fn).__name__
            ran = "torch" if node == "NativeBatchNormBackward0" else "fastbn"
            assert bt.implementation_of(case, dtype, {"pass": call}) == ran, (case, call)
            found.add(ran)
    assert found == {"torch", "fastbn"}  # the rows reach both sides of the crossover


@needs_torch
@pytest.mark.auto_dispatch  # the parent names the shipped table's choice, as the workers run it
def test_end_to_end_tiny_run(tmp_path, capsys):
    """One layer row through the three workers, and the MLP's model row (at batch 4) in two
    pairs of fresh processes and two of torch against itself."""
    path = tmp_path / "torch.json"
    args = bench.parse_args(["--torch", "--numba-layer", "workqueue", "--json", str(path)])
    settings = bt.settings_from(args)
    # workqueue: always there, the variable reaches the fastbn worker.
    assert settings.numba_layer == "workqueue"
    settings.cases = [bt.TorchCase((32, 128), "bf")]
    settings.dtypes = ["float32"]
    settings.models = [bt.ModelCase("mlp", "bf")]
    settings.budget, settings.rounds, settings.batch = 0.004, 4, 4
    settings.pairs, settings.warm_up, settings.steps = 2, 1, 2
    bt.run(args, settings)
    out = capsys.readouterr().out
    assert "numba.threading_layer() = workqueue, NUMBA_THREADING_LAYER=workqueue" in out
    results = json.loads(path.read_text())
    rows = results["rows"]
    assert [(r["case"], r["dtype"], r["pass"]) for r in rows] == [
        ("32x128 bf", "float32", "train"),
        ("32x128 bf", "float32", "eval"),
        ("mlp bf", "float32", "step"),
    ]
    layer, model = rows[:2], rows[2]
    for r in layer:
        # The ratios round by round, torch / fastbn and torch / torch again.
        assert set(r["rounds"]) == {"torch", "fastbn", bt.AGAIN}
        ratios = [t / f for t, f in zip(r["rounds"]["torch"], r["rounds"]["fastbn"], strict=True)]
        assert r["ratio"] == pytest.approx(stats.estimate(ratios))
        again = [t / a for t, a in zip(r["rounds"]["torch"], r["rounds"][bt.AGAIN], strict=True)]
        assert r["noise"] == pytest.approx(stats.estimate(again))
        assert len(ratios) in (4, 8)  # measured again at most once
        assert min(r["runs"].values()) >= bt.MIN_RUNS
        assert report.format_ratio(r["ratio"]) in out
    # (32, 128) is below every batch-first crossover: a converted layer runs torch's op there.
    assert [r["implementation"] for r in layer] == ["torch", "torch"]
    geomean = [math.sqrt(a * b) for a, b in zip(*map(bt.ratio_rounds, layer), strict=False)]
    assert results["geometric_mean"] == pytest.approx(stats.estimate(geomean))
    # The model row: a value per pair, the ratios of the pairs, by wall and CPU time.
    assert model["kind"] == "model" and not model["compiled"] and not model["large"]
    assert model["input"] == [4, 784] and model["pairs"] == 2
    assert model["runs"] == {"torch": 4, "fastbn": 4}
    for clock, key in (("rounds", "ratio"), ("cpu_rounds", "cpu_ratio")):
        assert {peer: len(t) for peer, t in model[clock].items()} == {"torch": 2, "fastbn": 2}
        assert model[key] == pytest.approx(
            report.ratio(model[clock]["torch"], model[clock]["fastbn"])
        )
    # Torch against itself after every other pair: one pair of two.
    assert model["noise"]["n"] == model["cpu_noise"]["n"] == 1
    assert set(model["first_call"]["fastbn"]) == {"step", "identity"}
    # (4, 1024) is below the crossover too: the MLP's two layers on torch's op.
    assert model["implementations"] == {"fastbn": 0, "torch": 2}
    for peer in bt.PEERS:
        share = 1 - model["identity_seconds"][peer] / model["seconds"][peer]
        assert model["bn_share"][peer] == pytest.approx(share)
    assert "mlp bf: BN share of the step: torch" in out
    assert "model table, 64 px rows, training steps:" in out
    assert "0/2 kernels" in out
    assert results["model_geometric_mean"]["small"] == pytest.approx(model["ratio"])
    assert results["model_geometric_mean"]["large"] is None
    assert results["settings"]["pairs"] == 2 and results["settings"]["steps"] == 2
    # Layer targets measured; of the model table's, the every-row one (the MLP), not the
    # geometric means (1 of the 9 64 px rows; no large one), VGG11-BN's or the compiled one.
    measured = [True, True, False, True, False, False, False, False]
    assert [t["met"] is not None for t in results["targets"]] == measured
    assert results["machine"]["threading_layer"] == "workqueue"
    assert bt.report.TARGETS_HEADING in out


def test_the_header_names_a_batch_and_a_size_that_replace_the_models():
    results = fake_results(model_rows(1.2))
    results["settings"].update(batch=4, size=32)
    text = bt.format_report(results)
    assert "here every model at batch 4; here every model at image size 32" in text
    assert "here every model at" not in bt.format_report(fake_results(model_rows(1.2)))


def test_the_bench_command_hands_torch_mode_its_arguments(monkeypatch):
    runs = []
    monkeypatch.setattr(bt, "run", runs.append)
    bench.main(["--torch", "--quick", "--numba-layer", "omp"])
    assert [(a.torch, a.quick, a.numba_layer) for a in runs] == [(True, True, "omp")]
