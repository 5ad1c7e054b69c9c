"""The bench command's plumbing: workers answer jobs, rows and targets come out.

Speed itself is never asserted here (the bench measures it); these tests
show that each peer's calls run, that the table and the target list are
built from them, and that a missing peer is reported as not measured.
"""

from fastbn import _bench_report as report
from fastbn import bench
from fastbn._bench_peers import PASSES, Case


def test_workers_give_a_row_per_pass():
    case = Case("8x64", "ff", (8, 64), 0)
    job = {"case": case.to_json(), "dtype": "float32", "threads": [1], "budget": 0, "seed": 0}
    records = {
        peer: bench.case_job(peer, job)["records"]
        for peer in ("fastbn", "fastbn-out", "numpy", "roofline")
    }
    rows = report.case_rows(case, "float32", records)
    assert [r["pass"] for r in rows] == list(PASSES)
    for r in rows:
        assert r["vs_numpy"] > 0
        assert r["vs_roofline"] > 0
        assert r["vs_torch"] is None  # torch was not asked: no ratio is made up
    assert "8x64 ff" in report.format_table(rows)


def test_thread_list_parsing():
    assert bench.parse_threads("1,2") == [1, 2]
