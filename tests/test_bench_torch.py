"""The plumbing of ``python -m fastbn.bench --torch`` (fastbn/bench/torch_mode.py), not speed.

Rows, ratios and their spreads, torch against itself, the geometric means,
batch norm's shares and the contract's targets (MET, NOT MET, WITHIN NOISE)
come from fake timings; the driver's rounds (and a row measured again) run
against fake workers. With
torch: the bench's models build as described and train, each converted
model's loss matches torch's in both memory formats, a worker's compiled
rows go through torch.compile (a stand-in for it: a real compile takes a
minute a model), and two tiny end-to-end runs (one layer row; the MLP's row at
batch 4) go through the workers.
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


def model_row(case, ratio, share=(0.2, 0.1)):
    """A model-table row of the case (a ModelCase): fastbn's step at 10 ms, torch's at ratio
    times it, each peer's step without BN at (1 - its share) of its step (the second torch
    worker's step alone, and none under compile, as the bench runs them); first calls (the
    compile) torch 30 s, fastbn 31 s."""
    shares = dict(zip(bt.PEERS, share, strict=True))
    steps = {"torch": ratio * 1e-2, "fastbn": 1e-2}
    times = fake_times(
        {"step": steps["torch"], "identity": (1 - shares["torch"]) * steps["torch"]},
        {"step": steps["fastbn"], "identity": (1 - shares["fastbn"]) * steps["fastbn"]},
        calls=("step", "identity"),
        again=not case.compiled,
    )
    times.get(bt.AGAIN, {}).pop("identity", None)
    first = {"torch": {"step": 30.0, "identity": 20.0}, "fastbn": {"step": 31.0, "identity": 20.0}}
    return bt.make_model_row(case, times, first)


def model_rows(ratios, compiled=False):
    """The whole model table (`MODEL_CASES`): a ratio per row, or one number for all."""
    if not isinstance(ratios, list):
        ratios = [ratios] * len(bt.MODEL_CASES)
    cases = [bt.ModelCase(c.model, c.format, compiled) for c in bt.MODEL_CASES]
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


def test_model_table_is_every_model_in_its_formats():
    assert [c.label for c in bt.MODEL_CASES] == [
        "resnet18 nchw",
        "resnet18 nhwc",
        "mobilenetv2 nchw",
        "mobilenetv2 nhwc",
        "cnn nchw",
        "cnn nhwc",
        "mlp bf",
    ]
    case = bt.ModelCase("cnn", "nhwc", compiled=True)
    assert case.label == "cnn nhwc compiled"
    assert bt.ModelCase.from_json(json.loads(json.dumps(case.to_json()))) == case
    assert bt.model_input_shape("resnet18") == (16, 3, 64, 64)
    assert bt.model_input_shape("mlp", batch=4) == (4, 784)


def test_model_row_bn_share_and_first_calls():
    row = model_row(bt.ModelCase("resnet18", "nhwc"), 1.25, share=(0.3, 0.1))
    assert (row["kind"], row["case"], row["pass"]) == ("model", "resnet18 nhwc", "step")
    assert (row["model"], row["format"], row["compiled"]) == ("resnet18", "nhwc", False)
    assert row["seconds"] == pytest.approx({"torch": 1.25e-2, "fastbn": 1e-2, bt.AGAIN: 1.25e-2})
    assert row["ratio"]["median"] == pytest.approx(1.25)
    assert row["noise"]["median"] == pytest.approx(1.0)
    assert row["identity_seconds"]["torch"] == pytest.approx(0.7 * 1.25e-2)
    assert set(row["identity_seconds"]) == set(bt.PEERS)  # torch again times the step alone
    assert row["bn_share"]["torch"] == pytest.approx(0.3)
    assert row["bn_share"]["fastbn"] == pytest.approx(0.1)
    assert row["first_call"]["fastbn"]["step"] == 31.0
    assert bt.format_bn_share(row) == (
        "resnet18 nhwc: BN share of the step: torch 30% (12.50ms, 8.75ms without BN),"
        " fastbn 10% (10.00ms, 9.00ms without BN)"
    )
    # A row without the step without BN: no share, and the line says so.
    times = {peer: {"step": [[1e-2]]} for peer in bt.PEERS}
    bare = bt.make_model_row(bt.ModelCase("mlp", "bf"), times, {})
    assert bare["bn_share"] is None and bare["identity_seconds"] is None
    assert bt.format_bn_share(bare) == "mlp bf: BN share not measured"


def test_targets_all_met():
    targets = bt.evaluate_targets(layer_rows([1.2, 1.4, 1.5]) + model_rows(1.2))
    assert [t["met"] for t in targets] == [True, True, True, True, True, None]
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
    assert targets[4]["measured"] == f"1.20x (1.18-1.22) over {len(bt.MODEL_CASES)} rows"
    compiled = bt.evaluate_targets(model_rows(1.2) + model_rows(1.05, compiled=True))
    assert compiled[5]["met"] is True
    # No second torch worker under compile: the row's own spread against 1.0x.
    assert (
        compiled[5]["measured"] == "worst 1.05x (1.03-1.07) (resnet18 nchw compiled float32 step)"
    )


def test_a_row_slower_within_the_spread_of_torch_against_itself_is_not_called_slower():
    # torch against itself reads 0.98-1.02x in these rows: 0.99x (0.97-1.01) is within it.
    assert statuses(layer_rows([0.99, 2.0, 2.0]) + model_rows(1.2))[0] == stats.NOISE
    # Beyond it, the row is slower: the every-row target fails, the geometric mean holds.
    assert statuses(layer_rows([0.9, 2.0, 2.0]) + model_rows(1.2)) == [
        *(False, True),
        *(True, True, True, None),
    ]
    # Equal to torch is never MET, nor NOT MET: the run cannot tell.
    assert statuses(layer_rows([1.0, 1.0]) + model_rows(1.2))[:2] == [stats.NOISE, False]
    # A wide floor does not turn a row MET: 0.9x against torch against itself 0.5-2x.
    row = layer_rows([0.9])[0]
    row["noise"] = {"median": 1.0, "low": 0.5, "high": 2.0, "n": 5}
    assert bt.evaluate_targets([row])[0]["met"] == stats.NOISE
    row["ratio"] = {"median": 0.4, "low": 0.38, "high": 0.45, "n": 5}
    assert bt.evaluate_targets([row])[0]["met"] is False  # slower beyond even that


def test_model_table_targets_not_met():
    ratios = [1.5] * len(bt.MODEL_CASES)
    ratios[1] = 0.9  # resnet18 nhwc: the every-row target fails, the geometric mean holds
    targets = bt.evaluate_targets(model_rows(ratios))
    assert [t["met"] for t in targets[3:5]] == [False, True]
    assert targets[3]["measured"].startswith(
        "worst 0.90x (0.88-0.92) (resnet18 nhwc float32 step)"
    )
    # Every row at least 1.0x, the geometric mean below 1.15x.
    targets = bt.evaluate_targets(model_rows(1.1))
    assert [t["met"] for t in targets[3:5]] == [True, False]
    assert targets[4]["measured"] == f"1.10x (1.08-1.12) over {len(bt.MODEL_CASES)} rows"
    # Under torch.compile: one compiled row below 1.0x fails the compiled target alone.
    compiled = model_rows(1.3, compiled=True)
    compiled[-1] = model_row(bt.ModelCase("mlp", "bf", compiled=True), 0.5)
    targets = bt.evaluate_targets(model_rows(1.3) + compiled)
    assert [t["met"] for t in targets[3:]] == [True, True, False]
    assert targets[5]["measured"] == "worst 0.50x (0.49-0.51) (mlp bf compiled float32 step)"
    # A fast compiled table does not make up for a slow eager one.
    assert statuses(model_rows(0.9) + model_rows(2.0, compiled=True))[3:] == [False, False, True]


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
    assert statuses([]) == [None] * 6
    # Layer rows alone: the model targets are not measured, not failed.
    assert statuses(layer_rows([2.0])) == [True, True, None, None, None, None]
    # Part of the model table: every row measured counts; the geometric mean is not measured.
    targets = bt.evaluate_targets(model_rows(1.5)[:3])
    assert [t["met"] for t in targets] == [None, None, None, True, None, None]
    assert (
        targets[4]["measured"] == f"not measured: 3 of the {len(bt.MODEL_CASES)} rows in this run"
    )


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
        "settings": {"rounds": 4, "budget": 0.5, "seconds": 3.0, "load_average": [0.5, 1.25]},
        "rows": rows,
        "targets": bt.evaluate_targets(rows),
    }


def status(text):
    """A target line's status column, as `report.format_targets` prints it."""
    return f"{text:<12} "


