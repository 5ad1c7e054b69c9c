"""fastbn.torch's BatchRenorm1d/2d/3d (Batch Renormalization for PyTorch).

References: fastbn's functional ``batch_renorm_train`` / ``batch_renorm_backward``
on NumPy copies (themselves held to the paper's Algorithm 1 in
test_renorm.py), the running-statistics rule of PyTorch written out in
float64, torch's own BatchNorm modules where renorm has no room to correct
(rmax = 1, dmax = 0), and torch.autograd.gradcheck / gradgradcheck.
"""

import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

import fastbn.torch as fbt  # noqa: E402
from fastbn import batch_renorm_backward, batch_renorm_train  # noqa: E402
from fastbn.renorm import corrections  # noqa: E402

C = 3
CL = torch.channels_last
CL3 = torch.channels_last_3d
F64 = torch.float64
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = {"float64": torch.float64, "float32": torch.float32}
RENORM = {1: fbt.BatchRenorm1d, 2: fbt.BatchRenorm2d, 3: fbt.BatchRenorm3d}
TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}

# name -> (dimension of the module, input shape, memory format or None)
LAYOUTS = {
    "nc": (1, (12, C), None),
    "ncl": (1, (3, C, 5), None),
    "nchw": (2, (3, C, 4, 5), None),
    "nchw_channels_last": (2, (3, C, 4, 5), CL),
    "ncdhw_channels_last_3d": (3, (2, C, 3, 2, 4), CL3),
}

# torch's own warnings: importing inductor.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method`:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning"),
]


@pytest.fixture
def gen():
    """A torch generator with a fixed seed for every test."""
    return torch.Generator().manual_seed(20240611)


@pytest.fixture
def fresh_dynamo():
    """Empty dynamo caches before and after: compiles of one test never leak into another."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def channel_view(t, ndim):
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def make_input(gen, shape, dtype=F64, memory_format=None):
    """Each channel with its own offset in [-2, 2] and scale in [0.3, 3]."""
    c = shape[1]
    x = torch.randn(shape, generator=gen, dtype=F64)
    offset = torch.empty(c, dtype=F64).uniform_(-2, 2, generator=gen)
    scale = torch.empty(c, dtype=F64).uniform_(0.3, 3, generator=gen)
    x = (x * channel_view(scale, len(shape)) + channel_view(offset, len(shape))).to(dtype)
    return x if memory_format is None else x.contiguous(memory_format=memory_format)


def make_module(gen, dim, dtype=F64, **kwargs):
    """A BatchRenorm{dim}d with weight of either sign, bias, and trained-looking running stats."""
    module = RENORM[dim](C, dtype=dtype, **kwargs)
    with torch.no_grad():
        sign = torch.where(torch.rand(C, generator=gen) < 0.5, -1.0, 1.0)
        weight = torch.empty(C).uniform_(0.5, 2, generator=gen) * sign
        bias = torch.randn(C, generator=gen)
        if module.affine:
            module.weight.copy_(weight)
            module.bias.copy_(bias)
        module.running_mean.copy_(torch.randn(C, generator=gen))
        module.running_var.copy_(torch.empty(C).uniform_(0.3, 3, generator=gen))
    return module


def reduced_dims(ndim):
    return (0, *range(2, ndim))


def torch_rule(running_mean, running_var, x, momentum, count):
    """PyTorch's running-statistics update in float64 NumPy; count is after this batch."""
    x = x.detach().to(F64).numpy()
    dims = reduced_dims(x.ndim)
    f = 1.0 / count if momentum is None else momentum
    return (
        (1 - f) * running_mean + f * x.mean(axis=dims),
        (1 - f) * running_var + f * x.var(axis=dims, ddof=1),
    )


