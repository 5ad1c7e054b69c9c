"""Mutation testing as a measurement: hand-made kernel mutants, and cosmic-ray on the rest.

Not a test (nothing here is collected by pytest) and not run in CI: a full run
takes an hour or more. See tools/README.md for the commands.

Two modes, both on a copy of the repository in a temporary directory (the
work tree is never written), each mutant's tests run with -x and a timeout:

- kernels (the default): the MUTANTS below, hand-made for the Numba kernels
  (fastbn/kernels/*.py and the njit functions of fastbn/_running.py). Each is
  (name, file, exact source snippet, replacement, description); a snippet
  that no longer occurs exactly once (or a file or mapped test file that is
  gone) stops the script before anything runs.
- --registry: cosmic-ray (from PyPI) over the pure-Python modules, each
  module's mutants against the test files of REGISTRY_TESTS only.

Numba caches compiled kernels on disk keyed by the source of the kernel's own
file, not of the functions it inlined from other files. So every mutant gets
its own cache: a copy of the cache warmed by the unmutated baseline run, less
the files of the mutated module and of every kernel module that compiles it
in (KERNEL_DEPENDENTS); --cold starts each mutant from an empty cache.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository
    old: str  # must occur exactly once in the file
    new: str
    description: str


def _m(name: str, path: str, old: str, new: str, description: str) -> Mutant:
    return Mutant(name, path, old, new, description)


K = "fastbn/kernels/"
MUTANTS = [
    # --- _common.py: the run kernels and per-feature finishing of both families
    _m(
        "common-shifted-sum-sign",
        K + "_common.py",
        "        s1 += d\n        s2 += d * d\n    return s1, s2",
        "        s1 -= d\n        s2 += d * d\n    return s1, s2",
        "shifted_sums: sum(x - shift) with the sign of every term flipped",
    ),
    _m(
        "common-acc-dtype",
        K + "_common.py",
        "        d = np.float64(x[o + i]) - shift\n",
        "        d = x[o + i] - x.dtype.type(shift)\n",
        "shifted_sums: differences and squares in x's dtype, not float64",
    ),
    _m(
        "common-normalized-lo-sign",
        K + "_common.py",
        "    return ((v - mean_hi) - mean_lo) * scale + shift",
        "    return ((v - mean_hi) + mean_lo) * scale + shift",
        "normalized: the low part of the mean added instead of subtracted",
    ),
    _m(
        "common-normalized-hi-lo-swap",
        K + "_common.py",
        "    return ((v - mean_hi) - mean_lo) * scale + shift",
        "    return ((v - mean_lo) - mean_hi) * scale + shift",
        "normalized: hi and lo mean terms swapped (subtraction order)",
    ),
    _m(
        "common-relu-mask-ge",
        K + "_common.py",
        "relu[2, k], relu[3, k]) > 0",
        "relu[2, k], relu[3, k]) >= 0",
        "relu_passes: gradient passes at y == 0 (subgradient 1 instead of 0)",
    ),
    _m(
        "common-relu-mask-dropped-in-sums",
        K + "_common.py",
        "        g = np.float64(dy[o + i]) if relu_passes(v, relu, c) else 0.0",
        "        g = np.float64(dy[o + i])",
        "centered_dot: the ReLU mask ignored in the gradient sums",
    ),
    _m(
        "common-centered-dot-mean-sign",
        K + "_common.py",
        "        s_dyxc += g * (np.float64(v) - mean)",
        "        s_dyxc += g * (np.float64(v) + mean)",
        "centered_dot: x + mean instead of x - mean",
    ),
    _m(
        "common-input-gradient-k0-sign",
        K + "_common.py",
        "        out[o + i] = scale * (g + x_hat * k_xhat + k0)",
        "        out[o + i] = scale * (g + x_hat * k_xhat - k0)",
        "input_gradient: the dbeta term's sign flipped",
    ),
    _m(
        "common-input-gradient-lo-dropped",
        K + "_common.py",
        "        x_hat = ((v - mean_hi) - mean_lo) * invstd\n        out[o + i]",
        "        x_hat = (v - mean_hi) * invstd\n        out[o + i]",
        "input_gradient: the low part of the mean dropped from x_hat",
    ),
    _m(
        "common-row-sums-off-by-one",
        K + "_common.py",
        "        for k in range(partials.shape[1]):",
        "        for k in range(partials.shape[1] - 1):",
        "row_sums: the last partial of each row left out",
    ),
    _m(
        "common-split-lo-zero",
        K + "_common.py",
        "    return hi, t(mean - np.float64(hi))",
        "    return hi, t(0)",
        "split: the low part dropped everywhere (every mean rounded to x's dtype)",
    ),
    _m(
        "common-split-mean-lo-zero",
        K + "_common.py",
        "        hi[c], lo[c] = split(mean[c], like.dtype.type)",
        "        hi[c], lo[c] = split(mean[c], like.dtype.type)[0], 0.0",
        "split_mean: the low part dropped (rows chunked train, rows eval and dx, the ReLU "
        "mask, blocks.normalize)",
    ),
    _m(
        "common-relu-params-no-gamma",
        K + "_common.py",
        "    params[2] = in_dtype(gamma * invstd, like)",
        "    params[2] = in_dtype(invstd, like)",
        "relu_params: the mask's scale ignores gamma",
    ),
    _m(
        "common-moments-no-shift-correction",
        K + "_common.py",
        "    var = s2 / count - d * d",
        "    var = s2 / count",
        "feature_moments: the shifted mean's square not subtracted",
    ),
    _m(
        "common-moments-overflow-branch",
        K + "_common.py",
        "    if s2 == np.inf",
        "    if s2 == -np.inf",
        "feature_moments: an overflowed square no longer gives var = inf",
    ),
    _m(
        "common-moments-overflow-finite-check",
        K + "_common.py",
        "    if s2 == np.inf and np.isfinite(d):",
        "    if s2 == np.inf:",
        "feature_moments: a feature with an infinite value gets var = inf (invstd 0), not NaN",
    ),
    _m(
        "common-stats-no-eps",
        K + "_common.py",
        "    return mean, 1.0 / np.sqrt(var + eps)",
        "    return mean, 1.0 / np.sqrt(var)",
        "feature_stats: eps dropped",
    ),
    _m(
        "common-coefficients-count-bessel",
        K + "_common.py",
        "    return gamma * invstd, -dgamma / count, -dbeta / count",
        "    return gamma * invstd, -dgamma / (count - 1), -dbeta / count",
        "train_coefficients: dgamma / (M - 1) instead of / M",
    ),
    # --- blocks.py: the public building blocks
    _m(
        "blocks-mean-bessel",
        K + "blocks.py",
        "        out[i] = s / m",
        "        out[i] = s / (m - 1)",
        "mean: divided by m - 1",
    ),
    _m(
        "blocks-mean-acc-dtype",
        K + "blocks.py",
        "        s = 0.0\n        for j in range(m):\n            s += np.float64(x[i, j])",
        "        s = x.dtype.type(0.0)\n        for j in range(m):\n            s += x[i, j]",
        "mean: accumulated in x's dtype instead of float64",
    ),
    _m(
        "blocks-var-bessel",
        K + "blocks.py",
        "np.float64(mean[i]))[1] / m",
        "np.float64(mean[i]))[1] / (m - 1)",
        "var: unbiased (m - 1) where the biased variance is promised",
    ),
    _m(
        "blocks-normalize-no-eps",
        K + "blocks.py",
        "        invstd = t(1.0 / np.sqrt(np.float64(var[i]) + eps))",
        "        invstd = t(1.0 / np.sqrt(np.float64(var[i])))",
        "normalize: eps dropped",
    ),
    # --- columns.py: the interleaved family
    _m(
        "columns-group-width-floor",
        K + "columns.py",
        "    return row * -(-MIN_WIDTH // row)",
        "    return row * max(1, MIN_WIDTH // row)",
        "group_width: rounded down (a group may be shorter than MIN_WIDTH)",
    ),
    _m(
        "columns-unit-group-bound",
        K + "columns.py",
        "    return b, g0, min(g0 + per_block, groups), j0, min(j0 + POSITION_BLOCK, width)",
        "    return b, g0, min(g0 + per_block - 1, groups), j0, min(j0 + POSITION_BLOCK, width)",
        "_unit: each block of a reduction loses its last group",
    ),
    _m(
        "columns-unit-position-bound",
        K + "columns.py",
        "    return b, g0, min(g0 + per_block, groups), j0, min(j0 + POSITION_BLOCK, width)",
        "    return b, g0, min(g0 + per_block, groups), j0, min(j0 + POSITION_BLOCK - 1, width)",
        "_unit: each position block of a reduction loses its last position",
    ),
    _m(
        "columns-moments-4group-offset",
        K + "columns.py",
        "            d3 = np.float64(x[o + w3 + i]) - k",
        "            d3 = np.float64(x[o + w2 + i]) - k",
        "_moments_block: the 4th group of a step reads the 3rd group's values",
    ),
    _m(
        "columns-grad-sums-e3-sign",
        K + "columns.py",
        "+ e3 * (np.float64(x[o + w3 + i]) - m))",
        "- e3 * (np.float64(x[o + w3 + i]) - m))",
        "_grad_sums_block: the e3 term's sign in the 4-group step (issue 17's example)",
    ),
    _m(
        "columns-grad-sums-remainder-mean-sign",
        K + "columns.py",
        "            s2[oa + i] += e * (np.float64(x[o + i]) - mean[oj + i])",
        "            s2[oa + i] += e * (np.float64(x[o + i]) + mean[oj + i])",
        "_grad_sums_block: x + mean in the remainder loop",
    ),
    _m(
        "columns-moments-remainder-drop",
        K + "columns.py",
        "    while g < g1:\n        o = np.uint64(g) * w + oj\n"
        "        for i in range(np.uint64(n)):\n"
        "            d = np.float64(x[o + i]) - shift[oj + i]",
        "    while g < g1 - 1:\n        o = np.uint64(g) * w + oj\n"
        "        for i in range(np.uint64(n)):\n"
        "            d = np.float64(x[o + i]) - shift[oj + i]",
        "_moments_block: the remainder loop skips its last group",
    ),
    _m(
        "columns-moments-tail-dropped",
        K + "columns.py",
        "    _moments_block(x, width, groups, groups + 1, 0, tail, shift, s1, s2, blocks)",
        "    _moments_block(x, width, groups, groups + 1, 0, 0, shift, s1, s2, blocks)",
        "_moments: the tail (values after the last whole group) left out",
    ),
    _m(
        "columns-scale-4group-offset",
        K + "columns.py",
        "            out[o + w3 + i] = _output(x[o + w3 + i], h, lo, sc, sh, relu, zero)",
        "            out[o + w3 + i] = _output(x[o + w2 + i], h, lo, sc, sh, relu, zero)",
        "_scale_block: the 4th group's output computed from the 3rd group's values",
    ),
    _m(
        "columns-input-grad-4group-offset",
        K + "columns.py",
        "_input_grad(dy[o + w2 + i], x[o + w2 + i], s, v, h, lo, kx, kc)",
        "_input_grad(dy[o + w + i], x[o + w2 + i], s, v, h, lo, kx, kc)",
        "_input_gradient_block: the 3rd group's dx uses the 2nd group's dy",
    ),
    _m(
        "columns-apply-block-bound",
        K + "columns.py",
        "        g1 = min(g0 + per_block, groups)\n        _scale_block(",
        "        g1 = min(g0 + per_block - 1, groups)\n        _scale_block(",
        "_apply: each block of the output pass loses its last group",
    ),
    _m(
        "columns-fold-off-by-one",
        K + "columns.py",
        "    for _ in range(width // (n_features * run)):",
        "    for _ in range(width // (n_features * run) - 1):",
        "fold: the last row of positions of a group not added",
    ),
    _m(
        "columns-first-shift-zero",
        K + "columns.py",
        "        first[c] = x[c * run]",
        "        first[c] = 0.0",
        "_mean_var: no shift (one-pass variance about 0: cancellation at large means)",
    ),
    _m(
        "columns-train-default-eps",
        K + "columns.py",
        "    mean, var = _mean_var(x, n_features, run, width)\n"
        "    invstd = 1.0 / np.sqrt(var + eps)",
        "    mean, var = _mean_var(x, n_features, run, width)\n"
        "    invstd = 1.0 / np.sqrt(var + 1e-5)",
        "_train: eps fixed at the default 1e-5",
    ),
    _m(
        "columns-eval-backward-no-invstd",
        K + "columns.py",
        "        _apply_per_feature(dy, out, n_features, run, width, zero, gamma * invstd, zero)",
        "        _apply_per_feature(dy, out, n_features, run, width, zero, gamma, zero)",
        "_backward (eval): dx = gamma * dy, invstd left out",
    ),
    _m(
        "columns-apply-lo-zero",
        K + "columns.py",
        "        params[0, c], params[1, c] = split(mean[c], t)",
        "        params[0, c], params[1, c] = split(mean[c], t)[0], 0.0",
        "_apply_per_feature: the low part of the mean dropped (columns train and eval y)",
    ),
    _m(
        "columns-train-dx-lo-zero",
        K + "columns.py",
        "        params[2, c], params[3, c] = split(mean[c], t)",
        "        params[2, c], params[3, c] = split(mean[c], t)[0], 0.0",
        "_train_dx: the low part of the mean dropped from x_hat (columns training dx)",
    ),
    # --- rows.py: the contiguous-runs family
    _m(
        "rows-grid-chunks-floor",
        K + "rows.py",
        "    q_chunks = (Q + RUN_CHUNK - 1) // RUN_CHUNK",
        "    q_chunks = max(1, Q // RUN_CHUNK)",
        "_grid: chunks per run rounded down (a run's last partial chunk lost)",
    ),
    _m(
        "rows-unit-p-bound",
        K + "rows.py",
        "    return c, p0, min(p0 + p_block, P), q0, min(q0 + RUN_CHUNK, Q), pb * q_chunks + j",
        "    return c, p0, min(p0 + p_block - 1, P), q0, min(q0 + RUN_CHUNK, Q), "
        "pb * q_chunks + j",
        "_unit: each block of p loses its last p",
    ),
    _m(
        "rows-piece-feature",
        K + "rows.py",
        "    return min((r + 1) * Q, end), r % C",
        "    return min((r + 1) * Q, end), (r + 1) % C",
        "_piece: an element-wise piece takes the next feature's parameters",
    ),
    _m(
        "rows-train-feature-lo-zero",
        K + "rows.py",
        "    mean_hi, mean_lo = split(mean[c], t)\n    scale = t(gamma[c] * invstd[c])",
        "    mean_hi, mean_lo = split(mean[c], t)[0], t(0)\n    scale = t(gamma[c] * invstd[c])",
        "_train_feature: the low part of the mean dropped (per-feature schedule's y)",
    ),
    _m(
        "rows-backward-feature-lo-zero",
        K + "rows.py",
        "    mean_hi, mean_lo = split(mean[c], t)\n    y_scale = t(gamma[c] * invstd[c])",
        "    mean_hi, mean_lo = split(mean[c], t)[0], t(0)\n    y_scale = t(gamma[c] * invstd[c])",
        "_backward_feature: the low part of the mean dropped (per-feature schedule's dx)",
    ),
    _m(
        "rows-backward-feature-dgamma",
        K + "rows.py",
        "    dgamma[c] = s2 * invstd[c]",
        "    dgamma[c] = s2 / invstd[c]",
        "_backward_feature: dgamma divided by invstd",
    ),
    _m(
        "rows-backward-feature-count",
        K + "rows.py",
        "gamma[c], P * Q)",
        "gamma[c], P * Q - 1)",
        "_backward_feature: M - 1 values per feature in the training dx",
    ),
    _m(
        "rows-backward-feature-eval-relu-mask",
        K + "rows.py",
        "            passed_scaled(dy, x, out, (p * C + c) * Q, Q, y_scale, relu, c)",
        "            scale_centered(dy, out, (p * C + c) * Q, Q, t(0), t(0), y_scale, t(0))",
        "_backward_feature (eval, ReLU): the mask ignored",
    ),
    _m(
        "rows-backward-count",
        K + "rows.py",
        "        count = shape[0] * shape[2]\n",
        "        count = shape[0] * shape[2] - 1\n",
        "_backward (chunked): M - 1 values per feature in the training dx",
    ),
    _m(
        "rows-eval-no-eps",
        K + "rows.py",
        "    invstd = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)",
        "    invstd = 1.0 / np.sqrt(running_var.astype(np.float64))",
        "_eval: eps dropped",
    ),
    # --- ghost batch norm: each family's ghost_* entries over stacked slices
    _m(
        "rows-ghost-backward-first-slice",
        K + "rows.py",
        "    _backward_slices(dy, x, mean, invstd, gamma, out, dgamma, dbeta)\n"
        "    return row_sums(dgamma.T), row_sums(dbeta.T)",
        "    _backward_slices(dy, x, mean, invstd, gamma, out, dgamma, dbeta)\n"
        "    return dgamma[0].copy(), dbeta[0].copy()",
        "ghost_backward (rows): dgamma and dbeta of the first virtual batch only",
    ),
    _m(
        "rows-ghost-train-no-eps",
        K + "rows.py",
        "    slice_invstd = 1.0 / np.sqrt(var + eps)",
        "    slice_invstd = 1.0 / np.sqrt(var)",
        "_train_slice (rows): eps dropped",
    ),
    _m(
        "columns-ghost-train-no-eps",
        K + "columns.py",
        "    slice_invstd = 1.0 / np.sqrt(var + eps)",
        "    slice_invstd = 1.0 / np.sqrt(var)",
        "_train_slice (columns): eps dropped",
    ),
    _m(
        "columns-ghost-train-last-slice",
        K + "columns.py",
        "def _train_slices(x, n_features, run, width, gamma, beta, eps, out, mean, invstd):\n"
        "    for g in prange(x.shape[0]):",
        "def _train_slices(x, n_features, run, width, gamma, beta, eps, out, mean, invstd):\n"
        "    for g in prange(x.shape[0] - 1):",
        "_train_slices (columns): the last virtual batch not normalized",
    ),
    _m(
        "columns-ghost-backward-first-slice",
        K + "columns.py",
        "    _backward_slices(dy, x, n_features, run, width, mean, invstd, gamma, out, dgamma, "
        "dbeta)\n    return row_sums(dgamma.T), row_sums(dbeta.T)",
        "    _backward_slices(dy, x, n_features, run, width, mean, invstd, gamma, out, dgamma, "
        "dbeta)\n    return dgamma[0].copy(), dbeta[0].copy()",
        "ghost_backward (columns): dgamma and dbeta of the first virtual batch only",
    ),
    # --- _running.py: the running-statistics fold (njit)
    _m(
        "running-var-eps-kept",
        "fastbn/_running.py",
        "            var = 1.0 / (invstd[g, c] * invstd[g, c]) - eps",
        "            var = 1.0 / (invstd[g, c] * invstd[g, c])",
        "fold_batches: eps not taken back out of var + eps",
    ),
    _m(
        "running-no-bessel",
        "fastbn/_running.py",
        "f * (var * bessel)",
        "f * var",
        "fold_batches: the biased variance folded in (Bessel factor dropped)",
    ),
    _m(
        "running-momentum-swapped",
        "fastbn/_running.py",
        "            new_mean[c] = (1.0 - f) * np.float64(new_mean[c]) + f * mean[g, c]",
        "            new_mean[c] = f * np.float64(new_mean[c]) + (1.0 - f) * mean[g, c]",
        "fold_batches: momentum weights swapped for the mean",
    ),
    _m(
        "running-all-or-none",
        "fastbn/_running.py",
        "        if bad:\n            return bad, g",
        "        if bad:\n            running_mean[:] = new_mean\n"
        "            running_var[:] = new_var\n            return bad, g",
        "fold_batches: the running statistics written even when a result is not finite",
    ),
    _m(
        "running-cumulative-same-factor",
        "fastbn/_running.py",
        "1.0 / (counter + g + 1)",
        "1.0 / (counter + 1)",
        "fold_batches: momentum None gives every batch of a call the first one's factor",
    ),
    _m(
        "running-nonfinite-overflow",
        "fastbn/_running.py",
        "invstd[c] > 0.0):",
        "invstd[c] >= 0.0):",
        "nonfinite_batch_stats: an overflowed variance (invstd 0) not reported",
    ),
]

# Not test_threads.py nor test_vectorize.py: they compare a kernel with itself
# (across threads) or read its machine code, so no arithmetic mutant fails them.
# test_kernel_paths.py first: it enters every loop of both families (and the ghost
# entries) in seconds, so it is the fastest killer; test_ghost.py last, for the
# ghost_* entries of both families.
NUMPY_KERNEL_TESTS = [
    "tests/test_kernel_paths.py",
    "tests/test_kernels.py",
    "tests/test_functional.py",
    "tests/test_relu.py",
    "tests/test_gradients.py",
    "tests/test_accuracy.py",
    "tests/test_extreme.py",
    "tests/test_ghost.py",
]
# Test files per mutated file, in the order they run (-x: fastest killer first).
KERNEL_TESTS = {
    "fastbn/kernels/_common.py": NUMPY_KERNEL_TESTS,
    "fastbn/kernels/columns.py": NUMPY_KERNEL_TESTS,
    "fastbn/kernels/rows.py": NUMPY_KERNEL_TESTS,
    "fastbn/kernels/blocks.py": ["tests/test_kernels.py"],
    # fold_batches serves the layer (one batch or G virtual ones) and the bridge.
    "fastbn/_running.py": [
        "tests/test_layer.py", "tests/test_ghost.py", "tests/test_extreme.py",
        "tests/test_torch.py",
    ],
}  # fmt: skip
# Kernel modules that compile a module's functions into their own cached kernels.
KERNEL_DEPENDENTS = {
    "fastbn/kernels/_common.py": ["blocks", "columns", "rows"],
    "fastbn/kernels/_twins.py": ["columns", "rows"],
    "fastbn/kernels/columns.py": ["columns"],
    "fastbn/kernels/rows.py": ["rows"],
    "fastbn/kernels/blocks.py": ["blocks"],
    "fastbn/_running.py": ["_running"],
}

# cosmic-ray: module -> the test files that are its own (in run order, -x).
_TORCH = ["tests/test_torch.py", "tests/test_torch_bridge.py"]
# Plans and executors: every public function goes through them (the layer too).
_ENGINE = [
    "tests/test_kernel_paths.py",
    "tests/test_functional.py",
    "tests/test_relu.py",
    "tests/test_ghost.py",
    "tests/test_renorm.py",
    "tests/test_layer.py",
]
REGISTRY_TESTS = {
    "fastbn/_checks.py": [
        "tests/test_errors.py", "tests/test_bad_input.py", "tests/test_functional.py",
    ],
    "fastbn/_running.py": [
        "tests/test_layer.py", "tests/test_extreme.py", "tests/test_bad_input.py",
    ],
    "fastbn/_plan.py": [*_ENGINE, "tests/test_errors.py", "tests/test_bad_input.py"],
    "fastbn/_engine.py": _ENGINE,
    "fastbn/functional.py": [
        "tests/test_functional.py", "tests/test_errors.py", "tests/test_bad_input.py",
        "tests/test_relu.py", "tests/test_gradients.py",
    ],
    "fastbn/layer.py": [
        "tests/test_layer.py", "tests/test_bad_input.py", "tests/test_extreme.py",
        "tests/test_ghost.py",  # the layer's virtual_batch_size
    ],
    "fastbn/renorm.py": ["tests/test_renorm.py", "tests/test_errors.py"],
    "fastbn/ghost.py": ["tests/test_ghost.py", "tests/test_errors.py"],
    # each fallback forced (test_torch_compat); forward-mode AD, torch.func, pruning,
    # parametrizations and torch.jit.script: workflows
    "fastbn/torch/_compat.py": [
        "tests/test_torch_compat.py", *_TORCH, "tests/test_torch_workflows.py",
        "tests/test_torch_versions.py",
    ],
    "fastbn/torch/_ops.py": [
        *_TORCH, "tests/test_torch_relu.py",
        "tests/test_torch_compile.py",  # fold_torch: the compiled path's running statistics
    ],
    "fastbn/torch/functional.py": [*_TORCH, "tests/test_torch_compile.py"],
    "fastbn/torch/modules.py": [
        *_TORCH, "tests/test_torch_relu.py", "tests/test_torch_workflows.py",
    ],
    "fastbn/torch/ghost.py": ["tests/test_torch_ghost.py"],
    "fastbn/torch/renorm.py": ["tests/test_torch_renorm.py"],
    "fastbn/torch/sync.py": ["tests/test_torch_sync.py"],
    "fastbn/torch/_threads.py": ["tests/test_torch_threads.py", "tests/test_host_threads.py"],
    "fastbn/_openmp.py": ["tests/test_host_threads.py"],
}  # fmt: skip

# Operators left out: replacements by shifts and bitwise operators (and of them),
# comparisons replaced by identity tests, and the variable operators (which take
# arguments): on this code each is either a type error at once or a near-copy
# of an arithmetic replacement that is kept.
EXCLUDED_OPERATORS = [
    r"core/ReplaceBinaryOperator_.*_(RShift|LShift|BitOr|BitAnd|BitXor)$",
    r"core/ReplaceBinaryOperator_(RShift|LShift|BitAnd|BitXor)_",
    r"core/ReplaceComparisonOperator_(Eq|NotEq|Lt|LtE|Gt|GtE)_(Is|IsNot)$",
    r"core/Variable(Replacer|Inserter)",
]

PYTEST = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]


# ----------------------------------------------------------------------------- workspace


def _copy_repo(src: Path, dst: Path) -> None:
    shutil.copytree(
        src,
        dst,
        ignore=shutil.ignore_patterns(
            ".git", "__pycache__", "*.egg-info", ".mypy_cache", ".ruff_cache"
        ),
    )


def _cache_subdir(source_dir: Path) -> str:
    """Numba's cache folder for the files of source_dir (numba.core.caching's rule)."""
    path = os.path.abspath(source_dir)
    return os.path.basename(path) + "_" + hashlib.sha1(path.encode()).hexdigest()


def _relocate_cache(cache: Path, repo: Path, dst_cache: Path, dst_repo: Path) -> None:
    """Copy a Numba cache built for repo as if built for dst_repo (index stamps are contents)."""
    names = {}
    for d in (repo / "fastbn").rglob("*"):
        if d.is_dir() and d.name != "__pycache__":
            names[_cache_subdir(d)] = _cache_subdir(dst_repo / d.relative_to(repo))
    names[_cache_subdir(repo / "fastbn")] = _cache_subdir(dst_repo / "fastbn")
    dst_cache.mkdir(parents=True, exist_ok=True)
    for sub in cache.iterdir():
        if sub.is_dir() and sub.name in names:
            shutil.copytree(sub, dst_cache / names[sub.name])


def _pruned_cache(warm: Path, dst: Path, modules: list[str]) -> None:
    """dst = warm without the cache files of the given module stems (e.g. 'columns')."""
    if dst.exists():
        shutil.rmtree(dst)
    prefixes = tuple(m + "." for m in modules)
    shutil.copytree(
        warm, dst, ignore=lambda _d, files: [f for f in files if f.startswith(prefixes)]
    )


def _env(repo: Path, cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(repo)
    env["NUMBA_CACHE_DIR"] = str(cache)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    lib = str(Path(sys.prefix) / "lib")
    if lib not in env.get("LD_LIBRARY_PATH", "").split(":"):
        env["LD_LIBRARY_PATH"] = lib + (
            ":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else ""
        )
    return env


def _run(
    cmd: list[str], cwd: Path, env: dict[str, str], timeout: float, log: Path
) -> tuple[str, float]:
    """Run cmd (niced, own process group); return (rc or 'timeout', seconds)."""
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["nice", "-n", "10", *cmd], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            rc = str(proc.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
    return rc, time.monotonic() - start


def _first_failure(log: Path) -> str:
    text = log.read_text(errors="replace")
    for line in text.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" - ")[0]
    m = re.search(r"Fatal Python error: .*|Segmentation fault.*", text)
    if m:
        return m.group(0)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1][:120] if lines else ""


def _check_import(repo: Path, cache: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import fastbn; print(fastbn.__file__)"],
        cwd=repo, env=_env(repo, cache), capture_output=True, text=True, check=True,
    )  # fmt: skip
    where = Path(out.stdout.strip()).resolve()
    if repo.resolve() not in where.parents:
        sys.exit(f"fastbn imports from {where}, not from the copy {repo}")


def _baseline(repo: Path, cache: Path, tests: list[str], logs: Path, label: str) -> float:
    """Run tests unmutated (warming cache); stop everything if they fail."""
    _check_import(repo, cache)
    cmd = [*PYTEST, *tests]
    rc, secs = _run(cmd, repo, _env(repo, cache), 4 * 3600, logs / f"baseline-{label}.log")
    print(f"baseline {label}: rc={rc} in {secs:.0f} s ({len(tests)} files)", flush=True)
    if rc != "0":
        sys.exit(
            f"the unmutated tests fail ({logs / f'baseline-{label}.log'}): nothing to measure"
        )
    return secs


# ----------------------------------------------------------------------------- kernels mode


def _check_mutants(mutants: list[Mutant], root: Path) -> None:
    errors = []
    for mu in mutants:
        if not (root / mu.path).is_file():
            errors.append(f"{mu.name}: {mu.path} does not exist")
            continue
        text = (root / mu.path).read_text()
        n = text.count(mu.old)
        if n != 1:
            errors.append(f"{mu.name}: snippet found {n} times in {mu.path} (must be once)")
            continue
        try:
            ast.parse(text.replace(mu.old, mu.new))
        except SyntaxError as exc:
            errors.append(f"{mu.name}: the mutated {mu.path} does not parse: {exc}")
    names = [mu.name for mu in mutants]
    errors += [f"{n}: name used twice" for n in sorted({n for n in names if names.count(n) > 1})]
    if errors:
        sys.exit("mutant list out of date:\n  " + "\n  ".join(errors))


def _check_tests(tests: list[str]) -> None:
    """Stop before anything runs if a mapped test file does not exist (a renamed file)."""
    missing = sorted({t for t in tests if not (REPO / t).is_file()})
    if missing:
        sys.exit(f"test files in the map that do not exist: {missing}")


def _diff(mu: Mutant) -> str:
    old = "\n".join("- " + ln for ln in mu.old.splitlines())
    new = "\n".join("+ " + ln for ln in mu.new.splitlines())
    return f"{mu.path}\n{old}\n{new}"


def run_kernels(args: argparse.Namespace) -> int:
    mutants = MUTANTS
    _check_mutants(mutants, REPO)
    if args.only:
        wanted = {n for item in args.only for n in item.split(",")}
        unknown = wanted - {mu.name for mu in mutants}
        if unknown:
            sys.exit(f"no such mutant: {', '.join(sorted(unknown))}")
        mutants = [mu for mu in mutants if mu.name in wanted]
    if args.list:
        for mu in mutants:
            print(f"{mu.name:40} {mu.path:30} {mu.description}")
        print(f"{len(mutants)} mutants")
        return 0

    out = _out_dir(args, "kernels")
    work = Path(tempfile.mkdtemp(prefix="fastbn-kernel-mutants-"))
    print(f"work in {work}, results in {out}", flush=True)
    pristine = work / "pristine"
    _copy_repo(REPO, pristine)
    slots = [work / f"slot{i}" for i in range(args.jobs)]
    for s in slots:
        _copy_repo(pristine, s / "repo")

    def tests_of(mu: Mutant) -> list[str]:
        return args.tests or KERNEL_TESTS[mu.path]

    all_tests = sorted({t for mu in mutants for t in tests_of(mu)})
    _check_tests(all_tests)
    warm = slots[0] / "warm"
    _seed(args, warm, slots[0] / "repo")
    started = time.monotonic()
    base = _baseline(slots[0] / "repo", warm, all_tests, out, "kernels")
    for s in slots[1:]:
        _relocate_cache(warm, slots[0] / "repo", s / "warm", s / "repo")
    # Each mutant recompiles the mutated module's kernels (and its dependents'): minutes
    # on a loaded two-core machine, which a warm (or seeded) baseline does not show.
    timeout = args.timeout or max(1200.0, 3 * base)
    free: queue.Queue[Path] = queue.Queue()
    for s in slots:
        free.put(s)

    def one(mu: Mutant) -> dict[str, object]:
        slot = free.get()
        try:
            repo = slot / "repo"
            target = repo / mu.path
            shutil.copy2(pristine / mu.path, target)
            cache = slot / "cache"
            if args.cold:
                shutil.rmtree(cache, ignore_errors=True)
                cache.mkdir()
            else:
                _pruned_cache(slot / "warm", cache, KERNEL_DEPENDENTS[mu.path])
            target.write_text(target.read_text().replace(mu.old, mu.new))
            log = out / f"{mu.name}.log"
            rc, secs = _run([*PYTEST, *tests_of(mu)], repo, _env(repo, cache), timeout, log)
            shutil.copy2(pristine / mu.path, target)
        finally:
            free.put(slot)
        status = "timeout" if rc == "timeout" else "survived" if rc == "0" else "killed"
        if rc not in ("0", "1", "timeout"):
            status = "killed" if rc in ("2", "3") else f"killed (rc {rc})"
        row = {
            "name": mu.name, "file": mu.path, "status": status, "rc": rc,
            "seconds": round(secs, 1), "first_failure": _first_failure(log) if rc != "0" else "",
            "description": mu.description, "diff": _diff(mu),
        }  # fmt: skip
        print(f"{mu.name:40} {status:10} {secs:6.0f} s  {row['first_failure']}", flush=True)
        with open(out / "results.jsonl", "a") as partial:  # kept if the run is stopped
            partial.write(json.dumps(row) + "\n")
        return row

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(one, mutants))
    elapsed = time.monotonic() - started
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    table = _kernel_table(rows, elapsed)
    (out / "table.md").write_text(table)
    print(table)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _kernel_table(rows: list[dict[str, object]], elapsed: float) -> str:
    lines = [
        "| mutant | file | result | s | first failing test |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {Path(str(r['file'])).name} | {r['status']} | {r['seconds']} "
            f"| {r['first_failure']} |"
        )
    killed = sum(str(r["status"]).startswith("killed") for r in rows)
    timeouts = sum(r["status"] == "timeout" for r in rows)
    survived = sum(r["status"] == "survived" for r in rows)
    n = len(rows)
    score = 100.0 * (killed + timeouts) / n if n else 0.0
    lines.append("")
    lines.append(
        f"{n} mutants: {killed} killed, {timeouts} killed by timeout, {survived} survived; "
        f"score {score:.1f}% ({elapsed / 60:.1f} min)"
    )
    for f in sorted({str(r["file"]) for r in rows}):
        rs = [r for r in rows if r["file"] == f]
        k = sum(r["status"] != "survived" for r in rs)
        lines.append(
            f"  {f}: {len(rs)} run, {k} killed (timeouts included), {len(rs) - k} survived"
        )
    return "\n".join(lines) + "\n"


def _seed(args: argparse.Namespace, cache: Path, repo: Path) -> None:
    """Start the baseline's cache from --seed-cache (a cache built for this repository)."""
    if args.seed_cache:
        _relocate_cache(Path(args.seed_cache), REPO, cache, repo)


