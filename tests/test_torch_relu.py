"""fastbn.torch's fused batch norm + ReLU against torch's BatchNorm followed by nn.ReLU.

- `BatchNormReLU1d/2d/3d` against ``nn.Sequential(torch BatchNorm, nn.ReLU())``:
  outputs, gradients of input, weight and bias, running statistics over
  training steps and eval, both dtypes, contiguous and channels_last,
  affine=False and track_running_stats=False, under no_grad; ties (y == 0
  exactly) pass no gradient, as in torch's ReLU;
- ``convert(model, fuse_relu=True)`` on a small CNN: which modules fuse, the
  state_dict, the training curve of the unfused torch model; ``revert``;
- gradcheck and gradgradcheck in float64, torch.compile and torch.jit.script.

The inputs keep y away from ReLU's kink (`kink_free`), so that rounding,
which differs between the two implementations, never moves a value across it.
"""

import copy
import math

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import fastbn.torch as fbt  # noqa: E402

C = 4
F64 = torch.float64
CL = torch.channels_last
CL3 = torch.channels_last_3d
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = {"float64": torch.float64, "float32": torch.float32}
FUSED = {1: fbt.BatchNormReLU1d, 2: fbt.BatchNormReLU2d, 3: fbt.BatchNormReLU3d}
PLAIN = {1: fbt.BatchNorm1d, 2: fbt.BatchNorm2d, 3: fbt.BatchNorm3d}
THEIRS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}

# name -> (BatchNorm dimension, input shape with an even count per channel, memory format)
LAYOUTS = {
    "nc": (1, (12, C), None),
    "ncl": (1, (4, C, 5), None),
    "nchw": (2, (3, C, 4, 5), None),
    "nchw_channels_last": (2, (3, C, 4, 5), CL),
    "ncdhw": (3, (2, C, 3, 2, 4), None),
    "ncdhw_channels_last_3d": (3, (2, C, 3, 2, 4), CL3),
}


@pytest.fixture
def gen():
    """A torch generator with a fixed seed for every test."""
    return torch.Generator().manual_seed(20250611)


@pytest.fixture
def fresh_dynamo():
    """Empty dynamo caches before and after: compiles of one test never leak into another."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def per_channel(shape):
    """The number of values of each channel in an (N, C, *) input."""
    return math.prod(shape) // shape[1]


def kink_free(gen, shape, dtype=F64, memory_format=None, center=None, scale=None):
    """Input whose normalized values x_hat keep away from 0.

    Each channel's values come in pairs center +- scale * a with a >= 0.3,
    so that its batch mean is center and |x_hat| = a / rms(a) >= 0.3 / rms(a),
    about 0.2 or more; with ``center`` the running mean and ``scale``
    sqrt(running_var + eps), the eval x_hat is +-a itself. Random centers
    and scales if not given.
    """
    c, m = shape[1], per_channel(shape)
    a = 0.3 + torch.randn(c, m // 2, generator=gen, dtype=F64).abs()
    signed = torch.cat([a, -a], dim=1)
    order = torch.argsort(torch.rand(c, m, generator=gen), dim=1)
    signed = torch.gather(signed, 1, order)
    if center is None:
        center = torch.empty(c, dtype=F64).uniform_(-1, 1, generator=gen)
        scale = torch.empty(c, dtype=F64).uniform_(0.5, 2, generator=gen)
    values = center.to(F64)[:, None] + scale.to(F64)[:, None] * signed
    x = values.reshape(c, shape[0], *shape[2:]).transpose(0, 1).to(dtype)
    x = x.contiguous() if memory_format is None else x.contiguous(memory_format=memory_format)
    assert x.shape == shape
    return x


def kink_free_affine(gen, module):
    """Weight of either sign, |weight| in [0.5, 2]; bias = weight * u, |u| <= 0.1.

    y = weight * (x_hat + u) then keeps away from 0 with `kink_free` input
    (tests that need the margin assert it). Channel 0 has u = 5 and channel
    1 u = -5: every y of one sign.
    """
    c = module.num_features
    sign = torch.where(torch.rand(c, generator=gen) < 0.5, -1.0, 1.0)
    weight = torch.empty(c).uniform_(0.5, 2, generator=gen) * sign
    u = torch.empty(c).uniform_(-0.1, 0.1, generator=gen)
    u[:2] = torch.tensor([5.0, -5.0])
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(weight * u)


def make_pair(gen, dim, dtype=F64, **kwargs):
    """(BatchNormReLU{dim}d, nn.Sequential(torch's BatchNorm{dim}d, nn.ReLU())), same state."""
    theirs = nn.Sequential(THEIRS[dim](C, dtype=dtype, **kwargs), nn.ReLU())
    if theirs[0].affine:
        kink_free_affine(gen, theirs[0])
    ours = FUSED[dim](C, dtype=dtype, **kwargs)
    ours.load_state_dict(theirs[0].state_dict())
    return ours, theirs


def run(module, x, dy, parameters):
    """Forward a fresh leaf x, backward dy: y, dx and the gradients of ``parameters``."""
    x = x.detach().clone().requires_grad_()
    for p in parameters:
        p.grad = None
    y = module(x)
    y.backward(dy)
    return {"y": y.detach(), "dx": x.grad, **{f"d{i}": p.grad for i, p in enumerate(parameters)}}


def assert_close(actual, expected, tol, context):
    torch.testing.assert_close(
        actual, expected, rtol=tol, atol=tol, msg=lambda m: f"{context}: {m}"
    )


def assert_buffers_close(ours, bn, tol, context):
    assert_close(ours.running_mean, bn.running_mean, tol, f"running_mean, {context}")
    assert_close(ours.running_var, bn.running_var, tol, f"running_var, {context}")
    assert int(ours.num_batches_tracked) == int(bn.num_batches_tracked), context


def pre_relu(bn, x):
    """torch's BatchNorm output without running-statistics side effects (a copy of bn)."""
    with torch.no_grad():
        return copy.deepcopy(bn)(x)


# ---------------------------------------------------------------- the modules


def test_modules_subclass_fastbns_and_torchs():
    """BatchNormReLU{n}d is fastbn's BatchNorm{n}d, so torch's, with their state_dict keys."""
    for dim, cls in FUSED.items():
        module = cls(C)
        assert isinstance(module, PLAIN[dim]) and isinstance(module, THEIRS[dim])
        assert module.fused_relu and not PLAIN[dim](C).fused_relu
        assert list(module.state_dict()) == list(THEIRS[dim](C).state_dict())


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_steps_then_eval_match_bn_then_relu(gen, layout, dtype, momentum):
    """Three training steps and an eval step: y, dx, dweight, dbias and the buffers."""
    dim, shape, fmt = LAYOUTS[layout]
    dtype = DTYPES[dtype]
    tol = TOL[dtype]
    m = per_channel(shape)
    ours, theirs = make_pair(gen, dim, dtype, momentum=momentum)
    bn = theirs[0]
    for step in range(4):
        if step == 3:
            ours.eval()
            theirs.eval()
            scale = (bn.running_var.to(F64) + bn.eps).sqrt()
            x = kink_free(gen, shape, dtype, fmt, center=bn.running_mean, scale=scale)
        else:
            x = kink_free(gen, shape, dtype, fmt)
        assert pre_relu(bn, x).abs().min() > 1e-3
        dy = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
        mine = run(ours, x, dy, [ours.weight, ours.bias])
        expected = run(theirs, x, dy, [bn.weight, bn.bias])
        context = f"step {step}"
        assert_close(mine["y"], expected["y"], tol, f"y, {context}")
        assert_close(mine["dx"], expected["dx"], tol, f"dx, {context}")
        assert_close(mine["d0"], expected["d0"], tol * m**0.5, f"dweight, {context}")
        assert_close(mine["d1"], expected["d1"], tol * m**0.5, f"dbias, {context}")
        assert_buffers_close(ours, bn, tol, context)
        if fmt is not None:
            assert mine["y"].is_contiguous(memory_format=fmt)
            assert mine["dx"].is_contiguous(memory_format=fmt)
        # Not vacuous: the ReLU cuts some values and lets others through.
        assert 0 < int((mine["y"] == 0).sum()) < mine["y"].numel()


# name -> constructor options away from the default
OPTIONS = {
    "affine_false": {"affine": False, "momentum": 0.5},
    "untracked": {"track_running_stats": False},
    "affine_false_untracked": {"affine": False, "track_running_stats": False},
}


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nc", "ncl", "nchw_channels_last", "ncdhw_channels_last_3d"])
def test_without_affine_or_running_stats_matches_bn_then_relu(gen, layout, dtype, options):
    """affine=False, track_running_stats=False: three training steps and eval, as torch's.

    Without running statistics, eval normalizes with the batch's too (torch's rule).
    """
    dim, shape, fmt = LAYOUTS[layout]
    dtype = DTYPES[dtype]
    tol = TOL[dtype]
    m = per_channel(shape)
    ours, theirs = make_pair(gen, dim, dtype, **OPTIONS[options])
    bn = theirs[0]
    assert (ours.weight is None) is (not bn.affine)
    assert (ours.running_mean is None) is (not bn.track_running_stats)
    parameters = {"ours": [], "theirs": []}
    if bn.affine:
        parameters = {"ours": [ours.weight, ours.bias], "theirs": [bn.weight, bn.bias]}
    for step in range(4):
        training = step < 3
        ours.train(training)
        theirs.train(training)
        if not training and bn.track_running_stats:
            scale = (bn.running_var.to(F64) + bn.eps).sqrt()
            x = kink_free(gen, shape, dtype, fmt, center=bn.running_mean, scale=scale)
        else:
            x = kink_free(gen, shape, dtype, fmt)
        assert pre_relu(bn, x).abs().min() > 1e-3
        dy = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
        mine = run(ours, x, dy, parameters["ours"])
        expected = run(theirs, x, dy, parameters["theirs"])
        context = f"step {step}"
        assert mine.keys() == expected.keys()
        for key, value in expected.items():
            scale = m**0.5 if key in ("d0", "d1") else 1.0  # sums of m terms
            assert_close(mine[key], value, tol * scale, f"{key}, {context}")
        if bn.track_running_stats:
            assert_buffers_close(ours, bn, tol, context)
        else:
            assert ours.running_mean is None and ours.num_batches_tracked is None
        if fmt is not None:
            assert mine["y"].is_contiguous(memory_format=fmt)
            assert mine["dx"].is_contiguous(memory_format=fmt)
        assert 0 < int((mine["y"] == 0).sum()) < mine["y"].numel()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_no_grad_forward(gen, dtype, training):
    """Under no_grad (the kernels without autograd), y and the buffers as torch's."""
    dtype = DTYPES[dtype]
    ours, theirs = make_pair(gen, 2, dtype)
    ours.train(training)
    theirs.train(training)
    bn = theirs[0]
    for _ in range(2):
        if training:
            x = kink_free(gen, (3, C, 4, 5), dtype, CL)
        else:
            scale = (bn.running_var.to(F64) + bn.eps).sqrt()
            x = kink_free(gen, (3, C, 4, 5), dtype, CL, center=bn.running_mean, scale=scale)
        with torch.no_grad():
            y = ours(x)
            expected = theirs(x)
        assert not y.requires_grad
        assert_close(y, expected, TOL[dtype], "y")
        assert y.is_contiguous(memory_format=CL)
        assert_buffers_close(ours, bn, TOL[dtype], "no_grad")


def test_frozen_parameters(gen):
    """Only the input requires grad: dx as torch's, no parameter gradients."""
    ours, theirs = make_pair(gen, 2)
    for p in [*ours.parameters(), *theirs.parameters()]:
        p.requires_grad_(False)
    x = kink_free(gen, (3, C, 4, 5))
    dy = torch.randn(x.shape, generator=gen, dtype=F64)
    mine = run(ours, x, dy, [])
    expected = run(theirs, x, dy, [])
    assert_close(mine["dx"], expected["dx"], 1e-10, "dx")
    assert ours.weight.grad is None and ours.bias.grad is None


# name -> (BatchNorm dimension, input shape with an odd count per channel, memory format)
TIE_LAYOUTS = {
    "nc": (1, (13, C), None),
    "nchw": (2, (3, C, 3, 5), None),
    "nchw_channels_last": (2, (3, C, 3, 5), CL),
}


def tied_input(gen, shape, dtype):
    """Each channel: integers k in [-3, 3] in +-k pairs, and 0 itself three times.

    The batch mean is 0 exactly, so with bias 0 y is exactly 0 where x == 0,
    in torch too (which computes y = x * a + (bias - mean * a)).
    """
    c, m = shape[1], per_channel(shape)
    k = torch.randint(1, 4, (c, (m - 3) // 2), generator=gen).to(F64)
    signed = torch.cat([k, -k, torch.zeros(c, 3, dtype=F64)], dim=1)
    signed = torch.gather(signed, 1, torch.argsort(torch.rand(c, m, generator=gen), dim=1))
    return signed.reshape(c, shape[0], *shape[2:]).transpose(0, 1).contiguous().to(dtype)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", TIE_LAYOUTS)
def test_ties_pass_no_gradient_as_torchs_relu(gen, layout, dtype, training):
    """y == 0 exactly: torch's ReLU passes no gradient there, and neither does the fused one.

    dy is positive, so that a tie letting dy through would add at least 3
    to its channel's dbias.
    """
    dim, shape, fmt = TIE_LAYOUTS[layout]
    dtype = DTYPES[dtype]
    ours, theirs = make_pair(gen, dim, dtype)
    with torch.no_grad():
        for module in (ours, theirs[0]):
            module.bias.zero_()
            module.running_mean.zero_()
    ours.train(training)
    theirs.train(training)
    x = tied_input(gen, shape, dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    ties = x == 0
    dy = (1 + torch.rand(shape, generator=gen, dtype=F64)).to(dtype)
    mine = run(ours, x, dy, [ours.weight, ours.bias])
    expected = run(theirs, x, dy, [theirs[0].weight, theirs[0].bias])
    assert bool((pre_relu(theirs[0], x)[ties] == 0).all())
    assert bool((mine["y"][ties] == 0).all())
    tol = TOL[dtype]
    assert_close(mine["dx"], expected["dx"], tol, "dx")
    assert_close(mine["d1"], expected["d1"], tol * 10, "dbias")
    reduce = [0, *range(2, x.dim())]
    through_ties = torch.where(ties, dy, 0).sum(reduce)
    assert bool((through_ties >= 3).all())
    if not training:  # dx = weight * invstd * dy where y > 0: exactly 0 at the ties
        assert bool((mine["dx"][ties] == 0).all())


def test_eval_backward_of_infinite_input_matches_torch(gen):
    """x = +inf in eval: y = +inf passes the ReLU, and torch's dx there is weight * invstd * dy."""
    ours, theirs = make_pair(gen, 2)
    with torch.no_grad():
        for module in (ours, theirs[0]):
            module.weight.abs_()
    ours.eval()
    theirs.eval()
    x = kink_free(gen, (3, C, 4, 5))
    x[1, 2, 3, 4] = float("inf")
    dy = torch.randn(x.shape, generator=gen, dtype=F64)
    mine = run(ours, x, dy, [ours.weight, ours.bias])
    expected = run(theirs, x, dy, [theirs[0].weight, theirs[0].bias])
    assert torch.isfinite(expected["dx"]).all()
    assert_close(mine["dx"], expected["dx"], 1e-10, "dx")


# ---------------------------------------------------------------- convert and revert


def cnn():
    """Conv-BN-ReLU blocks in Sequentials, a BN not followed by ReLU, a ReLU not after a BN."""
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Sequential(
            nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(inplace=True)
        ),
        nn.Conv2d(6, 6, 1, bias=False),
        nn.BatchNorm2d(6),  # followed by a pool: stays a plain batch norm
        nn.MaxPool2d(2),
        nn.ReLU(),  # after a pool: stays
        # A ReLU in the Sequential after the one its batch norm ends: not fused.
        nn.Sequential(nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6)),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 8, bias=False),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )


def module_types(model):
    return {name: type(module) for name, module in model.named_modules()}


# name -> the type convert(fuse_relu=True) gives it; every other module keeps its type.
FUSED_TYPES = {
    "0.1": fbt.BatchNormReLU2d,
    "0.2": nn.Identity,
    "1.1": fbt.BatchNormReLU2d,
    "1.2": nn.Identity,
    "3": fbt.BatchNorm2d,
    "6.1": fbt.BatchNorm2d,
    "10": fbt.BatchNormReLU1d,
    "11": nn.Identity,
}


def test_convert_fuses_exactly_bn_then_relu_in_a_sequential():
    torch.manual_seed(0)
    theirs = cnn().double()
    ours = fbt.convert(copy.deepcopy(theirs), fuse_relu=True)
    before, after = module_types(theirs), module_types(ours)
    assert after.keys() == before.keys()
    for name, kind in before.items():
        assert after[name] is FUSED_TYPES.get(name, kind), name
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    # Without fuse_relu, only the batch norms change; converting again then fuses them.
    plain = fbt.convert(copy.deepcopy(theirs))
    assert module_types(plain)["0.1"] is fbt.BatchNorm2d and module_types(plain)["0.2"] is nn.ReLU
    assert module_types(fbt.convert(plain, fuse_relu=True)) == after


def test_revert_restores_torchs_modules():
    torch.manual_seed(0)
    theirs = cnn().double()
    ours = fbt.revert(fbt.convert(copy.deepcopy(theirs), fuse_relu=True))
    assert module_types(ours) == module_types(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(5, 1, 8, 8, dtype=F64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    # A BatchNormReLU made as such (no Identity after it) stays as it is.
    direct = nn.Sequential(fbt.BatchNormReLU2d(3), nn.Conv2d(3, 3, 1))
    assert type(fbt.revert(direct)[0]) is fbt.BatchNormReLU2d


@pytest.mark.parametrize("fmt", [None, CL], ids=["contiguous", "channels_last"])
def test_fused_training_curve_matches_unfused_torch(fmt):
    """SGD steps, float64: losses, parameters, buffers and eval outputs to 1e-10."""
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    theirs = cnn().double()
    ours = fbt.convert(copy.deepcopy(theirs), fuse_relu=True)
    data = torch.randn((64, 1, 8, 8), generator=gen, dtype=F64)
    labels = torch.randint(0, 3, (64,), generator=gen)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ours, theirs)]
    initial = [p.detach().clone() for p in theirs.parameters()]
    for step in range(6):
        batch = torch.randint(0, 64, (16,), generator=gen)
        x = data[batch] if fmt is None else data[batch].contiguous(memory_format=fmt)
        losses = []
        for model, optimizer in zip((ours, theirs), optimizers, strict=True):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), labels[batch])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-10, abs=0), step
    moved = [(p - p0).abs().max() for p, p0 in zip(theirs.parameters(), initial, strict=True)]
    assert min(moved) > 1e-3
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert_close(p, q, 1e-10, name)
    for (name, b), c in zip(ours.named_buffers(), theirs.buffers(), strict=True):
        assert_close(b, c, 1e-10, name)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        assert_close(ours(data), theirs(data), 1e-10, "eval")


