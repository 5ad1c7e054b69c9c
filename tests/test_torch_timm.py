"""fastbn.torch and timm: `convert` takes timm's BatchNormAct2d, with timm's results.

- timm's CNNs whose norm layers are BatchNormAct2d: every one of them is
  converted, a training step (outputs, every gradient, the running
  statistics) and eval match timm's unconverted copy in float64, the
  state_dict keys stay and load both ways, `revert` gives timm's classes
  back;
- one layer in every configuration timm's constructor takes (momentum None,
  no affine, no tracking, no act, a drop layer before a SiLU) against
  timm's, and what a converted layer keeps (parameters, buffers, act, drop,
  hooks, training mode, isinstance), timm's input check, torch.fx, torch.jit
  script and whole-module pickling;
- timm's other batch norms (sync, frozen, split, a subclass) are left alone,
  and `convert` never imports timm.

Every test but the last skips, saying why, where timm is not installed
(``python -m pip install --no-deps timm==1.0.31 torchvision==0.28.0``, as
.ci/run does).
"""

import copy
import functools
import importlib
import importlib.util
import io
import sys
import types

import pytest
from conftest import python_env, run_python

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import fastbn.torch as fbt  # noqa: E402
import fastbn.torch.timm as fbt_timm  # noqa: E402

# timm's CNNs built of BatchNormAct2d, with how many each has in timm 1.0.31 (rexnet_100 has
# 13 torch BatchNorm2d too, in its squeeze-excitation blocks).
MODELS = {
    "efficientnet_b0": 49,
    "mobilenetv3_large_100": 46,
    "regnety_004": 53,
    "densenet121": 121,
    "mixnet_s": 49,
    "rexnet_100": 49,
    "tf_efficientnetv2_b0": 59,
}
# Batch 4 of 3x32x32: each model's last stage is 1x1, and a batch norm over 2 values per
# channel has no gradient but rounding noise, which two implementations don't share.
INPUT_SHAPE = (4, 3, 32, 32)
# float64: the bridge's tolerance, relative to the largest value of the compared tensors.
TOL = 1e-10


def import_timm():
    """timm, or a skip that says why.

    timm imports torchvision's Python modules (``torchvision.ops.misc``,
    ``torchvision.transforms``) but builds its models without torchvision's
    compiled ops, and those do not load here: PyPI's torchvision links
    torch's CUDA libraries, which the CPU build of torch lacks, and its
    ``__init__`` fails on them. torchvision is entered as a bare package over
    its folder (its ``__init__`` not run), from which the submodules import.
    """
    if importlib.util.find_spec("timm") is None:
        pytest.skip(
            "timm is not installed: python -m pip install --no-deps timm==1.0.31 "
            "torchvision==0.28.0 (.ci/run installs it)"
        )
    if "torchvision" not in sys.modules:
        spec = importlib.util.find_spec("torchvision")
        if spec is None:
            pytest.skip("timm imports torchvision, which is not installed")
        package = types.ModuleType("torchvision")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torchvision"] = package
    return importlib.import_module("timm")


@pytest.fixture(scope="module")
def timm():
    return import_timm()


@pytest.fixture(scope="module")
def norm_act(timm):
    """timm.layers.norm_act, where timm's BatchNormAct2d and its relatives live."""
    return importlib.import_module("timm.layers.norm_act")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(20240613)


@pytest.fixture
def one_torch_thread():
    """torch at one thread for the test, restored after: the models' float64 depthwise
    convolutions are many small parallel regions, which on a loaded 2-core machine stall
    (a tf_efficientnetv2_b0 step took 17 s at 2 threads, 1.2 s at one), and these tests
    check results, not speed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_matches(theirs, ours, names):
    """Each pair within TOL times the largest magnitude among theirs."""
    scale = max(t.detach().abs().max().item() for t in theirs)
    for name, a, b in zip(names, theirs, ours, strict=True):
        assert a.shape == b.shape, name
        gap = (a.detach() - b.detach()).abs().max().item()
        assert gap <= TOL * scale, f"{name}: {gap:.3g} apart (scale {scale:.3g})"


def run_seeded(model, x, seed=7):
    """model(x) with the global RNG seeded: the random drop layers draw alike for both copies."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return model(x)


def bn_act_layers(model, cls):
    return [name for name, m in model.named_modules() if type(m) is cls]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.usefixtures("one_torch_thread")
