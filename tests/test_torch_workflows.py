"""fastbn.torch as a drop-in for torch's BatchNorm in the workflows people use.

The promise is the contract page's (docs/guide/contract.md, the PyTorch bridge).

Every comparison test takes the ``bridge`` fixture, parametrized over
``"torch"`` and ``"fastbn"``: in ``"torch"`` mode the modules under test are
torch's own (``convert`` is the identity, ``batch_norm`` is
``F.batch_norm``), which proves that the test itself states torch's
behaviour; ``-k "not fastbn"`` runs only that sanity mode. No test name
contains "fastbn".

- building blocks of real CNNs (ResNet BasicBlock with a downsample branch,
  MobileNetV2 inverted residual, an MBConv with squeeze-excitation, SiLU,
  Hardswish and Hardsigmoid, conv-BN-Hardtanh), NCHW and channels_last: three
  SGD steps with momentum, then eval, equal to torch's step by step, each
  BatchNorm's output with torch's strides;
- in-place ops on the output (``add_``, ``relu_``) in every layout, train and
  eval, for the modules, the functional op and fastbn's variants (fused ReLU,
  Batch Renormalization, ghost batch norm), and outputs that are not views;
- pruning (``torch.nn.utils.prune``) and parametrizations of weight and bias;
- autograd's check on tensors modified in place after the forward;
- saved-tensor hooks, ``save_on_cpu``, checkpointing (reentrant or not, the
  running statistics updated twice as torch does) and what autograd keeps;
- torch.func (grad, vmap, jacrev, jacfwd, jvp, vjp, hessian) in eval, in
  train without running statistics, after ``replace_all_batch_norm_modules_``
  and, where torch raises, raising alike; ``functional_call``, model
  ensembling with ``stack_module_state``, forward-mode AD;
- torch.fx: ``symbolic_trace``, ``fuse``, ``fuse_modules`` and FX graph-mode
  quantization, after ``fbt.revert`` and directly on a converted model;
- DataLoader workers forked after the parent ran the parallel kernels, under
  every Numba threading layer;
- smaller differences: transposed 2-D input, a variance that overflows, the
  text of the wrong-channel-count errors;
- what matches torch already and must stay so: hooks (forward, pre-forward,
  full backward), autocast to bfloat16 on the CPU, ``torch.inference_mode``,
  save/load and deepcopy of fastbn's variants in the middle of training.

Plain layer semantics are in test_torch_bridge.py, convert/revert, save/load
of converted models, torch.jit and training curves in test_torch_models.py.
"""

import copy
import io
import json
import warnings

import numpy as np
import pytest
from conftest import python_env, run_python

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
import torch.nn.utils.parametrize as parametrize  # noqa: E402
import torch.nn.utils.prune as prune  # noqa: E402
from forward_ad_runs import forward_ad_runs  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

import fastbn.torch as fbt  # noqa: E402

C = 8
TOL = 1e-10  # float64: the contract's bound for the bridge
CL = torch.channels_last
CL3 = torch.channels_last_3d
THEIRS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
OURS = {1: fbt.BatchNorm1d, 2: fbt.BatchNorm2d, 3: fbt.BatchNorm3d}
RELU = {1: fbt.BatchNormReLU1d, 2: fbt.BatchNormReLU2d, 3: fbt.BatchNormReLU3d}
RENORM = {1: fbt.BatchRenorm1d, 2: fbt.BatchRenorm2d, 3: fbt.BatchRenorm3d}

# name -> (BatchNorm dimension, input shape, memory format or None)
LAYOUTS = {
    "nc": (1, (4, C), None),
    "ncl": (1, (4, C, 5), None),
    "nchw": (2, (4, C, 3, 4), None),
    "nchw_channels_last": (2, (4, C, 3, 4), CL),
    "ncdhw": (3, (4, C, 2, 3, 2), None),
    "ncdhw_channels_last_3d": (3, (4, C, 2, 3, 2), CL3),
}
TRAINING = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
# torch's forward-mode batch norm formulas are scripted on first use, which warns.
JIT_DEPRECATION = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)


# ---------------------------------------------------------------- the modules under test


class Bridge:
    """The BatchNorm under test: torch's own (``"torch"``, the sanity mode) or fastbn's.

    fastbn's modules on either implementation: ``"fastbn"`` its kernels,
    ``"fastbn_torch_op"`` torch's op with fastbn's running-statistics rule (what
    small calls take by default); ``batch_norm`` is fastbn's functional in both.
    """

    def __init__(self, name):
        self.name = name
        self.fast = name != "torch"
        self.implementation = "torch" if name == "fastbn_torch_op" else "fastbn"

    def __repr__(self):
        return self.name

    def convert(self, model):
        return fbt.convert(model, implementation=self.implementation) if self.fast else model

    def revert(self, model):
        return fbt.revert(model) if self.fast else model

    def batch_norm(self, *args, **kwargs):
        return (fbt.batch_norm if self.fast else F.batch_norm)(*args, **kwargs)

    def assert_converted(self, model):
        """Every BatchNorm in model is fastbn's (fastbn mode) or torch's (torch mode)."""
        found = batchnorms(model)
        assert found, "no BatchNorm in the model"
        for name, m in found.items():
            is_ours = type(m).__module__.startswith("fastbn.")
            assert is_ours == self.fast, (name, type(m))

    def variant(self, kind, dim, gen):
        """fastbn's fused ReLU, Batch Renormalization or ghost batch norm (virtual batch 2).

        In torch mode, torch's nearest module: plain BatchNorm, or BatchNorm then a ReLU
        that saves its input (``nn.Threshold(0, 0)``): ``nn.ReLU`` saves its output, which
        in-place ops then break, where fastbn's fused ReLU recomputes its mask from the input.
        """
        if self.fast:
            cls = {"relu": RELU[dim], "renorm": RENORM[dim], "ghost": OURS[dim]}[kind]
            kwargs = {"virtual_batch_size": 2} if kind == "ghost" else {}
            if kind != "renorm":  # Batch Renormalization runs on fastbn's kernels only
                kwargs["implementation"] = self.implementation
            bn = randomize_bn(gen, cls(C, dtype=torch.float64, **kwargs))
            return bn
        bn = randomize_bn(gen, THEIRS[dim](C, dtype=torch.float64))
        return nn.Sequential(bn, nn.Threshold(0.0, 0.0)) if kind == "relu" else bn


@pytest.fixture(params=["torch", "fastbn", "fastbn_torch_op"])
def bridge(request):
    """Which BatchNorm the comparison tests run: torch's (sanity) or fastbn's."""
    return Bridge(request.param)


@pytest.fixture
def gen():
    """A torch generator with a fixed seed for every test."""
    return torch.Generator().manual_seed(20240613)


# ---------------------------------------------------------------- helpers


