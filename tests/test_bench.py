"""The bench command's plumbing: workers answer jobs, rows and targets come out.

Speed itself is never asserted here (the bench measures it); these tests
show that each peer's calls run, that the table and the target list are
built from them, that a missing peer is reported as not measured, and that
the statistics and verdicts (`fastbn.bench.stats`) hold on synthetic
timings: a spread across a limit decides nothing, a row whose columns
disagree is measured again, a floor is broken only beyond the spread.
"""

import io
import math
import random

import pytest

from fastbn import bench
from fastbn.bench import report, stats
from fastbn.bench.peers import PASSES, ROOFLINE_FORMS, ROOFLINE_OF_PASS, Case


def test_workers_give_a_row_per_pass():
    case = Case("8x64", "ff", (8, 64), 0)
    job = {"case": case.to_json(), "dtype": "float32", "threads": [1], "budget": 0, "seed": 0}
    records = {}
    for peer in ("fastbn", "fastbn-out", "numpy"):
        records.update(bench.case_job(peer, job)["records"])
    assert set(records) == {"fastbn", "fastbn-out", "numpy", "roofline"}  # fastbn-out's floor
    # Each pass's floor is timed beside it, and its records say so.
    assert {(r["pass"], r["call"]) for r in records["roofline"]} == {
        (p, form)
        for p, kernels in ROOFLINE_OF_PASS.items()
        for k in kernels
        for form in ROOFLINE_FORMS[k]
    }
    rows = report.case_rows(case, "float32", records)
    assert [r["pass"] for r in rows] == list(PASSES)
    for r in rows:
        assert r["vs_numpy"]["median"] > 0
        assert r["vs_roofline"]["median"] > 0
        assert r["vs_torch"] is None  # torch was not asked: no ratio is made up
    assert "8x64 ff" in report.format_table(rows)


def test_thread_list_parsing():
    assert bench.parse_threads("1,2") == [1, 2]


def test_the_floor_is_the_fastest_form_of_each_kernel():
    times = {
        "R": {"seconds": 2.0},
        "R numpy": {"seconds": 1.0},
        "RW": {"seconds": 1.0},
        "RW numpy": {"seconds": 3.0},
        "R2": {"seconds": 5.0},
        "R2 numpy": {"seconds": 4.0},
        "R2W": {"seconds": 1.5},
        "R2W numpy": {"seconds": 1.5},
    }
    floors = report.floors(times)
    assert {k: (v["seconds"], v["form"]) for k, v in floors.items()} == {
        "R": (1.0, "R numpy"),
        "RW": (1.0, "RW"),
        "R2": (4.0, "R2 numpy"),
        "R2W": (1.5, "R2W"),
    }


# --- the statistics --------------------------------------------------------------------


def est(median, low, high):
    return {"median": median, "low": low, "high": high, "n": 5}


@pytest.mark.parametrize(
    ("n", "k"),
    # The order statistics of the distribution-free confidence interval of a median
    # (at least 90%), as the textbook tables give them (e.g. Conover, Practical
    # Nonparametric Statistics, table A3): 5 values, the range (93.8%); 10, the second
    # of each end (97.9%); 15, the fourth (96.5%); 20, the sixth (95.9%); 40, the
    # fifteenth (91.9%).
    [(1, 1), (2, 1), (4, 1), (5, 1), (6, 1), (9, 2), (10, 2), (15, 4), (20, 6), (40, 15)],
)
def test_the_interval_of_a_median_is_the_textbooks(n, k):
    assert stats.interval_rank(n) == k


def test_the_interval_holds_the_median_as_often_as_it_says():
    # Independent of the binomial formula: draw 20 rounds of a skewed distribution,
    # count how often the interval misses its median (ln 2 for an exponential).
    rng = random.Random(0)
    misses = 0
    trials = 4000
    for _ in range(trials):
        e = stats.estimate([rng.expovariate(1.0) for _ in range(20)])
        misses += not e["low"] <= math.log(2) <= e["high"]
    assert misses / trials <= 1 - stats.CONFIDENCE
    assert misses / trials >= 0.02  # and it is no wider than it needs (4.1% expected)


def test_an_estimate_is_the_median_and_its_order_statistics():
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 0.5, 6.0, 7.0, 8.0]
    assert stats.estimate(values) == {"median": 4.5, "low": 1.0, "high": 8.0, "n": 10}
    assert stats.estimate([3.0]) == {"median": 3.0, "low": 3.0, "high": 3.0, "n": 1}


