"""fastbn.BatchNorm against torch.nn.BatchNorm1d and BatchNorm2d, step by step.

Each step runs the same batch through both layers and compares the forward
output, the running statistics and the autograd gradients (input, weight,
bias), then takes the same SGD step on both; eval mode is compared at the end.
Skipped when torch is not installed.
"""

import numpy as np
import pytest

from fastbn import BatchNorm

torch = pytest.importorskip("torch")

C = 6
STEPS = 3
LR = 0.1
# Absolute tolerance on unit-scale data; float32 data is kept well-conditioned.
TOL = {np.float64: 1e-10, np.float32: 1e-5}
TORCH_DTYPE = {np.float64: torch.float64, np.float32: torch.float32}


def _same(a):
    return a


# name -> (torch module, fastbn shape, fastbn axis, fastbn layout -> torch's, and back)
LAYOUTS = {
    "1d_batch_first": (torch.nn.BatchNorm1d, (32, C), 1, _same, _same),
    "1d_features_first": (torch.nn.BatchNorm1d, (C, 32), 0, np.transpose, np.transpose),
    "1d_ncl": (torch.nn.BatchNorm1d, (4, C, 7), 1, _same, _same),
    "2d_nchw": (torch.nn.BatchNorm2d, (4, C, 5, 3), 1, _same, _same),
    "2d_nhwc": (
        torch.nn.BatchNorm2d,
        (4, 5, 3, C),
        -1,
        lambda a: a.transpose(0, 3, 1, 2),
        lambda a: a.transpose(0, 2, 3, 1),
    ),
}


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def make_pair(rng, name, dtype, **kwargs):
    """A fastbn layer and a torch module with the same random gamma and beta."""
    module_type, _, axis, _, _ = LAYOUTS[name]
    ours = BatchNorm(C, axis=axis, dtype=dtype, **kwargs)
    theirs = module_type(C, dtype=TORCH_DTYPE[dtype], **kwargs)
    if ours.affine:
        ours.gamma[...] = rng.uniform(0.5, 2.0, C)
        ours.beta[...] = rng.standard_normal(C)
        with torch.no_grad():
            theirs.weight.copy_(torch.from_numpy(ours.gamma))
            theirs.bias.copy_(torch.from_numpy(ours.beta))
    return ours, theirs


def run_both(ours, theirs, name, x, dy):
    """Forward and backward through both; return (ours, theirs) pairs in fastbn's layout."""
    _, _, _, to_torch, from_torch = LAYOUTS[name]
    x_t = torch.tensor(to_torch(x), requires_grad=True)
    y_t = theirs(x_t)
    y_t.backward(torch.tensor(to_torch(dy)))
    pairs = {
        "y": (ours(x), from_torch(y_t.detach().numpy())),
        "dx": (ours.backward(dy), from_torch(x_t.grad.numpy())),
    }
    if ours.affine:
        pairs["dgamma"] = (ours.dgamma.copy(), theirs.weight.grad.numpy().copy())
        pairs["dbeta"] = (ours.dbeta.copy(), theirs.bias.grad.numpy().copy())
    return pairs


def sgd_step(ours, theirs):
    ours.step(LR)
    if ours.affine:
        with torch.no_grad():
            for p in (theirs.weight, theirs.bias):
                p -= LR * p.grad
                p.grad = None


def assert_same_state(ours, theirs, tol):
    if ours.track_running_stats:
        np.testing.assert_allclose(
            ours.running_mean, theirs.running_mean.numpy(), rtol=tol, atol=tol
        )
        np.testing.assert_allclose(
            ours.running_var, theirs.running_var.numpy(), rtol=tol, atol=tol
        )
        assert ours.num_batches_tracked == int(theirs.num_batches_tracked)
    if ours.affine:
        np.testing.assert_allclose(ours.gamma, theirs.weight.detach().numpy(), rtol=tol, atol=tol)
        np.testing.assert_allclose(ours.beta, theirs.bias.detach().numpy(), rtol=tol, atol=tol)