def batchnorms(model):
    """name -> module for every BatchNorm (any subclass of torch's _BatchNorm)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}


def channel_view(t, ndim):
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def make_input(gen, shape, memory_format=None, dtype=torch.float64):
    """Unit-scale data, each channel its own offset in [-1, 1] and scale in [0.5, 2]."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    c = shape[1]
    offset = torch.empty(c, dtype=torch.float64).uniform_(-1, 1, generator=gen)
    scale = torch.empty(c, dtype=torch.float64).uniform_(0.5, 2, generator=gen)
    x = (x * channel_view(scale, len(shape)) + channel_view(offset, len(shape))).to(dtype)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    return x


def randomize_bn(gen, bn):
    """Weight of either sign, magnitude in [0.5, 2], bias normal; running stats as trained."""
    c = bn.num_features
    with torch.no_grad():
        if bn.weight is not None:
            sign = torch.where(torch.rand(c, generator=gen) < 0.5, -1.0, 1.0)
            bn.weight.copy_(torch.empty(c).uniform_(0.5, 2, generator=gen) * sign)
            bn.bias.copy_(torch.randn(c, generator=gen))
        if bn.running_mean is not None:
            bn.running_mean.copy_(0.3 * torch.randn(c, generator=gen))
            bn.running_var.copy_(torch.empty(c).uniform_(0.5, 2, generator=gen))
            bn.num_batches_tracked.fill_(3)
    return bn


def build(gen, factory, dtype=torch.float64):
    """factory() initialized by torch from a seed drawn from gen; its BatchNorms randomized."""
    seed = int(torch.randint(2**31, (1,), generator=gen))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = factory().to(dtype)
    for bn in batchnorms(model).values():
        randomize_bn(gen, bn)
    return model


def close(actual, expected, msg="", tol=TOL):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=lambda m: f"{msg}: {m}")


def assert_same_state(ours, theirs, *, grads=True, tol=TOL, context=""):
    """Parameters (and their gradients), buffers equal; num_batches_tracked exactly."""
    ours_params = dict(ours.named_parameters())
    theirs_params = dict(theirs.named_parameters())
    assert ours_params.keys() == theirs_params.keys()
    for name, q in theirs_params.items():
        p = ours_params[name]
        close(p.detach(), q.detach(), f"{name} {context}", tol)
        if grads:
            if q.grad is None:
                assert p.grad is None, f"{name}.grad {context}"
            else:
                assert p.grad is not None, f"{name}.grad missing {context}"
                close(p.grad, q.grad, f"{name}.grad {context}", tol)
    ours_buffers = dict(ours.named_buffers())
    theirs_buffers = dict(theirs.named_buffers())
    assert ours_buffers.keys() == theirs_buffers.keys()
    for name, c in theirs_buffers.items():
        b = ours_buffers[name]
        if c.dtype == torch.long:
            assert torch.equal(b, c), f"{name} {context}: {b} != {c}"
        else:
            close(b, c, f"{name} {context}", tol)


def leaves(tree):
    """The tensors of nested tuples, lists and dicts, in order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [leaf for key in sorted(tree) for leaf in leaves(tree[key])]
    if isinstance(tree, (tuple, list)):
        return [leaf for item in tree for leaf in leaves(item)]
    raise TypeError(type(tree))


def outcome(fn):
    """(fn(), None), or (None, the exception fn raised)."""
    try:
        return fn(), None
    except Exception as exc:  # compared with torch's outcome by the caller
        return None, exc


def assert_same_outcome(ours, theirs, tol=TOL):
    """Both raised (ours an instance of torch's exception type), or both results equal.

    Returns whether torch's call succeeded.
    """
    (result, exc), (expected, expected_exc) = ours, theirs
    if expected_exc is not None:
        if exc is None:
            raise AssertionError(f"torch's raises {expected_exc!r}; this one did not")
        if not isinstance(exc, type(expected_exc)):
            raise AssertionError(f"torch's raises {expected_exc!r}; this one {exc!r}") from exc
        return False
    if exc is not None:
        raise AssertionError(f"torch's works; this one raised {exc!r}") from exc
    got, want = leaves(result), leaves(expected)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        close(a, b, f"result {i}", tol)
    return True


# ---------------------------------------------------------------- 1. blocks of real CNNs


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, with its downsampling shortcut."""

    def __init__(self, cin=C, cout=2 * C, stride=2):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
        )

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV2 block: expand, depthwise, project, residual."""

    def __init__(self, c=C, expand=4):
        super().__init__()
        hidden = c * expand
        self.conv = nn.Sequential(
            nn.Conv2d(c, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, c, 1, bias=False),
            nn.BatchNorm2d(c),
        )

    def forward(self, x):
        return x + self.conv(x)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation."""

    def __init__(self, c, squeeze, activation, scale_activation):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, c, 1)
        self.activation = activation
        self.scale_activation = scale_activation

    def forward(self, x):
        scale = self.avgpool(x)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        scale = self.scale_activation(scale)
        return scale * x


class MBConv(nn.Module):
    """EfficientNet / MobileNetV3 style: SiLU and Hardswish in place after BN, SE, residual."""

    def __init__(self, c=C, hidden=2 * C):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(c, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.SiLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.Hardswish(inplace=True),
            SqueezeExcitation(hidden, 4, nn.SiLU(inplace=True), nn.Hardsigmoid(inplace=True)),
            nn.Conv2d(hidden, c, 1, bias=False),
            nn.BatchNorm2d(c),
        )

    def forward(self, x):
        return self.block(x) + x


def conv_bn_hardtanh():
    return nn.Sequential(
        nn.Conv2d(C, C, 3, padding=1, bias=False),
        nn.BatchNorm2d(C),
        nn.Hardtanh(0, 6, inplace=True),
    )


BLOCKS = {
    "basic_block": BasicBlock,
    "inverted_residual": InvertedResidual,
    "squeeze_excitation": MBConv,
    "conv_bn_hardtanh": conv_bn_hardtanh,
}
FORMATS = {"nchw": torch.contiguous_format, "channels_last": CL}
IMAGES = (4, C, 8, 8)


