"""fastbn never changes its host's thread settings (SPEC section 10), whichever API runs first.

Numba's omp layer sets the OpenMP thread count and nesting of the thread that
starts its pool, in the runtime the process resolves the symbols to (torch's
libgomp in a torch process; the libgomp Numba loads otherwise, which a later
``import torch`` reuses). fastbn starts the pool itself and puts back what the
start changed. Each case runs in a fresh interpreter (a fork would inherit a
started pool): it sets what a user would, records the host's settings, calls
fastbn's APIs in its order, and records them again after each step:

- torch.get_num_threads(),
- each OpenMP runtime mapped before fastbn's first call: omp_get_max_threads,
  omp_get_nested and omp_get_max_active_levels of the calling thread,
- numba.config.THREADING_LAYER (which `import fastbn.torch` sets for its start).

The matrix: every threading layer, each with NUMBA_NUM_THREADS unset and the
user's count 1 (Numba's start would set the core count), and with
NUMBA_NUM_THREADS=1 and no user setting (it would set 1 where the default is
the core count); in each, the four ways in: imports torch then fastbn or
fastbn then torch, the NumPy API or fastbn.torch first. Each layer runs all
four ways and each setting runs each way (two per layer and setting, turned
by the layer), so the file runs 16 interpreters, two at a time.

"fastbn first, NumPy API first" is a NumPy host that imports torch only
after fastbn's first call. With the user's count, the host uses an OpenMP
library (libgomp itself, the count set on it); without, it has none, and the
libgomp Numba's omp layer loads is new at the start (kept: it is what torch
will use). torch.get_num_threads() must then read what it reads in a process
without fastbn after the same set-up.
"""

import ctypes.util
import json
from concurrent.futures import ThreadPoolExecutor

import numba
import pytest
from conftest import python_env, run_python

pytest.importorskip("torch")

LAYERS = [None, "tbb", "omp", "workqueue"]  # None: Numba's own choice
# name -> (NUMBA_NUM_THREADS, the count the user sets: 0 for none)
SETTINGS = {"numba_default-user_1": (None, 1), "numba_1-user_none": ("1", 0)}
# The omp layer, with NUMBA_NUM_THREADS=1, takes the NumPy host without an OpenMP library
# of its own (the rotation below): Numba's libgomp is new there, and torch reuses it.
WAYS = [("torch_first", "numpy"), ("fastbn_first", "numpy"),
        ("fastbn_first", "torch"), ("torch_first", "torch")]  # fmt: skip


def _cases():
    for i, layer in enumerate(LAYERS):
        for j, setting in enumerate(SETTINGS):
            for k in (0, 2):
                yield layer, setting, *WAYS[(i + j + k) % 4]


CASES = list(_cases())

WORKER = r"""
import ctypes, json, os, re, sys
order, first, user = sys.argv[1], sys.argv[2], int(sys.argv[3])


def runtimes():
    with open("/proc/self/maps") as maps:
        paths = {line.split()[5] for line in maps if len(line.split()) == 6}
    return sorted(p for p in paths if re.search(r"/lib(gomp|iomp5|omp)[-.][^/]*$", p))


def settings(paths):
    seen = {"config": numba.config.THREADING_LAYER}
    for path in paths:
        lib = ctypes.CDLL(path)
        seen[os.path.basename(path)] = [
            lib.omp_get_max_threads(), lib.omp_get_nested(), lib.omp_get_max_active_levels()]
    if "torch" in sys.modules:
        seen["torch"] = sys.modules["torch"].get_num_threads()
    return seen


checks = []
expected = None


def record():
    global expected
    paths = runtimes()
    expected = settings(paths)
    return paths


def check(label, paths):
    seen = settings(paths)
    checks.append([label, {k: expected[k] for k in seen}, seen])


def numpy_api(paths):
    import numpy as np
    import fastbn
    x = np.random.default_rng(0).standard_normal((4096, 512)).astype(np.float32)
    y, mean, invstd = fastbn.batch_norm_train(x)
    fastbn.batch_norm_backward(y, x, mean, invstd)
    check("NumPy API", paths)


def torch_api(paths):
    import torch
    import fastbn.torch as fbt
    check("import fastbn.torch", paths)
    for shape in [(64, 32), (512, 256)]:  # a serial and a parallel size
        x = torch.randn(*shape, requires_grad=True)
        fbt.BatchNorm1d(shape[1])(x).sum().backward()
    check("fastbn.torch modules", paths)


torch_read = None
if order == "torch_first":
    import torch
    if user:
        torch.set_num_threads(user)
    import fastbn, numba
elif first == "numpy":  # a NumPy host; torch comes later
    if user:  # the host uses an OpenMP library, its count set
        ctypes.CDLL(sys.argv[4]).omp_set_num_threads(user)
    import fastbn, numba
else:
    import fastbn, numba
    import torch
    if user:
        torch.set_num_threads(user)

paths = record()
if first == "numpy":
    numpy_api(paths)
    if "torch" not in sys.modules:
        import torch
        torch_read = torch.get_num_threads()
        paths = record()
    torch_api(paths)
else:
    torch_api(paths)
    numpy_api(paths)
print(json.dumps({"layer": numba.threading_layer(), "checks": checks, "torch_read": torch_read}))
"""