def _out_dir(args: argparse.Namespace, what: str) -> Path:
    out = Path(args.out or tempfile.mkdtemp(prefix=f"fastbn-{what}-results-", dir="/tmp"))
    out.mkdir(parents=True, exist_ok=True)
    return out


# ----------------------------------------------------------------------------- registry mode


def _skipped_regions(path: Path) -> list[tuple[tuple[int, int], tuple[int, int], str]]:
    """Source regions whose mutants change no behaviour worth measuring, or are kernels.

    Annotations, @overload stubs, docstrings, __all__, `if TYPE_CHECKING:` blocks, and
    the bodies (with decorators) of @njit functions, which the kernel mutants cover.
    """
    tree = ast.parse(path.read_text())
    regions = []

    def add(node: ast.AST, why: str) -> None:
        start = (node.lineno, node.col_offset)  # type: ignore[attr-defined]
        end = (node.end_lineno, node.end_col_offset)  # type: ignore[attr-defined]
        regions.append((start, end, why))

    def name_of(dec: ast.expr) -> str:
        target = dec.func if isinstance(dec, ast.Call) else dec
        return target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names = {name_of(d) for d in node.decorator_list}
            if names & {"njit", "jit", "overload"}:
                first = node.decorator_list[0]
                regions.append(
                    ((first.lineno, 0), (node.end_lineno, node.end_col_offset),
                     "njit" if "overload" not in names else "overload")
                )  # fmt: skip
            if node.returns is not None:
                add(node.returns, "annotation")
            for a in [*node.args.args, *node.args.posonlyargs, *node.args.kwonlyargs,
                      node.args.vararg, node.args.kwarg]:  # fmt: skip
                if a is not None and a.annotation is not None:
                    add(a.annotation, "annotation")
        if isinstance(node, ast.AnnAssign):
            add(node.annotation, "annotation")
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                add(body[0], "docstring")
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            add(node, "__all__")
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            add(node, "TYPE_CHECKING")
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            if "TypeVar" in ast.unparse(node.value.func):
                add(node, "annotation")
    return regions