def test_model_trains_as_timms(timm, norm_act, gen, name):
    torch.manual_seed(0)  # timm's initialization
    theirs = timm.create_model(name, num_classes=5).double()
    layers = bn_act_layers(theirs, norm_act.BatchNormAct2d)
    assert len(layers) == MODELS[name]
    ours = fbt.convert(copy.deepcopy(theirs), implementation="fastbn")
    fast = fbt_timm.BatchNormAct2d
    assert bn_act_layers(ours, fast) == layers
    assert not bn_act_layers(ours, norm_act.BatchNormAct2d)
    assert list(ours.state_dict()) == list(theirs.state_dict())

    x = torch.randn(INPUT_SHAPE, generator=gen, dtype=torch.float64)
    weights = torch.randn(INPUT_SHAPE[0], 5, generator=gen, dtype=torch.float64)
    outputs = [run_seeded(model, x) for model in (theirs, ours)]
    for out in outputs:
        (out * weights).sum().backward()
    assert_matches(outputs[:1], outputs[1:], ["output"])
    names = [n for n, _ in theirs.named_parameters()]
    grads = [[p.grad for p in model.parameters()] for model in (theirs, ours)]
    assert_matches(grads[0], grads[1], names)
    for suffix in ("running_mean", "running_var", "num_batches_tracked"):
        names = [n for n, _ in theirs.named_buffers() if n.endswith(suffix)]
        buffers = [[model.get_buffer(n) for n in names] for model in (theirs, ours)]
        assert_matches(buffers[0], buffers[1], names)

    theirs.eval()
    ours.eval()
    with torch.no_grad():
        assert_matches([theirs(x)], [ours(x)], ["eval output"])

    # The state_dicts load both ways; revert gives timm's classes back.
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    fbt.revert(ours)
    assert [type(m) for m in ours.modules()] == [type(m) for m in theirs.modules()]
    assert bn_act_layers(ours, norm_act.BatchNormAct2d) == layers


# Keywords of timm's BatchNormAct2d: each configuration a batch norm can be in, an act (or
# none), and a drop layer, which timm applies before the act.
LAYER_CONFIGS = {
    "default": {},
    "silu_after_dropout": {"act_layer": nn.SiLU, "drop_layer": functools.partial(nn.Dropout, 0.5)},
    "cumulative": {"momentum": None, "act_layer": nn.GELU},
    "no_affine": {"affine": False, "act_layer": nn.Hardswish},
    "untracked": {"track_running_stats": False, "act_layer": nn.SiLU},
    "no_act": {"apply_act": False, "eps": 1e-3, "momentum": 0.01},
}


@pytest.mark.parametrize("config", LAYER_CONFIGS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_layer_matches_timms(norm_act, gen, config, channels_last):
    torch.manual_seed(0)
    theirs = norm_act.BatchNormAct2d(6, dtype=torch.float64, **LAYER_CONFIGS[config])
    if theirs.affine:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5, generator=gen)
            theirs.bias.normal_(generator=gen)
    ours = fbt.convert(copy.deepcopy(theirs), implementation="fastbn")
    assert type(ours) is fbt_timm.BatchNormAct2d
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for step in range(2):  # two batches: the cumulative average differs from one
        x = 2 + 3 * torch.randn(5, 6, 4, 3, generator=gen, dtype=torch.float64)
        x = x.to(memory_format=memory_format)
        dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        inputs = [x.clone().requires_grad_() for _ in range(2)]
        outputs = [run_seeded(theirs, inputs[0], step), run_seeded(ours, inputs[1], step)]
        for out in outputs:
            out.backward(dy)
        assert outputs[1].is_contiguous(memory_format=memory_format)
        assert_matches(outputs[:1], outputs[1:], ["output"])
        assert_matches([inputs[0].grad], [inputs[1].grad], ["input grad"])
        params = [list(m.parameters()) for m in (theirs, ours)]
        if params[0]:
            assert_matches([p.grad for p in params[0]], [p.grad for p in params[1]], ["w", "b"])
    buffers = [dict(m.named_buffers()) for m in (theirs, ours)]
    assert list(buffers[0]) == list(buffers[1])
    for name in buffers[0]:
        assert_matches([buffers[0][name]], [buffers[1][name]], [name])
    theirs.eval()
    ours.eval()
    with torch.no_grad():
        assert_matches([theirs(x)], [ours(x)], ["eval output"])


def test_converted_layer_keeps_its_state(norm_act):
    layer = norm_act.BatchNormAct2d(4, act_layer=nn.SiLU, drop_layer=nn.Dropout).eval()
    before = {**dict(layer.named_parameters()), **dict(layer.named_buffers())}
    act, drop = layer.act, layer.drop
    calls = []
    layer.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    fbt.convert(layer)
    assert type(layer) is fbt_timm.BatchNormAct2d
    assert isinstance(layer, norm_act.BatchNormAct2d)
    assert {**dict(layer.named_parameters()), **dict(layer.named_buffers())} == before
    assert all(t is before[n] for n, t in [*layer.named_parameters(), *layer.named_buffers()])
    assert layer.act is act and layer.drop is drop and not layer.training
    fresh = norm_act.BatchNormAct2d(4, act_layer=nn.SiLU, drop_layer=nn.Dropout)
    assert repr(layer) == repr(fresh)
    layer(torch.randn(2, 4, 3, 3))
    assert calls == [(2, 4, 3, 3)]

    fbt.revert(layer)
    assert type(layer) is norm_act.BatchNormAct2d
    assert layer.__dict__.keys() == fresh.__dict__.keys()


def test_fastbn_class_takes_timms_constructor(norm_act, gen):
    kwargs = {"momentum": 0.2, "act_layer": nn.Hardswish, "inplace": False}
    ours = fbt_timm.BatchNormAct2d(3, **kwargs)
    theirs = norm_act.BatchNormAct2d(3, **kwargs)
    assert isinstance(ours.act, nn.Hardswish) and not ours.act.inplace
    x = torch.randn(4, 3, 2, 2, generator=gen)
    torch.testing.assert_close(ours(x), theirs(x))
    assert fbt_timm.fast_class(norm_act.BatchNormAct2d) is type(ours)


def test_other_batchnorms_left_alone(norm_act):
    split_batchnorm = importlib.import_module("timm.layers.split_batchnorm")

    class Subclass(norm_act.BatchNormAct2d):
        """Someone's subclass of timm's class, which may have a forward of its own."""

    model = nn.Sequential(
        norm_act.SyncBatchNormAct(4),
        norm_act.FrozenBatchNormAct2d(4),
        split_batchnorm.SplitBatchNorm2d(4, num_splits=2),
        Subclass(4),
    )
    classes = [type(m) for m in model]
    fbt.convert(model)  # SplitBatchNorm2d's auxiliary BatchNorm2d modules are torch's: converted
    assert [type(m) for m in model] == classes
    fbt.revert(model)
    assert [type(m) for m in model] == classes


def test_input_check_is_timms(norm_act):
    x = torch.randn(2, 4, 5)
    layers = [norm_act.BatchNormAct2d(4), fbt.convert(norm_act.BatchNormAct2d(4))]
    messages = []
    for layer in layers:
        with pytest.raises(AssertionError) as error:
            layer(x)
        messages.append(str(error.value))
    assert messages[0] == messages[1] == "expected 4D input (got 3D input)"


def test_fx_records_the_layer_once(norm_act, gen):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), norm_act.BatchNormAct2d(4, act_layer=nn.SiLU))
    fbt.convert(model)
    graph = torch.fx.symbolic_trace(model)
    ops = [node.op for node in graph.graph.nodes]
    assert ops == ["placeholder", "call_module", "call_module", "output"]
    x = torch.randn(2, 3, 4, 4, generator=gen)
    expected = copy.deepcopy(model)(x)
    torch.testing.assert_close(graph(x), expected)
    assert graph.get_submodule("1").num_batches_tracked.item() == 1  # one call, not traced


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script's
def test_script_runs_timms_forward(norm_act, gen):
    theirs = norm_act.BatchNormAct2d(4, act_layer=nn.SiLU, momentum=None)
    ours = fbt.convert(copy.deepcopy(theirs), implementation="fastbn")
    scripted = [torch.jit.script(m) for m in (theirs, ours)]
    for _ in range(2):
        x = torch.randn(3, 4, 2, 2, generator=gen, dtype=torch.float32)
        torch.testing.assert_close(scripted[1](x), scripted[0](x))
    for a, b in zip(scripted[0].buffers(), scripted[1].buffers(), strict=True):
        torch.testing.assert_close(a, b)


def test_whole_model_pickles(norm_act, gen):
    model = fbt.convert(nn.Sequential(nn.Conv2d(3, 4, 1), norm_act.BatchNormAct2d(4)))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded[1]) is fbt_timm.BatchNormAct2d
    x = torch.randn(2, 3, 4, 4, generator=gen)
    torch.testing.assert_close(loaded(x), model(x))


def test_convert_never_imports_timm(subprocess_cache):
    code = (
        "import sys, torch\n"
        "import fastbn.torch as fbt\n"
        "model = fbt.revert(fbt.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(3))))\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('timm', 'torchvision'))\n"
        "assert not leaked, leaked\n"
    )
    run_python(code, python_env(subprocess_cache), timeout=120)