def assert_pairs_close(pairs, tol, m, context):
    for what, (mine, torch_result) in pairs.items():
        assert mine.dtype == torch_result.dtype, what
        # dgamma and dbeta are sums of M unit-scale terms.
        scale = np.sqrt(m) if what in ("dgamma", "dbeta") else 1.0
        np.testing.assert_allclose(
            mine, torch_result, rtol=tol, atol=tol * scale, err_msg=f"{what}, {context}"
        )


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("name", LAYOUTS)
def test_training_steps_then_eval_match_torch(rng, name, momentum, dtype):
    shape = LAYOUTS[name][1]
    tol = TOL[dtype]
    m = int(np.prod(shape)) // C
    ours, theirs = make_pair(rng, name, dtype, momentum=momentum)
    for step in range(STEPS):
        x = (rng.uniform(-1, 1) + rng.uniform(0.5, 2) * rng.standard_normal(shape)).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        assert_pairs_close(run_both(ours, theirs, name, x, dy), tol, m, f"step {step}")
        assert_same_state(ours, theirs, tol)
        sgd_step(ours, theirs)
        assert_same_state(ours, theirs, tol)

    ours.eval()
    theirs.eval()
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    assert_pairs_close(run_both(ours, theirs, name, x, dy), tol, m, "eval")
    assert_same_state(ours, theirs, tol)


@pytest.mark.parametrize(
    "kwargs", [{"track_running_stats": False}, {"affine": False}], ids=["untracked", "no_affine"]
)
def test_options_match_torch(rng, kwargs):
    name = "2d_nchw"
    shape = LAYOUTS[name][1]
    m = int(np.prod(shape)) // C
    ours, theirs = make_pair(rng, name, np.float64, **kwargs)
    for training in (True, True, False):
        ours.train(training)
        theirs.train(training)
        x = rng.standard_normal(shape)
        dy = rng.standard_normal(shape)
        assert_pairs_close(run_both(ours, theirs, name, x, dy), 1e-10, m, f"training={training}")
        sgd_step(ours, theirs)
        assert_same_state(ours, theirs, 1e-10)
    assert set(ours.state_dict()) == set(theirs.state_dict())


def trained_torch_module(dtype=torch.float32):
    module = torch.nn.BatchNorm1d(C, dtype=dtype)
    with torch.no_grad():
        module.weight.uniform_(0.5, 2.0)
        module.bias.normal_()
    for _ in range(3):
        module(torch.randn(16, C, dtype=dtype) * 2 + 1)
    return module.eval()


def test_load_torch_state_dict(rng):
    torch.manual_seed(0)
    module = trained_torch_module()
    state = {key: value.numpy() for key, value in module.state_dict().items()}
    assert state["num_batches_tracked"].shape == () and state["weight"].dtype == np.float32
    ours = BatchNorm(C, axis=1).eval()
    ours.load_state_dict(state)
    assert ours.num_batches_tracked == 3 and type(ours.num_batches_tracked) is int
    x = rng.standard_normal((8, C)).astype(np.float32)
    np.testing.assert_allclose(ours(x), module(torch.from_numpy(x)).detach().numpy(), atol=1e-6)


def test_torch_loads_our_state_dict(rng):
    ours = BatchNorm(C, axis=1, dtype=np.float64)
    ours.gamma[...] = rng.uniform(0.5, 2.0, C)
    for _ in range(3):
        ours(rng.standard_normal((16, C)) * 2 + 1)
    module = torch.nn.BatchNorm1d(C, dtype=torch.float64)
    module.load_state_dict(
        {key: torch.as_tensor(value) for key, value in ours.state_dict().items()}
    )
    assert int(module.num_batches_tracked) == 3
    x = rng.standard_normal((8, C))
    ours.eval()
    module.eval()
    np.testing.assert_allclose(ours(x), module(torch.from_numpy(x)).detach().numpy(), atol=1e-12)