def _filter_session(
    session: Path, module: Path, rel: str, rate: float, cap: int
) -> dict[str, int]:
    """Mark the session's work items skipped: operators, regions, then a deterministic sample."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    regions = _skipped_regions(module)
    excluded = re.compile("|".join(f"(?:{e})" for e in EXCLUDED_OPERATORS))
    counts = {"total": 0, "operator": 0, "region": 0, "unsampled": 0, "run": 0}
    keep: list[tuple[str, str]] = []
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item in list(db.pending_work_items):
            counts["total"] += 1
            mu = item.mutations[0]
            why = None
            if excluded.match(mu.operator_name):
                why = "operator"
            else:
                for start, end, _ in regions:
                    if start <= tuple(mu.start_pos) and tuple(mu.end_pos) <= end:
                        why = "region"
                        break
            if why:
                counts[why] += 1
                db.set_result(
                    item.job_id,
                    WorkResult(output=f"filtered: {why}", worker_outcome=WorkerOutcome.SKIPPED),
                )
                continue
            key = f"{rel}:{mu.operator_name}:{mu.start_pos}:{mu.end_pos}"
            keep.append((hashlib.sha1(key.encode()).hexdigest(), item.job_id))
        keep.sort()
        n = len(keep) if rate >= 1 else round(rate * len(keep))
        if cap:
            n = min(n, cap)
        chosen = {job for _, job in keep[:n]}
        for _, job in keep:
            if job not in chosen:
                counts["unsampled"] += 1
                db.set_result(
                    job,
                    WorkResult(output="filtered: sample", worker_outcome=WorkerOutcome.SKIPPED),
                )
        counts["run"] = len(chosen)
    return counts


def run_registry(args: argparse.Namespace) -> int:
    try:
        import cosmic_ray  # noqa: F401
    except ImportError:
        sys.exit("cosmic-ray is not installed: pip install cosmic-ray")
    modules = args.modules or list(REGISTRY_TESTS)
    unknown = [m for m in modules if m not in REGISTRY_TESTS]
    if unknown:
        sys.exit(f"no test map for {unknown}; known: {list(REGISTRY_TESTS)}")
    _check_tests([t for m in modules for t in REGISTRY_TESTS[m]])
    out = _out_dir(args, "cosmic-ray")
    work = Path(tempfile.mkdtemp(prefix="fastbn-cosmic-ray-"))
    print(f"work in {work}, results in {out}", flush=True)
    pristine = work / "pristine"
    _copy_repo(REPO, pristine)
    slots = [work / f"slot{i}" for i in range(args.jobs)]
    for s in slots:
        _copy_repo(pristine, s / "repo")
    cosmic = str(Path(sys.executable).parent / "cosmic-ray")
    _seed(args, slots[0] / "cache", slots[0] / "repo")
    started = time.monotonic()
    # Baselines: each module's tests, unmutated, in slot 0 (warming its cache).
    base: dict[str, float] = {}
    for tests in sorted({tuple(REGISTRY_TESTS[m]) for m in modules}):
        label = "+".join(Path(t).stem.removeprefix("test_") for t in tests)
        base[",".join(tests)] = _baseline(
            slots[0] / "repo", slots[0] / "cache", list(tests), out, label
        )
    for s in slots[1:]:
        _relocate_cache(slots[0] / "cache", slots[0] / "repo", s / "cache", s / "repo")
    free: queue.Queue[Path] = queue.Queue()
    for s in slots:
        free.put(s)

    def one(module: str) -> dict[str, object]:
        slot = free.get()
        try:
            return _registry_module(
                args, module, slot, out, cosmic, base[",".join(REGISTRY_TESTS[module])]
            )
        finally:
            free.put(slot)

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        summaries = list(pool.map(one, modules))
    elapsed = time.monotonic() - started
    (out / "summary.json").write_text(json.dumps(summaries, indent=1))
    table = _registry_table(summaries, elapsed)
    (out / "table.md").write_text(table)
    print(table)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _registry_module(
    args: argparse.Namespace, module: str, slot: Path, out: Path, cosmic: str, base: float
) -> dict[str, object]:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    repo = slot / "repo"
    label = module.removeprefix("fastbn/").removesuffix(".py").replace("/", "-")
    tests = REGISTRY_TESTS[module]
    timeout = args.timeout or max(60.0, 3 * base + 30)
    config = out / f"{label}.toml"
    session = out / f"{label}.sqlite"
    command = " ".join(["nice", "-n", "10", *PYTEST, *tests])
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{module}"\n'
        f"timeout = {timeout:.0f}.0\n"
        "excluded-modules = []\n"
        f'test-command = "{command}"\n'
        "[cosmic-ray.distributor]\n"
        'name = "local"\n'
    )
    env = _env(repo, slot / "cache")
    if session.exists():
        session.unlink()
    subprocess.run([cosmic, "init", str(config), str(session)], cwd=repo, env=env, check=True)
    counts = _filter_session(session, repo / module, module, args.sample, args.cap)
    print(f"{module}: {counts}", flush=True)
    t0 = time.monotonic()
    with open(out / f"{label}.exec.log", "w") as log:
        subprocess.run([cosmic, "exec", str(config), str(session)], cwd=repo, env=env, stdout=log,
                       stderr=subprocess.STDOUT, check=False)  # fmt: skip
    secs = time.monotonic() - t0
    with open(out / f"{label}.report.txt", "w") as rep:
        subprocess.run([str(Path(cosmic).parent / "cr-report"), "--show-output", str(session)],
                       stdout=rep, stderr=subprocess.STDOUT, check=False)  # fmt: skip
    # The mutated file must be back as it was.
    if (repo / module).read_text() != (Path(repo).parent.parent / "pristine" / module).read_text():
        shutil.copy2(Path(repo).parent.parent / "pristine" / module, repo / module)
        print(f"warning: {module} was left mutated; restored", flush=True)
    rows = []
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item, result in db.completed_work_items:
            if result.worker_outcome == WorkerOutcome.SKIPPED:
                continue
            mu = item.mutations[0]
            output = result.output or ""
            if result.worker_outcome != WorkerOutcome.NORMAL:
                status = f"error ({result.worker_outcome.value})"
            elif result.test_outcome == TestOutcome.SURVIVED:
                status = "survived"
            elif result.test_outcome == TestOutcome.INCOMPETENT:
                status = "incompetent"
            elif output == "timeout":
                status = "timeout"
            else:
                status = "killed"
            first = ""
            for line in output.splitlines():
                if line.startswith(("FAILED ", "ERROR ")):
                    first = line.split(" - ")[0]
                    break
            rows.append({
                "job": item.job_id, "operator": mu.operator_name, "occurrence": mu.occurrence,
                "start": list(mu.start_pos), "end": list(mu.end_pos), "status": status,
                "first_failure": first, "diff": result.diff or "",
            })  # fmt: skip
    (out / f"{label}.results.json").write_text(json.dumps(rows, indent=1))
    summary: dict[str, object] = {
        "module": module,
        "tests": tests,
        "timeout_s": timeout,
        "seconds": round(secs),
    }
    summary.update(counts)
    for s in ("killed", "timeout", "survived", "incompetent"):
        summary[s] = sum(r["status"] == s for r in rows)
    summary["errors"] = sum(str(r["status"]).startswith("error") for r in rows)
    print(f"{module}: done in {secs:.0f} s: {summary}", flush=True)
    return summary


def _registry_table(summaries: list[dict[str, object]], elapsed: float) -> str:
    cols = ["module", "total", "operator", "region", "unsampled", "run", "killed", "timeout",
            "survived", "incompetent", "errors", "seconds"]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for s in summaries:
        lines.append("| " + " | ".join(str(s.get(c, "")) for c in cols) + " |")
    run = sum(int(s["run"]) for s in summaries)  # type: ignore[call-overload]
    dead = sum(int(s["killed"]) + int(s["timeout"]) for s in summaries)  # type: ignore[call-overload]
    lines.append("")
    lines.append(f"{run} mutants run, {dead} killed (timeouts included): "
                 f"score {100.0 * dead / run if run else 0:.1f}% "
                 f"({elapsed / 60:.1f} min)")  # fmt: skip
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--list", action="store_true", help="list the kernel mutants and stop")
    p.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run these mutants (comma list, repeatable)",
    )
    p.add_argument(
        "--tests", nargs="+", metavar="PATH", help="test files to run instead of the map"
    )
    p.add_argument(
        "--jobs", type=int, default=1, help="mutants (or modules) run at once (default 1)"
    )
    p.add_argument("--timeout", type=float, help="seconds per mutant (default: from the baseline)")
    p.add_argument(
        "--cold", action="store_true", help="an empty Numba cache for every kernel mutant"
    )
    p.add_argument(
        "--seed-cache", metavar="DIR",
        help="a NUMBA_CACHE_DIR already built by this repository's tests: the baseline starts "
        "from a copy of it (saves the cold compile; only from the same sources)",
    )  # fmt: skip
    p.add_argument("--out", help="results folder (default: a new /tmp/fastbn-*-results-*)")
    p.add_argument("--keep", action="store_true", help="keep the temporary copies")
    p.add_argument(
        "--registry", action="store_true", help="run cosmic-ray over the pure-Python modules"
    )
    p.add_argument(
        "--modules", nargs="+", metavar="PATH", help="with --registry: these modules only"
    )
    p.add_argument(
        "--sample", type=float, default=1.0,
        help="with --registry: keep this fraction of each module's mutants, the first by sha1 of "
        "(module, operator, position)",
    )  # fmt: skip
    p.add_argument(
        "--cap", type=int, default=0, help="with --registry: at most this many per module"
    )
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    return run_registry(args) if args.registry else run_kernels(args)


if __name__ == "__main__":
    sys.exit(main())
