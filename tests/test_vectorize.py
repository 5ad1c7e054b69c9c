"""The hot loops vectorize: their LLVM IR has vector arithmetic, for each dtype.

Whether LLVM vectorizes a loop depends on how it is written (signed indices
with Numba's wraparound checks can stop it) and on the machine, so a yardstick
or a kernel that silently runs scalar is caught here, not in the bench. Each
loop is compiled afresh (cached code cannot be inspected) with its own
options, including its fastmath flags.
"""

import re

import numba
import numpy as np
import pytest

from fastbn.kernels import _common, columns, roofline

N = 4096
WIDTH = 256
VECTOR_OP = re.compile(r"= (?:fadd|fsub|fmul|fneg)(?: \w+)* <\d+ x (float|double)>")


def _fresh(kernel):
    """An uncached compilation of kernel's Python function with kernel's options."""
    options = {k: v for k, v in kernel.targetoptions.items() if k != "nopython"}
    return numba.njit(**options)(kernel.py_func)


def _calls(dtype):
    """(name, kernel, args) of every hot loop, on arrays of dtype."""
    t = np.dtype(dtype).type
    x, dy, out = (np.ones(N, dtype) for _ in range(3))
    per_position = [np.ones(WIDTH, dtype) for _ in range(6)]
    shift64 = np.zeros(WIDTH)
    partials = np.zeros(2 * WIDTH)
    one = t(1)
    relu = np.ones((4, WIDTH), dtype)  # a fused ReLU's per-feature or per-position parameters
    groups = N // WIDTH
    return [
        ("roofline.read", roofline.read, (x,)),
        ("roofline.read_write", roofline.read_write, (x, one, one, out)),
        ("roofline.read2", roofline.read2, (x, dy)),
        ("roofline.read2_write", roofline.read2_write, (dy, x, one, one, one, out)),
        ("rows: shifted_sums", _common.shifted_sums, (x, 0, N, 0.0)),
        ("rows: centered_dot", _common.centered_dot, (dy, x, 0, N, 0.0)),
        ("rows: scale_centered", _common.scale_centered, (x, out, 0, N, one, one, one, one)),
        (
            "rows: input_gradient",
            _common.input_gradient,
            (dy, x, out, 0, N, one, one, one, one, one, one),
        ),
        ("rows: centered_dot, relu", _common.centered_dot, (dy, x, 0, N, 0.0, relu, 0)),
        (
            "rows: scale_centered, relu",
            _common.scale_centered,
            (x, out, 0, N, one, one, one, one, True),
        ),
        (
            "rows: input_gradient, relu",
            _common.input_gradient,
            (dy, x, out, 0, N, one, one, one, one, one, one, relu, 0),
        ),
        ("rows: passed_scaled", _common.passed_scaled, (dy, x, out, 0, N, one, relu, 0)),
        (
            "columns: moments",
            columns._moments_block,
            (x, WIDTH, 0, N // WIDTH, 0, WIDTH, shift64, partials, partials, 0),
        ),
        (
            "columns: gradient sums",
            columns._grad_sums_block,
            (dy, x, WIDTH, 0, groups, 0, WIDTH, shift64, partials, partials, 0, True),
        ),
        (
            "columns: scale",
            columns._scale_block,
            (x, out, WIDTH, 0, groups, 0, WIDTH, *per_position[:4], None, True),
        ),
        (
            "columns: scale, relu",
            columns._scale_block,
            (x, out, WIDTH, 0, groups, 0, WIDTH, *per_position[:4], True, True),
        ),
        (
            "columns: input gradient",
            columns._input_gradient_block,
            (dy, x, out, WIDTH, 0, groups, 0, WIDTH, tuple(per_position), True),
        ),
        (
            "columns: passed scaled",
            columns._passed_scaled_block,
            (dy, x, out, WIDTH, 0, groups, WIDTH, per_position[0], relu),
        ),
    ]


CASES = [
    pytest.param(dtype, name, id=f"{name}-{dtype}")
    for dtype in ("float32", "float64")
    for name, _, _ in _calls(dtype)
]


@pytest.mark.parametrize(("dtype", "name"), CASES)
def test_hot_loop_vectorizes(dtype, name):
    kernel, args = next((k, a) for n, k, a in _calls(dtype) if n == name)
    fresh = _fresh(kernel)
    fresh(*args)
    (ir,) = fresh.inspect_llvm().values()
    vector_types = set(VECTOR_OP.findall(ir))
    assert vector_types, f"{name} ({dtype}) compiled to scalar code only"


def test_a_scalar_loop_is_caught():
    """The check itself: a loop with a dependence between iterations does not vectorize."""

    @numba.njit
    def prefix_sum(x):
        for i in range(1, x.size):
            x[i] += x[i - 1]

    prefix_sum(np.ones(N))
    (ir,) = prefix_sum.inspect_llvm().values()
    assert not VECTOR_OP.findall(ir)
