"""The contract page (docs/guide/contract.md) and the bench that reports its targets.

The bench prints each performance target it measures, limit included, under a
heading that names the page; the page's target tables give each target's text
as the bench prints it, in the first column. So:

- every target ``python -m fastbn.bench`` reports (`report.evaluate_targets`)
  is a row of the page's table of the bench's targets, and every row there is
  one of them; the same for ``--torch`` (`torch_mode.evaluate_targets`) and the
  page's table of the PyTorch mode's targets;
- the page's table of targets measured elsewhere names none that a bench
  command reports;
- the bench's heading for its targets names the page and a heading of it, in
  both modes (tests/test_readme.py checks that the README names the page);
- no text a user reads (the README, the docs, the package's docstrings and
  printouts) sends them to a contract they cannot read.

The targets' texts are enumerated by running the evaluators twice: on a run
that measured nothing and on a run of fake rows that measures every target
(each target's verdict then is True or False). A text must not depend on the
measurements. Two texts depend on the machine, the L2 size and the thread
count; the page writes them as ``<L>`` and ``<N>``.
"""

import pathlib
import re

import pytest
from test_bench_torch import fake_results, layer_rows, model_rows

from fastbn.bench import report
from fastbn.bench import torch_mode as bt
from fastbn.bench.peers import BENCH_CASES, PASSES, ROOFLINE_FORMS

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "guide" / "contract.md"
TEXT = PAGE.read_text()
# The page's placeholders for what depends on the machine.
PLACEHOLDERS = {"<L>": r"\d+", "<N>": r"\d+"}


def section(label):
    """The page's text from the MyST label ``(label)=`` to the next label."""
    start = TEXT.index(f"({label})=\n")
    following = re.search(r"^\(contract-[a-z-]+\)=$", TEXT[start + 1 :], re.MULTILINE)
    return TEXT[start : start + 1 + following.start()] if following else TEXT[start:]


def table_rows(label):
    """The cells of each body row of the table in a section (its header and rule left out)."""
    lines = [line for line in section(label).splitlines() if line.startswith("|")]
    assert len(lines) > 2, f"no table under ({label})="
    assert set(lines[1]) <= set("|- "), lines[1]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


def page_targets(label):
    """A section's targets: each row's first cell, a code span of the bench's text."""
    targets = []
    for cells in table_rows(label):
        span = re.fullmatch(r"`([^`]+)`", cells[0])
        assert span, f"({label})=: the first cell is not one code span: {cells[0]}"
        targets.append(span.group(1))
    assert len(targets) == len(set(targets)), f"({label})= lists a target twice"
    return targets


def pattern(page_text):
    """The bench texts a page text stands for: its placeholders match the machine's numbers."""
    parts = re.split("(" + "|".join(map(re.escape, PLACEHOLDERS)) + ")", page_text)
    return re.compile("".join(PLACEHOLDERS.get(p, re.escape(p)) for p in parts))


def numpy_bench_run(l2_bytes, max_threads, rows):
    """What `report.evaluate_targets` reads: the rows, the machine, the small case, cold start."""
    return {
        "rows": rows,
        "machine": {"l2_bytes": l2_bytes, "max_threads": max_threads},
        "small": {call: {"seconds": 3e-6, "threads": 1} for call in report.SMALL_LIMITS_US},
        "cold_start": {"warm_cache": {"total": 0.5}, "empty_cache": {"total": 20.0}},
    }


def numpy_bench_rows(threads):
    """A row per bench case, dtype and pass from fake timings: every peer, every floor."""
    forms = [form for kernel_forms in ROOFLINE_FORMS.values() for form in kernel_forms]
    seconds = {"fastbn": 1.0, "fastbn-out": 0.9, "numpy": 8.0, "torch": 1.2, "roofline": 0.4}

    def records(peer, calls):
        return [
            {"call": call, "threads": t, "median": seconds[peer] * (1 + 0.1 * (t != threads[-1]))}
            for call in calls
            for t in threads
        ]

    peers = {peer: records(peer, PASSES) for peer in ("fastbn", "fastbn-out", "numpy", "torch")}
    peers["roofline"] = records("roofline", forms)
    return [
        row
        for case in BENCH_CASES
        for dtype in ("float32", "float64")
        for row in report.case_rows(case, dtype, peers)
    ]