def record_bn_strides(model):
    """A list that every BatchNorm's forward appends its output's strides to."""
    strides = []
    for m in batchnorms(model).values():
        m.register_forward_hook(lambda mod, args, out: strides.append(out.stride()))
    return strides


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("block", BLOCKS)
def test_cnn_block_trains_and_evaluates_as_torch(bridge, gen, block, fmt):
    memory_format = FORMATS[fmt]
    theirs = build(gen, BLOCKS[block]).to(memory_format=memory_format)
    ours = bridge.convert(copy.deepcopy(theirs))
    bridge.assert_converted(ours)
    models = (ours, theirs)
    strides = [record_bn_strides(m) for m in models]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    for step in range(3):
        x = make_input(gen, IMAGES, memory_format)
        target = None
        results = []
        for model, optimizer in zip(models, optimizers, strict=True):
            optimizer.zero_grad()
            y = model(x)
            if target is None:
                target = torch.randn(y.shape, generator=gen, dtype=y.dtype)
            loss = (y - target).pow(2).mean()
            loss.backward()
            results.append((y.detach(), loss.detach()))
        (y, loss), (expected_y, expected_loss) = results
        close(loss, expected_loss, f"loss, step {step}")
        close(y, expected_y, f"output, step {step}")
        assert y.stride() == expected_y.stride(), step
        assert y.is_contiguous(memory_format=memory_format)
        assert strides[0] == strides[1], step
        assert_same_state(ours, theirs, context=f"after backward {step}")
        for optimizer in optimizers:
            optimizer.step()
        assert_same_state(ours, theirs, grads=False, context=f"after step {step}")
    # Eval, without and with autograd.
    for model in models:
        model.eval()
    x = make_input(gen, IMAGES, memory_format)
    with torch.no_grad():
        y, expected_y = (model(x) for model in models)
    close(y, expected_y, "eval output")
    assert y.stride() == expected_y.stride()
    dxs = []
    for model in models:
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y = model(xi)
        y.backward(torch.ones_like(y) + y.detach().sin())
        dxs.append(xi.grad)
    close(dxs[0], dxs[1], "eval dx")
    assert dxs[0].stride() == dxs[1].stride()
    assert_same_state(ours, theirs, context="eval backward")


# ---------------------------------------------------------------- 2. in-place ops after BN


def inplace_tail(y):
    """What a residual add and ReLU(inplace=True) do to the BatchNorm's output."""
    y.add_(-0.5)
    torch.relu_(y)
    return y


def out_of_place_tail(y):
    return (y - 0.5).relu()


def run_tail(fn, x, dy, params, tail):
    """fn on a fresh leaf copy of x, then tail, then backward dy.

    Returns (results, whether fn's output was not a view).
    """
    for p in params.values():
        p.grad = None
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    not_a_view = y._base is None
    y = tail(y)
    y.backward(dy)
    results = {"y": y.detach(), "dx": x.grad}
    results.update({f"d{name}": p.grad for name, p in params.items()})
    return results, not_a_view


def assert_results_close(ours, theirs, context=""):
    assert ours.keys() == theirs.keys()
    for what, expected in theirs.items():
        assert (ours[what] is None) == (expected is None), (what, context)
        if expected is not None:
            close(ours[what], expected, f"{what} {context}")


@TRAINING
@pytest.mark.parametrize("layout", LAYOUTS)
def test_inplace_ops_on_module_output_as_torch(bridge, gen, layout, training):
    dim, shape, fmt = LAYOUTS[layout]
    theirs = randomize_bn(gen, THEIRS[dim](C, dtype=torch.float64)).train(training)
    ours = bridge.convert(copy.deepcopy(theirs))
    x = make_input(gen, shape, fmt)
    dy = make_input(gen, shape, fmt)
    expected, theirs_not_view = run_tail(
        theirs, x, dy, dict(theirs.named_parameters()), inplace_tail
    )
    assert theirs_not_view
    results, not_a_view = run_tail(ours, x, dy, dict(ours.named_parameters()), inplace_tail)
    assert not_a_view, "the output is a view"
    assert_results_close(results, expected)
    assert results["y"].stride() == expected["y"].stride()
    assert_same_state(ours, theirs, grads=False)


@TRAINING
@pytest.mark.parametrize("layout", LAYOUTS)
def test_inplace_ops_on_functional_output_as_torch(bridge, gen, layout, training):
    dim, shape, fmt = LAYOUTS[layout]
    x = make_input(gen, shape, fmt)
    dy = make_input(gen, shape, fmt)
    bn = randomize_bn(gen, THEIRS[dim](C, dtype=torch.float64))
    outcomes = []
    for fn in (bridge.batch_norm, F.batch_norm):
        params = {name: p.detach().clone().requires_grad_() for name, p in bn.named_parameters()}
        rm, rv = bn.running_mean.clone(), bn.running_var.clone()

        def forward(x, fn=fn, params=params, rm=rm, rv=rv):
            return fn(x, rm, rv, params["weight"], params["bias"], training, 0.1, 1e-5)

        results, not_a_view = run_tail(forward, x, dy, params, inplace_tail)
        outcomes.append((results, not_a_view, rm, rv))
    (results, not_a_view, rm, rv), (expected, theirs_not_view, rm_t, rv_t) = outcomes
    assert theirs_not_view
    assert not_a_view, "the output is a view"
    assert_results_close(results, expected)
    close(rm, rm_t, "running_mean")
    close(rv, rv_t, "running_var")


@TRAINING
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["relu", "renorm", "ghost"])
def test_inplace_ops_on_variant_output_as_out_of_place(bridge, gen, kind, layout, training):
    """fastbn's variants: in place on the output equals the same module's out-of-place result."""
    dim, shape, fmt = LAYOUTS[layout]
    module = bridge.variant(kind, dim, gen).train(training)
    inplace, reference = copy.deepcopy(module), copy.deepcopy(module)
    x = make_input(gen, shape, fmt)
    dy = make_input(gen, shape, fmt)
    expected, _ = run_tail(reference, x, dy, dict(reference.named_parameters()), out_of_place_tail)
    results, not_a_view = run_tail(inplace, x, dy, dict(inplace.named_parameters()), inplace_tail)
    assert not_a_view, "the output is a view"
    assert_results_close(results, expected)
    assert results["y"].stride() == expected["y"].stride()
    assert_same_state(inplace, reference, grads=False)


# ---------------------------------------------------------------- 3. pruning, parametrizations


def module_run(module, x, dy):
    """Forward and backward on a fresh leaf: output, input gradient, every parameter's gradient."""
    results, _ = run_tail(module, x, dy, dict(module.named_parameters()), lambda y: y)
    return results


@TRAINING
@pytest.mark.parametrize("order", ["convert_then_prune", "prune_then_convert"])
@pytest.mark.parametrize("name", ["weight", "bias"])
def test_pruned_batchnorm_as_torch(bridge, gen, name, order, training):
    theirs = randomize_bn(gen, nn.BatchNorm2d(C, dtype=torch.float64)).train(training)
    ours = copy.deepcopy(theirs)
    if order == "convert_then_prune":
        ours = bridge.convert(ours)
        prune.l1_unstructured(ours, name, amount=0.5)
    else:
        prune.l1_unstructured(ours, name, amount=0.5)
        ours = bridge.convert(ours)
    bridge.assert_converted(ours)
    prune.l1_unstructured(theirs, name, amount=0.5)
    assert int((getattr(theirs, name) == 0).sum()) == C // 2  # half the channels pruned
    for step in range(2):
        x = make_input(gen, (4, C, 3, 3))
        dy = make_input(gen, (4, C, 3, 3))
        expected = module_run(theirs, x, dy)
        other = "bias" if name == "weight" else "weight"
        assert expected.keys() == {"y", "dx", f"d{name}_orig", f"d{other}"}
        assert_results_close(module_run(ours, x, dy), expected, f"step {step}")
        assert_same_state(ours, theirs, grads=False)


