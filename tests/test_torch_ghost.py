"""Ghost batch norm in the PyTorch bridge: ``virtual_batch_size`` on fastbn's BatchNorm1d/2d/3d.

The reference is torch's own BatchNorm module called on each consecutive
slice of k examples in turn: outputs, input gradients, weight and bias
gradients (torch accumulates them over the slices), running statistics and
num_batches_tracked over several training steps. Plus gradcheck and
gradgradcheck in float64, torch.compile(fullgraph=True) against eager, the
torch-op fallback, and the errors.
"""

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")

import fastbn.torch as fbt  # noqa: E402
from fastbn.torch import ghost  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method`:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning"),
]

C = 3
CL = torch.channels_last
CL3 = torch.channels_last_3d
DTYPES = {"float32": torch.float32, "float64": torch.float64}
TOL = {torch.float32: 2e-5, torch.float64: 1e-10}

# name -> (module class, input shape, memory format, k)
LAYOUTS = {
    "nc": (fbt.BatchNorm1d, (12, C), None, 4),
    "ncl": (fbt.BatchNorm1d, (12, C, 5), None, 3),
    "nchw": (fbt.BatchNorm2d, (8, C, 4, 5), None, 2),
    "nchw_long_runs": (fbt.BatchNorm2d, (8, C, 6, 6), None, 4),
    "nchw_channels_last": (fbt.BatchNorm2d, (8, C, 4, 5), CL, 2),
    "ncdhw_channels_last_3d": (fbt.BatchNorm3d, (6, C, 2, 3, 4), CL3, 3),
    "ncdhw": (fbt.BatchNorm3d, (6, C, 2, 3, 4), None, 2),
}

TORCH_CLASS = {
    fbt.BatchNorm1d: torch.nn.BatchNorm1d,
    fbt.BatchNorm2d: torch.nn.BatchNorm2d,
    fbt.BatchNorm3d: torch.nn.BatchNorm3d,
}


@pytest.fixture
def gen():
    """A torch generator with a fixed seed for every test."""
    return torch.Generator().manual_seed(20240611)


def make_input(gen, shape, dtype, memory_format=None):
    """Data whose examples differ in scale and offset, so that slices matter."""
    scale = torch.rand(shape[0], generator=gen, dtype=dtype) * 2.5 + 0.5
    x = torch.randn(shape, generator=gen, dtype=dtype) * scale.view(-1, *[1] * (len(shape) - 1))
    x = x + 1.5
    return x if memory_format is None else x.contiguous(memory_format=memory_format)


def module_pair(gen, cls, dtype, k, **kwargs):
    """fastbn's module with virtual_batch_size=k and torch's, with the same random affine."""
    ours = cls(C, dtype=dtype, virtual_batch_size=k, **kwargs)
    theirs = TORCH_CLASS[cls](C, dtype=dtype, **kwargs)
    if ours.affine:
        with torch.no_grad():
            ours.weight.copy_(torch.rand(C, generator=gen, dtype=dtype) + 0.5)
            ours.bias.copy_(torch.randn(C, generator=gen, dtype=dtype))
            theirs.weight.copy_(ours.weight)
            theirs.bias.copy_(ours.bias)
    return ours, theirs


def sliced_step(module, x, dy, k):
    """torch's module on each slice of k examples in turn: (y, dx)."""
    x = x.detach().clone().requires_grad_()
    y = torch.cat([module(x[g : g + k]) for g in range(0, x.shape[0], k)])
    y.backward(dy)
    return y, x.grad


def step(module, x, dy):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    return y, x.grad


def assert_close(actual, expected, tol, what):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def assert_state_close(ours, theirs, tol, what):
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked), what
    assert_close(ours.running_mean, theirs.running_mean, tol, f"{what} running_mean")
    assert_close(ours.running_var, theirs.running_var, tol, f"{what} running_var")


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_equals_torch_on_each_slice(gen, layout, dtype, momentum):
    cls, shape, memory_format, k = LAYOUTS[layout]
    dtype = DTYPES[dtype]
    tol = TOL[dtype]
    ours, theirs = module_pair(gen, cls, dtype, k, momentum=momentum)
    for i in range(3):
        x = make_input(gen, shape, dtype, memory_format)
        dy = torch.randn(shape, generator=gen, dtype=dtype)
        y, dx = step(ours, x, dy)
        y_ref, dx_ref = sliced_step(theirs, x, dy, k)
        what = f"step {i}"
        assert_close(y, y_ref, tol, f"{what} y")
        assert_close(dx, dx_ref, tol, f"{what} dx")
        grad_tol = tol * shape[0]  # sums over the batch
        assert_close(ours.weight.grad, theirs.weight.grad, grad_tol, f"{what} weight.grad")
        assert_close(ours.bias.grad, theirs.bias.grad, grad_tol, f"{what} bias.grad")
        assert_state_close(ours, theirs, tol, what)
        if memory_format is not None:
            assert y.is_contiguous(memory_format=memory_format)
        for module in (ours, theirs):
            module.zero_grad()
    assert int(ours.num_batches_tracked) == 3 * shape[0] // k


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_input(gen, dtype):
    dtype = DTYPES[dtype]
    ours, theirs = module_pair(gen, fbt.BatchNorm2d, dtype, 2)
    base = make_input(gen, (8, C, 6, 10), dtype)
    x = base[:, :, ::2, 1::3]  # neither contiguous nor channels_last
    dy = torch.randn(x.shape, generator=gen, dtype=dtype)
    y, dx = step(ours, x, dy)
    y_ref, dx_ref = sliced_step(theirs, x, dy, 2)
    assert_close(y, y_ref, TOL[dtype], "y")
    assert_close(dx, dx_ref, TOL[dtype], "dx")
    assert_state_close(ours, theirs, TOL[dtype], "state")


def test_one_slice_is_plain_batch_norm(gen):
    x = make_input(gen, (8, C, 4), torch.float64)
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    ours, theirs = module_pair(gen, fbt.BatchNorm1d, torch.float64, 8)
    y, dx = step(ours, x, dy)
    y_ref, dx_ref = step(theirs, x, dy)
    assert_close(y, y_ref, 1e-12, "y")
    assert_close(dx, dx_ref, 1e-12, "dx")
    assert_state_close(ours, theirs, 1e-12, "state")


def test_eval_and_no_running_stats(gen):
    """Eval ignores virtual batches; without running statistics training still uses them."""
    ours, theirs = module_pair(gen, fbt.BatchNorm2d, torch.float64, 2)
    x = make_input(gen, (8, C, 3, 3), torch.float64)
    step(ours, x, torch.ones_like(x))
    sliced_step(theirs, x, torch.ones_like(x), 2)
    ours.eval()
    theirs.eval()
    odd = make_input(gen, (5, C, 3, 3), torch.float64)  # 5: not a multiple of k
    assert_close(ours(odd), theirs(odd), 1e-12, "eval")

    untracked, reference = module_pair(gen, fbt.BatchNorm2d, torch.float64, 4,
                                       track_running_stats=False)  # fmt: skip
    y = untracked(x)
    y_ref = torch.cat([reference(x[:4]), reference(x[4:])])
    assert_close(y, y_ref, 1e-12, "untracked training")
    assert untracked.running_mean is None


def test_nonfinite_slice_leaves_the_buffers_unchanged_and_warns(gen):
    ours, _ = module_pair(gen, fbt.BatchNorm2d, torch.float32, 2)
    step(ours, make_input(gen, (8, C, 3, 3), torch.float32), torch.ones(8, C, 3, 3))
    saved = {k: v.clone() for k, v in ours.state_dict().items()}
    x = make_input(gen, (8, C, 3, 3), torch.float32)
    x[5, 1, 0, 0] = float("nan")  # slice 2 of 4: slices 0 and 1 would be folded before it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = ours(x)
    (warning,) = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert "[1]" in str(warning.message) and warning.filename == __file__
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=key)
    # The output is each slice's: NaN only in channel 1 of slice 2.
    nan = torch.isnan(y)
    assert nan[4:6, 1].all() and int(nan.sum()) == 2 * 9


def test_errors(gen):
    module = fbt.BatchNorm1d(C, virtual_batch_size=4)
    with pytest.raises(ValueError, match=r"virtual_batch_size=4 .*batch size 10"):
        module(torch.randn(10, C))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        fbt.BatchNorm1d(C, virtual_batch_size=1)(torch.randn(8, C))
    with pytest.raises(ValueError, match="virtual_batch_size must be positive, got 0"):
        fbt.BatchNorm2d(C, virtual_batch_size=0)
    with pytest.raises(TypeError, match=r"virtual_batch_size must be an int, got 2\.0"):
        fbt.BatchNorm2d(C, virtual_batch_size=2.0)
    # Checked in the fallback too: float16 takes the torch-op formula.
    with pytest.raises(ValueError, match=r"virtual_batch_size=4 .*batch size 10"):
        module.half()(torch.randn(10, C, dtype=torch.float16))


def test_module_options(gen):
    module = fbt.BatchNorm2d(C, momentum=0.2, virtual_batch_size=4)
    expected = repr(torch.nn.BatchNorm2d(C, momentum=0.2))[: -len(")")]
    assert repr(module) == f"{expected}, virtual_batch_size=4)"
    assert repr(fbt.BatchNorm2d(C)) == repr(torch.nn.BatchNorm2d(C))
    assert module.state_dict().keys() == torch.nn.BatchNorm2d(C).state_dict().keys()
    assert copy.deepcopy(module).virtual_batch_size == 4
    # A converted torch module has no such attribute: plain batch norm.
    converted = fbt.convert(torch.nn.BatchNorm2d(C))
    assert not hasattr(converted, "virtual_batch_size")
    x = make_input(gen, (4, C, 2, 2), torch.float32)
    assert_close(converted(x), torch.nn.BatchNorm2d(C)(x), 2e-5, "converted")


def test_gradcheck_and_gradgradcheck(gen):
    x = make_input(gen, (6, C, 2, 2), torch.float64).requires_grad_()
    weight = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(C, generator=gen, dtype=torch.float64).requires_grad_()

    def ghost_bn(x, weight, bias):
        return ghost.forward(x, None, None, weight, bias, 2, 0.1, 1e-5)

    assert torch.autograd.gradcheck(ghost_bn, (x, weight, bias))
    assert torch.autograd.gradgradcheck(ghost_bn, (x, weight, bias))
    module = fbt.BatchNorm1d(C, dtype=torch.float64, virtual_batch_size=3)
    x1 = make_input(gen, (9, C), torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(module, (x1,))


@pytest.mark.parametrize("dtype", DTYPES)
def test_compile_fullgraph_equals_eager(gen, dtype):
    dtype = DTYPES[dtype]
    tol = TOL[dtype]
    eager, _ = module_pair(gen, fbt.BatchNorm2d, dtype, 2, momentum=None)
    compiled_module = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_module, fullgraph=True)
    try:
        for i, memory_format in enumerate((None, CL)):
            x = make_input(gen, (8, C, 3, 4), dtype, memory_format)
            dy = torch.randn(x.shape, generator=gen, dtype=dtype)
            y, dx = step(compiled, x, dy)
            y_ref, dx_ref = step(eager, x, dy)
            what = f"step {i}"
            assert_close(y, y_ref, tol, f"{what} y")
            assert_close(dx, dx_ref, tol, f"{what} dx")
            assert_close(compiled_module.weight.grad, eager.weight.grad, tol * 8, f"{what} dw")
            assert_state_close(compiled_module, eager, tol, what)
    finally:
        torch._dynamo.reset()
    assert int(eager.num_batches_tracked) == 8


def test_fallback_formula_for_other_dtypes(gen):
    """bfloat16 takes the torch-op formula: each slice as torch normalizes it in float32."""
    ours, theirs = module_pair(gen, fbt.BatchNorm2d, torch.float32, 2)
    ours.to(torch.bfloat16)
    x = make_input(gen, (6, C, 3, 3), torch.float32).to(torch.bfloat16)
    y = ours(x)
    y_ref = torch.cat([theirs(x[g : g + 2].float()) for g in range(0, 6, 2)])
    assert y.dtype == torch.bfloat16
    assert_close(y.float(), y_ref, 2e-2, "y")
    assert int(ours.num_batches_tracked) == 3
    assert_close(ours.running_mean.float(), theirs.running_mean, 1e-2, "running_mean")
    assert_close(ours.running_var.float(), theirs.running_var, 1e-2, "running_var")


def test_fused_relu_module_applies_its_relu_after_the_slices(gen):
    ours = fbt.BatchNormReLU2d(C, dtype=torch.float64, virtual_batch_size=2)
    theirs = torch.nn.BatchNorm2d(C, dtype=torch.float64)
    x = make_input(gen, (6, C, 3, 3), torch.float64)
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    y, dx = step(ours, x, dy)
    relu_then = torch.nn.Sequential(theirs, torch.nn.ReLU())
    y_ref, dx_ref = sliced_step(relu_then, x, dy, 2)
    assert (y == 0).any()
    assert_close(y, y_ref, 1e-12, "y")
    assert_close(dx, dx_ref, 1e-12, "dx")
    assert_state_close(ours, theirs, 1e-12, "state")
