"""The plumbing of ``python -m fastbn.bench --torch`` (fastbn/bench/torch_mode.py), not speed.

Rows, ratios, the geometric mean and the SPEC targets come from fake
timings; the driver's rounds run against fake workers; one tiny end-to-end
run (one small shape, a tiny budget) and one step of each model need torch
and fastbn.torch, and are skipped without torch.
"""

import importlib.util
import json
import math

import pytest

from fastbn import bench
from fastbn.bench import torch_mode as bt

needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="torch is not installed"
)


def fake_times(torch_s, fastbn_s, calls=("train", "eval")):
    """Pooled times of each peer: every call's times around the given medians."""
    return {
        "torch": {c: [torch_s[c] * f for f in (0.9, 1.0, 5.0)] for c in calls},
        "fastbn": {c: [fastbn_s[c] * f for f in (1.0, 0.8, 3.0)] for c in calls},
    }


def layer_rows(ratios):
    """Layer rows with the given torch / fastbn ratios (fastbn at 1 ms)."""
    rows = []
    for i, r in enumerate(ratios):
        times = fake_times({"train": r * 1e-3}, {"train": 1e-3}, calls=("train",))
        rows += bt.make_rows("layer", f"{i}x8 bf", "float32", 32, times)
    return rows


def model_rows(resnet, mlp):
    rows = []
    for name, r in (("resnet", resnet), ("mlp", mlp)):
        times = fake_times({"step": r * 1e-2}, {"step": 1e-2}, calls=("step",))
        rows += bt.make_rows("model", name, "float32", None, times)
    return rows


def test_rows_are_medians_and_ratios():
    times = fake_times({"train": 4e-3, "eval": 1e-3}, {"train": 2e-3, "eval": 2e-3})
    rows = bt.make_rows("layer", "32x128 bf", "float64", 32768, times)
    assert [r["pass"] for r in rows] == ["train", "eval"]
    train, evaluate = rows
    assert train["seconds"] == {"torch": 4e-3, "fastbn": 2e-3}  # the medians
    assert train["ratio"] == pytest.approx(2.0)  # > 1: fastbn faster
    assert evaluate["ratio"] == pytest.approx(0.5)
    assert train["runs"] == {"torch": 3, "fastbn": 3}
    assert train["quartiles"]["torch"][0] <= 4e-3 <= train["quartiles"]["torch"][1]
    assert (train["kind"], train["case"], train["dtype"]) == ("layer", "32x128 bf", "float64")


def test_geometric_mean():
    assert bt.geometric_mean([2.0, 0.5]) == pytest.approx(1.0)
    assert bt.geometric_mean([1.5, 1.5, 1.5]) == pytest.approx(1.5)
    assert bt.geometric_mean([]) is None


def statuses(rows):
    return [t["met"] for t in bt.evaluate_targets(rows)]


def test_targets_all_met():
    targets = bt.evaluate_targets(layer_rows([1.2, 1.4, 1.5]) + model_rows(1.1, 1.05))
    assert [t["met"] for t in targets] == [True, True, True]
    assert "worst 1.20x (0x8 bf float32 train)" in targets[0]["measured"]
    g = (1.2 * 1.4 * 1.5) ** (1 / 3)
    assert targets[1]["measured"] == f"{g:.2f}x over 3 rows"
    assert targets[2]["measured"] == "resnet 1.10x, mlp 1.05x"


def test_one_slow_row_fails_the_every_row_target_only():
    assert statuses(layer_rows([0.99, 2.0, 2.0]) + model_rows(1.1, 1.1)) == [False, True, True]
    assert statuses(layer_rows([1.0, 1.0]) + model_rows(1.1, 1.1)) == [True, False, True]


def test_model_steps_must_both_be_faster():
    assert statuses(layer_rows([2.0]) + model_rows(1.5, 1.0)) == [True, True, False]
    assert statuses(layer_rows([2.0]) + model_rows(0.9, 1.5)) == [True, True, False]


def test_targets_not_measured():
    assert statuses([]) == [None, None, None]
    # Layer rows alone: the model target is not measured, not failed.
    assert statuses(layer_rows([2.0])) == [True, True, None]
    assert statuses(layer_rows([2.0]) + model_rows(1.5, 1.5)[:1]) == [True, True, None]


