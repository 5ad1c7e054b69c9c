"""The typed public API: annotations on every public callable, py.typed, what mypy infers.

Covers the public modules (issue 12): fastbn (its functional API, the
layer, ghost batch norm and Batch Renormalization), fastbn.nn,
fastbn.reference, the public kernels of fastbn.kernels, and fastbn.torch.
"""

import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastbn.nn

ROOT = Path(__file__).resolve().parents[1]

# Names: the fastbn.torch modules import torch, and are skipped without it.
TYPED_MODULES = (
    "fastbn",
    "fastbn.functional",
    "fastbn.ghost",
    "fastbn.kernels",
    "fastbn.layer",
    "fastbn.nn",
    "fastbn.reference",
    "fastbn.renorm",
    "fastbn.torch",
    "fastbn.torch._compat",
    "fastbn.torch._ops",
    "fastbn.torch.functional",
    "fastbn.torch.ghost",
    "fastbn.torch.modules",
    "fastbn.torch.renorm",
    "fastbn.torch.sync",
)


def _public_callables(module):
    """(qualified name, function) for each public function, kernel and class method of module.

    A class's methods are those it and its fastbn bases define (a mixin's
    forward is the class's), static and class methods included.
    """
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isclass(obj):
            for cls in obj.__mro__:
                if not cls.__module__.startswith("fastbn."):
                    continue
                for member in vars(cls).values():
                    function = getattr(member, "__func__", member)  # staticmethod, classmethod
                    # Only the methods the class defines (a Protocol is given an __init__).
                    if inspect.isfunction(function) and function.__qualname__.startswith(
                        f"{cls.__qualname__}."
                    ):
                        yield f"{cls.__module__}.{function.__qualname__}", function
        elif callable(obj):  # not __version__
            # A Numba kernel carries its Python function as py_func.
            yield f"{module.__name__}.{name}", getattr(obj, "py_func", obj)


@pytest.mark.parametrize("name", TYPED_MODULES)
def test_every_public_callable_is_annotated(name):
    if name.startswith("fastbn.torch"):
        pytest.importorskip("torch")
    module = importlib.import_module(name)
    unannotated = []
    for qualname, function in _public_callables(module):
        signature = inspect.signature(function)
        params = [p for p in signature.parameters.values() if p.name not in ("self", "cls")]
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

# The functional API: an ndarray's results in its dtype, statistics in float64.
y32, mean32, invstd32 = fastbn.batch_norm_train(x, axis=np.int64(0))
assert_type(y32, NDArray[np.float32])
assert_type(invstd32, NDArray[np.float64])
dx32, dgamma32, dbeta32 = fastbn.batch_norm_relu_backward(y32, x, mean32, invstd32)
assert_type(dbeta32, NDArray[np.float32])
x64 = x.astype(np.float64)
assert_type(fastbn.batch_norm_eval(x64, np.zeros(3), np.ones(3), out=x64), NDArray[np.float64])
assert_type(fastbn.batch_norm_train([[1.0, 2.0], [3.0, 4.0]])[0], NDArray[np.floating])
renormed, _, _, r, d = fastbn.batch_renorm_train(x, np.zeros(3), np.ones(3), r_max=2.0)
assert_type(renormed, NDArray[np.float32])
assert_type(r, NDArray[np.float64])
assert_type(fastbn.batch_renorm_backward(y32, x, mean32, invstd32, r, d)[1], NDArray[np.float32])
y_ghost, mean_ghost, invstd_ghost = fastbn.ghost_batch_norm_train(x, virtual_batch_size=4)
assert_type(y_ghost, NDArray[np.float32])
assert_type(mean_ghost, NDArray[np.float64])
dx_ghost = fastbn.ghost_batch_norm_backward(
    y_ghost, x, mean_ghost, invstd_ghost, virtual_batch_size=4
)[0]
assert_type(dx_ghost, NDArray[np.float32])