def test_a_spread_across_the_limit_decides_nothing():
    assert stats.verdict(est(1.2, 1.16, 1.3), ">=", 1.15) is True
    assert stats.verdict(est(1.1, 1.05, 1.14), ">=", 1.15) is False
    assert stats.verdict(est(1.2, 1.1, 1.3), ">=", 1.15) == stats.NOISE
    assert stats.verdict(est(1.1, 1.05, 1.14), "<=", 1.15) is True
    assert stats.verdict(est(1.2, 1.16, 1.3), "<=", 1.15) is False
    assert stats.verdict(est(1.2, 1.1, 1.3), "<=", 1.15) == stats.NOISE
    assert stats.verdict(est(1.0, 1.0, 1.1), ">", 1.0) == stats.NOISE
    assert stats.verdict(est(0.9, 0.8, 1.0), ">", 1.0) is False
    # A band: MET wholly above its top, NOT MET wholly below its bottom.
    assert stats.verdict(est(0.97, 0.96, 0.98), ">=", (0.95, 1.0)) == stats.NOISE
    assert stats.verdict(est(0.9, 0.89, 0.94), ">=", (0.95, 1.0)) is False
    assert stats.verdict(est(1.02, 1.0, 1.05), ">=", (0.95, 1.0)) is True
    assert stats.every([True, stats.NOISE, True]) == stats.NOISE
    assert stats.every([True, stats.NOISE, False]) is False
    assert stats.every([True, True]) is True


def rows_of(ratios, key="vs_numpy"):
    return [
        {"case": f"{i}x8 ff", "dtype": "float32", "pass": "train", key: r}
        for i, r in enumerate(ratios)
    ]


def test_a_target_is_met_or_not_only_outside_every_rows_spread():
    def value(r):
        return r["vs_numpy"]

    met = report.worst_row("t", rows_of([est(12, 11, 13), est(20, 15, 30)]), value, ">=", 10)
    assert (
        met["met"] is True
        and met["measured"] == "worst 12.00x (11.00-13.00) (0x8 ff float32 train)"
    )
    # One row's spread holds the limit: within noise, and that row is the one shown.
    noise = report.worst_row("t", rows_of([est(12, 11, 13), est(10.5, 9, 12)]), value, ">=", 10)
    assert noise["met"] == stats.NOISE and "(1x8 ff float32 train)" in noise["measured"]
    assert noise["measured"].startswith("undecided: 10.50x (9.00-12.00)")
    # One row wholly below the limit: not met, whatever the others.
    rows = rows_of([est(12, 11, 13), est(10.5, 9, 12), est(9, 8.5, 9.5)])
    missed = report.worst_row("t", rows, value, ">=", 10)
    assert missed["met"] is False and "(2x8 ff float32 train)" in missed["measured"]
    assert "WITHIN NOISE t >= 10x" in report.format_targets([noise])


def test_a_floor_is_broken_only_beyond_the_spread():
    def value(r):
        return r["vs_roofline"]

    def floor_row(*ratios):
        return report.floor_row("train / (R + RW)", rows_of(ratios, "vs_roofline"), value, 1.15)

    broken = floor_row(est(1.05, 1.0, 1.1), est(0.8, 0.75, 0.85))
    assert broken["met"] == "broken" and "0.80x (0.75-0.85)" in broken["measured"]
    # Below 0.9 by its median, but its spread reaches above 0.9: not broken, not met.
    doubtful = floor_row(est(1.05, 1.0, 1.1), est(0.85, 0.8, 0.95))
    assert doubtful["met"] == stats.NOISE and "broken within noise" in doubtful["measured"]
    assert floor_row(est(1.05, 1.0, 1.1), est(0.95, 0.92, 0.98))["met"] is True
    assert floor_row(est(1.3, 1.2, 1.4), est(0.95, 0.92, 0.98))["met"] is False
    assert "BROKEN" in report.format_targets([broken])


def test_the_table_shows_each_time_and_ratio_with_its_spread():
    assert report.format_ratio(est(1.22, 1.17, 1.25)) == "1.22x±0.05"
    assert report.format_time_spread(est(100e-6, 96e-6, 112e-6)) == "100.0us±12%"
    assert report.format_range(est(0.97, 0.93, 1.02)) == "0.97x (0.93-1.02)"
    row = case_rows_of({"fastbn": 1.0, "fastbn-out": 1.0, "numpy": 10.0})[0]
    names = [name for name, _ in report.COLUMNS]
    cells = dict(zip(names, report.table_cells(row), strict=True))
    for column in ("fastbn", "fastbn-out", "numpy", "roofline"):
        assert "±" in cells[column], column
    for column in ("xNumPy", "/roof"):
        assert cells[column] == report.format_ratio(
            row[{"xNumPy": "vs_numpy", "/roof": "vs_roofline"}[column]]
        )
        assert "±" in cells[column]
    assert cells["rnd"] == "5"


