"""The contract's reliability: calls from many Python threads at once, under every layer.

Each layer is forced with NUMBA_THREADING_LAYER in a fresh interpreter (not a
fork: GNU OpenMP aborts in forked children). The child computes every case
alone, then runs them all from 8 threads at once, and reports any result that
is not bit-identical. An abort (the workqueue layer's failure mode when two
threads launch parallel regions) shows as a negative return code.
"""

import json

import numba
import numpy as np
import pytest
from conftest import python_env, run_python

import fastbn
from fastbn import _threading

N_THREADS = 8
REPEATS = 2

# The cases mix serial inputs (under 32768 values: no parallel region) and
# parallel ones, both kernel families, both dtypes, C and Fortran order, the
# functional API and one layer per case.
WORKER = r"""
import json, sys, threading
import numpy as np
import numba
import fastbn

N_THREADS, REPEATS = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(5)


def functional_case(shape, axis, dtype, order="C"):
    x = (3.0 * rng.standard_normal(shape) + 1.0).astype(dtype)
    x = np.asfortranarray(x) if order == "F" else x
    dy = rng.standard_normal(shape).astype(dtype)
    c = shape[axis]
    g = rng.uniform(0.5, 2.0, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)

    def run():
        y, mean, invstd = fastbn.batch_norm_train(x, g, b, axis=axis)
        dx, dg, db = fastbn.batch_norm_backward(dy, x, mean, invstd, g, axis=axis)
        ye = fastbn.batch_norm_eval(x, mean, 1.0 / invstd**2 - 1e-5, g, b, axis=axis)
        dxe, _, _ = fastbn.batch_norm_backward(dy, x, mean, invstd, g, axis=axis, training=False)
        return [y, mean, invstd, dx, dg, db, ye, dxe]

    return run


def layer_case(shape, axis, dtype):
    xs = [(2.0 * rng.standard_normal(shape) - 1.0).astype(dtype) for _ in range(3)]
    dy = rng.standard_normal(shape).astype(dtype)

    def run():
        bn = fastbn.BatchNorm(shape[axis], axis=axis, dtype=dtype)
        outs = []
        for x in xs:
            outs += [bn(x), bn.backward(dy)]
            bn.step(0.1)
        bn.eval()
        outs += [bn(xs[0]), bn.backward(dy)]
        return outs + [bn.gamma.copy(), bn.beta.copy(), bn.running_mean.copy(),
                       bn.running_var.copy()]

    return run


cases = {}
for dtype in (np.float32, np.float64):
    n = np.dtype(dtype).name
    cases[f"ff-big-{n}"] = functional_case((256, 1024), 0, dtype)
    cases[f"bf-big-{n}"] = functional_case((1024, 256), 1, dtype)
    cases[f"ff-small-{n}"] = functional_case((64, 128), 0, dtype)
    cases[f"bf-small-{n}"] = functional_case((128, 64), -1, dtype)
    cases[f"layer-big-{n}"] = layer_case((256, 1024), 0, dtype)
    cases[f"layer-small-{n}"] = layer_case((96, 48), -1, dtype)
cases["nchw-big-float32"] = functional_case((8, 16, 32, 32), 1, np.float32)
cases["nhwc-big-float64"] = functional_case((8, 32, 32, 16), -1, np.float64)
cases["F-big-float32"] = functional_case((256, 1024), 0, np.float32, order="F")
cases["layer-nchw-float32"] = layer_case((4, 8, 32, 32), 1, np.float32)

alone = {name: run() for name, run in cases.items()}
names = list(cases)
barrier = threading.Barrier(N_THREADS)
mismatches, errors = [], []


def same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and (
        np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes())


def worker(t):
    try:
        barrier.wait()
        for r in range(REPEATS):
            for k in range(len(names)):
                name = names[(k + t + r) % len(names)]  # each thread in its own order
                got = cases[name]()
                if not all(same(a, b) for a, b in zip(got, alone[name], strict=True)):
                    mismatches.append((t, r, name))
    except BaseException as e:
        errors.append(f"thread {t}: {e!r}")


threads = [threading.Thread(target=worker, args=(t,)) for t in range(N_THREADS)]
for th in threads:
    th.start()
for th in threads:
    th.join()
print(json.dumps({
    "layer": numba.threading_layer(),
    "threads": numba.get_num_threads(),
    "cases": len(names),
    "calls": N_THREADS * REPEATS * len(names),
    "mismatches": mismatches[:20],
    "errors": errors[:20],
}))
"""


def _tbb_loads(env):
    """Whether Numba can load its tbb layer with this environment."""
    code = (
        "from numba.np.ufunc.parallel import _check_tbb_version_compatible as c\n"
        "import numba.np.ufunc.tbbpool\nc()\n"
    )
    return run_python(code, env, timeout=120, check=False).returncode == 0


@pytest.mark.parametrize("layer", ["tbb", "omp", "workqueue", None], ids=str)
def test_threads_agree_with_calls_made_alone(layer, subprocess_cache):
    env = python_env(subprocess_cache, NUMBA_THREADING_LAYER=layer)
    if layer == "tbb" and not _tbb_loads(env):
        pytest.skip("the tbb threading layer cannot load (pip install tbb)")
    proc = run_python(WORKER, env, N_THREADS, REPEATS, timeout=400)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if layer is not None:
        assert report["layer"] == layer
    assert report["errors"] == []
    assert report["mismatches"] == []
    assert report["calls"] == N_THREADS * REPEATS * report["cases"] >= 8 * 2 * 16


def test_threads_with_one_numba_thread_each(subprocess_cache):
    """numba.set_num_threads is per Python thread: mixed counts must not disturb anyone."""
    code = WORKER.replace(
        "def worker(t):\n    try:\n",
        "def worker(t):\n    try:\n"
        "        numba.set_num_threads(1 + t % numba.config.NUMBA_NUM_THREADS)\n",
    )
    assert code != WORKER
    # Results may differ between thread counts only if chunking followed the
    # count; the contract fixes the chunking by shape, so they must not.
    proc = run_python(code, python_env(subprocess_cache), N_THREADS, REPEATS)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["errors"] == [] and report["mismatches"] == []


GUARD_WORKER = r"""
import json, sys, threading
import numpy as np
import numba
from fastbn import _threading
from fastbn.kernels import mean as kmean

x = np.random.default_rng(1).standard_normal((64, 4096))
assert _threading.layer_is_safe() is None
_threading.start_pool()  # the layer is chosen here
expected = kmean(x)
seen = []
barrier = threading.Barrier(8)


def work():
    barrier.wait()
    for _ in range(50):
        with _threading.kernel_guard(False):
            seen.append(np.array_equal(kmean(x), expected))


ts = [threading.Thread(target=work) for _ in range(8)]
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps({"layer": numba.threading_layer(), "safe": _threading.layer_is_safe(),
                  "ok": all(seen), "n": len(seen)}))
"""


@pytest.mark.parametrize(("layer", "safe"), [("workqueue", False), ("omp", True)])
def test_kernel_guard_serializes_only_unsafe_layers(layer, safe, subprocess_cache):
    """Parallel kernels from 8 threads under kernel_guard(False): no abort, right answers."""
    env = python_env(subprocess_cache, NUMBA_THREADING_LAYER=layer)
    proc = run_python(GUARD_WORKER, env, timeout=200)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"layer": layer, "safe": safe, "ok": True, "n": 400}


def test_kernel_guard_serial_calls_take_no_lock():
    guard = _threading.kernel_guard(True)
    with guard:
        assert not _threading._LOCK.locked()
    assert _threading.kernel_guard(True) is guard


def test_kernel_guard_holds_the_lock_until_the_layer_is_known(monkeypatch):
    monkeypatch.setattr(_threading, "_safe", None)
    with _threading.kernel_guard(False):
        assert _threading._LOCK.locked()
    assert not _threading._LOCK.locked()
    assert _threading.layer_is_safe() is None  # a guarded call alone does not learn it
    _threading.start_pool()  # started already or now: the layer is known
    layer = numba.threading_layer()
    assert _threading.layer_is_safe() is (layer in ("tbb", "omp"))
    with _threading.kernel_guard(False):
        assert _threading._LOCK.locked() is (layer == "workqueue")
    assert not _threading._LOCK.locked()


def test_launch_starts_the_pool_first(monkeypatch):
    """launch calls start_pool while the layer is unknown, then never again."""
    starts = []
    real_start = _threading.start_pool
    monkeypatch.setattr(_threading, "_safe", None)
    monkeypatch.setattr(_threading, "start_pool", lambda: starts.append(real_start()))
    for _ in range(2):
        fastbn.batch_norm_train(np.ones((8, 4), np.float32))  # serial: the twin
    assert len(starts) == 1 and _threading.layer_is_safe() is not None


def test_kernel_guard_releases_the_lock_on_error(monkeypatch):
    monkeypatch.setattr(_threading, "_safe", None)
    with pytest.raises(ZeroDivisionError), _threading.kernel_guard(False):
        1 / 0  # noqa: B018
    assert not _threading._LOCK.locked()