# torch.get_num_threads() in a process without fastbn, after the same host set-up.
BASELINE = r"""
import ctypes, sys
if int(sys.argv[2]):
    ctypes.CDLL(sys.argv[1]).omp_set_num_threads(int(sys.argv[2]))
import torch
print(torch.get_num_threads())
"""


def _tbb_loads(env):
    code = "import numba.np.ufunc.tbbpool"
    return run_python(code, env, check=False).returncode == 0


def _last_line(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reports(request, subprocess_cache):
    """The selected cases' reports (None where tbb cannot load), two interpreters at a time."""
    selected = [
        tuple(item.callspec.params[k] for k in ("layer", "setting", "order", "first"))
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec")
    ]
    gomp = ctypes.util.find_library("gomp")
    if gomp is None:
        pytest.skip("no libgomp for the NumPy host's OpenMP library")
    tbb = any(case[0] == "tbb" for case in selected) and _tbb_loads(python_env(subprocess_cache))

    def run(case):
        layer, setting, order, first = case
        if layer == "tbb" and not tbb:
            return None
        numba_threads, user = SETTINGS[setting]
        env = python_env(
            subprocess_cache, NUMBA_THREADING_LAYER=layer, NUMBA_NUM_THREADS=numba_threads
        )
        # The timeout only turns a hang into a failure: a cold compile cache takes minutes.
        return _last_line(run_python(WORKER, env, order, first, user, gomp, timeout=900))

    def baseline(user):
        env = python_env(subprocess_cache, NUMBA_NUM_THREADS=None)
        return int(run_python(BASELINE, env, gomp, user).stdout.split()[-1])

    users = {SETTINGS[setting][1] for _, setting, order, first in selected
             if (order, first) == ("fastbn_first", "numpy")}  # fmt: skip
    with ThreadPoolExecutor(2) as pool:
        baselines = {user: pool.submit(baseline, user) for user in users}
        runs = {case: pool.submit(run, case) for case in selected}
        return (
            {user: b.result() for user, b in baselines.items()},
            {case: r.result() for case, r in runs.items()},
        )


@pytest.mark.parametrize(("layer", "setting", "order", "first"), CASES, ids=str)
def test_host_settings_are_left_alone(reports, layer, setting, order, first):
    if numba.config.NUMBA_DEFAULT_NUM_THREADS < 2:
        pytest.skip("one core: Numba's count and the user's would be the same")
    baselines, runs = reports
    report = runs[layer, setting, order, first]
    if report is None:
        pytest.skip("the tbb layer cannot load here (libtbb.so.12 not on the loader's path)")
    if layer is not None:
        assert report["layer"] == layer
    labels = [label for label, _, _ in report["checks"]]
    assert labels == (
        ["NumPy API", "import fastbn.torch", "fastbn.torch modules"]
        if first == "numpy"
        else ["import fastbn.torch", "fastbn.torch modules", "NumPy API"]
    )
    numpy_host = order == "fastbn_first" and first == "numpy"
    for label, expected, seen in report["checks"]:
        if numpy_host and label == "NumPy API":  # before torch: the host's libgomp if any
            assert "torch" not in seen and len(seen) == (2 if SETTINGS[setting][1] else 1)
        else:  # torch's count and its OpenMP runtime's settings were read
            assert "torch" in seen and set(seen) - {"config", "torch"}, seen
        assert seen == expected, (label, report)
    if numpy_host:
        assert report["torch_read"] == baselines[SETTINGS[setting][1]], report