# --- rounds and measuring again ----------------------------------------------------------

# A round's scatter: the factor of each round's times, each worker's own (shifted by
# `SHIFT` rounds): the roofline shares fastbn-out's worker, so its scatter.
SCATTER = (1.0, 1.02, 0.98, 1.01, 0.99)
SHIFT = {"fastbn": 0, "fastbn-out": 1, "numpy": 2, "roofline": 1}


def scatter(peer, r):
    return SCATTER[(r + SHIFT[peer]) % len(SCATTER)]


def fake_records(seconds, rounds, peers=("fastbn", "fastbn-out", "numpy")):
    """Each peer's records over rounds, as the workers give them: a time per pass (the
    roofline's forms at 0.4 each, beside each pass) at one thread, scaled by `scatter`."""
    records = {}
    for r in rounds:
        for peer in peers:
            records.setdefault(peer, []).extend(
                {"call": p, "threads": 1, "median": seconds[peer] * scatter(peer, r), "round": r}
                for p in PASSES
            )
        records.setdefault("roofline", []).extend(
            {"call": form, "threads": 1, "median": 0.4 * scatter("roofline", r), "round": r}
            | {"pass": p}
            for p, kernels in ROOFLINE_OF_PASS.items()
            for k in kernels
            for form in ROOFLINE_FORMS[k]
        )
    return records


def case_rows_of(seconds, rounds=range(5)):
    return report.case_rows(
        Case("1024x256", "bf", (256, 1024), 1), "float32", fake_records(seconds, rounds)
    )


def test_ratios_are_taken_round_by_round():
    # fastbn-out's scatter runs against fastbn's: paired, the ratio's spread is theirs.
    records = fake_records({"fastbn": 1.0, "fastbn-out": 1.0, "numpy": 10.0}, range(5))
    for rec in records["numpy"]:
        rec["median"] *= 1 + 0.1 * rec["round"]  # numpy slower round by round
    train = report.case_rows(Case("1024x256", "bf", (256, 1024), 1), "float32", records)[0]
    assert train["rounds"]["fastbn"] == [scatter("fastbn", r) for r in range(5)]
    numpy_over_fastbn = [
        10 * (1 + 0.1 * r) * scatter("numpy", r) / scatter("fastbn", r) for r in range(5)
    ]
    assert train["vs_numpy"] == pytest.approx(stats.estimate(numpy_over_fastbn))
    # The floor shares fastbn-out's rounds: their ratio does not scatter.
    assert train["vs_roofline"]["low"] == pytest.approx(1.0 / 0.8)  # R + RW
    assert train["vs_roofline"]["high"] == pytest.approx(1.0 / 0.8)
    out = [scatter("fastbn-out", r) / scatter("fastbn", r) for r in range(5)]
    assert train["out_vs_fastbn"] == pytest.approx(stats.estimate(out))


class FakeWorker:
    """Answers a case job with one round of `fake_records`: its peer's records (fastbn-out's
    with the roofline's); logs the order of the asks."""

    def __init__(self, peer, seconds, log):
        self.peer = peer
        self.seconds = seconds
        self.log = log

    def ask(self, job):
        self.log.append(self.peer)
        r = (len(self.log) - 1) // 3  # the round: each asks the three workers
        peers = [self.peer]
        records = fake_records(self.seconds, [r], peers)
        if self.peer != "fastbn-out":
            del records["roofline"]
        return {"records": records}


def measured_rounds(seconds, remeasures=2):
    """measure_case against fake workers: the number of rounds it took, and the rows."""
    log = []
    workers = [FakeWorker(p, seconds, log) for p in ("fastbn", "fastbn-out", "numpy")]
    settings = bench.Settings(
        cases=[], dtypes=["float32"], threads=[1], budget=0.0, peers=[], remeasures=remeasures
    )
    progress = bench.Progress(1, stream=io.StringIO())
    case = Case("1024x256", "bf", (256, 1024), 1)
    rows = bench.measure_case(workers, case, "float32", settings, progress)
    return len(log) // len(workers), rows, log


def test_each_round_asks_every_peer_and_another_first():
    rounds, _, log = measured_rounds({"fastbn": 1.0, "fastbn-out": 1.0, "numpy": 10.0})
    assert rounds == bench.ROUNDS  # nothing to measure again
    assert log[:9] == [
        *("fastbn", "fastbn-out", "numpy"),
        *("fastbn-out", "numpy", "fastbn"),
        *("numpy", "fastbn", "fastbn-out"),
    ]


def test_a_row_whose_out_column_is_slower_beyond_the_spread_is_measured_again():
    slow_out = {"fastbn": 1.0, "fastbn-out": 1.3, "numpy": 10.0}
    rounds, rows, _ = measured_rounds(slow_out)
    assert rounds == 3 * bench.ROUNDS  # measured again twice, then reported
    assert all(len(r["rounds"]["fastbn"]) == rounds for r in rows)
    assert "fastbn-out slower than fastbn" in report.disagreements(rows[0])
    names = [name for name, _ in report.COLUMNS]
    cells = dict(zip(names, report.table_cells(rows[0]), strict=True))
    assert cells["fastbn-out"].startswith("!")
    out = rows[0]["out_vs_fastbn"]
    assert out["low"] > 1.0 and out["median"] == pytest.approx(1.3, rel=0.03)
    assert f"fastbn-out slower than fastbn, {report.format_range(out)}" in (
        report.format_disagreements(rows)
    )
    assert measured_rounds(slow_out, remeasures=0)[0] == bench.ROUNDS  # at most that often
    # Within the spread (the rounds' scatter is 2%): no disagreement, nothing measured again.
    assert measured_rounds({"fastbn": 1.0, "fastbn-out": 1.01, "numpy": 10.0})[0] == bench.ROUNDS


def test_a_floor_slower_than_the_pass_it_bounds_is_measured_again():
    # fastbn-out at 0.6 against a floor of 0.8 (R + RW): the floor is slower.
    rounds, rows, _ = measured_rounds({"fastbn": 0.6, "fastbn-out": 0.6, "numpy": 10.0})
    assert rounds == 3 * bench.ROUNDS
    assert "roofline slower than fastbn-out" in report.disagreements(rows[0])


def test_a_row_whose_ratio_is_wide_is_measured_again():
    rows = case_rows_of({"fastbn": 1.0, "fastbn-out": 1.0, "numpy": 10.0})
    assert bench.remeasure_reasons(rows) == []
    rows[0]["vs_numpy"] = est(10.0, 8.0, 12.5)  # 45% of the median
    assert bench.remeasure_reasons(rows) == ["train vs_numpy wide"]


def test_features_first_rows_in_l2_are_held_to_rw_not_to_r_plus_rw():
    def row(shape, layout):
        nbytes = 4 * shape[0] * shape[1]
        return {"shape": shape, "layout": layout, "nbytes": nbytes, "pass": "train"}

    fits = row((4096, 4096), "ff")  # 16 KiB rows
    long_rows = row((64, 262144), "ff")  # 1 MiB rows: the kernels read them twice
    batch_first = row((4096, 4096), "bf")
    small = row((256, 64), "ff")
    rows = [fits, long_rows, batch_first, small]
    for l2 in (512 * 1024, 1 << 20, 1 << 21):
        assert report.rows_in_l2(rows, l2) == [fits]
        assert report.streamed_rows(rows, l2) == [long_rows, batch_first]


def test_a_row_read_once_is_held_to_rw_in_the_mid_range():
    def row(case, rw, r):
        records = fake_records({"fastbn": 1.0, "fastbn-out": 1.0, "numpy": 1.0}, range(5))
        for rec in records["roofline"]:
            rec["median"] *= {"R": r, "RW": rw}.get(rec["call"].split()[0], 1.0) / 0.4
        return report.case_rows(case, "float32", records)[0]

    once = row(Case("1024x256", "ff", (1024, 256), 0), 0.8, 0.8)  # 1 KiB features: read once
    twice = row(Case("1024x256", "bf", (256, 1024), 1), 0.8, 0.8)
    ratio = report.floor_ratio(512 * 1024)
    assert ratio(once)["median"] == pytest.approx(1.0 / 0.8)
    assert ratio(twice)["median"] == pytest.approx(1.0 / 1.6)
    # The table's roofline and /roof columns show the floor the targets use.
    floor = report.floor_rounds(512 * 1024)
    names = [name for name, _ in report.COLUMNS]
    for r, expected in ((once, 0.8), (twice, 1.6)):
        cells = dict(zip(names, report.table_cells(r, floor), strict=True))
        assert cells["roofline"] == report.format_time_spread(stats.estimate(floor(r)))
        assert cells["roofline"].startswith(report.format_time(expected))
        assert cells["/roof"] == report.format_ratio(ratio(r))
