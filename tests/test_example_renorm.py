"""Smoke test: examples/batch_renorm.py runs in its --quick configuration and writes its plot."""

import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib", reason="the examples need the examples extra")
pytest.importorskip("sklearn", reason="the examples need the examples extra")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def test_batch_renorm_example_runs_quick_and_writes_its_plot(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "batch_renorm.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    # Both runs reached the summary table, with an accuracy per run.
    for label in ("batch norm", "batch renorm"):
        assert any(line.startswith(label + " ") for line in result.stdout.splitlines()), label
    # A PNG file starts with this signature.
    assert (tmp_path / "batch_renorm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