class Softplus(nn.Module):
    """A parametrization: a positive weight."""

    def forward(self, w):
        return F.softplus(w)


class Shifted(nn.Module):
    """A parametrization: an affine map of the bias."""

    def forward(self, b):
        return 2.0 * b - 0.5


PARAMETRIZATIONS = {"weight": Softplus, "bias": Shifted}


@TRAINING
@pytest.mark.parametrize("names", [("weight",), ("bias",), ("weight", "bias")], ids="+".join)
def test_parametrized_batchnorm_as_torch(bridge, gen, names, training):
    theirs = randomize_bn(gen, nn.BatchNorm2d(C, dtype=torch.float64)).train(training)
    ours = bridge.convert(copy.deepcopy(theirs))
    for module in (ours, theirs):
        for name in names:
            parametrize.register_parametrization(module, name, PARAMETRIZATIONS[name]())
    if bridge.fast:
        assert isinstance(ours, fbt.BatchNorm2d)
    for step in range(2):
        x = make_input(gen, (4, C, 3, 3), CL if step else None)
        dy = make_input(gen, (4, C, 3, 3), CL if step else None)
        expected = module_run(theirs, x, dy)
        for name in names:
            assert expected[f"dparametrizations.{name}.original"] is not None
        assert_results_close(module_run(ours, x, dy), expected, f"step {step}")
        assert_same_state(ours, theirs, grads=False)


# ---------------------------------------------------------------- 4. autograd's safety net


