"""The bench command's plumbing: workers answer jobs, rows and targets come out.

Speed itself is never asserted here (the bench measures it); these tests
show that each peer's calls run, that the table and the target list are
built from them, and that a missing peer is reported as not measured.
"""

from fastbn import bench
from fastbn.bench import report
from fastbn.bench.peers import PASSES, Case


def test_workers_give_a_row_per_pass():
    case = Case("8x64", "ff", (8, 64), 0)
    job = {"case": case.to_json(), "dtype": "float32", "threads": [1], "budget": 0, "seed": 0}
    records = {}
    for peer in ("fastbn", "fastbn-out", "numpy"):
        records.update(bench.case_job(peer, job)["records"])
    assert set(records) == {"fastbn", "fastbn-out", "numpy", "roofline"}  # fastbn-out's floor
    rows = report.case_rows(case, "float32", records)
    assert [r["pass"] for r in rows] == list(PASSES)
    for r in rows:
        assert r["vs_numpy"] > 0
        assert r["vs_roofline"] > 0
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


def _row(vs_roofline):
    return {"case": "4096x512 ff", "dtype": "float32", "pass": "train", "vs_roofline": vs_roofline}


def test_a_floor_beaten_by_more_than_ten_percent_is_reported_broken():
    def value(r):
        return r["vs_roofline"]

    broken = report.floor_row("train / (R + RW)", [_row(1.05), _row(0.5)], value, 1.15)
    assert broken["met"] == "broken" and "0.50x" in broken["measured"]
    met = report.floor_row("train / (R + RW)", [_row(1.05), _row(0.95)], value, 1.15)
    assert met["met"] is True
    missed = report.floor_row("train / (R + RW)", [_row(1.3), _row(0.95)], value, 1.15)
    assert missed["met"] is False
    assert "BROKEN" in report.format_targets([broken, met])


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
    def row(shape, layout, rw, r_plus_rw):
        kernels = {"RW": {"seconds": rw}, "R": {"seconds": r_plus_rw - rw}}
        return {
            "shape": shape,
            "layout": layout,
            "nbytes": 4 * shape[0] * shape[1],
            "pass": "train",
            "seconds": {"fastbn-out": 1.0},
            "roofline_kernels": kernels,
            "roofline": r_plus_rw,
            "vs_roofline": 1.0 / r_plus_rw,
        }

    once = row((1024, 256), "ff", 0.8, 1.6)  # 1 KiB features: read once
    twice = row((256, 1024), "bf", 0.8, 1.6)
    ratio = report.floor_ratio(512 * 1024)
    assert ratio(once) == 1.0 / 0.8
    assert ratio(twice) == 1.0 / 1.6
    # The table's roofline and /roof columns show the floor the targets use.
    floor = report.floor_seconds(512 * 1024)
    for r, expected in ((once, 0.8), (twice, 1.6)):
        r.update(case="c", dtype="float32", gbps=1.0, vs_numpy=1.0, vs_torch=1.0)
        r["seconds"].update(fastbn=1.0, numpy=1.0, torch=1.0)
        r["threads"] = {"fastbn": 1, "torch": 1}
        names = [name for name, _ in report.COLUMNS]
        cells = dict(zip(names, report.table_cells(r, floor), strict=True))
        assert cells["roofline"] == report.format_time(expected)
        assert cells["/roof"] == report.format_ratio(1.0 / expected)
