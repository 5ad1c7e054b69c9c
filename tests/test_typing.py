"""The typed public API: annotations on every public callable, py.typed, what mypy infers.

Covers the modules annotated so far: fastbn.nn, fastbn.reference and the
public kernels of fastbn.kernels (issue 12).
"""

import inspect
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastbn.kernels
import fastbn.nn
import fastbn.reference

ROOT = Path(__file__).resolve().parents[1]

TYPED_MODULES = (fastbn.nn, fastbn.reference, fastbn.kernels)


def _public_callables(module):
    """(qualified name, function) for each public function, kernel and class method of module."""
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isclass(obj):
            for member in vars(obj).values():
                # Only the methods the class defines (a Protocol is given an __init__).
                if inspect.isfunction(member) and member.__qualname__.startswith(f"{name}."):
                    yield f"{module.__name__}.{member.__qualname__}", member
        else:
            # A Numba kernel carries its Python function as py_func.
            yield f"{module.__name__}.{name}", getattr(obj, "py_func", obj)


@pytest.mark.parametrize("module", TYPED_MODULES, ids=lambda m: m.__name__)
def test_every_public_callable_is_annotated(module):
    unannotated = []
    for qualname, function in _public_callables(module):
        signature = inspect.signature(function)
        params = [p for p in signature.parameters.values() if p.name != "self"]
        missing = [p.name for p in params if p.annotation is inspect.Parameter.empty]
        if signature.return_annotation is inspect.Signature.empty:
            missing.append("return")
        if missing:
            unannotated.append(f"{qualname}: {', '.join(missing)}")
    assert unannotated == []


def test_the_package_ships_its_py_typed_marker():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    assert (ROOT / "fastbn" / "py.typed").is_file()
    with open(ROOT / "pyproject.toml", "rb") as f:
        package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["fastbn"]


# A user's code: assert_type holds where nothing is marked, and mypy reports
# exactly the marked lines, with the marked error code.
USER_CODE = """
import numpy as np
from numpy.typing import NDArray
from typing_extensions import assert_type

import fastbn
from fastbn import kernels, nn, reference

x = np.ones((3, 8), np.float32)
mean = kernels.mean(x)
assert_type(mean, NDArray[np.float64])
var = kernels.var(x, mean)
assert_type(var, NDArray[np.float64])
z_norm = kernels.normalize(x, mean, var, 1e-5)
assert_type(z_norm, NDArray[np.float32] | NDArray[np.float64])
y, batch_mean, invstd = reference.batch_norm_train(x, np.ones(3), np.zeros(3))
assert_type(y, NDArray[np.float32])
assert_type(batch_mean, NDArray[np.float64])
dx, dgamma, dbeta = reference.batch_norm_backward(y, x, batch_mean, invstd)
assert_type(dgamma, NDArray[np.float32])

model = nn.Sequential(nn.Dense(3, 4, bias=False), fastbn.BatchNorm(4), nn.ReLU())
assert_type(model.train(), nn.Sequential)
optimizer = nn.SGD(model.parameters(), lr=0.1, momentum=0.9)
labels = np.zeros(8, np.int64)
for A, Y in nn.minibatches(x, labels, 4, np.random.default_rng(0)):
    loss, dlogits = nn.SoftmaxCrossEntropy()(model(A), Y)
    assert_type(loss, float)
    model.backward(dlogits)
    optimizer.step()
folded = nn.fold_batch_norm(nn.Dense(3, 4), fastbn.BatchNorm(4))
assert_type(folded, nn.Dense)

kernels.mean([[1.0, 2.0]])  # E: arg-type
reference.batch_norm_train(x, axis="0")  # E: arg-type
nn.Dense(3, 4, rng=0)  # E: arg-type
nn.Sequential(nn.Dense(3, 4), "relu")  # E: arg-type
nn.Adam(model.parameters(), betas=0.9)  # E: arg-type
assert_type(kernels.affine(z_norm, np.ones(3), np.zeros(3)), NDArray[np.float32])  # E: assert-type
"""


def test_mypy_infers_the_documented_types_and_rejects_misuse(tmp_path):
    user_code = tmp_path / "user_code.py"
    user_code.write_text(USER_CODE)
    # From the repository root, with its configuration, as CI runs mypy.
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "pyproject.toml",
         "--cache-dir", str(tmp_path / "cache"), "--no-error-summary", str(user_code)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    reported = {
        int(m["line"]): m["code"]
        for m in re.finditer(
            rf"^{re.escape(str(user_code))}:(?P<line>\d+): error: .*\[(?P<code>[a-z-]+)\]$",
            proc.stdout,
            re.MULTILINE,
        )
    }
    expected = {
        number: line.split("# E: ")[1]
        for number, line in enumerate(USER_CODE.splitlines(), start=1)
        if "# E: " in line
    }
    assert reported == expected, proc.stdout + proc.stderr


def test_dense_rejects_dtype_none():
    # np.dtype(None) is float64, and None == np.dtype(np.float64): the layer
    # used to take None as its dtype.
    with pytest.raises(TypeError, match=r"dtype must be np\.float32 or np\.float64, got None"):
        fastbn.nn.Dense(3, 2, dtype=None)
    assert fastbn.nn.Dense(3, 2, dtype=np.float64).dtype == np.float64
