"""fastbn.torch never changes torch's thread count (SPEC section 10), under every layer.

Numba's omp layer sets the OpenMP thread count of the runtime torch uses
when its pool starts; `import fastbn.torch` starts the pool and puts torch's
count back. Each case runs in a fresh interpreter with the layer and
NUMBA_NUM_THREADS forced, runs converted modules at a serial and at a
parallel size (forward and backward), and compares torch.get_num_threads()
with what it was before fastbn was imported, also after the user set it.
"""

import json

import pytest
from conftest import python_env, run_python

pytest.importorskip("torch")

CODE = r"""
import json, sys
import torch
user_threads = int(sys.argv[1])
if user_threads:
    torch.set_num_threads(user_threads)
before = torch.get_num_threads()
import numba
import fastbn.torch as fbt
seen = [torch.get_num_threads()]
for shape in [(64, 32), (512, 256)]:  # one thread, then a parallel kernel
    bn = fbt.BatchNorm1d(shape[1])
    x = torch.randn(*shape, requires_grad=True)
    bn(x).sum().backward()
    seen.append(torch.get_num_threads())
print(json.dumps({"before": before, "seen": seen, "layer": numba.threading_layer()}))
"""


def _tbb_loads(subprocess_cache):
    code = "import numba, numba.np.ufunc.tbbpool"
    return run_python(code, python_env(subprocess_cache), check=False).returncode == 0


@pytest.mark.parametrize("user_threads", [0, 1], ids=["default", "user_set_1"])
@pytest.mark.parametrize("numba_threads", ["1", "2"])
@pytest.mark.parametrize("layer", ["omp", "tbb", "workqueue"])
def test_torch_thread_count_is_left_alone(subprocess_cache, layer, numba_threads, user_threads):
    if layer == "tbb" and not _tbb_loads(subprocess_cache):
        pytest.skip("the tbb layer cannot load here (libtbb.so.12 not on the loader's path)")
    env = python_env(
        subprocess_cache, NUMBA_THREADING_LAYER=layer, NUMBA_NUM_THREADS=numba_threads
    )
    result = json.loads(run_python(CODE, env, str(user_threads)).stdout.strip().splitlines()[-1])
    assert result["layer"] == layer
    assert result["seen"] == [result["before"]] * 3, result
