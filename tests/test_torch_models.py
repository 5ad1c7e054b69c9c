"""fastbn.torch in models: convert/revert, torch's fallbacks, training curves (the contract).

- ``convert`` and ``revert`` on a nested model: which layers change, and that
  parameters (the same objects), buffers, requires_grad, training mode,
  hooks and optimizers survive;
- the calls that must take torch's own op (bfloat16, float16, torch.jit trace
  and script) give torch's results, and ``import fastbn`` never imports torch;
- a small CNN and an MLP trained with converted layers follow torch's
  training curve step by step in float64.

The layer-level tests are in test_torch_bridge.py.
"""

import copy
import io

import pytest
from conftest import python_env, run_python

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import fastbn.torch as fbt  # noqa: E402

THEIRS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
OURS = {1: fbt.BatchNorm1d, 2: fbt.BatchNorm2d, 3: fbt.BatchNorm3d}
BN_ATTRIBUTES = ("num_features", "eps", "momentum", "affine", "track_running_stats", "training")


@pytest.fixture
def gen():
    """A torch generator with a fixed seed for every test."""
    return torch.Generator().manual_seed(20240612)


def randomize(gen, model):
    """Random parameters everywhere and non-trivial running statistics in every BatchNorm."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen, dtype=b.dtype))
            elif name.endswith("running_var"):
                b.copy_(torch.empty(b.shape, dtype=b.dtype).uniform_(0.5, 2, generator=gen))
            elif name.endswith("num_batches_tracked"):
                b.fill_(7)
    return model


class CustomBatchNorm1d(nn.BatchNorm1d):
    """Someone else's subclass of torch's BatchNorm1d: convert must leave it alone."""


class Net(nn.Module):
    """A nested model with every kind of BatchNorm convert meets."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, bias=False),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, eps=1e-3)),
        )
        self.sync = nn.SyncBatchNorm(4)
        self.custom = CustomBatchNorm1d(4)
        self.volume = nn.Sequential(nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2, momentum=None))
        self.head = nn.Sequential(
            nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5, affine=False), nn.Linear(5, 3)
        )
        self.done = fbt.BatchNorm1d(3, momentum=0.3)

    def forward(self, image, volume):
        a = self.custom(self.sync(self.features(image)).mean((2, 3)))
        b = self.volume(volume).mean((2, 3, 4))
        return self.done(self.head(torch.cat([a, b], 1)))


def net_inputs(gen, n=4):
    image = torch.randn(n, 2, 5, 5, generator=gen, dtype=torch.float64)
    volume = torch.randn(n, 1, 2, 3, 3, generator=gen, dtype=torch.float64)
    return image, volume


def make_net(gen):
    return randomize(gen, Net().double())


def batchnorms(model):
    """name -> module for every BatchNorm (any subclass of torch's _BatchNorm)."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }


def snapshot(model):
    """Everything convert and revert must keep."""
    return {
        "parameters": dict(model.named_parameters()),
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "attributes": {
            n: tuple(getattr(m, a) for a in BN_ATTRIBUTES) for n, m in batchnorms(model).items()
        },
        "training": {n: m.training for n, m in model.named_modules()},
        "state_dict_keys": list(model.state_dict()),
    }


def assert_kept(model, before):
    """Same Parameter objects, buffers of the same values and dtypes, same flags and modes."""
    after = snapshot(model)
    assert after["parameters"].keys() == before["parameters"].keys()
    for name, p in before["parameters"].items():
        assert after["parameters"][name] is p, name
    assert after["requires_grad"] == before["requires_grad"]
    assert after["buffers"].keys() == before["buffers"].keys()
    for name, b in before["buffers"].items():
        assert after["buffers"][name].dtype == b.dtype, name
        assert torch.equal(after["buffers"][name], b), name
    assert after["attributes"] == before["attributes"]
    assert after["training"] == before["training"]
    assert after["state_dict_keys"] == before["state_dict_keys"]


def assert_models_agree(ours, theirs, inputs, tol=1e-10):
    """Outputs, every parameter's gradient and the buffers afterwards within tol."""
    for model in (ours, theirs):
        model.zero_grad(set_to_none=True)
    results = []
    for model in (ours, theirs):
        y = model(*inputs)
        y.pow(2).sum().backward()
        results.append(y.detach())
    torch.testing.assert_close(results[0], results[1], rtol=tol, atol=tol)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=tol, msg=name)
    for (name, b), c in zip(ours.named_buffers(), theirs.buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=tol, atol=tol, msg=name)


# ---------------------------------------------------------------- convert and revert


def test_fastbn_modules_are_torchs_batchnorms():
    assert isinstance(fbt.BatchNorm1d(3), nn.BatchNorm1d)
    assert isinstance(fbt.BatchNorm2d(3), nn.BatchNorm2d)
    assert isinstance(fbt.BatchNorm3d(3), nn.BatchNorm3d)


def test_convert_replaces_exactly_torchs_batchnorms(gen):
    model = make_net(gen)
    model.features[1].eval()  # a layer in eval mode inside a model in training mode
    model.features[3][1].weight.requires_grad_(False)
    untouched = {name: model.get_submodule(name) for name in ("sync", "custom", "done")}
    reference = copy.deepcopy(model)
    before = snapshot(model)

    assert fbt.convert(model) is model
    kinds = {name: type(m) for name, m in batchnorms(model).items()}
    assert kinds == {
        "features.1": fbt.BatchNorm2d,
        "features.3.1": fbt.BatchNorm2d,
        "sync": nn.SyncBatchNorm,
        "custom": CustomBatchNorm1d,
        "volume.1": fbt.BatchNorm3d,
        "head.1": fbt.BatchNorm1d,
        "done": fbt.BatchNorm1d,
    }
    for name, module in untouched.items():
        assert model.get_submodule(name) is module, name
    assert_kept(model, before)
    assert not model.features[1].training and model.features[3][1].training
    assert_models_agree(model, reference, net_inputs(gen))
    model.eval()
    reference.eval()
    assert_models_agree(model, reference, net_inputs(gen))


def test_optimizer_built_before_convert_still_works(gen):
    model = make_net(gen)
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    fbt.convert(model)
    for _ in range(3):
        inputs = net_inputs(gen)
        for m, opt in ((model, optimizer), (reference, reference_optimizer)):
            opt.zero_grad()
            m(*inputs).pow(2).sum().backward()
            opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10, msg=name)
    assert int(model.features[1].num_batches_tracked) == 7 + 3


def test_hooks_registered_on_a_batchnorm_survive_convert_and_revert(gen):
    model = make_net(gen)
    bn = model.features[1]
    calls = []
    bn.register_forward_pre_hook(lambda m, args: calls.append(("pre", type(m))))
    bn.register_forward_hook(lambda m, args, out: calls.append(("post", type(m))))
    fbt.convert(model)
    model(*net_inputs(gen))
    assert calls == [("pre", fbt.BatchNorm2d), ("post", fbt.BatchNorm2d)]
    fbt.revert(model)
    calls.clear()
    model(*net_inputs(gen))
    assert calls == [("pre", nn.BatchNorm2d), ("post", nn.BatchNorm2d)]


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_bare_batchnorm_root_comes_back_replaced(gen, dim):
    bn = randomize(gen, THEIRS[dim](3, eps=1e-3, momentum=None).double()).eval()
    bn.bias.requires_grad_(False)
    before = snapshot(bn)
    converted = fbt.convert(bn)
    assert type(converted) is OURS[dim]
    assert_kept(converted, before)
    reverted = fbt.revert(converted)
    assert type(reverted) is THEIRS[dim]
    assert_kept(reverted, before)


def test_revert_gives_torchs_exact_classes_with_the_same_state(gen):
    model = fbt.convert(make_net(gen))
    model(*net_inputs(gen))  # move the running statistics
    converted = copy.deepcopy(model)
    before = snapshot(model)
    assert fbt.revert(model) is model
    kinds = {name: type(m) for name, m in batchnorms(model).items()}
    assert kinds == {
        "features.1": nn.BatchNorm2d,
        "features.3.1": nn.BatchNorm2d,
        "sync": nn.SyncBatchNorm,
        "custom": CustomBatchNorm1d,
        "volume.1": nn.BatchNorm3d,
        "head.1": nn.BatchNorm1d,
        "done": nn.BatchNorm1d,  # built as fastbn's, reverted all the same
    }
    assert_kept(model, before)
    assert_models_agree(converted, model, net_inputs(gen))
    model.eval()
    converted.eval()
    assert_models_agree(converted, model, net_inputs(gen))


def test_converted_model_deepcopies_saves_and_loads(gen):
    model = fbt.convert(make_net(gen)).eval()
    inputs = net_inputs(gen)
    expected = model(*inputs)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert {n: type(m) for n, m in batchnorms(other).items()} == {
            n: type(m) for n, m in batchnorms(model).items()
        }
        torch.testing.assert_close(other(*inputs), expected, rtol=0, atol=0)
    # A torch model's state_dict loads into the converted one and back.
    plain = Net().double()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(plain.eval()(*inputs), expected, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- torch's op where fastbn's cannot


@pytest.mark.parametrize("module_dtype", ["same", "float32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_takes_torchs_op(gen, dtype, module_dtype):
    module_dtype = dtype if module_dtype == "same" else torch.float32
    theirs = randomize(gen, nn.BatchNorm2d(3)).to(module_dtype)
    ours = fbt.convert(copy.deepcopy(theirs))
    for step in range(4):
        training = step < 3
        ours.train(training)
        theirs.train(training)
        x = (2 * torch.randn(2, 3, 4, 4, generator=gen) + 1).to(dtype)
        if step == 1:
            x = x.contiguous(memory_format=torch.channels_last)
        dy = torch.randn(x.shape, generator=gen).to(dtype)
        results = []
        for module in (ours, theirs):
            module.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_()
            y = module(xi)
            y.backward(dy)
            results.append((y, xi.grad, module.weight.grad, module.bias.grad))
        for what, mine, expected in zip(("y", "dx", "dw", "db"), *results, strict=True):
            assert mine.dtype == expected.dtype, what
            assert torch.equal(mine, expected), (what, step)
        for mine, expected in zip(ours.buffers(), theirs.buffers(), strict=True):
            assert torch.equal(mine, expected)
    # The functional API too.
    x = torch.randn(6, 3, generator=gen).to(dtype)
    w = torch.rand(3, generator=gen).to(dtype)
    rm, rv = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
    y = fbt.batch_norm(x, rm, rv, w, None, True, 0.1, 1e-5)
    rm2, rv2 = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
    expected = F.batch_norm(x, rm2, rv2, w, None, True, 0.1, 1e-5)
    assert torch.equal(y, expected) and torch.equal(rm, rm2) and torch.equal(rv, rv2)


class SmallNet(nn.Module):
    """conv-BN2d-ReLU, pool, linear-BN1d: what torch.jit has to handle."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None))

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def jit_pair(gen):
    theirs = randomize(gen, SmallNet().double())
    return fbt.convert(copy.deepcopy(theirs)), theirs


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_jit_trace_of_fastbn_layers_gives_torchs_results(gen, training):
    ours, theirs = jit_pair(gen)
    ours.train(training)
    theirs.train(training)
    example = torch.randn(4, 1, 5, 5, generator=gen, dtype=torch.float64)
    traced = torch.jit.trace(ours, example, check_trace=False)
    reference = torch.jit.trace(theirs, example, check_trace=False)
    for _ in range(2):
        x = torch.randn(5, 1, 5, 5, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(traced(x), reference(x), rtol=1e-10, atol=1e-10)
    for (name, b), c in zip(ours.named_buffers(), theirs.buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_jit_script_of_fastbn_layers_gives_torchs_results(gen):
    ours, theirs = jit_pair(gen)
    scripted = torch.jit.script(ours)
    for step in range(4):
        training = step < 3
        scripted.train(training)
        theirs.train(training)
        x = torch.randn(4, 1, 5, 5, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(scripted(x), theirs(x), rtol=1e-10, atol=1e-10)
    for (name, b), c in zip(scripted.named_buffers(), theirs.buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-10, msg=name)


def test_import_fastbn_never_imports_torch(subprocess_cache):
    code = (
        "import sys\n"
        "import fastbn, fastbn.functional, fastbn.layer, fastbn.nn, fastbn.kernels\n"
        "import fastbn.reference\n"
        "leaked = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not leaked, leaked\n"
    )
    run_python(code, python_env(subprocess_cache), timeout=120)


# ---------------------------------------------------------------- training curves


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 3),
    )


def mlp():
    return nn.Sequential(
        nn.Linear(10, 16, bias=False),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 16, bias=False),
        nn.BatchNorm1d(16, momentum=None),
        nn.ReLU(),
        nn.Linear(16, 3),
    )


# name -> (model, shape of one example, memory format of the images)
CURVES = {
    "cnn": (cnn, (1, 8, 8), None),
    "cnn_channels_last": (cnn, (1, 8, 8), torch.channels_last),
    "mlp": (mlp, (10,), None),
}


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("name", CURVES)
def test_training_curve_matches_torch(name):
    build, example, fmt = CURVES[name]
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    theirs = build().double()
    initial = [p.detach().clone() for p in theirs.parameters()]
    ours = fbt.convert(copy.deepcopy(theirs))
    assert {type(m) for m in ours.modules()} & set(OURS.values())
    assert not {type(m) for m in theirs.modules()} & set(OURS.values())
    data = torch.randn((128, *example), generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (128,), generator=gen)
    optimizers = [
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) for model in (ours, theirs)
    ]
    for step in range(30):
        batch = torch.randint(0, 128, (16,), generator=gen)
        x = data[batch]
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        losses = []
        for model, optimizer in zip((ours, theirs), optimizers, strict=True):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), labels[batch])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-8, abs=0), step
    # A real training run: every parameter moved.
    moved = [(p - p0).abs().max() for p, p0 in zip(theirs.parameters(), initial, strict=True)]
    assert min(moved) > 1e-2
    for (name_, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9, msg=name_)
    for (name_, b), c in zip(ours.named_buffers(), theirs.buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=1e-7, atol=1e-9, msg=name_)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(data), theirs(data), rtol=1e-7, atol=1e-9)
