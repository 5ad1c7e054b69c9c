"""The contract's reliability: the compile cache from a read-only install, across
NUMBA_NUM_THREADS, and filled by several processes at once. Every case runs in fresh interpreters.
"""

import fcntl
import importlib
import json
import os
import select
import shutil
import subprocess
import sys
import threading

import pytest
from conftest import python_env, run_python
from numba.core.caching import FunctionCache

import fastbn
from fastbn import _compile

# Train forward and backward on one features-first input (the rows family),
# checked against the float64 reference; reports the kernels' cache hits and misses.
WORK = r"""
import hashlib, json, sys
import numpy as np
import numba
import fastbn
from fastbn import reference
from fastbn.kernels import rows

dtype = np.dtype(sys.argv[1])
rng = np.random.default_rng(11)
x = (2.0 * rng.standard_normal((64, 1024)) + 1.0).astype(dtype)  # parallel: > 32768 values
dy = rng.standard_normal(x.shape).astype(dtype)
y, mean, invstd = fastbn.batch_norm_train(x)
dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, x, mean, invstd)
y_ref, mean_ref, invstd_ref = reference.batch_norm_train(x.astype(np.float64))
dx_ref, _, _ = reference.batch_norm_backward(
    dy.astype(np.float64), x.astype(np.float64), mean_ref, invstd_ref)
tol = 1e-4 if dtype == np.float32 else 1e-10
stats = {f.__name__: [sum(f.stats.cache_hits.values()), sum(f.stats.cache_misses.values())]
         for f in (rows.train_forward, rows.backward)}
print(json.dumps({
    "file": fastbn.__file__,
    "ok": bool(np.max(np.abs(y - y_ref)) < tol and np.max(np.abs(dx - dx_ref)) < 10 * tol),
    "stats": stats,
    "threads": numba.config.NUMBA_NUM_THREADS,
    "digest": hashlib.sha1(y.tobytes() + dx.tobytes() + dgamma.tobytes()).hexdigest(),
}))
"""


