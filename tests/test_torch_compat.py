"""fastbn.torch._compat's public fallbacks, each forced, give torch's results (the contract).

`_compat` reads three torch internals at import, each beside the public mechanism
that takes its place where a torch release lacks it. This torch has all three, so
a green suite says nothing of the fallbacks: here each is forced (monkeypatch, for
one test) and the calls that depend on it are compared with torch's own modules:

- `transforms_active` without ``torch._C._are_functorch_transforms_active``:
  whether a tensor of the call lacks storage. torch.func's vmap, grad and jvp over
  a converted BatchNorm in eval mode take torch's op, as with the internal; an
  ordinary call (a None weight included) still takes fastbn's kernels.
- `dual_tensors` without ``forward_ad._current_level``: ``unpack_dual`` of every
  tensor. Forward-mode AD in train and eval gives torch's tangents; an ordinary
  call still takes fastbn's kernels.
- `function_apply` without the C base's ``apply``: the Function's own ``apply``.
  A training step and an eval step with gradients through it are torch's.

Which mechanism took an ordinary call is seen through the bridge's one deliberate
difference: a non-finite training batch leaves fastbn's running statistics alone
and warns, where torch's op writes NaN into them.
"""

import copy

import pytest

torch = pytest.importorskip("torch")

import torch.autograd.forward_ad as fwAD  # noqa: E402
from forward_ad_runs import forward_ad_runs  # noqa: E402
from torch import nn  # noqa: E402

import fastbn.torch as fbt  # noqa: E402
from fastbn.torch import _compat, _ops  # noqa: E402

C = 3
SHAPE = (4, C, 3, 2)
TOL = 1e-10  # float64: the contract's PyTorch bridge
TRAINING = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
# The behaviours are checked with the internal too, so that this file alone holds both.
MECHANISM = pytest.mark.parametrize("mechanism", ["fallback", "internal"])
# torch's forward-mode batch norm formulas (under jvp and forward AD) are scripted on
# first use, which warns.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(20240611)


def randn(gen, shape):
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def force(monkeypatch, mechanism, name, value):
    """Set _compat's internal ``name`` to ``value`` (its absence) for the fallback."""
    if mechanism == "fallback":
        monkeypatch.setattr(_compat, name, value)


def bn_pair(gen, training, **kwargs):
    """(converted, torch's) BatchNorm2d with the same random parameters and running stats."""
    theirs = nn.BatchNorm2d(C, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        if theirs.affine:
            theirs.weight.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
            theirs.bias.copy_(randn(gen, C))
        theirs.running_mean.copy_(randn(gen, C))
        theirs.running_var.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
    theirs.train(training)
    ours = fbt.convert(copy.deepcopy(theirs))
    assert type(ours) is fbt.BatchNorm2d
    return ours, theirs


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=TOL, atol=TOL, msg=lambda m: f"{what}: {m}")


def assert_same_buffers(ours, theirs):
    for (name, mine), expected in zip(ours.named_buffers(), theirs.buffers(), strict=True):
        if expected.is_floating_point():
            close(mine, expected, name)
        else:
            assert torch.equal(mine, expected), name


def assert_takes_fastbns_kernels(module):
    """A NaN training batch: fastbn leaves the running statistics and warns (torch's op
    would write NaN into them without a word)."""
    module.train()
    before = [b.clone() for b in module.buffers()]
    x = torch.ones(SHAPE, dtype=torch.float64)
    x[0, 1, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="not finite"):
        module(x)
    for b, saved in zip(module.buffers(), before, strict=True):
        assert torch.equal(b, saved)


# ---------------------------------------------------------------- transforms_active


def test_storage_fallback_sees_transforms(monkeypatch):
    monkeypatch.setattr(_compat, "_ARE_TRANSFORMS_ACTIVE", None)
    seen = []

    def record(x):
        seen.append(_compat.transforms_active(x, None))
        return x.sin().sum()

    torch.func.vmap(record)(torch.ones(2, 3))
    torch.func.grad(record)(torch.ones(3))
    torch.func.jvp(record, (torch.ones(3),), (torch.ones(3),))
    assert seen == [True, True, True]
    assert _compat.transforms_active(torch.ones(3), None) is False  # None: no tensor, no transform


TRANSFORMS = {
    "vmap": lambda m, x, v: torch.func.vmap(m)(torch.stack([x, v, x * v])),
    "grad": lambda m, x, v: torch.func.grad(lambda x: m(x).sin().sum())(x),
    "jvp": lambda m, x, v: torch.func.jvp(m, (x,), (v,)),
}