# The layer: arrays of its dtype (not known statically), None where the options say.
bn = fastbn.BatchNorm(3, momentum=None, dtype=np.float64, activation="relu")
assert_type(bn.train().eval(), fastbn.BatchNorm)
assert_type(bn(x.astype(np.float64)), NDArray[np.floating])
assert_type(bn.gamma, NDArray[np.floating] | None)
assert_type(bn.state_dict(), dict[str, NDArray[np.floating] | int])

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
fastbn.batch_norm_eval(x, np.zeros(3))  # E: call-overload
fastbn.batch_norm_train(x, axis="0")  # E: call-overload
fastbn.batch_norm_backward(y32, x, mean32, invstd32, training="no")  # E: call-overload
fastbn.batch_renorm_train(x, np.zeros(3), np.ones(3), r_min="1")  # E: call-overload
assert_type(fastbn.batch_norm_train(x64)[0], NDArray[np.float32])  # E: assert-type
fastbn.ghost_batch_norm_train(x)  # E: call-overload
fastbn.BatchNorm(3, activation="tanh")  # E: arg-type
fastbn.BatchNorm(3, virtual_batch_size=4.0)  # E: arg-type
bn.gamma.sum()  # E: union-attr
"""

TORCH_CODE = """
import torch
from typing_extensions import assert_type

import fastbn.torch as fbt

x = torch.randn(8, 3, 4, 4)
running_mean, running_var = torch.zeros(3), torch.ones(3)
y = fbt.batch_norm(x, running_mean, running_var, training=True, momentum=0.2)
assert_type(y, torch.Tensor)
fbt.batch_norm(x, running_mean, running_var, momentum=None)  # E: arg-type
renorm = fbt.BatchRenorm2d(3, renorm_clipping={"rmax": 2.0, "dmax": float("inf")})
assert_type(renorm.forward(x), torch.Tensor)
sync = fbt.SyncBatchNorm(3, momentum=None, device="cpu", dtype=torch.float64)
assert_type(sync.forward(x.double()), torch.Tensor)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3), torch.nn.ReLU())
assert_type(fbt.SyncBatchNorm.convert_sync_batchnorm(model), torch.nn.Module)
assert_type(fbt.convert(model, fuse_relu=True), torch.nn.Sequential)
assert_type(fbt.revert(model), torch.nn.Module)
ghost = fbt.BatchNorm2d(3, momentum=None, device="cpu", virtual_batch_size=4)
assert_type(ghost.forward(x), torch.Tensor)
assert_type(fbt.BatchNormReLU3d(3).fused_relu, bool)

fbt.batch_norm(x.numpy(), running_mean, running_var)  # E: arg-type
fbt.batch_norm(x, running_mean, running_var, training="yes")  # E: arg-type
fbt.BatchRenorm2d(3, renorm_clipping={"rmax": "2"})  # E: dict-item
fbt.SyncBatchNorm(3, process_group=0)  # E: arg-type
fbt.BatchNorm2d(3, virtual_batch_size="4")  # E: arg-type
fbt.BatchNormReLU1d(3, eps="1e-5")  # E: arg-type
fbt.convert(model, fuse_relu="yes")  # E: arg-type
assert_type(renorm.forward(x), float)  # E: assert-type
"""


@pytest.mark.parametrize("code", [USER_CODE, TORCH_CODE], ids=["numpy", "torch"])
def test_mypy_infers_the_documented_types_and_rejects_misuse(code, tmp_path):
    if code is TORCH_CODE:
        pytest.importorskip("torch")
    user_code = tmp_path / "user_code.py"
    user_code.write_text(code)
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
        for number, line in enumerate(code.splitlines(), start=1)
        if "# E: " in line
    }
    assert reported == expected, proc.stdout + proc.stderr


def test_dense_rejects_dtype_none():
    # np.dtype(None) is float64, and None == np.dtype(np.float64): the layer
    # used to take None as its dtype.
    with pytest.raises(TypeError, match=r"dtype must be np\.float32 or np\.float64, got None"):
        fastbn.nn.Dense(3, 2, dtype=None)
    assert fastbn.nn.Dense(3, 2, dtype=np.float64).dtype == np.float64