# ---------------------------------------------------------------- autograd checks


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nc", "ncl", "nchw_channels_last", "ncdhw"])
def test_gradcheck_and_gradgradcheck(gen, layout, training):
    """In float64, with y away from the kink (x, and the parameters gradcheck perturbs)."""
    dim, shape, fmt = LAYOUTS[layout]
    bn = FUSED[dim](C, dtype=F64).train(training)
    kink_free_affine(gen, bn)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1, generator=gen)
        bn.running_var.uniform_(0.5, 2, generator=gen)
    if training:
        x = kink_free(gen, shape, F64, fmt)
    else:
        scale = (bn.running_var + bn.eps).sqrt()
        x = kink_free(gen, shape, F64, fmt, center=bn.running_mean, scale=scale)
    x.requires_grad_()
    weight = bn.weight.detach().clone().requires_grad_()
    bias = bn.bias.detach().clone().requires_grad_()
    state = {"running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone()}

    def f(x, weight, bias):
        buffers = {name: t.clone() for name, t in state.items()}
        return torch.func.functional_call(bn, {"weight": weight, "bias": bias, **buffers}, (x,))

    y = f(x, weight, bias)
    assert 0 < int((y == 0).sum()) < y.numel()
    assert torch.autograd.gradcheck(f, (x, weight, bias))
    assert torch.autograd.gradgradcheck(f, (x, weight, bias))


# ---------------------------------------------------------------- compile and script


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method`:DeprecationWarning")
def test_compiled_matches_eager(gen, fresh_dynamo):
    """torch.compile(fullgraph=True) of a fused model: training steps, then eval, as eager.

    The graphs call fastbn's ops (then torch.relu), not torch's batch norm.
    """
    from torch._inductor.compile_fx import compile_fx

    graphs = []

    def recording_inductor(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    torch.manual_seed(3)
    eager = fbt.convert(cnn().double(), fuse_relu=True)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend=recording_inductor, fullgraph=True)
    for step in range(3):
        training = step < 2
        model.train(training)
        eager.train(training)
        x = torch.randn(8, 1, 8, 8, generator=gen, dtype=F64)
        dy = torch.randn(8, 3, generator=gen, dtype=F64)
        mine = run(compiled, x, dy, list(model.parameters()))
        expected = run(eager, x, dy, list(eager.parameters()))
        assert mine.keys() == expected.keys()
        for key, value in expected.items():
            assert_close(mine[key], value, 1e-10, f"{key}, step {step}")
        for (name, b), c in zip(model.named_buffers(), eager.buffers(), strict=True):
            assert_close(b, c, 1e-10, f"{name}, step {step}")
    called = {
        getattr(node.target, "__name__", str(node.target))
        for gm in graphs
        for node in gm.graph.nodes
        if node.op == "call_function"
    }
    # torch's batch norm, which inductor fuses: native_batch_norm (training, giving the
    # statistics for fastbn's running-statistics rule) and batch_norm (eval), then relu.
    assert {"native_batch_norm", "batch_norm", "relu"} <= called, called


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_jit_script_matches_eager(gen):
    """Scripted, a BatchNormReLU2d runs torch's batch norm then torch.relu: eager's results."""
    eager, _ = make_pair(gen, 2)
    scripted = torch.jit.script(copy.deepcopy(eager))
    for step in range(4):
        training = step < 3
        scripted.train(training)
        eager.train(training)
        x = kink_free(gen, (3, C, 4, 5), F64, CL)
        y = scripted(x)
        assert_close(y, eager(x), 1e-10, f"step {step}")
        assert bool((y == 0).any())
        for (name, b), c in zip(scripted.named_buffers(), eager.buffers(), strict=True):
            assert_close(b, c, 1e-10, f"{name}, step {step}")


@pytest.mark.parametrize("inplace", [False, True])
def test_revert_gives_back_the_relu_with_its_inplace_flag(inplace):
    model = nn.Sequential(nn.BatchNorm1d(3), nn.ReLU(inplace=inplace), nn.Linear(3, 2))
    fbt.convert(model, fuse_relu=True)
    assert type(model[0]) is fbt.BatchNormReLU1d and type(model[1]) is nn.Identity
    fbt.revert(model)
    assert type(model[0]) is nn.BatchNorm1d and type(model[1]) is nn.ReLU
    assert model[1].inplace is inplace
    assert "_relu_inplace" not in model[0].__dict__