def test_report_prints_table_geometric_mean_and_targets():
    rows = layer_rows([2.0, 0.5]) + model_rows(1.1, 0.9)
    results = {
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
    text = bt.format_report(results)
    assert "numba.threading_layer() = tbb, NUMBA_THREADING_LAYER=tbb" in text
    assert "torch.get_num_threads() = 2" in text
    assert "load average 0.50 before, 1.25 after" in text
    assert "geometric mean of xTorch over the 2 layer rows: 1.00x" in text
    lines = text.splitlines()
    assert any(line.startswith("0x8 bf") and "2.00x" in line for line in lines)
    assert any(line.startswith("mlp") and "0.90x" in line for line in lines)
    assert "NOT MET  training step faster than torch's, both models" in text


class FakeWorker:
    """Answers a row job with one time per call: the order of the rounds, budget and min_runs."""

    def __init__(self, peer, log):
        self.peer = peer
        self.log = log

    def ask(self, job):
        self.log.append((self.peer, job["budget"], job["min_runs"]))
        return {"times": {"train": [len(self.log)], "eval": [len(self.log)]}}


def test_rounds_alternate_between_the_peers_and_pool_their_times():
    log = []
    workers = [FakeWorker("torch", log), FakeWorker("fastbn", log)]
    job = {"kind": "layer", "row": {}, "dtype": "float32", "seed": 0, "budget": 1.0}
    times = bt.measure_row(workers, job, rounds=4)
    order = [peer for peer, _, _ in log]
    assert order == ["torch", "fastbn", "fastbn", "torch"] * 2  # who goes first alternates
    assert {budget for _, budget, _ in log} == {0.25}  # the budget is split over the rounds
    assert 4 * log[0][2] >= bt.MIN_RUNS  # at least MIN_RUNS calls in all
    assert times["torch"]["train"] == [1, 4, 5, 8]
    assert times["fastbn"]["eval"] == [2, 3, 6, 7]


def test_numba_layer_is_set_for_the_fastbn_worker_only(monkeypatch):
    monkeypatch.delenv("NUMBA_THREADING_LAYER", raising=False)
    assert bt.worker_env("fastbn", "tbb")["NUMBA_THREADING_LAYER"] == "tbb"
    assert "NUMBA_THREADING_LAYER" not in bt.worker_env("torch", "tbb")
    assert "NUMBA_THREADING_LAYER" not in bt.worker_env("fastbn", None)


def test_arguments():
    args = bench.parse_args(["--torch", "--numba-layer", "workqueue", "--quick"])
    settings = bt.settings_from(args)
    assert settings.numba_layer == "workqueue"
    assert settings.dtypes == ["float32"]
    assert [c.label for c in settings.cases] == list(bt.QUICK_LABELS)
    assert settings.models == list(bt.MODELS)
    assert settings.budget == bt.QUICK_BUDGET
    full = bt.settings_from(bench.parse_args(["--torch"]))
    assert len(full.cases) == 13 and full.dtypes == ["float32", "float64"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--numba-layer", "omp"])  # without --torch
    with pytest.raises(SystemExit):
        bench.parse_args(["--torch", "--numba-layer", "gomp"])


def test_shape_filter():
    cases, models = bt.select(bt.LAYER_CASES, list(bt.MODELS), "32x128,64x256x14x14:nhwc,mlp")
    assert [c.label for c in cases] == ["32x128 bf", "64x256x14x14 nhwc"]
    assert models == ["mlp"]
    cases, models = bt.select(bt.LAYER_CASES, list(bt.MODELS), "nchw")
    assert len(cases) == 4 and all(c.layout == "nchw" for c in cases) and models == []
    assert bt.select(bt.LAYER_CASES, list(bt.MODELS), "models") == ([], list(bt.MODELS))
    with pytest.raises(SystemExit, match="matches no torch-mode row"):
        bt.select(bt.LAYER_CASES, list(bt.MODELS), "4096x512")


def test_case_bytes_and_json():
    case = bt.TorchCase((8, 512, 7, 7), "nhwc")
    assert case.label == "8x512x7x7 nhwc"
    assert case.nbytes("float64") == 8 * 512 * 49 * 8
    assert bt.TorchCase.from_json(json.loads(json.dumps(case.to_json()))) == case


@needs_torch
@pytest.mark.parametrize("peer", bt.PEERS)
def test_each_peer_runs_a_layer_and_both_models(peer):
    import torch

    import fastbn.torch as fbt

    calls = bt.layer_calls(peer, bt.TorchCase((4, 3, 5, 5), "nhwc"), "float64")
    for fn in calls.values():
        fn()
    for name in bt.MODELS:
        bt.model_calls(peer, name)["step"]()
        model = bt.to_peer(peer, bt.make_model(name))
        norms = [
            m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        ]
        assert len(norms) == (2 if name == "mlp" else 9)
        ours = [isinstance(m, fbt.BatchNorm1d | fbt.BatchNorm2d) for m in norms]
        assert all(ours) if peer == "fastbn" else not any(ours)


@needs_torch
def test_end_to_end_tiny_run(tmp_path, capsys):
    path = tmp_path / "torch.json"
    bench.main(
        [
            "--torch",
            "--shapes",
            "32x128:bf",
            "--dtype",
            "float32",
            "--budget",
            "0.004",
            "--numba-layer",
            "workqueue",  # always there: the variable reaches the fastbn worker
            "--json",
            str(path),
        ]
    )
    out = capsys.readouterr().out
    assert "numba.threading_layer() = workqueue, NUMBA_THREADING_LAYER=workqueue" in out
    results = json.loads(path.read_text())
    rows = results["rows"]
    assert [(r["case"], r["dtype"], r["pass"]) for r in rows] == [
        ("32x128 bf", "float32", "train"),
        ("32x128 bf", "float32", "eval"),
    ]
    for r in rows:
        assert r["ratio"] == pytest.approx(r["seconds"]["torch"] / r["seconds"]["fastbn"])
        assert min(r["runs"].values()) >= bt.MIN_RUNS
        assert f"{r['ratio']:.2f}x" in out
    assert math.isclose(results["geometric_mean"], math.sqrt(rows[0]["ratio"] * rows[1]["ratio"]))
    assert [t["met"] for t in results["targets"]][2] is None  # no model rows asked for
    assert results["machine"]["threading_layer"] == "workqueue"
    assert "SPEC section 8 targets:" in out
