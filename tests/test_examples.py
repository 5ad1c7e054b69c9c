"""Each example runs --quick, writes its plots and prints what the pages report.

One run per example: the README and the user guide state what train_digits.py
and running_stats.py print (tests/test_readme.py and tests/test_docs.py check
that the pages name them); the patterns below hold the kind of each value
(the quick run's numbers differ from the full run's, their form does not).
"""

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib", reason="the examples need the examples extra")
pytest.importorskip("sklearn", reason="the examples need the examples extra")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"

# What the pages say each example reports.
REPORTS = {
    # "with and without batch norm, at learning rates 0.1 and 1.0": accuracy per epoch
    "train_digits.py": [
        rf"lr {lr}, {bn}batch norm:\n +epoch +1: loss \d\.\d+, test accuracy \d\.\d+"
        for lr in ("0.1", "1.0")
        for bn in ("", "no ")
    ],
    # eval mode against test batches normalized by themselves, "with batches of 2"
    "running_stats.py": [
        r"eval mode \(running statistics\) \d\.\d+",
        r"test batches of +2 normalized by themselves: \d\.\d+",
    ],
}


@pytest.mark.parametrize(
    ("script", "plots"),
    [
        ("train_digits.py", ["train_digits.png"]),
        ("running_stats.py", ["running_stats.png"]),
        ("internal_shift.py", ["internal_shift.png"]),
        # Starts 2 gloo processes itself (no torchrun).
        pytest.param(
            "ddp_syncbn.py",
            ["ddp_syncbn.png"],
            marks=pytest.mark.skipif(
                importlib.util.find_spec("torch") is None, reason="needs torch"
            ),
        ),
    ],
)
def test_example_runs_quick_and_writes_its_plots(tmp_path, script, plots):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    for pattern in REPORTS.get(script, []):
        assert re.search(pattern, result.stdout, re.IGNORECASE), (pattern, result.stdout)
    for plot in plots:
        path = tmp_path / plot
        # A PNG file starts with this signature.
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot
