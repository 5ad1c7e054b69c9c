"""Which implementation takes a module's call: fastbn's kernels or torch's op (dispatch.py).

Both sides of every crossover of the shipped table, the user's choice (``implementation``
of the modules and of ``convert``), and torch's op path against torch's own module,
fastbn's running-statistics rule included.
"""

import copy
import warnings

import pytest
import torch

import fastbn.torch as fbt
from fastbn.torch import dispatch

pytestmark = pytest.mark.auto_dispatch  # the shipped crossover, not conftest's kernels-always

C = 16
LAYOUT_NAMES = ("batch_first", "channels_first", "channels_last")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def shape_of(layout, numel):
    """A shape of exactly numel elements (a multiple of 4 * C) in layout, C channels."""
    if layout == "batch_first":
        return (numel // C, C)
    return (numel // (4 * C), C, 2, 2)


def make_input(layout, shape, dtype, gen):
    x = torch.randn(shape, generator=gen, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


def module_for(shape, dtype, implementation="auto"):
    cls = fbt.BatchNorm1d if len(shape) == 2 else fbt.BatchNorm2d
    return cls(C, dtype=dtype, implementation=implementation)


def ran(y):
    """Which implementation made y: torch's op leaves its C++ node, fastbn its Function."""
    name = type(y.grad_fn).__name__
    assert name in ("NativeBatchNormBackward0", "BatchNormFunctionBackward"), name
    return "torch" if name.startswith("Native") else "fastbn"


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(20261207)


def test_the_table_covers_every_key_a_call_can_have():
    keys = {
        (layout, dtype, mode)
        for layout in LAYOUT_NAMES
        for dtype in DTYPES
        for mode in ("train", "eval")
    }
    assert set(dispatch.CROSSOVER) == keys
    assert len(dispatch.THRESHOLDS) == len(keys)
    assert dispatch.SMALLEST == min(dispatch.THRESHOLDS.values())  # no key is asked below it


@pytest.mark.parametrize(("layout", "dtype", "mode"), list(dispatch.CROSSOVER))
def test_each_side_of_the_crossover_takes_its_implementation(gen, layout, dtype, mode):
    threshold = dispatch.CROSSOVER[(layout, dtype, mode)]
    step = 4 * C  # the smallest change of size shape_of makes
    sizes = {"below": 8 * step if threshold is None else threshold - step}
    if threshold is not None:
        sizes["at"] = threshold
    for side, numel in sizes.items():
        shape = shape_of(layout, numel)
        bn = module_for(shape, DTYPES[dtype]).train(mode == "train")
        x = make_input(layout, shape, DTYPES[dtype], gen)
        assert dispatch.layout(x) == layout
        expected = "torch" if side == "below" else "fastbn"
        assert ran(bn(x)) == expected, (side, shape)


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
@pytest.mark.parametrize("implementation", ["fastbn", "torch"])
def test_a_forced_implementation_takes_every_size(gen, layout, implementation):
    for numel in (8 * 4 * C, 1 << 20):
        shape = shape_of(layout, numel)
        for training in (True, False):
            bn = module_for(shape, torch.float32, implementation).train(training)
            assert ran(bn(make_input(layout, shape, torch.float32, gen))) == implementation


def test_convert_sets_the_implementation_of_every_layer_and_revert_removes_it():
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(C), torch.nn.Linear(2, 2), fbt.BatchNorm1d(C))
    fbt.convert(model, implementation="torch")
    layers = [model[0], model[2]]
    assert all(layer.implementation == "torch" for layer in layers)
    assert "implementation='torch'" in repr(model[0])
    fbt.convert(model)  # the default chooses by the table again
    assert all(layer.implementation == "auto" for layer in layers)
    assert "implementation" not in repr(model[0])
    fbt.revert(model)
    assert type(model[0]) is torch.nn.BatchNorm2d and "implementation" not in model[0].__dict__


@pytest.mark.parametrize("bad", ["Torch", "numba", None, 1])
def test_an_unknown_implementation_raises(bad):
    with pytest.raises(
        ValueError, match="implementation must be one of 'auto', 'fastbn', 'torch'"
    ):
        fbt.BatchNorm2d(C, implementation=bad)
    with pytest.raises(ValueError, match=r"implementation must be one of"):
        fbt.convert(torch.nn.BatchNorm2d(C), implementation=bad)


# ------------------------------------------------- torch's op path against torch's module


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_torch_op_path_gives_torchs_module_bit_for_bit(gen, layout, dtype, momentum):
    shape = shape_of(layout, 8 * 4 * C)
    cls = torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d
    theirs = cls(C, momentum=momentum, dtype=DTYPES[dtype])
    with torch.no_grad():
        theirs.weight.normal_(generator=gen)
        theirs.bias.normal_(generator=gen)
    ours = fbt.convert(copy.deepcopy(theirs), implementation="torch")
    for step in range(3):
        training = step < 2
        x = make_input(layout, shape, DTYPES[dtype], gen)
        dy = torch.randn(shape, generator=gen, dtype=DTYPES[dtype])
        results = []
        for module in (ours, theirs):
            module.train(training)
            x.grad = None
            module.zero_grad()
            y = module(x)
            y.backward(dy)
            results.append((y, x.grad, module.weight.grad, module.bias.grad))
        for a, b in zip(*results, strict=True):
            assert torch.equal(a, b)
            assert a.stride() == b.stride()
    for name, buffer in theirs.named_buffers():
        assert torch.equal(dict(ours.named_buffers())[name], buffer), name
    assert int(ours.num_batches_tracked) == 2


@pytest.mark.parametrize("momentum", [0.1, None])
def test_torch_op_path_keeps_running_statistics_from_a_bad_batch(gen, momentum):
    bn = fbt.BatchNorm2d(C, momentum=momentum, implementation="torch")
    x = torch.randn(4, C, 2, 2, generator=gen)
    bn(x)  # one good batch
    state = {name: t.clone() for name, t in bn.state_dict().items()}
    x[1, 3, 0, 1] = float("nan")
    x[2, 5] = float("inf")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        y = bn(x)
    assert [w.filename for w in record] == [__file__]  # names the caller's line
    assert "features [3, 5]" in str(record[0].message)
    for name, t in bn.state_dict().items():
        assert torch.equal(t, state[name]), name
    assert torch.isnan(y[:, 3]).all() and torch.isfinite(y[:, 0]).all()  # torch's output
    bn(torch.randn(4, C, 2, 2, generator=gen))  # the next good batch is taken
    assert int(bn.num_batches_tracked) == 2


def test_torch_op_path_takes_finite_statistics_whose_product_overflows(gen):
    # The rule checks mean . var first: its overflow alone must not reject a batch.
    bn = fbt.BatchNorm1d(C, implementation="torch")
    x = torch.randn(8, C, generator=gen) * 1e18 + 1e20  # mean ~1e20, var ~1e36: finite
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn(x)
    assert int(bn.num_batches_tracked) == 1
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()
    assert float(bn.running_mean.double() @ bn.running_var.double()) > 3.5e38  # overflows
    assert torch.allclose(bn.running_mean, 0.1 * x.mean(0))


def test_torch_op_path_rejects_a_variance_that_overflows(gen):
    bn = fbt.BatchNorm1d(C, implementation="torch")
    x = torch.randn(8, C, generator=gen)
    x[0, 2] = 3e38  # finite data, but its variance overflows float32
    with pytest.warns(RuntimeWarning, match=r"features \[2\]"):
        bn(x)
    assert int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.running_var, torch.ones(C))


def test_torch_op_path_without_tracking_or_affine_is_torchs(gen):
    x = make_input("channels_first", (8, C, 2, 2), torch.float64, gen)
    for kwargs in ({"track_running_stats": False}, {"affine": False}):
        theirs = torch.nn.BatchNorm2d(C, dtype=torch.float64, **kwargs)
        ours = fbt.convert(copy.deepcopy(theirs), implementation="torch")
        for training in (True, False):
            assert torch.equal(ours.train(training)(x), theirs.train(training)(x))
        for name, buffer in theirs.named_buffers():
            assert torch.equal(dict(ours.named_buffers())[name], buffer), name


@pytest.mark.parametrize("implementation", ["auto", "torch"])
def test_fused_relu_on_torchs_op_gives_the_kernels_results_and_survives_in_place_ops(
    gen, implementation
):
    # Below the crossover (or forced) a fused ReLU runs torch's op then threshold, whose
    # backward reads its input: an in-place op on the output (a residual add) breaks nothing.
    x = make_input("channels_first", (8, C, 2, 2), torch.float64, gen).requires_grad_()
    ours = fbt.BatchNormReLU2d(C, dtype=torch.float64, implementation=implementation)
    kernels = fbt.BatchNormReLU2d(C, dtype=torch.float64, implementation="fastbn")
    theirs = torch.nn.BatchNorm2d(C, dtype=torch.float64)
    y = ours(x)
    assert type(y.grad_fn).__name__ == "ThresholdBackward0"
    y_kernels = kernels(x)
    assert type(y_kernels.grad_fn).__name__ == "BatchNormFunctionBackward"
    torch.testing.assert_close(y, y_kernels)
    torch.testing.assert_close(y, torch.relu(theirs(x)))
    residual = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    (gx,) = torch.autograd.grad((y.add_(residual) ** 2).sum(), x)
    (gx_kernels,) = torch.autograd.grad((y_kernels.add_(residual) ** 2).sum(), x)
    torch.testing.assert_close(gx, gx_kernels)
    for name, buffer in kernels.named_buffers():
        torch.testing.assert_close(dict(ours.named_buffers())[name], buffer)


@pytest.mark.parametrize("implementation", ["torch", "fastbn"])
@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_a_per_channel_tensor_of_the_wrong_size_raises_torchs_error_and_changes_nothing(
    gen, implementation, name
):
    # torch's op path leaves the size check to torch's op, the kernels' path makes it itself:
    # the same error, and neither the buffers nor the counter move.
    bn = fbt.BatchNorm1d(C, implementation=implementation)
    tensor = getattr(bn, name)
    tensor.data = torch.ones(C - 1) if name == "running_var" else torch.zeros(C - 1)
    state = {key: t.clone() for key, t in bn.state_dict().items()}
    x = torch.randn(8, C, generator=gen)
    with pytest.raises(RuntimeError, match=rf"^{name} should contain {C} elements not {C - 1}$"):
        bn(x)
    for key, t in bn.state_dict().items():
        assert torch.equal(t, state[key]), key