def test_report_prints_tables_geometric_means_shares_and_targets():
    ratios = [1.3, 0.9, 1.2, 1.2, 1.1, 1.0, 0.8]
    rows = layer_rows([2.0, 0.5]) + model_rows(ratios)
    text = bt.format_report(fake_results(rows))
    assert "numba.threading_layer() = tbb, NUMBA_THREADING_LAYER=tbb" in text
    assert "torch.get_num_threads() = 2" in text
    assert "load average 0.50 before, 1.25 after" in text
    assert "geometric mean of xTorch over the 2 layer rows: 1.00x (0.98-1.02)" in text
    assert "torch against itself (A/A) over the 2 rows: medians 1.00-1.00x" in text
    lines = text.splitlines()
    assert any(line.startswith("0x8 bf") and "2.00x±0.04" in line for line in lines)
    # The model table: model, format, torch, fastbn, xTorch, A/A, runs, each time and ratio
    # with its spread; a blank line between models.
    start = lines.index("model table, training steps:")
    head = ["model", "format", "torch", "fastbn", "xTorch", "A/A", "runs"]
    assert lines[start + 1].split() == head
    resnet = rows[2]
    assert lines[start + 3].split() == [
        *("resnet18", "nchw", "13.00ms±0%", "10.00ms±2%"),
        *(report.format_ratio(resnet["ratio"]), report.format_ratio(resnet["noise"]), "15/15"),
    ]
    assert report.format_ratio(resnet["ratio"]) == "1.30x±0.03"
    assert lines[start + 4].split()[:2] == ["resnet18", "nhwc"]
    assert lines[start + 5] == ""
    assert lines[start + 6].split()[:2] == ["mobilenetv2", "nchw"]
    assert lines[start + 12].split()[:2] == ["mlp", "bf"]
    assert lines[start + 12].split()[4] == "0.80x±0.02"
    g = math.prod(ratios) ** (1 / len(ratios))
    assert f"geometric mean of xTorch over the 7 rows: {g:.2f}x (" in text
    # A line per model and format of batch norm's share, torch's and fastbn's.
    shares = [line for line in lines if "BN share of the step" in line]
    assert [line.split(":")[0] for line in shares] == [c.label for c in bt.MODEL_CASES]
    assert shares[0].startswith("resnet18 nchw: BN share of the step: torch 20% (13.00ms")
    assert "fastbn 10% (10.00ms, 9.00ms without BN)" in shares[0]
    assert "under torch.compile" not in text.split(bt.report.TARGETS_HEADING)[0]
    assert status("NOT MET") + "model table, every model and format >= 1.0x" in text
    assert "worst 0.80x (0.78-0.82) (mlp bf float32 step)" in text
    assert status("NOT MET") + "model table, geometric mean of torch / fastbn >= 1.15x" in text
    assert status("-") + "model table under torch.compile" in text


