"""Smoke tests: each example runs in its --quick configuration and writes its plots."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib", reason="the examples need the examples extra")
pytest.importorskip("sklearn", reason="the examples need the examples extra")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


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
    for plot in plots:
        path = tmp_path / plot
        # A PNG file starts with this signature.
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot
