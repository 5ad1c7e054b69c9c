"""The contract's reliability: a process forked after fastbn ran computes correctly.

Numba's thread pool starts at fastbn's first kernel call, of any size. A child
forked after that cannot use it: under the ``omp`` layer (GNU OpenMP) Numba
terminates the child at its first parallel region ("fork() called from a
process already using GNU OpenMP, this is unsafe"), and ``tbb`` children hang
in tbb's locks when the fork came while another thread was launching. So a
forked child runs every kernel's one-thread twin (`_threading.serial_only`).

Each layer is forced in a fresh interpreter (see test_threads). The parent
computes every case at parallel sizes (over 32768 values), then forks; the
children compute the same cases and send them back, and the parent checks
them bit for bit against its own. Serial twins give the bits of the parallel
kernels: the chunking follows the shape, not the thread count (the contract's
reliability; test_threads checks calls at every thread count too). Then the parent runs
the cases again, still on the parallel kernels. Timeouts here only guard
against hangs.
"""

import json
import threading

import numba
import numpy as np
import pytest
from conftest import python_env, run_python

import fastbn
from fastbn import _threading

LAYERS = ["omp", "tbb", "workqueue", None]  # None: Numba's default choice

# The cases and the comparison, shared by the workers below. serial_twin is
# wrapped to count the kernel calls that ran on one thread: every case is of
# parallel size, so a process on its thread pool makes none.
COMMON = r"""
import json, os, pickle, sys, traceback
import numpy as np
import numba
import fastbn
from fastbn import _threading, functional

HANG_GUARD = 120  # seconds; only so that a hung pool fails instead of hanging
rng = np.random.default_rng(20240611)
twin_calls = [0]
_real_twin = _threading.serial_twin


def counting_twin(kernel):
    twin_calls[0] += 1
    return _real_twin(kernel)


_threading.serial_twin = counting_twin


def data(shape, axis, dtype, order="C"):
    x = (3.0 * rng.standard_normal(shape) + 1.0).astype(dtype)
    x = np.asfortranarray(x) if order == "F" else x
    dy = rng.standard_normal(shape).astype(dtype)
    c = shape[axis]
    return x, dy, rng.uniform(0.5, 2.0, c).astype(dtype), rng.standard_normal(c).astype(dtype)


def functional_case(shape, axis, dtype, order="C"):
    x, dy, g, b = data(shape, axis, dtype, order)

    def run():
        y, mean, invstd = fastbn.batch_norm_train(x, g, b, axis=axis)
        dx, dg, db = fastbn.batch_norm_backward(dy, x, mean, invstd, g, axis=axis)
        ye = fastbn.batch_norm_eval(x, mean, 1.0 / invstd**2, g, b, axis=axis)
        dxe, _, _ = fastbn.batch_norm_backward(dy, x, mean, invstd, g, axis=axis, training=False)
        yr, _, _ = fastbn.batch_norm_relu_train(x, g, b, axis=axis)
        dxr, dgr, dbr = fastbn.batch_norm_relu_backward(dy, x, mean, invstd, g, b, axis=axis)
        return [y, mean, invstd, dx, dg, db, ye, dxe, yr, dxr, dgr, dbr]

    return run


def ghost_case(shape, axis, k, dtype):
    x, dy, g, b = data(shape, axis, dtype)

    def run():
        y, mean, invstd = fastbn.ghost_batch_norm_train(x, g, b, virtual_batch_size=k, axis=axis)
        grads = fastbn.ghost_batch_norm_backward(
            dy, x, mean, invstd, g, virtual_batch_size=k, axis=axis)
        return [y, mean, invstd, *grads]

    return run


def renorm_case(shape, axis, dtype):
    x, dy, g, b = data(shape, axis, dtype)
    c = shape[axis]
    running_mean, running_var = np.full(c, 0.9, dtype), np.full(c, 11.0, dtype)

    def run():
        y, mean, invstd, r, d = fastbn.batch_renorm_train(
            x, running_mean, running_var, g, b, axis=axis)
        grads = fastbn.batch_renorm_backward(dy, x, mean, invstd, r, d, g, axis=axis)
        return [y, mean, invstd, r, d, *grads]

    return run


def layer_case(shape, axis, dtype):
    xs = [(2.0 * rng.standard_normal(shape) - 1.0).astype(dtype) for _ in range(2)]
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


CASES = {
    "features_first-float32": functional_case((256, 512), 0, np.float32),  # rows family
    "batch_first-float64": functional_case((512, 256), 1, np.float64),  # columns family
    "nchw-float32": functional_case((8, 16, 32, 32), 1, np.float32),
    "nhwc-float64": functional_case((8, 32, 32, 16), -1, np.float64),
    "F-float32": functional_case((256, 512), 0, np.float32, order="F"),
    "ghost-batch_first-float32": ghost_case((2048, 32), 1, 512, np.float32),
    "ghost-nchw-float64": ghost_case((32, 8, 16, 16), 1, 8, np.float64),
    "renorm-nchw-float32": renorm_case((8, 16, 32, 32), 1, np.float32),
    "layer-nhwc-float32": layer_case((8, 32, 32, 16), -1, np.float32),
}


def run_cases():
    # (twin calls, results): the count says whether the kernels ran on one thread.
    twin_calls[0] = 0
    results = {name: run() for name, run in CASES.items()}
    return twin_calls[0], results


def mismatches(results, expected):
    # The cases whose arrays are not bit-identical to the expected ones.
    bad = []
    for name, arrays in results.items():
        for a, b in zip(arrays, expected[name], strict=True):
            a, b = np.asarray(a), np.asarray(b)
            if not (a.dtype == b.dtype and a.shape == b.shape
                    and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()):
                bad.append(name)
                break
    return bad


def state():
    return {"pid": os.getpid(), "serial_only": _threading.serial_only}


def fork_child(body):
    # (exit code, body() as the child returned it, or None): body runs in an os.fork() child.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            payload = pickle.dumps(body())
            with os.fdopen(w, "wb") as f:
                f.write(payload)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:  # read it all before waiting: the pipe's buffer is small
        payload = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), pickle.loads(payload) if payload else None
"""

FORK_WORKER = (
    COMMON
    + r"""
MODE = sys.argv[1]  # "fork": os.fork() children; "pool": a fork-started multiprocessing.Pool


def child_report(exit_code, payload, expected):
    if payload is None:
        return {"exit": exit_code}
    calls, results = payload.pop("run")
    return {"exit": exit_code, **payload, "twin_calls": calls,
            "mismatches": mismatches(results, expected)}


def child_body():
    return {**state(), "run": run_cases()}


def child_with_grandchild_body():
    # A grandchild forked from a serial child: also serial, also right.
    own = child_body()
    return {**own, "grandchild": fork_child(child_body)}


def pool_task(name):
    twin_calls[0] = 0
    arrays = CASES[name]()
    return {**state(), "name": name, "twin_calls": twin_calls[0], "arrays": arrays}


# A child forked before any kernel call: Numba's pool has not started, so the
# child starts its own and keeps parallel kernels.
early = None
if MODE == "fork":
    try:
        numba.threading_layer()
        raise AssertionError("the thread pool started before any kernel call")
    except ValueError:
        pass
    early = fork_child(child_body)

parent_calls, expected = run_cases()  # the parent's parallel kernels: the pool starts
report = {"layer": numba.threading_layer(), "parent_calls": parent_calls, "children": []}
if early is not None:
    report["children"].append({"kind": "early", **child_report(*early, expected)})

if MODE == "fork":
    first = fork_child(child_body)
    second = fork_child(child_with_grandchild_body)
    report["children"].append({"kind": "child", **child_report(*first, expected)})
    grandchild = second[1].pop("grandchild") if second[1] else (None, None)
    report["children"].append({"kind": "child", **child_report(*second, expected)})
    report["children"].append({"kind": "grandchild", **child_report(*grandchild, expected)})
else:
    import multiprocessing
    with multiprocessing.get_context("fork").Pool(2) as pool:
        try:
            done = pool.map_async(pool_task, list(CASES) * 2, chunksize=1).get(HANG_GUARD)
        except multiprocessing.TimeoutError:
            done = None
    if done is None:
        report["children"].append({"kind": "pool", "exit": "hung or died"})
    for task in done or ():
        bad = mismatches({task["name"]: task.pop("arrays")}, expected)
        report["children"].append({"kind": "pool", "exit": 0, **task, "mismatches": bad})

# The parent keeps its thread pool: the same cases again, on the parallel kernels.
again_calls, again = run_cases()
report["parent"] = {**state(), "twin_calls": again_calls, "mismatches": mismatches(again,
                                                                                     expected)}
print(json.dumps(report))
"""
)


def _tbb_loads(env):
    """Whether Numba can load its tbb layer with this environment (as in test_threads)."""
    code = (
        "from numba.np.ufunc.parallel import _check_tbb_version_compatible as c\n"
        "import numba.np.ufunc.tbbpool\nc()\n"
    )
    return run_python(code, env, timeout=120, check=False).returncode == 0


def _env(layer, cache_dir):
    env = python_env(cache_dir, NUMBA_THREADING_LAYER=layer)
    if layer == "tbb" and not _tbb_loads(env):
        pytest.skip("the tbb threading layer cannot load (pip install tbb)")
    return env


def _report(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_parent(report, layer):
    if layer is not None:
        assert report["layer"] == layer
    assert report["parent_calls"] == 0  # the parent ran every case on its pool
    assert report["parent"]["serial_only"] is False
    assert report["parent"]["twin_calls"] == 0  # and still does after forking
    assert report["parent"]["mismatches"] == []


@pytest.mark.parametrize("layer", LAYERS, ids=str)
def test_forked_children_compute_like_the_parent(layer, subprocess_cache):
    env = _env(layer, subprocess_cache)
    report = _report(run_python(FORK_WORKER, env, "fork", timeout=400))
    _check_parent(report, layer)
    kinds = [child["kind"] for child in report["children"]]
    assert kinds == ["early", "child", "child", "grandchild"], report["children"]
    for child in report["children"]:
        assert child["exit"] == 0, child
        assert child["mismatches"] == [], child
        if child["kind"] == "early":  # forked before the pool started: parallel kernels
            assert child["serial_only"] is False and child["twin_calls"] == 0, child
        else:  # forked after: every kernel call on one thread
            assert child["serial_only"] is True and child["twin_calls"] > 0, child


@pytest.mark.parametrize("layer", LAYERS, ids=str)
def test_fork_pool_workers_compute_like_the_parent(layer, subprocess_cache):
    env = _env(layer, subprocess_cache)
    report = _report(run_python(FORK_WORKER, env, "pool", timeout=400))
    _check_parent(report, layer)
    tasks = report["children"]
    assert len(tasks) == 2 * 9, tasks[:2]
    for task in tasks:
        assert task["exit"] == 0, task
        assert task["mismatches"] == [], task
        assert task["serial_only"] is True and task["twin_calls"] > 0, task
    assert len({task["pid"] for task in tasks}) >= 1


# A forked child loads (or compiles and saves) a kernel from the compile cache
# under fastbn's flock (fastbn._compile) while the parent holds that lock at the
# fork, as another parent thread saving a kernel would: the child must wait for
# the parent to release it, then compute. The cache is empty, so the child
# compiles the float64 serial twin itself.
LOCK_WORKER = (
    COMMON
    + r"""
from fastbn import _compile
from fastbn.kernels import rows

x32 = (3.0 * rng.standard_normal((256, 512)) + 1.0).astype(np.float32)
x64 = x32.astype(np.float64)
fastbn.batch_norm_train(x32)  # parallel: the pool starts
with _compile._locked(rows.train_forward._cache._cache_path):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            twin_calls[0] = 0
            out = fastbn.batch_norm_train(x64)
            with os.fdopen(w, "wb") as f:
                f.write(pickle.dumps((state(), twin_calls[0], out)))
            code = 0
        finally:
            os._exit(code)
    os.close(w)
with os.fdopen(r, "rb") as f:
    payload = f.read()
_, status = os.waitpid(pid, 0)
expected = fastbn.batch_norm_train(x64)  # the parent's parallel kernel
child_state, calls, out = pickle.loads(payload) if payload else ({}, 0, None)
print(json.dumps({
    "exit": os.waitstatus_to_exitcode(status),
    **child_state,
    "twin_calls": calls,
    "mismatches": mismatches({"x64": out}, {"x64": list(expected)}) if out else ["x64"],
}))
"""
)


@pytest.mark.parametrize("layer", ["omp", None], ids=str)
def test_forked_child_waits_for_the_cache_lock(layer, tmp_path):
    env = python_env(tmp_path / "cache", NUMBA_THREADING_LAYER=layer)
    report = _report(run_python(LOCK_WORKER, env, timeout=400))
    assert report["exit"] == 0, report
    assert report["serial_only"] is True and report["twin_calls"] > 0, report
    assert report["mismatches"] == [], report


# DataLoader workers (fork start method) running fastbn.torch.BatchNorm2d forward
# and backward at a parallel size, after the parent ran the same items.
DATALOADER_WORKER = (
    COMMON
    + r"""
import torch
import fastbn.torch

N_ITEMS, C = 6, 16


def item(i):
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(8, C, 32, 32, generator=g)  # 131072 values: parallel kernels
    if i % 2:
        x = x.contiguous(memory_format=torch.channels_last)
    gy = torch.randn(x.shape, generator=g)
    bn = fastbn.torch.BatchNorm2d(C, implementation="fastbn")  # the kernels at every size
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, C))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, C))
    twin_calls[0] = 0
    x.requires_grad_(True)
    y = bn(x)
    y.backward(gy)
    bn.eval()
    with torch.no_grad():
        ye = bn(x)
    tensors = [y.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean,
               bn.running_var, ye]
    return {**state(), "twin_calls": twin_calls[0], "tensors": tensors}


class Items(torch.utils.data.Dataset):
    def __len__(self):
        return N_ITEMS

    def __getitem__(self, i):
        return i, item(i)


expected = [item(i) for i in range(N_ITEMS)]  # the parent's own kernels first
loader = torch.utils.data.DataLoader(
    Items(), batch_size=None, num_workers=2, multiprocessing_context="fork",
    timeout=HANG_GUARD,
)
parent_pid = os.getpid()
workers = []
for i, got in loader:
    same = all(torch.equal(a, b) and a.stride() == b.stride()
               for a, b in zip(got["tensors"], expected[i]["tensors"], strict=True))
    workers.append({"item": int(i), "same": same, "pid": got["pid"],
                    "serial_only": got["serial_only"], "twin_calls": got["twin_calls"]})
print(json.dumps({
    "layer": numba.threading_layer(),
    "parent": [{k: e[k] for k in ("pid", "serial_only", "twin_calls")} for e in expected],
    "parent_pid": parent_pid,
    "workers": workers,
}))
"""
)


@pytest.mark.parametrize("layer", ["omp", None], ids=str)
def test_dataloader_workers_compute_like_the_parent(layer, subprocess_cache):
    pytest.importorskip("torch")
    env = python_env(subprocess_cache, NUMBA_THREADING_LAYER=layer)
    report = _report(run_python(DATALOADER_WORKER, env, timeout=400))
    if layer is not None:
        assert report["layer"] == layer
    for entry in report["parent"]:  # the parent ran fastbn's parallel kernels
        assert entry["serial_only"] is False and entry["twin_calls"] == 0, entry
    assert sorted(w["item"] for w in report["workers"]) == list(range(6))
    for worker in report["workers"]:
        assert worker["pid"] != report["parent_pid"], worker
        assert worker["serial_only"] is True and worker["twin_calls"] > 0, worker
        assert worker["same"], worker


# In this process: the hook and the launcher, without forking.


def test_after_fork_hook_sets_serial_only_once_the_pool_started(monkeypatch):
    fastbn.batch_norm_train(np.ones((256, 256)) + np.arange(256))  # the pool starts
    numba.threading_layer()  # it has
    held = threading.Lock()
    held.acquire()
    monkeypatch.setattr(_threading, "_LOCK", held)
    monkeypatch.setattr(_threading, "serial_only", False)
    _threading._after_fork_in_child()
    assert _threading.serial_only is True
    # A lock held by a parent thread at the fork would never be released in
    # the child: the child gets a fresh one.
    assert _threading._LOCK is not held and not _threading._LOCK.locked()


def test_after_fork_hook_keeps_parallel_kernels_before_the_pool_started(monkeypatch):
    def not_started():
        raise ValueError("Threading layer is not initialized.")

    monkeypatch.setattr(numba, "threading_layer", not_started)
    monkeypatch.setattr(_threading, "_LOCK", threading.Lock())
    monkeypatch.setattr(_threading, "serial_only", False)
    _threading._after_fork_in_child()
    assert _threading.serial_only is False


def test_launch_runs_serial_twins_when_serial_only(monkeypatch):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((128, 512)).astype(np.float32)  # parallel size
    dy = rng.standard_normal(x.shape).astype(np.float32)

    def run():
        y, mean, invstd = fastbn.batch_norm_train(x)
        return [y, mean, invstd, *fastbn.batch_norm_backward(dy, x, mean, invstd)]

    calls = []
    real_twin = _threading.serial_twin

    def counting_twin(kernel):
        calls.append(kernel)
        return real_twin(kernel)

    monkeypatch.setattr(_threading, "serial_twin", counting_twin)
    parallel = run()
    assert calls == []
    monkeypatch.setattr(_threading, "serial_only", True)
    serial = run()
    assert len(calls) == 2
    for a, b in zip(serial, parallel, strict=True):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