def functional_step(module, x, dy):
    """fastbn's functional results for module's training step: y, dx, dweight, dbias, r, d."""
    x_np = x.detach().numpy()
    weight = None if module.weight is None else module.weight.detach().numpy()
    bias = None if module.bias is None else module.bias.detach().numpy()
    y, mean, invstd, r, d = batch_renorm_train(
        x_np, module.running_mean.numpy().copy(), module.running_var.numpy().copy(), weight,
        bias, r_max=module.rmax, d_max=module.dmax, r_min=module.rmin, axis=1, eps=module.eps,
    )  # fmt: skip
    dx, dweight, dbias = batch_renorm_backward(
        dy.numpy(), x_np, mean, invstd, r, d, weight, axis=1
    )
    return y, dx, dweight, dbias, r, d


def step(module, x, dy):
    """A training step of module on a fresh leaf x: y, dx, dweight, dbias (tensors).

    Without weight and bias (affine=False): y and dx only.
    """
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(dy)
    if not module.affine:
        return y.detach(), x.grad
    return y.detach(), x.grad, module.weight.grad, module.bias.grad


def assert_close(actual, expected, tol, scale=1.0):
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64), expected, rtol=tol, atol=tol * scale
    )


# ------------------------------------------------------------- against the functional


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_module_matches_the_functional_over_steps(gen, layout, dtype, momentum):
    dim, shape, fmt = LAYOUTS[layout]
    dtype = DTYPES[dtype]
    module = make_module(gen, dim, dtype, momentum=momentum)
    tol = TOL[dtype]
    running_mean = module.running_mean.to(F64).numpy().copy()
    running_var = module.running_var.to(F64).numpy().copy()
    clipped = False
    for count, (rmax, dmax) in enumerate([(1.0, 0.0), (1.5, 0.5), (3.0, 5.0)], start=1):
        module.rmax, module.dmax = rmax, dmax
        x = make_input(gen, shape, dtype, fmt)
        dy = make_input(gen, shape, dtype, fmt)
        y_ref, dx_ref, dweight_ref, dbias_ref, r, d = functional_step(module, x, dy)
        clipped |= bool(np.any((r == rmax) | (r == 1 / rmax) | (np.abs(d) == dmax)))
        y, dx, dweight, dbias = step(module, x, dy)
        m = x.numel() // C
        assert_close(y, y_ref, tol, 5.0)
        assert_close(dx, dx_ref, tol, 5.0)
        assert_close(dweight, dweight_ref, tol, 5.0 * m)
        assert_close(dbias, dbias_ref, tol, m)
        if fmt is not None:  # the input's memory format, without copies
            assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)
        running_mean, running_var = torch_rule(running_mean, running_var, x, momentum, count)
        assert_close(module.running_mean, running_mean, tol)
        assert_close(module.running_var, running_var, tol)
        assert int(module.num_batches_tracked) == count
        # The reference keeps the buffers' rounding, as the module stores them.
        running_mean = module.running_mean.to(F64).numpy().copy()
        running_var = module.running_var.to(F64).numpy().copy()
    assert clipped  # the limits were active at some step


AFFINE_FALSE_LAYOUTS = ["nc", "ncl", "nchw", "nchw_channels_last"]