@TRAINING
@pytest.mark.parametrize("wanted", ["input", "weight"], ids=["input_grad", "weight_grad_only"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("api", ["module", "functional"])
def test_input_modified_in_place_before_backward_raises(bridge, gen, api, fmt, wanted, training):
    bn = bridge.convert(randomize_bn(gen, nn.BatchNorm2d(C, dtype=torch.float64)))
    bn.train(training)
    x = make_input(gen, (4, C, 3, 3), FORMATS[fmt]).requires_grad_(wanted == "input")
    h = x * 1
    if api == "module":
        y = bn(h)
    else:
        rm, rv = bn.running_mean.clone(), bn.running_var.clone()
        y = bridge.batch_norm(h, rm, rv, bn.weight, bn.bias, training)
    h.mul_(3)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.pow(3).sum().backward()


# ---------------------------------------------------------------- 5. saved tensors, checkpoint


def conv_bn_relu(cin=3, cout=C):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


@TRAINING
@pytest.mark.parametrize("fmt", FORMATS)
def test_saved_tensor_hooks_see_the_input(bridge, gen, fmt, training):
    theirs = randomize_bn(gen, nn.BatchNorm2d(C, dtype=torch.float64)).train(training)
    ours = bridge.convert(copy.deepcopy(theirs))
    x = make_input(gen, (4, C, 3, 3), FORMATS[fmt])
    dy = make_input(gen, (4, C, 3, 3), FORMATS[fmt])
    runs = []
    for module in (ours, theirs):
        packed = []

        def pack(t, packed=packed):
            packed.append(t.detach().clone())
            return len(packed) - 1  # backward must come through unpack for every saved tensor

        def unpack(i, packed=packed):
            return packed[i]

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            results = module_run(module, x, dy)
        assert any(t.shape == x.shape and torch.equal(t, x) for t in packed), [
            tuple(t.shape) for t in packed
        ]
        runs.append(results)
    assert_results_close(*runs)
    assert_same_state(ours, theirs, grads=False)


@TRAINING
def test_save_on_cpu(bridge, gen, training):
    theirs = build(gen, conv_bn_relu).train(training)
    ours = bridge.convert(copy.deepcopy(theirs))
    x = make_input(gen, (4, 3, 6, 6))
    dy = make_input(gen, (4, C, 6, 6))
    runs = []
    for model in (ours, theirs):
        with torch.autograd.graph.save_on_cpu(pin_memory=False):
            runs.append(module_run(model, x, dy))
    assert_results_close(*runs)
    assert_same_state(ours, theirs, grads=False)


@TRAINING
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpoint_gives_torchs_gradients_and_running_stats(
    bridge, gen, reentrant, fmt, training
):
    theirs = build(gen, conv_bn_relu).to(memory_format=FORMATS[fmt]).train(training)
    ours = bridge.convert(copy.deepcopy(theirs))
    x = make_input(gen, (4, 3, 6, 6), FORMATS[fmt])
    dy = make_input(gen, (4, C, 6, 6), FORMATS[fmt])
    before = int(theirs[1].num_batches_tracked)
    runs = []
    for model in (ours, theirs):

        def checkpointed(x, model=model):
            return checkpoint(model, x, use_reentrant=reentrant)

        results, _ = run_tail(checkpointed, x, dy, dict(model.named_parameters()), lambda y: y)
        assert all(p is not None for p in results.values())
        runs.append(results)
    assert_results_close(*runs)
    assert_same_state(ours, theirs)
    # torch runs the forward twice in training (the forward, then the recompute).
    assert int(theirs[1].num_batches_tracked) == before + (2 if training else 0)


REENTRANT = pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)


@DTYPES
@REENTRANT
@pytest.mark.parametrize("layout", LAYOUTS)
def test_checkpointed_batch_norm_alone_takes_the_batch_twice_as_torch(
    bridge, gen, layout, reentrant, dtype
):
    # The batch norm is the last op that saves tensors in the checkpointed function, so the
    # non-reentrant recomputation stops right after its saves: the running statistics must
    # already have taken the batch by then, as torch's op does before it saves.
    dim, shape, fmt = LAYOUTS[layout]
    theirs = randomize_bn(gen, THEIRS[dim](C, dtype=dtype))
    ours = bridge.convert(copy.deepcopy(theirs))
    x = make_input(gen, shape, fmt, dtype)
    for module in (ours, theirs):
        checkpoint(module, x.requires_grad_(), use_reentrant=reentrant).pow(2).sum().backward()
    assert_same_state(ours, theirs, grads=False, tol=TOL if dtype is torch.float64 else 1e-6)
    assert int(theirs.num_batches_tracked) == 3 + 2  # randomize_bn's 3, the forward, the recompute


def twice_unchecked(module, x):
    """A copy of module after two plain training forwards of x: what checkpointing must leave."""
    twice = copy.deepcopy(module)
    for _ in range(2):
        twice(x)
    return twice


@REENTRANT
@pytest.mark.parametrize("kind", ["relu", "renorm", "ghost"])
@pytest.mark.parametrize("layout", ["nc", "nchw_channels_last"])
def test_checkpointed_variant_alone_takes_the_batch_twice(gen, kind, layout, reentrant):
    dim, shape, fmt = LAYOUTS[layout]
    bn = Bridge("fastbn").variant(kind, dim, gen)
    x = make_input(gen, shape, fmt)
    expected = twice_unchecked(bn, x)
    checkpoint(bn, x.requires_grad_(), use_reentrant=reentrant).pow(2).sum().backward()
    assert_same_state(bn, expected, grads=False)
    batches = 2 * (shape[0] // 2 if kind == "ghost" else 1)  # the ghost's slices of 2 count
    assert int(bn.num_batches_tracked) == 3 + batches


@pytest.mark.parametrize("kind", ["ghost", "renorm"])
def test_checkpointed_variant_on_torch_ops_takes_the_batch_twice(gen, kind):
    # bfloat16 runs the variants' torch-op formulas: they fold before the output's ops save.
    dim, shape, _ = LAYOUTS["nchw"]
    bn = Bridge("fastbn").variant(kind, dim, gen).to(torch.bfloat16)
    x = make_input(gen, shape, dtype=torch.bfloat16)
    expected = twice_unchecked(bn, x)
    checkpoint(bn, x.requires_grad_(), use_reentrant=False).pow(2).sum().backward()
    assert_same_state(bn, expected, grads=False, tol=0.0)
    assert int(bn.num_batches_tracked) == 3 + 2 * (shape[0] // 2 if kind == "ghost" else 1)


def held_bytes(obj, seen, depth=0):
    """Bytes of the tensors and arrays reachable from obj through containers and attributes."""
    if id(obj) in seen or depth > 4:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(held_bytes(v, seen, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(held_bytes(v, seen, depth + 1) for v in obj)
    if isinstance(obj, (type, nn.Module)) or callable(obj):
        return 0
    attributes = getattr(obj, "__dict__", None)
    return 0 if attributes is None else held_bytes(attributes, seen, depth + 1)


def graph_held_bytes(grad_fn):
    """Bytes that the autograd graph's nodes hold outside saved tensors (custom ctx attributes)."""
    total, seen, nodes, stack = 0, set(), set(), [grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in nodes:
            continue
        nodes.add(node)
        total += held_bytes(getattr(node, "__dict__", None), seen)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return total


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
def test_autograd_keeps_no_more_than_for_torch(bridge, gen, checkpointed):
    """What autograd keeps for a backward: saved tensors (pack hooks) plus node attributes.

    No timing and no RSS: byte counts of the tensors and arrays the graph holds.
    fastbn may keep a few per-channel vectors more than torch, nothing input-sized.
    """
    theirs = build(gen, lambda: nn.Sequential(conv_bn_relu(C, C), conv_bn_relu(C, C)))
    ours = bridge.convert(copy.deepcopy(theirs))
    x = make_input(gen, IMAGES)
    slack = 16 * C * 8  # sixteen float64 per-channel vectors
    assert slack < x.numel() * x.element_size() // 8
    kept = []
    for model in (ours, theirs):
        saved = 0

        def pack(t):
            nonlocal saved
            saved += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            xi = x.clone().requires_grad_()
            y = checkpoint(model, xi, use_reentrant=False) if checkpointed else model(xi)
        held = graph_held_bytes(y.grad_fn)
        y.sum().backward()
        kept.append((saved, held))
    (saved, held), (theirs_saved, theirs_held) = kept
    assert saved + held <= theirs_saved + theirs_held + slack, kept
    assert held <= slack, kept


# ---------------------------------------------------------------- 6. torch.func


def func_model():
    return nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))


FUNC_SHAPE = (4, 2, 3, 3)


def sin_sum(model):
    return lambda x: model(x).sin().sum()


TRANSFORMS = {
    "grad": lambda m, x, v: torch.func.grad(sin_sum(m))(x),
    "vmap": lambda m, x, v: torch.func.vmap(m)(torch.stack([x, v, x * v])),
    "jacrev": lambda m, x, v: torch.func.jacrev(m)(x),
    "jacfwd": lambda m, x, v: torch.func.jacfwd(m)(x),
    "jvp": lambda m, x, v: torch.func.jvp(m, (x,), (v,)),
    "vjp": lambda m, x, v: torch.func.vjp(m, x)[1](v),
    "hessian": lambda m, x, v: torch.func.hessian(sin_sum(m))(x),
}
# eval; train with track_running_stats=False; train after replace_all_batch_norm_modules_;
# train with tracked running statistics (torch's raises under every transform).
FUNC_STATES = ["eval", "train_untracked", "train_replaced", "train_tracked"]


def func_pair(bridge, gen, state):
    theirs = build(gen, func_model)
    if state == "train_untracked":
        theirs[1] = randomize_bn(
            gen, nn.BatchNorm2d(2, track_running_stats=False, dtype=torch.float64)
        )
    ours = bridge.convert(copy.deepcopy(theirs))
    for model in (ours, theirs):
        model.train(state != "eval")
        if state == "train_replaced":
            torch.func.replace_all_batch_norm_modules_(model)
    bridge.assert_converted(ours)
    return ours, theirs


@JIT_DEPRECATION
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("state", FUNC_STATES)
def test_func_transforms_as_torch(bridge, gen, state, transform):
    ours, theirs = func_pair(bridge, gen, state)
    x, v = make_input(gen, FUNC_SHAPE), make_input(gen, FUNC_SHAPE)
    fn = TRANSFORMS[transform]
    expected = outcome(lambda: fn(theirs, x, v))
    if state != "train_tracked":
        assert expected[1] is None, expected[1]
    if assert_same_outcome(outcome(lambda: fn(ours, x, v)), expected):
        assert_same_state(ours, theirs, grads=False)


@TRAINING
def test_functional_call_with_params_and_buffers(bridge, gen, training):
    theirs = build(gen, func_model).train(training)
    ours = bridge.convert(copy.deepcopy(theirs))
    x, dy = make_input(gen, FUNC_SHAPE), make_input(gen, FUNC_SHAPE)
    runs = []
    for model in (ours, theirs):
        untouched = {name: b.clone() for name, b in model.named_buffers()}
        params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
        params["1.weight"] = params["1.weight"].detach() * 1.5  # other values than the module's
        params["1.weight"].requires_grad_()
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        y = torch.func.functional_call(model, {**params, **buffers}, (x,))
        y.backward(dy)
        runs.append({"y": y.detach(), **{f"d{n}": p.grad for n, p in params.items()}, **buffers})
        for name, b in model.named_buffers():  # the module's own were not used
            assert torch.equal(b, untouched[name]), name
    assert_results_close(*runs)
    assert int(runs[0]["1.num_batches_tracked"]) == 3 + training


@TRAINING
def test_grad_of_functional_call_over_parameters(bridge, gen, training):
    theirs = build(gen, func_model).train(training)
    ours = bridge.convert(copy.deepcopy(theirs))
    x = make_input(gen, FUNC_SHAPE)
    outcomes = []
    for model in (ours, theirs):
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        buffers = {n: b.clone() for n, b in model.named_buffers()}

        def loss(params, model=model, buffers=buffers):
            return torch.func.functional_call(model, (params, buffers), (x,)).sin().sum()

        outcomes.append(outcome(lambda loss=loss, params=params: torch.func.grad(loss)(params)))
    # In training the buffers are captured tensors updated in place: torch's raises.
    assert (outcomes[1][1] is None) == (not training), outcomes[1][1]
    assert_same_outcome(*outcomes)


@TRAINING
def test_model_ensembling_with_stack_module_state(bridge, gen, training):
    """torch.func's ensembling recipe: vmap of functional_call over stacked copies."""
    runs = []
    models = [build(gen, func_model).train(training) for _ in range(3)]
    x = make_input(gen, FUNC_SHAPE)
    for convert in (bridge.convert, lambda m: m):
        copies = [convert(copy.deepcopy(m)) for m in models]
        params, buffers = torch.func.stack_module_state(copies)
        base = copy.deepcopy(copies[0]).to("meta")

        def ensemble(params, buffers, x, base=base):
            return torch.func.functional_call(base, (params, buffers), (x,))

        result = outcome(
            lambda ensemble=ensemble, params=params, buffers=buffers: (
                torch.func.vmap(ensemble, in_dims=(0, 0, None))(params, buffers, x),
                buffers,
            )
        )
        runs.append(result)
    assert runs[1][1] is None, runs[1][1]  # torch's works in both modes
    assert_same_outcome(*runs)
    (y, buffers), _ = runs[1]
    assert int(buffers["1.num_batches_tracked"][0]) == 3 + training
    for i, model in enumerate(models):  # the recipe's meaning: each copy on the same x
        close(y[i], copy.deepcopy(model)(x), f"model {i}")


@JIT_DEPRECATION
@TRAINING
@pytest.mark.parametrize("layout", ["nc", "nchw", "nchw_channels_last"])
def test_forward_mode_ad_as_torch(bridge, gen, layout, training):
    dim, shape, fmt = LAYOUTS[layout]
    theirs = randomize_bn(gen, THEIRS[dim](C, dtype=torch.float64)).train(training)
    ours = bridge.convert(copy.deepcopy(theirs))
    x, tx = make_input(gen, shape, fmt), make_input(gen, shape, fmt)
    tw = torch.randn(C, generator=gen, dtype=torch.float64)
    tb = torch.randn(C, generator=gen, dtype=torch.float64)
    functions = (bridge.batch_norm, F.batch_norm)
    runs = forward_ad_runs((ours, theirs), functions, x, tx, tw, tb, training)
    for name, (mine, expected) in {"module": runs[:2], "functional": runs[2:]}.items():
        assert expected["tangent"] is not None
        assert_results_close(mine, expected, name)
    assert_same_state(ours, theirs, grads=False)


# ---------------------------------------------------------------- 7. torch.fx


class ConvBNReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3, padding=1)
        self.bn = nn.BatchNorm2d(C)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


FX_SHAPE = (4, 3, 6, 6)
# A clear error names what it cannot handle: fastbn's class (torch's own fuser errors name
# the module types they meet). The README lists the way out: fbt.revert first.
CLEAR_ERROR = r"fastbn\.torch"


def test_fx_symbolic_trace_keeps_batchnorm_a_module(bridge, gen):
    theirs = build(gen, ConvBNReLU)
    ours = bridge.convert(copy.deepcopy(theirs))
    traced = torch.fx.symbolic_trace(ours)
    nodes = [(n.op, n.target) for n in traced.graph.nodes if n.op not in ("placeholder", "output")]
    assert nodes == [("call_module", "conv"), ("call_module", "bn"), ("call_module", "relu")]
    assert type(traced.get_submodule("bn")) is type(ours.bn)
    for step in range(2):
        x = make_input(gen, FX_SHAPE)
        close(traced(x), theirs(x), f"train step {step}")
    assert_same_state(traced, theirs, grads=False)
    traced.eval()  # after tracing: the BatchNorm's own mode decides
    theirs.eval()
    x = make_input(gen, FX_SHAPE)
    close(traced(x), theirs(x), "eval")
    assert_same_state(traced, theirs, grads=False)


def fx_fuse(model):
    """torch.fx.experimental.optimization.fuse (whose import warns of torch.jit deprecations)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.fx.experimental.optimization import fuse
    return fuse(model)


@pytest.mark.parametrize("what", ["model", "traced"])
def test_fx_fuse_in_eval_as_torch(bridge, gen, what):
    theirs = build(gen, ConvBNReLU).eval()
    ours = bridge.convert(copy.deepcopy(theirs))
    if what == "traced":
        ours = torch.fx.symbolic_trace(ours)
    fused_ours, fused_theirs = fx_fuse(ours), fx_fuse(theirs)
    assert not batchnorms(fused_theirs)  # torch's folded its BatchNorm into the conv
    # fuse matches `type(module) is nn.BatchNorm2d`: fastbn's BatchNorm stays, unfolded,
    # with the same results (not asserted: no subclass can pass that test).
    x = make_input(gen, FX_SHAPE)
    with torch.no_grad():
        close(fused_ours(x), fused_theirs(x), "fused")
        close(fused_ours(x), theirs(x), "unfused")


def test_ao_fuse_modules_after_revert_as_torch(bridge, gen):
    theirs = build(gen, ConvBNReLU).eval()
    reverted = bridge.revert(bridge.convert(copy.deepcopy(theirs)))
    assert type(reverted.bn) is nn.BatchNorm2d
    groups = [["conv", "bn", "relu"]]
    fused = torch.ao.quantization.fuse_modules(reverted, groups)
    expected = torch.ao.quantization.fuse_modules(theirs, groups)
    x = make_input(gen, FX_SHAPE)
    with torch.no_grad():
        close(fused(x), expected(x))


def test_ao_fuse_modules_on_converted_model(bridge, gen):
    """Directly on a converted model: torch's results or a clear error."""
    theirs = build(gen, ConvBNReLU).eval()
    ours = bridge.convert(copy.deepcopy(theirs))
    groups = [["conv", "bn", "relu"]]
    expected = torch.ao.quantization.fuse_modules(theirs, groups)
    result, exc = outcome(lambda: torch.ao.quantization.fuse_modules(ours, groups))
    if exc is not None:
        assert bridge.fast, exc
        with pytest.raises(type(exc), match=CLEAR_ERROR):
            raise exc
        return
    x = make_input(gen, FX_SHAPE)
    with torch.no_grad():
        close(result(x), expected(x))


def quantize_fx(model, calibration):
    """FX graph-mode post-training quantization with the default qconfig mapping."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        prepared = prepare_fx(model, get_default_qconfig_mapping(), (calibration[0],))
        with torch.no_grad():
            for x in calibration:
                prepared(x)
        return convert_fx(prepared)


def qualified_name(module):
    return f"{type(module).__module__}.{type(module).__qualname__}"


def quantization_pair(bridge, gen):
    theirs = build(gen, ConvBNReLU, dtype=torch.float32).eval()
    ours = bridge.convert(copy.deepcopy(theirs))
    calibration = [make_input(gen, FX_SHAPE, dtype=torch.float32) for _ in range(3)]
    return ours, theirs, calibration


def test_fx_quantization_after_revert_as_torch(bridge, gen):
    ours, theirs, calibration = quantization_pair(bridge, gen)
    quantized = quantize_fx(bridge.revert(ours), calibration)
    expected = quantize_fx(theirs, calibration)
    x = make_input(gen, FX_SHAPE, dtype=torch.float32)
    with torch.no_grad():
        # torch's own modules and ops on the same float32 values: bit-identical.
        assert torch.equal(quantized(x), expected(x))


def test_fx_quantization_on_converted_model(bridge, gen):
    """Directly on a converted model: torch's quantized model's results or a clear error."""
    ours, theirs, calibration = quantization_pair(bridge, gen)
    expected = quantize_fx(theirs, calibration)
    result, exc = outcome(lambda: quantize_fx(ours, calibration))
    if exc is not None:
        assert bridge.fast, exc
        with pytest.raises(type(exc), match=CLEAR_ERROR):
            raise exc
        return
    x = make_input(gen, FX_SHAPE, dtype=torch.float32)
    with torch.no_grad():
        y, want = result(x), expected(x)
    # Not folded into the conv, a BatchNorm changes what is quantized: other results.
    assert torch.equal(y, want), (
        f"quantized differently from torch's: max |difference| {(y - want).abs().max():.3g}; "
        f"modules {[qualified_name(m) for m in result.modules()]} "
        f"against {[qualified_name(m) for m in expected.modules()]}"
    )


# ---------------------------------------------------------------- 8. forked DataLoader workers

# The parent runs a layer on a batch big enough for the parallel kernels
# (fastbn._plan.PARALLEL_MIN is 2**15 values), then forks two DataLoader
# workers whose items call the functional API and a layer (forward and
# backward) on inputs above PARALLEL_MIN too; the parent then computes every
# item itself. In torch mode the items use torch's BatchNorm and fastbn's
# NumPy reference, which proves the harness.
FORK_WORKER = r"""
import copy, json, os, sys
import numpy as np
import torch
import fastbn
import fastbn.torch as fbt
from fastbn import reference

fast = sys.argv[1] != "torch"
implementation = "torch" if sys.argv[1] == "fastbn_torch_op" else "fastbn"
torch.manual_seed(0)


def make_layer(c):
    bn = torch.nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
    return fbt.convert(bn, implementation=implementation) if fast else bn


big = make_layer(64)
xb = torch.randn(256, 64, 16, 16).requires_grad_()
yb = big(xb)
yb.backward(torch.randn(yb.shape))
if fast:
    import numba
    layer = numba.threading_layer()  # a parallel region has run in the parent
else:
    layer = None

ITEMS = 4
rng = np.random.default_rng(3)
arrays = [3.0 * rng.standard_normal((8192, 16)) + 1.0 for _ in range(ITEMS)]  # float64
gamma, beta = rng.uniform(0.5, 2.0, 16), rng.standard_normal(16)
images = [2.0 * torch.randn(32, 64, 8, 8) + 0.5 for _ in range(ITEMS)]  # float32
grads = [torch.randn(32, 64, 8, 8) for _ in range(ITEMS)]
module = make_layer(64)
train = fastbn.batch_norm_train if fast else reference.batch_norm_train


def compute(i):
    y, mean, invstd = train(arrays[i], gamma, beta, axis=1)
    bn = copy.deepcopy(module)
    x = images[i].clone().requires_grad_()
    out = bn(x)
    out.backward(grads[i])
    return {
        "y": torch.from_numpy(np.ascontiguousarray(y)),
        "mean": torch.from_numpy(mean),
        "invstd": torch.from_numpy(invstd),
        "out": out.detach(),
        "dx": x.grad,
        "running_mean": bn.running_mean.clone(),
        "running_var": bn.running_var.clone(),
    }


class Items(torch.utils.data.Dataset):
    def __len__(self):
        return ITEMS

    def __getitem__(self, i):
        item = compute(i)
        item["pid"] = torch.tensor(os.getpid())
        item["index"] = torch.tensor(i)
        return item


loader = torch.utils.data.DataLoader(
    Items(), batch_size=None, num_workers=2, multiprocessing_context="fork", timeout=120
)
from_workers = list(loader)
mismatches = []
for item in from_workers:
    i = int(item["index"])
    expected = compute(i)  # the parent, after the workers
    for key, want in expected.items():
        tol = 1e-10 if want.dtype == torch.float64 else 1e-5
        if not torch.allclose(item[key], want, rtol=tol, atol=tol):
            mismatches.append([i, key, float((item[key] - want).abs().max())])
print(json.dumps({
    "layer": layer,
    "indices": sorted(int(item["index"]) for item in from_workers),
    "worker_pids": sorted({int(item["pid"]) for item in from_workers}),
    "parent_pid": os.getpid(),
    "mismatches": mismatches,
}))
"""


def _tbb_loads(env):
    """Whether Numba can load its tbb layer with this environment (as test_threads checks)."""
    code = (
        "from numba.np.ufunc.parallel import _check_tbb_version_compatible as c\n"
        "import numba.np.ufunc.tbbpool\nc()\n"
    )
    return run_python(code, env, timeout=120, check=False).returncode == 0


@pytest.mark.parametrize("layer", ["omp", "tbb", "workqueue", None], ids=str)
def test_forked_dataloader_workers_compute_as_the_parent(bridge, subprocess_cache, layer):
    if not bridge.fast and layer is not None:
        pytest.skip("torch mode checks the harness once; the threading layer is Numba's")
    env = python_env(subprocess_cache, NUMBA_THREADING_LAYER=layer)
    if layer == "tbb" and not _tbb_loads(env):
        pytest.skip("the tbb threading layer cannot load (pip install tbb)")
    # timeout: a hang guard (a worker stuck in a dead thread pool); the loader has its own.
    proc = run_python(FORK_WORKER, env, bridge.name, timeout=300)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if layer is not None:
        assert report["layer"] == layer
    assert report["indices"] == [0, 1, 2, 3]
    assert len(report["worker_pids"]) == 2
    assert report["parent_pid"] not in report["worker_pids"]
    assert report["mismatches"] == []


# ---------------------------------------------------------------- 9. smaller differences


@TRAINING
@pytest.mark.parametrize("api", ["module", "functional"])
def test_transposed_2d_input_gives_torchs_contiguous_output(bridge, gen, api, training):
    x = make_input(gen, (C, 6)).t()  # (6, C) with strides (1, 6)
    assert not x.is_contiguous()
    dy = make_input(gen, (6, C))
    theirs = randomize_bn(gen, nn.BatchNorm1d(C, dtype=torch.float64)).train(training)
    ours = bridge.convert(copy.deepcopy(theirs))
    runs = []
    for module, fn in ((ours, bridge.batch_norm), (theirs, F.batch_norm)):

        def forward(x, module=module, fn=fn):
            if api == "module":
                return module(x)
            rm, rv = theirs.running_mean.clone(), theirs.running_var.clone()
            return fn(x, rm, rv, theirs.weight, theirs.bias, training)

        xi = x.detach().clone().requires_grad_()  # clone keeps the strides
        assert xi.stride() == x.stride()
        y = forward(xi)
        assert y.is_contiguous()
        y.view(-1)  # raises for a non-contiguous output
        y.backward(dy)
        runs.append({"y": y.detach(), "dx": xi.grad, "stride": torch.tensor(y.stride())})
    assert_results_close(runs[0], runs[1])


@pytest.mark.parametrize("affine", ["default_affine", "random_affine"])
def test_overflowing_variance_gives_torchs_output(bridge, gen, affine):
    """Squares of 1e200 overflow float64: invstd is 0 and the output is the bias (torch's)."""
    theirs = nn.BatchNorm1d(2, dtype=torch.float64)
    if affine == "random_affine":
        randomize_bn(gen, theirs)
    ours = bridge.convert(copy.deepcopy(theirs))
    x = torch.randn(8, 2, generator=gen, dtype=torch.float64) * 1e200
    expected = theirs(x)
    assert torch.equal(expected, theirs.bias.detach().expand(8, 2))
    with warnings.catch_warnings():
        # The running statistics are not compared: fastbn leaves them alone and
        # warns (the contract's deliberate difference), torch stores inf.
        warnings.simplefilter("ignore", RuntimeWarning)
        y = ours(x)
    close(y, expected)


@pytest.mark.parametrize("track", [True, False], ids=["tracked", "untracked"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@TRAINING
def test_wrong_channel_count_raises_torchs_error(bridge, training, affine, track):
    theirs = nn.BatchNorm1d(3, affine=affine, track_running_stats=track, dtype=torch.float64)
    theirs.train(training)
    ours = bridge.convert(copy.deepcopy(theirs))
    x = torch.randn(4, 4, dtype=torch.float64)
    expected = outcome(lambda: theirs(x))
    result = outcome(lambda: ours(x))
    if assert_same_outcome(result, expected):
        assert not affine and not track  # torch checks nothing else
    else:
        assert str(result[1]) == str(expected[1])


@TRAINING
@pytest.mark.parametrize("wrong", ["running_mean", "running_var", "weight", "bias"])
def test_functional_wrong_channel_count_raises_torchs_error(bridge, wrong, training):
    x = torch.randn(4, 4, dtype=torch.float64)
    args = {
        "running_mean": torch.zeros(4, dtype=torch.float64),
        "running_var": torch.ones(4, dtype=torch.float64),
        "weight": torch.ones(4, dtype=torch.float64),
        "bias": torch.zeros(4, dtype=torch.float64),
    }
    args[wrong] = args[wrong][:3].clone()
    outcomes = [
        outcome(lambda fn=fn: fn(x, **{k: v.clone() for k, v in args.items()}, training=training))
        for fn in (bridge.batch_norm, F.batch_norm)
    ]
    assert outcomes[1][1] is not None
    assert_same_outcome(*outcomes)
    assert str(outcomes[0][1]) == str(outcomes[1][1])


# ---------------------------------------------------------------- 10. what matches already


@TRAINING
@pytest.mark.parametrize("layout", ["nc", "nchw_channels_last"])
def test_hooks_see_torchs_tensors(bridge, gen, layout, training):
    """Forward pre-hook and forward hook that replace input and output; full backward hooks."""
    dim, shape, fmt = LAYOUTS[layout]
    theirs = randomize_bn(gen, THEIRS[dim](C, dtype=torch.float64)).train(training)
    ours = bridge.convert(copy.deepcopy(theirs))
    x, dy = make_input(gen, shape, fmt), make_input(gen, shape, fmt)
    runs = []
    for module in (ours, theirs):
        seen = {}
        module.register_forward_pre_hook(lambda m, args: (2.0 * args[0] - 1.0,))
        module.register_forward_hook(lambda m, args, out: out * 3.0)
        module.register_full_backward_pre_hook(
            lambda m, grad_output, seen=seen: seen.update(pre=grad_output[0].clone())
        )
        module.register_full_backward_hook(
            lambda m, grad_input, grad_output, seen=seen: seen.update(
                grad_input=grad_input[0].clone(), grad_output=grad_output[0].clone()
            )
        )
        results = module_run(module, x, dy)
        assert seen.keys() == {"pre", "grad_input", "grad_output"}
        runs.append({**results, **seen})
    assert_results_close(*runs)
    assert_same_state(ours, theirs, grads=False)


@TRAINING
def test_autocast_bfloat16_on_cpu_as_torch(bridge, gen, training):
    def model():
        return nn.Sequential(conv_bn_relu(3, C), nn.Conv2d(C, 4, 1), nn.BatchNorm2d(4))

    theirs = build(gen, model, dtype=torch.float32).train(training)
    ours = bridge.convert(copy.deepcopy(theirs))
    x = make_input(gen, (4, 3, 6, 6), dtype=torch.float32)
    runs = []
    for m in (ours, theirs):
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(xi)
        y.float().pow(2).sum().backward()
        runs.append((y, xi.grad))
    (y, dx), (expected, expected_dx) = runs
    assert expected.dtype == torch.bfloat16  # the conv's output: BatchNorm ran on bfloat16
    # bfloat16 BatchNorm input is served by torch's own op (the contract): bit-identical.
    assert y.dtype == expected.dtype and torch.equal(y, expected)
    assert torch.equal(dx, expected_dx)
    assert_same_state(ours, theirs, tol=0)


@TRAINING
@pytest.mark.parametrize("layout", ["nc", "nchw_channels_last"])
def test_inference_mode_as_torch(bridge, gen, layout, training):
    dim, shape, fmt = LAYOUTS[layout]
    theirs = randomize_bn(gen, THEIRS[dim](C, dtype=torch.float64)).train(training)
    ours = bridge.convert(copy.deepcopy(theirs))
    x = make_input(gen, shape, fmt)
    outputs = []
    for module in (ours, theirs):
        with torch.inference_mode():
            y = module(x)
        assert y.is_inference() and not y.requires_grad
        outputs.append(y)
    close(outputs[0], outputs[1])
    assert outputs[0].stride() == outputs[1].stride()
    assert_same_state(ours, theirs, grads=False)


def test_variants_save_load_and_deepcopy_mid_training(bridge, gen):
    """fastbn's variants (fused ReLU, renorm, ghost) in a model: save, load, deepcopy, go on."""
    model = nn.Sequential(*(bridge.variant(kind, 2, gen) for kind in ("relu", "renorm", "ghost")))
    x = make_input(gen, (4, C, 3, 3))
    model(x).sum().backward()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = copy.deepcopy(model)
    x = make_input(gen, (4, C, 3, 3))
    expected = module_run(model, x, x)
    for other in (loaded, copied):
        assert [type(m) for m in other.modules()] == [type(m) for m in model.modules()]
        assert_results_close(module_run(other, x, x), expected)
        assert_same_state(other, model)
