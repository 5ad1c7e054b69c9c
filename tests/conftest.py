"""Shared helpers for the functional, kernel, gradient, accuracy and error suites.

Layouts, memory orders, a seeded rng, float64 wrappers around ``fastbn.reference``
and a ``raises`` helper that checks every fragment an error message must contain.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from fastbn import reference

DTYPES = (np.float32, np.float64)

# Absolute tolerance (and relative, where magnitudes grow) per compute dtype, on
# unit-scale data: the contract asks 1e-10 for float64; float32 gets ~100 ulps.
TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}

# Relative tolerance of the float64 statistics (mean, invstd) against the float64
# reference: float32 inputs are held to the contract's 1e-6; float64 to 1e-12.
STAT_TOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}

# name -> (shape, axis): every layout of the contract's shapes, small and with odd sizes.
LAYOUTS = {
    "features_first": ((7, 53), 0),
    "batch_first": ((53, 7), 1),
    "batch_first_neg": ((53, 7), -1),
    "nchw": ((4, 5, 3, 7), 1),
    "nhwc": ((4, 3, 7, 5), -1),
    "ncl": ((4, 5, 9), 1),
}

# Memory orders: the contract says every memory order gives correct results.
ORDERS = ("C", "F", "sliced", "transposed", "reversed")

# Inputs large enough (> 1e6 elements) to take the parallel paths, one per layout.
LARGE_LAYOUTS = {
    "features_first": ((3, 400_003), 0),
    "features_first_many": ((1024, 1100), 0),
    "batch_first": ((400_003, 3), 1),
    "batch_first_many": ((1100, 1024), -1),
    "nchw": ((8, 16, 96, 97), 1),
    "nhwc": ((8, 96, 97, 16), -1),
    "ncl_short_runs": ((20000, 16, 4), 1),  # runs of 4: folded into the columns family
    "ncl_many_runs": ((5000, 8, 32), 1),  # runs of 32: many runs per unit (rows family)
}


@pytest.fixture(autouse=True)
def kernels_take_every_call(request, monkeypatch):
    """fastbn.torch's modules on fastbn's kernels at every size, as the suites test them.

    By default a module gives small calls to torch's op (`fastbn.torch.dispatch`);
    tests marked ``auto_dispatch`` keep the shipped crossover. Only where the test's
    module imported fastbn.torch (``import fastbn`` never imports torch).
    """
    dispatch = sys.modules.get("fastbn.torch.dispatch")
    if dispatch is None or request.node.get_closest_marker("auto_dispatch"):
        return
    everywhere = dispatch.thresholds(dict.fromkeys(dispatch.CROSSOVER, 0))
    monkeypatch.setattr(dispatch, "THRESHOLDS", everywhere)
    monkeypatch.setattr(dispatch, "SMALLEST", 0)


@pytest.fixture
def rng():
    """A fresh generator with a fixed seed for every test."""
    return np.random.default_rng(20240611)


def num_features(shape, axis):
    return shape[axis]


def per_example(shape, axis):
    """M: the number of values reduced per feature."""
    return int(np.prod(shape)) // shape[axis]


def reduced_axes(ndim, axis):
    axis %= ndim
    return tuple(a for a in range(ndim) if a != axis)


def feature_slice(ndim, axis, c):
    """Index selecting every value of feature c."""
    idx = [slice(None)] * ndim
    idx[axis % ndim] = c
    return tuple(idx)


def layout(a, order):
    """Return an array equal to ``a`` in the requested memory order.

    C: C-contiguous; F: Fortran-ordered; sliced: a view with step 2 along every
    axis (non-contiguous, every stride a multiple of 2 elements); transposed: a
    transposed view of a C array whose axes are a cyclic shift (for 2-D the same
    memory as F, for N-D neither C nor F); reversed: negative strides on every axis.
    """
    a = np.asarray(a)
    if order == "C":
        out = np.ascontiguousarray(a)
    elif order == "F":
        out = np.asfortranarray(a)
    elif order == "sliced":
        base = np.full(tuple(2 * s for s in a.shape), np.nan, a.dtype)
        out = base[tuple(slice(None, None, 2) for _ in a.shape)]
        out[...] = a
    elif order == "transposed":
        perm = np.roll(np.arange(a.ndim), 1)
        base = np.ascontiguousarray(a.transpose(perm))
        out = base.transpose(np.argsort(perm))
    elif order == "reversed":
        rev = tuple(slice(None, None, -1) for _ in a.shape)
        out = np.ascontiguousarray(a[rev])[rev]
    else:
        raise ValueError(order)
    assert out.shape == a.shape and out.dtype == a.dtype
    np.testing.assert_array_equal(out, a)
    return out


def make_params(rng, c, dtype):
    """gamma, beta of length c: gamma of either sign, magnitude in [0.5, 2]."""
    gamma = rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)
    beta = rng.standard_normal(c)
    return gamma.astype(dtype), beta.astype(dtype)


def make_running(rng, c, dtype):
    """running_mean, running_var of length c, as a trained layer would hold."""
    running_mean = 0.3 * rng.standard_normal(c)
    running_var = rng.uniform(0.5, 2.0, c)
    return running_mean.astype(dtype), running_var.astype(dtype)


def f64(a):
    """A float64 copy (None stays None)."""
    return None if a is None else np.array(a, dtype=np.float64)


def running_invstd(running_var, eps):
    """What backward takes for training=False: 1 / sqrt(running_var + eps) in float64."""
    return 1.0 / np.sqrt(f64(running_var) + eps)


def ref_train(x, gamma=None, beta=None, *, axis=0, eps=1e-5):
    """The float64 reference of batch_norm_train on the same values."""
    return reference.batch_norm_train(f64(x), f64(gamma), f64(beta), axis=axis, eps=eps)


def ref_eval(x, running_mean, running_var, gamma=None, beta=None, *, axis=0, eps=1e-5):
    """The float64 reference of batch_norm_eval on the same values."""
    return reference.batch_norm_eval(
        f64(x), f64(running_mean), f64(running_var), f64(gamma), f64(beta), axis=axis, eps=eps
    )


def ref_backward(dy, x, mean, invstd, gamma=None, *, axis=0, training=True):
    """The float64 reference of batch_norm_backward on the same values."""
    return reference.batch_norm_backward(
        f64(dy), f64(x), f64(mean), f64(invstd), f64(gamma), axis=axis, training=training
    )


def assert_close(actual, expected, dtype, *, scale=1.0, err_msg=""):
    """|actual - expected| <= tol * (scale + |expected|), tol from the compute dtype."""
    tol = TOL[np.dtype(dtype)]
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=err_msg)


def assert_stats_close(mean, invstd, mean_ref, invstd_ref, dtype):
    """mean and invstd are float64 (C,) and within STAT_TOL of the reference.

    The mean error is measured against |mean_ref| + std_ref, as the contract's bound does.
    """
    tol = STAT_TOL[np.dtype(dtype)]
    assert mean.dtype == np.float64 and invstd.dtype == np.float64
    assert mean.shape == mean_ref.shape and invstd.shape == invstd_ref.shape
    std_ref = 1.0 / invstd_ref
    np.testing.assert_array_less(np.abs(mean - mean_ref), tol * (np.abs(mean_ref) + std_ref))
    np.testing.assert_allclose(invstd, invstd_ref, rtol=tol, atol=0)


def readonly(*arrays):
    """Mark arrays read-only (None passes through); return them."""
    for a in arrays:
        if a is not None:
            a.flags.writeable = False
    return arrays


def copies(*arrays):
    return [None if a is None else a.copy() for a in arrays]


def assert_unchanged(arrays, saved):
    for a, s in zip(arrays, saved, strict=True):
        if a is not None:
            np.testing.assert_array_equal(a, s)


def raises(exc, name, *fragments):
    """pytest.raises(exc) whose message names ``name`` (as a word) and each fragment.

    Fragments are literal text (e.g. a shape's repr or a dtype's name).
    """
    parts = [rf"(?=.*(?<!\w){re.escape(name)}(?!\w))"]
    parts += [f"(?=.*{re.escape(str(f))})" for f in fragments]
    return pytest.raises(exc, match="(?s)" + "".join(parts))


# ---------------------------------------------------------------- hypothesis

# CI profile: reproducible and bounded, so the suite's time is known in advance.
# HYPOTHESIS_PROFILE=dev explores more (random examples, no bound on time).
settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("dev", deadline=None, max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# ---------------------------------------------------------------- subprocesses


@pytest.fixture(scope="session")
def subprocess_cache(tmp_path_factory):
    """NUMBA_CACHE_DIR for subprocesses that import this same fastbn source.

    The one this pytest process uses if set (children run the same source,
    one at a time, so each kernel compiles once per run), else one temporary
    directory for the session. Tests that need an empty cache use tmp_path.
    """
    return os.environ.get("NUMBA_CACHE_DIR") or str(tmp_path_factory.mktemp("numba-cache"))


def python_env(cache_dir, **updates):
    """The environment of a child Python: this one with a cache dir and ``updates``.

    A value of None removes the variable. libtbb.so.12 of the ``tbb`` wheel
    lives in sys.prefix/lib, which the loader searches only when told.
    """
    env = dict(os.environ)
    lib = os.path.join(sys.prefix, "lib")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (lib, env.get("LD_LIBRARY_PATH")) if p)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = str(cache_dir)
    for key, value in updates.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def run_python(code, env, *args, timeout=300, cwd=None, check=True):
    """Run ``code`` with sys.argv[1:] = ``args`` in a fresh interpreter (not a fork).

    Returns the CompletedProcess.

    With check, a non-zero exit (an abort included: a negative return code
    is the signal) fails the test with the child's stderr.
    """
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, (
            f"child exited with {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}"
            f"\n--- stderr\n{proc.stderr[-5000:]}"
        )
    return proc


def central_difference(loss, array, h=1e-6):
    """d loss / d array by central differences, perturbing ``array`` in place and restoring it."""
    grad = np.empty(array.shape)
    for index in np.ndindex(array.shape):
        saved = array[index]
        array[index] = saved + h
        up = loss()
        array[index] = saved - h
        down = loss()
        array[index] = saved
        grad[index] = (up - down) / (2 * h)
    return grad
