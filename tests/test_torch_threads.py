"""fastbn.torch's thread pool: torch's OpenMP shared where no layer was chosen.

With none chosen, `import fastbn.torch` starts Numba's pool on the omp layer
where torch's ATen runs on OpenMP (here: Linux, torch's wheel), so that both
libraries' parallel regions run on one OpenMP runtime (measured in
fastbn/torch/_threads.py); a layer the user chose (the variable or
numba.config), or a pool fastbn's kernels started before the import, stands.
The settings this start leaves alone (torch's thread count, OpenMP's,
numba.config.THREADING_LAYER) are tested in test_host_threads.py, for this
start and the NumPy API's.
"""

import json

import pytest
from conftest import python_env, run_python

pytest.importorskip("torch")


def _tbb_loads(subprocess_cache):
    code = "import numba, numba.np.ufunc.tbbpool"
    return run_python(code, python_env(subprocess_cache), check=False).returncode == 0


LAYER_CODE = r"""
import json, sys
import numba
import torch
how = sys.argv[1]
if how == "config":
    numba.config.THREADING_LAYER = "workqueue"
if how == "started":
    import numpy as np
    import fastbn
    fastbn.batch_norm_train(np.ones((2, 1 << 16), np.float32))  # a parallel kernel
    started = numba.threading_layer()
import fastbn.torch as fbt
bn = fbt.BatchNorm1d(256)
bn(torch.randn(512, 256, requires_grad=True)).sum().backward()
print(json.dumps({"layer": numba.threading_layer(), "started": locals().get("started")}))
"""


@pytest.mark.parametrize(
    ("how", "env_layer"),
    [("nothing", None), ("variable", "tbb"), ("variable", "workqueue"), ("config", None)],
)
def test_import_starts_the_pool_on_torchs_openmp_unless_a_layer_was_chosen(
    subprocess_cache, how, env_layer
):
    import fastbn.torch._threads as threads

    if env_layer == "tbb" and not _tbb_loads(subprocess_cache):
        pytest.skip("the tbb layer cannot load here (libtbb.so.12 not on the loader's path)")
    env = python_env(subprocess_cache, NUMBA_THREADING_LAYER=env_layer)
    result = json.loads(run_python(LAYER_CODE, env, how).stdout.strip().splitlines()[-1])
    if how == "nothing":
        assert threads.prefers_torchs_openmp()  # Linux and torch's wheel: ATen on OpenMP
        assert result["layer"] == "omp"
    else:
        assert result["layer"] == (env_layer or "workqueue")


def test_a_pool_started_before_the_import_is_left_alone(subprocess_cache):
    env = python_env(subprocess_cache, NUMBA_THREADING_LAYER=None)
    result = json.loads(run_python(LAYER_CODE, env, "started").stdout.strip().splitlines()[-1])
    # Numba's own first choice (tbb where it loads), kept by the import.
    assert result["layer"] == result["started"]
    assert result["started"] == ("tbb" if _tbb_loads(subprocess_cache) else "omp")


NO_OMP_CODE = r"""
import json, sys
sys.modules["numba.np.ufunc.omppool"] = None  # a numba build without its omp layer
import numba
import torch
import fastbn.torch
print(json.dumps({"layer": numba.threading_layer(), "setting": numba.config.THREADING_LAYER}))
"""


def test_without_an_omp_layer_numbas_own_choice_stands(subprocess_cache):
    """The omp layer cannot load: the import falls back to Numba's order, its setting put back."""
    env = python_env(subprocess_cache, NUMBA_THREADING_LAYER=None)
    result = json.loads(run_python(NO_OMP_CODE, env).stdout.strip().splitlines()[-1])
    assert result["setting"] == "default"
    assert result["layer"] in ("tbb", "workqueue")