@pytest.mark.parametrize("momentum", [0.5, None])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", AFFINE_FALSE_LAYOUTS)
def test_affine_false_matches_the_functional_over_steps(gen, layout, dtype, momentum):
    """BatchRenorm1d/2d without weight and bias: y = x_hat * r + d, its dx, the running rule.

    Against fastbn's functional with gamma and beta None, and torch's rule in
    float64; the limits widen over the steps, and are active at some step.
    """
    dim, shape, fmt = LAYOUTS[layout]
    dtype = DTYPES[dtype]
    module = make_module(gen, dim, dtype, momentum=momentum, affine=False)
    assert module.weight is None and module.bias is None
    assert list(module.state_dict()) == ["running_mean", "running_var", "num_batches_tracked"]
    tol = TOL[dtype]
    running_mean = module.running_mean.to(F64).numpy().copy()
    running_var = module.running_var.to(F64).numpy().copy()
    clipped = False
    for count, (rmax, dmax) in enumerate([(1.0, 0.0), (1.5, 0.5), (3.0, 5.0)], start=1):
        module.rmax, module.dmax = rmax, dmax
        x = make_input(gen, shape, dtype, fmt)
        dy = make_input(gen, shape, dtype, fmt)
        y_ref, dx_ref, _, _, r, d = functional_step(module, x, dy)
        clipped |= bool(np.any((r == rmax) | (r == 1 / rmax) | (np.abs(d) == dmax)))
        y, dx = step(module, x, dy)
        assert_close(y, y_ref, tol, 5.0)
        assert_close(dx, dx_ref, tol, 5.0)
        if fmt is not None:
            assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)
        running_mean, running_var = torch_rule(running_mean, running_var, x, momentum, count)
        assert_close(module.running_mean, running_mean, tol)
        assert_close(module.running_var, running_var, tol)
        assert int(module.num_batches_tracked) == count
        running_mean = module.running_mean.to(F64).numpy().copy()
        running_var = module.running_var.to(F64).numpy().copy()
    assert clipped
    module.eval()  # eval: batch norm with the running statistics, no weight or bias
    theirs = TORCH_BN[dim](C, affine=False, dtype=dtype).eval()
    theirs.load_state_dict(module.state_dict())
    x = make_input(gen, shape, dtype, fmt)
    torch.testing.assert_close(module(x), theirs(x), rtol=tol, atol=tol)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_no_room_to_correct_is_torch_batchnorm(gen, dim):
    """rmax = 1, dmax = 0: torch's own BatchNorm, in training and in eval."""
    shape = {1: (6, C, 4), 2: (3, C, 4, 5), 3: (2, C, 3, 2, 4)}[dim]
    ours = make_module(gen, dim, renorm_clipping={"rmax": 1.0, "dmax": 0.0})
    theirs = TORCH_BN[dim](C, dtype=F64)
    theirs.load_state_dict(ours.state_dict())
    for _ in range(3):
        x, dy = make_input(gen, shape), make_input(gen, shape)
        for a, b in zip(step(ours, x, dy), step(theirs, x, dy), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for name, buffer in theirs.named_buffers():
        torch.testing.assert_close(getattr(ours, name), buffer, rtol=1e-12, atol=0)
    ours.eval()
    theirs.eval()
    x = make_input(gen, shape)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)


def test_running_statistics_of_the_batch_give_batch_norm(gen):
    x = make_input(gen, (4, C, 3, 5))
    ours = make_module(gen, 2)
    theirs = nn.BatchNorm2d(C, dtype=F64)
    theirs.load_state_dict(ours.state_dict())
    with torch.no_grad():
        ours.running_mean.copy_(x.mean((0, 2, 3)))
        ours.running_var.copy_(x.var((0, 2, 3), unbiased=False))
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)


def test_limits_follow_the_attributes(gen):
    """rmin None follows rmax; an explicit rmin (Keras's) is its own limit."""
    x = make_input(gen, (8, C))
    module = make_module(gen, 1, momentum=0.0)
    with torch.no_grad():  # sigma = 10 sigma_B: r = 0.1 before clipping
        module.running_mean.copy_(x.mean(0))
        module.running_var.copy_(100 * (x.var(0, unbiased=False) + 1e-5) - 1e-5)
    assert module.rmin is None
    for rmax, rmin, expected_r in [(3.0, None, 1 / 3), (2.0, None, 0.5), (2.0, 0.25, 0.25)]:
        module.rmax, module.rmin = rmax, rmin
        _, _, _, _, r, _ = functional_step(module, x, torch.zeros_like(x))
        np.testing.assert_allclose(r, expected_r, rtol=1e-15)
        expected = fbt.batch_norm(
            x, None, None, module.weight * expected_r, module.bias, training=True
        )
        torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)
    keras = fbt.BatchRenorm1d(C, renorm_clipping={"rmax": 4, "rmin": 0, "dmax": 2})
    assert (keras.rmax, keras.rmin, keras.dmax) == (4.0, 0.0, 2.0)
    default = fbt.BatchRenorm1d(C)
    assert (default.rmax, default.rmin, default.dmax) == (3.0, None, 5.0)
    assert fbt.BatchRenorm1d(C, renorm_clipping={"rmax": 2}).dmax == 5.0


# --------------------------------------------------------------- the torch-op paths


# Unit roundoff u of round-to-nearest, 2**-p for p significant bits (bfloat16's 8,
# float32's 24): a value rounded once to the dtype is within u * |value| of it.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24, torch.float64: 0.0}
# Two float64 computations of the same unit-scale value (kernels, torch ops) differ by
# far less than this.
FLOAT64_NOISE = 1e-12


def assert_within(actual, expected, bound, what):
    """|actual - expected| <= bound, element by element (expected and bound in float64)."""
    excess = (actual.to(F64) - expected).abs() - bound
    assert bool((excess <= 0).all()), f"{what}: exceeds its bound by up to {excess.max():.3g}"


@pytest.mark.parametrize(
    ("dtype", "param_dtype"),
    [
        (torch.float32, F64),  # mixed dtypes: not the kernels' call
        (torch.bfloat16, torch.bfloat16),
    ],
    ids=["float32_float64_parameters", "bfloat16"],
)
def test_fallback_matches_the_kernels(gen, dtype, param_dtype):
    """The torch-op fallback against the float64 kernels on the same values.

    Before each step the float64 module takes the fallback module's state
    (exact in float64), and both take the same x and dy (exact too). The
    fallback computes in float64 and rounds each result once to its dtype,
    so y, the weight and bias gradients and the running statistics are each
    within u * |expected| (u of the result's dtype). dx is two gradients,
    each rounded to the input's dtype, then added in it (the fallback
    converts the input to float64 twice: for the statistics and for
    x_hat): g1 = weight * r * invstd * dy through x_hat and g2 = dx - g1
    through the statistics, hence within u * (|g1| + |g2| + |dx|). Each
    bound is first-order in u, so times (1 + u), plus float64 noise.
    """
    shape = (4, C, 3, 5)
    clipping = {"rmax": 1.5, "dmax": 0.5}
    slow = make_module(gen, 2, param_dtype, renorm_clipping=clipping)
    fast = RENORM[2](C, dtype=F64, renorm_clipping=clipping)
    for _ in range(2):
        fast.load_state_dict(slow.state_dict())
        x = make_input(gen, shape).to(dtype)
        dy = make_input(gen, shape).to(dtype)
        _, _, _, _, r, _ = functional_step(fast, x.to(F64), dy.to(F64))  # before the update
        expected = step(fast, x.to(F64), dy.to(F64))
        got = step(slow, x, dy)
        for name, a, b in zip(("y", "dx", "dweight", "dbias"), got, expected, strict=True):
            assert a.dtype is (dtype if name in ("y", "dx") else param_dtype), name
            u = UNIT_ROUNDOFF[a.dtype]
            if name == "dx":
                x64 = x.to(F64)
                invstd = (x64.var(reduced_dims(4), unbiased=False) + fast.eps).rsqrt()
                scale = fast.weight.detach() * torch.from_numpy(r) * invstd
                g1 = channel_view(scale, 4) * dy.to(F64)
                size = g1.abs() + (b - g1).abs() + b.abs()
            else:
                size = b.abs()
            assert_within(a, b, u * (1 + u) * size + FLOAT64_NOISE * (1 + b.abs()), name)
        for name in ("running_mean", "running_var"):
            a, b = getattr(slow, name), getattr(fast, name)
            u = UNIT_ROUNDOFF[a.dtype]
            assert_within(a, b, u * (1 + u) * b.abs() + FLOAT64_NOISE, name)
    assert int(slow.num_batches_tracked) == 2


def clipped_running_stats(module, x):
    """Running statistics that clip every channel's r and d: (r, d) at (rmin, dmax),
    (rmax, -dmax), (rmax, dmax) for the C = 3 channels."""
    dims = reduced_dims(x.dim())
    mean, var = x.detach().mean(dims), x.detach().var(dims, unbiased=False)
    ratio = 4 * module.rmax  # sigma_B / sigma = 1 / ratio, ratio, ratio
    with torch.no_grad():
        module.running_var.copy_(var * torch.tensor([ratio**2, ratio**-2, ratio**-2], dtype=F64))
        sigma = module.running_var.sqrt()
        shift = torch.tensor([3.0, -3.0, 3.0], dtype=F64) * module.dmax
        module.running_mean.copy_(mean - shift * sigma)


@pytest.mark.parametrize(
    ("dim", "shape", "fmt"),
    [(1, (5, C), None), (1, (2, C, 3), None), (2, (2, C, 2, 3), CL), (3, (2, C, 1, 2, 2), None)],
)
def test_gradcheck_and_gradgradcheck(gen, dim, shape, fmt):
    """float64, r and d at their limits: there they are constants of x, as autograd assumes."""
    module = make_module(gen, dim, momentum=0.0, renorm_clipping={"rmax": 2.0, "dmax": 0.5})
    x = make_input(gen, shape, memory_format=fmt).requires_grad_()
    clipped_running_stats(module, x)
    _, _, _, _, r, d = functional_step(module, x, torch.zeros_like(x))
    np.testing.assert_array_equal(r, [0.5, 2.0, 2.0])
    np.testing.assert_array_equal(d, [0.5, -0.5, 0.5])
    weight = module.weight.detach().clone().requires_grad_()
    bias = module.bias.detach().clone().requires_grad_()

    def f(x, weight, bias):
        return torch.func.functional_call(module, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(f, (x, weight, bias))
    assert torch.autograd.gradgradcheck(f, (x, weight, bias))


def test_corrections_op_passes_opcheck(gen):
    """The op that computes r and d under torch.compile (and in the fallback)."""
    mean, running_mean = torch.randn(2, C, generator=gen, dtype=F64)
    var, running_var = torch.empty(2, C, dtype=F64).uniform_(0.2, 5, generator=gen)
    for limits in [(1 / 3, 3.0, 5.0), (0.0, float("inf"), 0.5)]:
        args = (mean, var, running_mean, running_var, 1e-5, *limits)
        torch.library.opcheck(torch.ops.fastbn.batch_renorm_corrections.default, args)
        r, d = torch.ops.fastbn.batch_renorm_corrections(*args)
        r_ref, d_ref = corrections(
            mean.numpy(), var.numpy(), running_mean.numpy(), running_var.numpy(), 1e-5, limits
        )
        torch.testing.assert_close(r, torch.from_numpy(r_ref), rtol=1e-15, atol=0)
        torch.testing.assert_close(d, torch.from_numpy(d_ref), rtol=1e-15, atol=1e-15)


def test_compiled_fullgraph_matches_eager(gen, fresh_dynamo):
    """conv - BatchRenorm2d - ReLU - linear - BatchRenorm1d: training steps, a ramp, eval."""
    with torch.random.fork_rng():
        torch.manual_seed(7)
        eager = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, dtype=F64),
            fbt.BatchRenorm2d(4, momentum=None, dtype=F64),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 5 * 5, 6, dtype=F64),
            fbt.BatchRenorm1d(6, dtype=F64),
        )
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, compiled_model)]
    renorms = [
        [m for m in model if isinstance(m, _BatchNorm)] for model in (eager, compiled_model)
    ]
    for rmax, dmax in [(1.0, 0.0), (1.0, 0.0), (2.0, 1.0)]:
        x = make_input(gen, (8, 2, 5, 5))
        target = torch.randn(8, 6, generator=gen, dtype=F64)
        outputs = []
        for model, run, layers, optimizer in zip(
            (eager, compiled_model), (eager, compiled), renorms, optimizers, strict=True
        ):
            for layer in layers:
                layer.rmax, layer.dmax = rmax, dmax
            optimizer.zero_grad()
            y = run(x)
            ((y - target) ** 2).mean().backward()
            outputs.append((y.detach(), [p.grad.clone() for p in model.parameters()]))
            optimizer.step()
        (y_eager, grads_eager), (y_compiled, grads_compiled) = outputs
        torch.testing.assert_close(y_compiled, y_eager, rtol=1e-10, atol=1e-10)
        for a, b in zip(grads_compiled, grads_eager, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for a, b in zip(renorms[1], renorms[0], strict=True):
        for name, buffer in b.named_buffers():
            torch.testing.assert_close(getattr(a, name), buffer, rtol=1e-10, atol=1e-12)
    eager.eval()
    compiled_model.eval()
    x = make_input(gen, (8, 2, 5, 5))
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ module behaviour


def test_is_a_torch_batchnorm_with_its_state_and_repr():
    module = fbt.BatchRenorm2d(4, momentum=0.2, renorm_clipping={"rmax": 2.0, "dmax": 1})
    assert isinstance(module, _BatchNorm)
    assert list(module.state_dict()) == list(nn.BatchNorm2d(4).state_dict())
    assert repr(module) == (
        "BatchRenorm2d(4, eps=1e-05, momentum=0.2, affine=True, bias=True, "
        "track_running_stats=True, rmax=2.0, rmin=None, dmax=1.0)"
        if "bias=" in repr(nn.BatchNorm2d(4))
        else "BatchRenorm2d(4, eps=1e-05, momentum=0.2, affine=True, "
        "track_running_stats=True, rmax=2.0, rmin=None, dmax=1.0)"
    )


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"track_running_stats": False}, ValueError, "track_running_stats=True"),
        ({"renorm_clipping": {"rmax": 0.5}}, ValueError, "rmax must be >= 1, got 0.5"),
        ({"renorm_clipping": {"dmax": -1}}, ValueError, "dmax must be >= 0, got -1"),
        ({"renorm_clipping": {"rmin": 2}}, ValueError, r"rmin must be in \[0, 1\], got 2"),
        ({"renorm_clipping": {"rmax": "3"}}, TypeError, "rmax must be a real number"),
        ({"renorm_clipping": {"r_max": 3}}, ValueError, r"unknown keys \['r_max'\]"),
        ({"renorm_clipping": [("rmax", 3)]}, TypeError, "renorm_clipping must be a dict"),
    ],
)
def test_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fbt.BatchRenorm1d(C, **kwargs)