def _report(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cache_files(root):
    return sorted(
        os.path.relpath(os.path.join(d, f), root)
        for d, _, files in os.walk(root)
        for f in files
        if f.endswith((".nbi", ".nbc"))
    )


# As root a read-only mode bit stops nothing: the package directory is then
# bind-mounted read-only in a private mount namespace (needs CAP_SYS_ADMIN).
READ_ONLY_MOUNT = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'


def _run_read_only(site, code, env, *args, cwd):
    """run_python with ``site`` read-only, whoever this process is."""
    if os.geteuid() != 0:
        return run_python(code, env, *args, cwd=cwd, timeout=400)
    prefix = ["unshare", "-m", "sh", "-c", READ_ONLY_MOUNT, "sh", str(site)]
    probe = subprocess.run(
        [*prefix, "sh", "-c", 'touch "$0/probe"', str(site)], capture_output=True
    )
    if probe.returncode == 0 or shutil.which("unshare") is None:
        pytest.skip("running as root without a way to make the package read-only")
    proc = subprocess.run(
        [*prefix, sys.executable, "-c", code, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    return proc


def test_read_only_install_caches_in_the_user_directory(tmp_path):
    """A read-only copy of the package: Numba falls back to XDG_CACHE_HOME/numba."""
    site, home, xdg = tmp_path / "site", tmp_path / "home", tmp_path / "xdg"
    shutil.copytree(
        os.path.dirname(fastbn.__file__),
        site / "fastbn",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    home.mkdir()
    for d, _, files in os.walk(site):
        for f in files:
            os.chmod(os.path.join(d, f), 0o444)
        os.chmod(d, 0o555)
    env = python_env(
        None,
        NUMBA_CACHE_DIR=None,
        PYTHONPATH=site,
        HOME=home,
        XDG_CACHE_HOME=xdg,
        PYTHONDONTWRITEBYTECODE=1,
    )
    try:
        first = _report(_run_read_only(site, WORK, env, "float32", cwd=tmp_path))
        files = _cache_files(xdg)
        second = _report(_run_read_only(site, WORK, env, "float32", cwd=tmp_path))
    finally:
        for d, _, _ in os.walk(site):
            os.chmod(d, 0o755)
    assert first["file"] == str(site / "fastbn" / "__init__.py")
    assert first["ok"] and second["ok"]
    assert first["digest"] == second["digest"]
    assert any(f.endswith(".nbc") for f in files), f"no cache under XDG_CACHE_HOME: {files}"
    assert _cache_files(site) == [], "cache written into the read-only package"
    assert first["stats"]["train_forward"][1] >= 1  # compiled on the first run
    for hits, misses in second["stats"].values():  # loaded from the user cache after
        assert hits >= 1 and misses == 0, second["stats"]


def test_cache_survives_a_change_of_num_threads(subprocess_cache):
    """Kernels cached at one NUMBA_NUM_THREADS load and agree at another (both ways)."""
    reports = []
    for threads in (1, 2, 1, 2):
        env = python_env(subprocess_cache, NUMBA_NUM_THREADS=threads)
        reports.append(_report(run_python(WORK, env, "float64", timeout=400)))
    assert [r["threads"] for r in reports] == [1, 2, 1, 2]
    assert all(r["ok"] for r in reports)
    for r in reports[1:]:
        assert all(misses == 0 for _, misses in r["stats"].values()), r["stats"]
    # The chunking is fixed by the shape, not the thread count: same bits.
    assert len({r["digest"] for r in reports}) == 1


def test_cold_cache_filled_by_four_processes_at_once(tmp_path):
    """Four processes compile float32 and float64 into one empty cache at the same time,
    then four more load from it: no crash, no wrong result, no lost entry."""
    env = python_env(tmp_path / "cache")
    dtypes = ["float32", "float64", "float32", "float64"]
    for round_ in ("cold", "warm"):
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", WORK, dt],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for dt in dtypes
        ]
        outs = [p.communicate(timeout=600) for p in procs]
        for p, (_, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, f"{round_}: exit {p.returncode}\n{err[-4000:]}"
        reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
        assert all(r["ok"] for r in reports), (round_, reports)
        assert reports[0]["digest"] == reports[2]["digest"]
        assert reports[1]["digest"] == reports[3]["digest"]
        if round_ == "warm":
            for r in reports:
                assert all(m == 0 for _, m in r["stats"].values()), (
                    "a signature compiled in the cold round is missing from the cache "
                    f"(index race?): {r['stats']}"
                )


# The child of the lock test: fcntl.flock wrapped so that, when fastbn asks for its
# cache lock and another process holds it, the child says "blocked" and the lock
# operation on stdout right before it blocks (a non-blocking try fails first: the
# lock is held, not free).
LOCK_CHILD = r"""
import fcntl, os, sys

real_flock = fcntl.flock


def flock(file, operation):
    name = os.path.basename(getattr(file, "name", ""))
    if operation in (fcntl.LOCK_SH, fcntl.LOCK_EX) and name == sys.argv[1]:
        try:
            real_flock(file, operation | fcntl.LOCK_NB)
        except BlockingIOError:
            print("blocked", operation, flush=True)
            real_flock(file, operation)
            print("acquired", flush=True)
        return None
    return real_flock(file, operation)


fcntl.flock = flock

import numpy as np
import fastbn

x = np.arange(64 * 128, dtype=np.float32).reshape(64, 128)
y, mean, invstd = fastbn.batch_norm_train(x, axis=1)
print("done", float(mean[0]), flush=True)
"""


def test_cache_reads_and_writes_wait_for_the_cache_lock(subprocess_cache):
    """A process's first kernel call waits while another process holds its cache's lock.

    Numba's cache index has no lock of its own: two processes saving into
    one cache at once can leave a signature pointing at another's code.
    Proof by the order of events, not by time: while this process holds the
    lock, the child reports that fastbn asked for the lock and found it held,
    then blocks in flock and so can write nothing more; only after the
    release does it load (or compile and save) its kernel and finish. A lock
    that fastbn never takes, or takes on another file, gives "done" first.
    """
    env = python_env(subprocess_cache)
    where = run_python(
        "from fastbn import _compile\n"
        "from fastbn.kernels import columns\n"
        "print(_compile.lock_path(columns.train_forward))\n",
        env,
    )
    lock = where.stdout.strip().splitlines()[-1]
    assert os.path.dirname(lock).startswith(str(subprocess_cache))
    with open(lock, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        # Unbuffered: readline reads byte by byte, so nothing after the line is taken.
        proc = subprocess.Popen(
            [sys.executable, "-c", LOCK_CHILD, _compile.LOCK_NAME],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        hang_guard = threading.Timer(300, proc.kill)  # a hang fails the test, never waits
        hang_guard.start()
        try:
            first = proc.stdout.readline()
            # Blocked in flock: no more output, and alive, while the lock is held.
            more, _, _ = select.select([proc.stdout], [], [], 0)
            alive = proc.poll() is None
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
        try:
            out, err = proc.communicate(timeout=300)
        finally:
            hang_guard.cancel()
    assert first.startswith(b"blocked "), (
        f"the child did not wait for the lock: {first + out!r} {err.decode()[-3000:]}"
    )
    assert first == f"blocked {fcntl.LOCK_EX}\n".encode(), f"not an exclusive lock: {first!r}"
    assert not more and alive, "the child went on while the lock was held"
    assert proc.returncode == 0, err.decode()[-3000:]
    lines = out.decode().splitlines()
    assert lines[0] == "acquired"
    assert lines[-1] == "done 4032.0"


@pytest.mark.parametrize(
    "module", ["fastbn.kernels.rows", "fastbn.kernels.columns", "fastbn.kernels.blocks",
               "fastbn.kernels.roofline", "fastbn._running"],
)  # fmt: skip
def test_every_cached_kernel_saves_under_the_lock(module):
    namespace = vars(importlib.import_module(module))
    cached = [
        name
        for name, value in namespace.items()
        if isinstance(getattr(value, "_cache", None), FunctionCache)
    ]
    assert cached, f"{module} has no cached kernel"
    for name in cached:
        assert isinstance(namespace[name]._cache._cache_file, _compile._LockedCacheFile), name