def test_report_prints_the_compiled_table_with_compile_times():
    text = bt.format_report(fake_results(model_rows(1.2) + model_rows(0.9, compiled=True)))
    lines = text.splitlines()
    assert "no layer rows in this run" in text
    start = next(
        i
        for i, line in enumerate(lines)
        if line.startswith("model table, training") and "torch.compile" in line
    )
    assert lines[start + 1].split()[-4:] == ["compile", "torch", "compile", "fastbn"]
    assert lines[start + 3].split() == [
        *("resnet18", "nchw", "9.00ms±0%", "10.00ms±2%", "0.90x±0.02", "-", "15/15"),
        *("30.0s", "31.0s"),  # each peer's first step
    ]
    assert "torch against itself: not measured (no second torch worker for these rows)" in text
    assert "resnet18 nchw compiled: BN share of the step: torch 20%" in text
    assert status("NOT MET") + "model table under torch.compile, every model and format" in text
    assert status("MET") + "model table, every model and format >= 1.0x" in text


class FakeWorker:
    """Answers a row job with its calls' times, and the first calls on its first answer:
    logs the order of the asks, the budget, min_runs and the calls asked for.

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
        self.log.append((self.name, job["budget"], job["min_runs"], job.get("calls")))
        calls = job.get("calls") or ["train", "eval"]
        if self.seconds is None:
            reply = {"times": {c: [len(self.log)] for c in calls}}
        else:
            f = self.scatter[self.asks % len(self.scatter)]
            reply = {"times": {c: [self.seconds * f] for c in calls}}
        if not self.asks:
            reply["first"] = {"train": 10.0 * len(self.log)}
        self.asks += 1
        return reply


LAYER_JOB = {
    "kind": "layer",
    "row": {},
    "dtype": "float32",
    "seed": 0,
    "budget": 1.0,
    "ratio_calls": ["train", "eval"],
}


def test_rounds_go_through_every_worker_and_keep_their_times_by_round():
    log = []
    workers = [FakeWorker(name, log) for name in ("torch", "fastbn", bt.AGAIN)]
    settings = bt.Settings(cases=[], dtypes=[], models=[], budget=1.0, rounds=4, remeasures=0)
    times, first = bt.measure_row(workers, {**LAYER_JOB, "ratio_calls": ["train"]}, settings)
    order = [name for name, *_ in log]
    # Each round another worker first.
    assert order[:9] == [
        *("torch", "fastbn", bt.AGAIN),
        *("fastbn", bt.AGAIN, "torch"),
        *(bt.AGAIN, "torch", "fastbn"),
    ]
    assert len(order) == 12
    assert {budget for _, budget, _, _ in log} == {0.25}  # the budget is split over the rounds
    assert 4 * log[0][2] >= bt.MIN_RUNS  # at least MIN_RUNS calls in all
    # The second torch worker times only the calls of the row's ratios.
    assert all(calls == ["train"] for name, _, _, calls in log if name == bt.AGAIN)
    assert all(calls is None for name, _, _, calls in log if name != bt.AGAIN)
    assert times["torch"]["train"] == [[1], [6], [8], [10]]  # a list of calls per round
    assert times["fastbn"]["eval"] == [[2], [4], [9], [11]]
    assert first == {
        "torch": {"train": 10.0},
        "fastbn": {"train": 20.0},
        bt.AGAIN: {"train": 30.0},
    }


def measured_rounds(torch_scatter, again_scatter, fastbn=1.0):
    """measure_row against fake workers at 1.0 (fastbn at ``fastbn``): the rounds it took."""
    log = []
    workers = [
        FakeWorker("torch", log, 1.0, torch_scatter),
        FakeWorker("fastbn", log, fastbn),
        FakeWorker(bt.AGAIN, log, 1.0, again_scatter),
    ]
    settings = bt.Settings(cases=[], dtypes=[], models=[], budget=1.0, rounds=5)
    times, _ = bt.measure_row(workers, LAYER_JOB, settings)
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
    assert settings.models == bt.MODEL_CASES
    assert settings.budget == bt.QUICK_BUDGET
    assert not settings.compile and settings.model_rows() == bt.MODEL_CASES
    full = bt.settings_from(bench.parse_args(["--torch"]))
    assert len(full.cases) == 13 and full.dtypes == ["float32", "float64"]
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
    assert [m.label for m in models] == ["resnet18 nhwc", "mlp bf"]
    cases, models = bt.select(bt.LAYER_CASES, bt.MODEL_CASES, "mobilenetv2")
    assert cases == [] and [m.label for m in models] == ["mobilenetv2 nchw", "mobilenetv2 nhwc"]
    cases, models = bt.select(bt.LAYER_CASES, bt.MODEL_CASES, "nchw")  # layouts: layer rows
    assert len(cases) == 4 and all(c.layout == "nchw" for c in cases) and models == []
    assert bt.select(bt.LAYER_CASES, bt.MODEL_CASES, "models") == ([], bt.MODEL_CASES)
    with pytest.raises(SystemExit, match="matches no torch-mode row"):
        bt.select(bt.LAYER_CASES, bt.MODEL_CASES, "4096x512")
    with pytest.raises(SystemExit, match="resnet18:nhwc"):  # the message lists the names
        bt.select(bt.LAYER_CASES, bt.MODEL_CASES, "resnet")


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


@needs_torch
@pytest.mark.usefixtures("one_torch_thread")
def test_models_are_built_as_described():
    import torch
    from torch import nn

    from fastbn.bench import models

    torch.manual_seed(0)
    n_bn = {"resnet18": 20, "mobilenetv2": 52, "cnn": 9, "mlp": 2}
    for name in bt.MODELS:
        model = models.make_model(name)
        assert models.count_bn(model) == n_bn[name]
        assert str(n_bn[name]) in bt.MODEL_INPUTS[name][1]
        x = torch.randn(bt.model_input_shape(name, batch=2))
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
    with pytest.raises(ValueError, match="unknown model"):
        models.make_model("resnet")


@needs_torch
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("name", bt.MODELS)
def test_converted_models_train_as_torchs_do_in_both_formats(name):
    """Two steps at batch 4: the first loss (forward only) equal to torch's to float32
    rounding; the second (after an SGD step) off float64 torch's by no more than a few times
    torch's own float32 error in either format. MobileNetV2 is ill-conditioned here (its
    last BNs see 16 values a channel): torch's two formats differ by 0.6% after one step."""
    import torch

    import fastbn.torch as fbt
    from fastbn.bench import models

    batch = 4
    torch.manual_seed(bt.SEED)  # as model_calls: the model's weights, then the data
    reference = models.make_model(name).double()
    shape = bt.model_input_shape(name, batch)
    inputs = torch.randn(shape).double()
    labels = torch.randint(0, bt.N_CLASSES, (batch,))
    step = bt.training_step(reference.train(), inputs, labels)
    exact = [step().item() for _ in range(2)]
    losses = {}
    for fmt in bt.model_formats(name):
        case = bt.ModelCase(name, fmt)
        for peer in bt.PEERS:
            calls = bt.model_calls(peer, case, batch=batch)
            losses[fmt, peer] = [calls["step"]().item() for _ in range(2)]
            assert calls["identity"]().item() > 0  # the model without BN trains too
    for fmt in bt.model_formats(name):
        assert losses[fmt, "fastbn"][0] == pytest.approx(losses[fmt, "torch"][0], rel=1e-5)
    torch_error = max(
        abs(loss[1] - exact[1]) for (_, peer), loss in losses.items() if peer == "torch"
    )
    for fmt in bt.model_formats(name):
        assert abs(losses[fmt, "fastbn"][1] - exact[1]) <= max(4 * torch_error, 1e-5 * exact[1])
    # The models are fastbn's: every BN converted in the fastbn peer, none in torch's.
    converted = bt.to_peer("fastbn", models.make_model(name))
    norms = [
        m for m in converted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    assert norms and all(type(m).__module__.startswith("fastbn.torch") for m in norms)
    assert isinstance(norms[0], fbt.BatchNorm1d | fbt.BatchNorm2d)


@needs_torch
def test_a_worker_compiles_compiled_rows_and_times_the_first_calls(monkeypatch):
    import torch

    compiled = []

    def fake_compile(model):
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    server = bt.Server("fastbn")
    job = {
        "kind": "model",
        "row": bt.ModelCase("mlp", "bf", compiled=True).to_json(),
        "dtype": "float32",
        "seed": bt.SEED,
        "batch": 4,
        "budget": 0.0,
        "min_runs": 2,
    }
    reply = server.answer(job)
    assert len(compiled) == 2  # the step's model and the model without BN
    assert set(reply["first"]) == set(bt.MODEL_CALLS)
    assert all(t > 0 for t in reply["first"].values())
    assert {call: len(t) for call, t in reply["times"].items()} == {"step": 2, "identity": 2}
    again = server.answer(job)  # the same row: built once, no first calls
    assert "first" not in again and len(compiled) == 2
    server.answer({**job, "row": bt.ModelCase("mlp", "bf").to_json()})  # eager: no compile
    assert len(compiled) == 2


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
    """One layer row and the MLP's model-table row (at batch 4) through the three workers."""
    path = tmp_path / "torch.json"
    args = bench.parse_args(["--torch", "--numba-layer", "workqueue", "--json", str(path)])
    settings = bt.settings_from(args)
    # workqueue: always there, the variable reaches the fastbn worker.
    assert settings.numba_layer == "workqueue"
    settings.cases = [bt.TorchCase((32, 128), "bf")]
    settings.dtypes = ["float32"]
    settings.models = [bt.ModelCase("mlp", "bf")]
    settings.budget, settings.rounds, settings.batch = 0.004, 4, 4
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
    for r in rows:
        # The ratios round by round, torch / fastbn and torch / torch again.
        assert set(r["rounds"]) == {"torch", "fastbn", bt.AGAIN}
        ratios = [t / f for t, f in zip(r["rounds"]["torch"], r["rounds"]["fastbn"], strict=True)]
        assert r["ratio"] == pytest.approx(stats.estimate(ratios))
        again = [t / a for t, a in zip(r["rounds"]["torch"], r["rounds"][bt.AGAIN], strict=True)]
        assert r["noise"] == pytest.approx(stats.estimate(again))
        assert len(ratios) in (4, 8)  # measured again at most once
        assert min(r["runs"].values()) >= bt.MIN_RUNS
        assert report.format_ratio(r["ratio"]) in out
    layer, model = rows[:2], rows[2]
    # (32, 128) is below every batch-first crossover: a converted layer runs torch's op there.
    assert [r["implementation"] for r in layer] == ["torch", "torch"]
    assert "implementation" not in model
    geomean = [math.sqrt(a * b) for a, b in zip(*map(bt.ratio_rounds, layer), strict=False)]
    assert results["geometric_mean"] == pytest.approx(stats.estimate(geomean))
    # The model row: the step without BN in torch's and fastbn's workers, not torch again's.
    assert model["kind"] == "model" and not model["compiled"]
    assert set(model["first_call"]["fastbn"]) == set(bt.MODEL_CALLS)
    assert set(model["identity_seconds"]) == set(bt.PEERS)
    for peer in bt.PEERS:
        share = 1 - model["identity_seconds"][peer] / model["seconds"][peer]
        assert model["bn_share"][peer] == pytest.approx(share)
    assert "mlp bf: BN share of the step: torch" in out
    assert "model table, training steps:" in out
    assert results["model_geometric_mean"] == pytest.approx(model["ratio"])
    # Layer targets measured; of the model table's, the every-row one (the MLP), not the
    # geometric mean (1 of the 7 rows) nor the compiled one.
    measured = [False, False, True, False, True, True]
    assert [t["met"] is None for t in results["targets"]] == measured
    assert results["machine"]["threading_layer"] == "workqueue"
    assert bt.report.TARGETS_HEADING in out


def test_the_header_names_a_batch_that_replaces_the_models():
    results = fake_results(model_rows(1.2))
    results["settings"]["batch"] = 4
    assert "here every model at batch 4" in bt.format_report(results)
    assert "here every model at batch" not in bt.format_report(fake_results(model_rows(1.2)))


def test_the_bench_command_hands_torch_mode_its_arguments(monkeypatch):
    runs = []
    monkeypatch.setattr(bt, "run", runs.append)
    bench.main(["--torch", "--quick", "--numba-layer", "omp"])
    assert [(a.torch, a.quick, a.numba_layer) for a in runs] == [(True, True, "omp")]