def numpy_bench_texts():
    """Every target text of ``python -m fastbn.bench``, on two machines, measured or not."""
    texts = set()
    for l2_bytes, threads in ((1 << 20, [1, 2]), (128 * 1024, [1, 2, 4, 8])):
        empty = report.evaluate_targets(numpy_bench_run(l2_bytes, threads[-1], []))
        full = report.evaluate_targets(
            numpy_bench_run(l2_bytes, threads[-1], numpy_bench_rows(threads))
        )
        measured = [t["target"] for t in full if t["met"] is None]
        assert not measured, f"fake run leaves targets unmeasured: {measured}"
        assert [t["target"] for t in empty] == [t["target"] for t in full]
        texts |= {t["target"] for t in full}
    return texts


def torch_mode_texts():
    """Every target text of ``python -m fastbn.bench --torch``, measured or not."""
    empty = bt.evaluate_targets([])
    assert all(t["met"] is None for t in empty)
    rows = layer_rows([0.9, 1.4]) + model_rows(1.2) + model_rows(0.9, compiled=True)
    full = bt.evaluate_targets(rows)
    assert all(t["met"] is not None for t in full), full
    assert [t["target"] for t in empty] == [t["target"] for t in full]
    return {t["target"] for t in full}


BENCHES = {
    "contract-bench-targets": numpy_bench_texts,
    "contract-torch-targets": torch_mode_texts,
}


@pytest.mark.parametrize("label", sorted(BENCHES))
def test_every_target_the_bench_reports_is_on_the_page(label):
    texts = BENCHES[label]()
    patterns = [pattern(t) for t in page_targets(label)]
    for text in sorted(texts):
        matches = [p.pattern for p in patterns if p.fullmatch(text)]
        assert len(matches) == 1, f"bench target {text!r}: rows of ({label})= {matches}"


@pytest.mark.parametrize("label", sorted(BENCHES))
def test_the_page_lists_no_target_the_bench_does_not_report(label):
    texts = BENCHES[label]()
    for page_text in page_targets(label):
        assert any(pattern(page_text).fullmatch(t) for t in texts), (
            f"({label})= lists {page_text!r}, which the bench does not report: mark it as"
            " measured elsewhere (contract-other-targets) or remove it"
        )


def test_the_targets_measured_elsewhere_say_what_measures_them():
    rows = table_rows("contract-other-targets")
    reported = numpy_bench_texts() | torch_mode_texts()
    assert rows
    for target, measured_by in rows:
        assert measured_by, target
        assert not any(text in target for text in reported), target
    # The memory target is a test's, not the bench's: the page names the test, which exists.
    memory = [by for target, by in rows if target.startswith("memory:")]
    assert memory and "`tests/test_memory.py`" in memory[0]
    assert (ROOT / "tests" / "test_memory.py").exists()


def test_the_bench_names_the_contract_page_in_both_modes():
    met = report.target("a target", True, "1.00x")
    heading = report.format_targets([met]).splitlines()[0]
    assert heading == report.TARGETS_HEADING
    page, section_title = re.fullmatch(r"Targets \((\S+\.md), (.+)\):", heading).groups()
    assert ROOT / page == PAGE
    assert f"## {section_title}\n" in TEXT
    torch_report = bt.format_report(fake_results(layer_rows([1.0]))).splitlines()
    assert report.TARGETS_HEADING in torch_report


# What a user reads: the README and the changelog, the site's sources (not what its build
# writes), the package's docstrings and printouts, the bench scripts and the examples.
BUILT = {"_build", "generated", "auto_examples"}
USER_TEXT = [
    ROOT / "README.md",
    ROOT / "CHANGELOG.md",
    *(
        path
        for pattern in ("docs/**/*.md", "docs/**/*.rst", "fastbn/**/*.py", "bench/*.py")
        for path in sorted(ROOT.glob(pattern))
        if not BUILT & set(path.relative_to(ROOT).parts)
    ),
    *sorted((ROOT / "examples").glob("*.py")),
]


@pytest.mark.parametrize("path", USER_TEXT, ids=lambda p: str(p.relative_to(ROOT)))
def test_user_text_points_to_the_contract_page_not_a_spec_file(path):
    for number, line in enumerate(path.read_text().splitlines(), 1):
        assert not re.search(r"\bSPEC\b|shared folder", line), f"{path.name}:{number}: {line}"