@MECHANISM
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_func_transforms_take_torchs_op(monkeypatch, gen, transform, mechanism):
    force(monkeypatch, mechanism, "_ARE_TRANSFORMS_ACTIVE", None)
    ours, theirs = bn_pair(gen, training=False)
    x, v = randn(gen, SHAPE), randn(gen, SHAPE)
    got, expected = TRANSFORMS[transform](ours, x, v), TRANSFORMS[transform](theirs, x, v)
    if transform != "jvp":
        got, expected = (got,), (expected,)
    for i, (mine, want) in enumerate(zip(got, expected, strict=True)):  # jvp: output, tangent
        close(mine, want, f"{transform} output {i}")
    assert_same_buffers(ours, theirs)


@MECHANISM
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_ordinary_calls_take_the_kernels(monkeypatch, gen, affine, mechanism):
    """Outside transforms every tensor has storage (and a None weight is no transform)."""
    force(monkeypatch, mechanism, "_ARE_TRANSFORMS_ACTIVE", None)
    ours, theirs = bn_pair(gen, training=True, affine=affine)
    x = randn(gen, SHAPE)
    close(ours(x), theirs(x), "y")
    assert_same_buffers(ours, theirs)
    assert_takes_fastbns_kernels(ours)


# ---------------------------------------------------------------- dual_tensors


def test_unpack_dual_fallback_finds_tangents(monkeypatch):
    monkeypatch.setattr(_compat, "_HAS_LEVEL", False)
    plain = torch.ones(3)
    assert _compat.dual_tensors(plain, None) is False
    with fwAD.dual_level():
        dual = fwAD.make_dual(torch.ones(3), torch.ones(3))
        assert _compat.dual_tensors(plain, None) is False
        assert _compat.dual_tensors(plain, None, dual) is True


@MECHANISM
@TRAINING
def test_forward_mode_ad_gives_torchs_tangents(monkeypatch, gen, training, mechanism):
    """torch's tangents, from the module and from fbt.batch_norm (tangents on weight and bias)."""
    force(monkeypatch, mechanism, "_HAS_LEVEL", False)
    ours, theirs = bn_pair(gen, training)
    x, tx = randn(gen, SHAPE), randn(gen, SHAPE)
    tw, tb = randn(gen, C), randn(gen, C)
    functions = (fbt.batch_norm, torch.nn.functional.batch_norm)
    runs = forward_ad_runs((ours, theirs), functions, x, tx, tw, tb, training)
    for name, (mine, expected) in {"module": runs[:2], "functional": runs[2:]}.items():
        assert expected.keys() == mine.keys() and expected["tangent"] is not None, name
        for what, value in expected.items():
            assert mine[what] is not None, (name, what)
            close(mine[what], value, f"{name} {what}")
    assert_same_buffers(ours, theirs)
    assert_takes_fastbns_kernels(ours)  # outside a dual level: no tangent, fastbn's kernels


# ---------------------------------------------------------------- function_apply


def test_function_apply_is_the_c_base_apply_when_there_is_one():
    """The internal's point: the C entry, not the Function's Python ``apply`` wrapper."""
    assert _compat._FUNCTION_BASE_APPLY is not None
    assert _compat.function_apply(_ops.BatchNormFunction) != _ops.BatchNormFunction.apply


@TRAINING
def test_steps_through_the_functions_own_apply(monkeypatch, gen, training):
    """With the fallback's apply in place of `_ops.apply`: torch's y, gradients and state."""
    monkeypatch.setattr(_compat, "_FUNCTION_BASE_APPLY", None)
    apply = _compat.function_apply(_ops.BatchNormFunction)
    assert apply == _ops.BatchNormFunction.apply
    monkeypatch.setattr(_ops, "apply", apply)  # the bridge's, captured at import
    ours, theirs = bn_pair(gen, training)
    for step in range(2):
        x, dy = randn(gen, SHAPE), randn(gen, SHAPE)
        runs = []
        for module in (ours, theirs):
            xi = x.clone().requires_grad_()
            module.zero_grad()
            y = module(xi)
            y.backward(dy)
            runs.append((y.detach(), xi.grad, module.weight.grad, module.bias.grad))
        for what, a, b in zip(("y", "dx", "dweight", "dbias"), *runs, strict=True):
            close(a, b, f"step {step} {what}")
        assert_same_buffers(ours, theirs)