def test_bad_limits_at_forward_change_nothing(gen):
    module = make_module(gen, 2)
    x = make_input(gen, (2, C, 3, 3))
    state = {k: v.clone() for k, v in module.state_dict().items()}
    for name, value, match in [
        ("rmax", 0.9, "rmax must be >= 1"),
        ("dmax", float("nan"), "dmax must be >= 0"),
        ("rmin", 1.5, r"rmin must be in \[0, 1\]"),
    ]:
        saved = getattr(module, name)
        setattr(module, name, value)
        with pytest.raises(ValueError, match=match):
            module(x)
        setattr(module, name, saved)
        for key, value in module.state_dict().items():
            torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    module.eval()  # eval mode has no r or d: the limits are not used
    module.rmax = 0.5
    module(x)


def test_input_errors(gen):
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        fbt.BatchRenorm2d(C)(torch.ones(2, C, 3))
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
        fbt.BatchRenorm1d(C)(torch.ones(2, C, 3, 3))
    with pytest.raises(ValueError, match=r"expected 5D input"):
        fbt.BatchRenorm3d(C)(torch.ones(2, C, 3, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        fbt.BatchRenorm1d(C)(torch.ones(1, C))
    # torch's order of checks: the running statistics first
    with pytest.raises(RuntimeError, match="running_mean should contain 4 elements not 3"):
        fbt.BatchRenorm1d(C)(torch.ones(5, 4))


def test_non_finite_batch_warns_and_keeps_the_running_statistics(gen):
    module = make_module(gen, 1)
    x = make_input(gen, (6, C))
    x[2, 1] = float("nan")
    state = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.warns(RuntimeWarning, match=r"features \[1\] are not finite") as record:
        y = module(x)
    assert record[0].filename == __file__  # the warning names the caller's line
    assert torch.isnan(y[:, 1]).all() and torch.isfinite(y[:, [0, 2]]).all()
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, equal_nan=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module(make_input(gen, (6, C)))  # a finite batch is taken, silently
    assert int(module.num_batches_tracked) == int(state["num_batches_tracked"]) + 1
