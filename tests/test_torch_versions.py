"""The torch versions fastbn.torch claims are the ones the suite runs on (issue 20).

pyproject.toml's ``torch`` extra pins the tested release; this suite runs on
it; `import fastbn.torch` under another release warns once, naming it.
"""

import re
import warnings
from pathlib import Path

import pytest
from conftest import python_env, run_python

torch = pytest.importorskip("torch")

from fastbn.torch import _compat  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_the_torch_extra_pins_the_tested_release():
    pyproject = (ROOT / "pyproject.toml").read_text()
    # The extra's line (tomllib is Python 3.11+; the package supports 3.10).
    assert re.findall(r"^torch = (.*)$", pyproject, flags=re.M) == [
        f'["torch=={_compat.TESTED_TORCH}"]'
    ]


def test_the_suite_runs_on_the_tested_release():
    assert torch.__version__.split("+")[0] == _compat.TESTED_TORCH


@pytest.mark.parametrize("version", ["2.13.0", "2.13.0+cpu"])
def test_no_warning_on_the_tested_release(version):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _compat.warn_if_untested(version)


@pytest.mark.parametrize("version", ["2.14.1", "2.12.0+cpu", "2.13.1"])
def test_another_release_warns_naming_the_tested_one(version):
    with pytest.warns(
        RuntimeWarning, match=re.escape(f"tested with torch {_compat.TESTED_TORCH}")
    ):
        _compat.warn_if_untested(version)


def test_import_under_another_release_warns_once(subprocess_cache):
    code = (
        "import warnings, torch\n"
        "torch.__version__ = '9.9.9'\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastbn.torch\n"
        "    import fastbn.torch\n"
        "print(sum('9.9.9' in str(w.message) for w in caught))\n"
    )
    out = run_python(code, python_env(subprocess_cache)).stdout.strip().splitlines()[-1]
    assert out == "1"
