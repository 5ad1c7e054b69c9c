"""fastbn.torch under torch.compile, ONNX and torch.export (the contract's PyTorch bridge).

Compiled graphs call torch's batch norm (inductor fuses it with the ops around
it; `fastbn.torch.functional._compiled` has the measurement) with fastbn's
running-statistics rule; the tests check both, and which op the graphs call.

- `torch.compile(..., fullgraph=True)` of a converted model against the same
  model in eager mode (and torch's): training steps, eval, channels_last;
  of single layers away from the defaults (momentum 0.5 and None, eps,
  affine=False, track_running_stats=False, fused ReLU, renorm, ghost
  batches) against the eager layer, running statistics included; of
  `fbt.batch_norm` itself against eager and torch's F.batch_norm;
- the non-finite rule under compile, and eager's warning;
- fallbacks: a bfloat16 model compiled gives torch's results;
- ONNX export (legacy and dynamo) gives the graph of torch's own BatchNorm;
  `torch.export` gives a graph of torch's ops;
- double backward in eager (gradgradcheck).

Compiles are slow (seconds each): one compiled model is reused across the
training, eval and channels_last checks.
"""

import copy
import io
import re
import warnings

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import fastbn.torch as fbt  # noqa: E402

# torch's own warnings: importing inductor, the dynamo ONNX exporter.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method`:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning"),
]

C = 3
CL = torch.channels_last
CL3 = torch.channels_last_3d
F64 = torch.float64
TOL64 = 1e-10
DTYPES = {"float32": torch.float32, "float64": torch.float64}

# name -> (input shape, memory format or None)
LAYOUTS = {
    "nc": ((6, C), None),
    "ncl": ((4, C, 5), None),
    "nchw": ((2, C, 4, 5), None),
    "nchw_channels_last": ((2, C, 4, 5), CL),
    "ncdhw_channels_last_3d": ((2, C, 2, 3, 4), CL3),
}

# The model: conv - BN2d (momentum None) - ReLU - linear - BN1d, on (N, 2, 5, 5) input.
IN_CHANNELS, SIDE, CONV_OUT, LINEAR_OUT, BATCH = 2, 5, 4, 6, 8


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


def make_input(gen, shape, dtype=F64, memory_format=None, *, requires_grad=False):
    """Unit-scale data, each channel with its own offset and scale."""
    x = torch.randn(shape, generator=gen, dtype=F64)
    view = (1, -1) + (1,) * (len(shape) - 2)
    offset = torch.empty(shape[1], dtype=F64).uniform_(-1, 1, generator=gen)
    scale = torch.empty(shape[1], dtype=F64).uniform_(0.5, 2, generator=gen)
    x = (x * scale.view(view) + offset.view(view)).to(dtype)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    return x.requires_grad_(requires_grad)


def vector(gen, dtype, *, positive=False, requires_grad=False):
    """A (C,) tensor: uniform in [0.5, 2] if positive, else standard normal."""
    if positive:
        t = torch.empty(C, dtype=F64).uniform_(0.5, 2, generator=gen)
    else:
        t = torch.randn(C, generator=gen, dtype=F64)
    return t.to(dtype).requires_grad_(requires_grad)


def recording_inductor(graphs):
    """Inductor, recording each graph dynamo hands it (to see which ops were traced)."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    return backend


# The batch norm ops a compiled graph calls: torch's native_batch_norm in training
# (which returns the batch statistics for fastbn's running-statistics rule), torch's
# batch_norm in eval (and where torch's op takes the call with torch's rule), fastbn's
# renorm corrections.
TRAIN_OP, EVAL_OP = "native_batch_norm", "batch_norm"
RENORM_OP = "batch_renorm_corrections.default"


def batch_norm_ops(graphs):
    """The batch norm ops the graphs call, in order: torch's (`TRAIN_OP` in training,
    `EVAL_OP` in eval) and fastbn's renorm corrections (`RENORM_OP`)."""
    names = []
    for gm in graphs:
        for node in gm.graph.nodes:
            name = getattr(node.target, "__name__", str(node.target))
            if node.op == "call_function" and ("batch_norm" in name or "renorm" in name):
                names.append(name)
    return names


def random_affine(gen, module):
    """Weight of either sign with magnitude in [0.5, 2], bias standard normal."""
    c = module.num_features
    sign = torch.where(torch.rand(c, generator=gen) < 0.5, -1.0, 1.0)
    with torch.no_grad():
        module.weight.copy_(torch.empty(c).uniform_(0.5, 2, generator=gen) * sign)
        module.bias.copy_(torch.randn(c, generator=gen))


def make_model(gen, dtype=F64, momentum=None):
    """torch's conv - BN2d(momentum) - ReLU - linear - BN1d, seeded parameters."""
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
        model = nn.Sequential(
            nn.Conv2d(IN_CHANNELS, CONV_OUT, 3, padding=1),
            nn.BatchNorm2d(CONV_OUT, momentum=momentum),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(CONV_OUT * SIDE * SIDE, LINEAR_OUT),
            nn.BatchNorm1d(LINEAR_OUT),
        )
    random_affine(gen, model[1])
    random_affine(gen, model[5])
    return model.to(dtype)


def model_input(gen, dtype=F64, memory_format=None):
    return make_input(gen, (BATCH, IN_CHANNELS, SIDE, SIDE), dtype, memory_format)


def run(call, model, x, dy):
    """Forward x (a fresh leaf) through call, backward dy: output, input and parameter grads."""
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    y = call(x)
    y.backward(dy)
    results = {"y": y.detach(), "dx": x.grad}
    results.update({f"d{name}": p.grad for name, p in model.named_parameters()})
    return results


def sgd_step(model, lr=0.1):
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad


def assert_all_close(actual, expected, tol, context, *, equal_nan=False):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(
            actual[key],
            value,
            rtol=tol,
            atol=tol,
            equal_nan=equal_nan,
            msg=lambda msg, key=key: f"{key}, {context}: {msg}",
        )


def assert_buffers_close(model, expected_model, tol, context):
    """running_mean and running_var within tol, num_batches_tracked equal."""
    expected = dict(expected_model.named_buffers())
    for name, buffer in model.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert int(buffer) == int(expected[name]), f"{name}, {context}"
        else:
            torch.testing.assert_close(
                buffer, expected[name], rtol=tol, atol=tol, msg=f"{name}, {context}"
            )


def numbers_in(message):
    return {int(s) for s in re.findall(r"(?<![\w.])\d+(?![\w.])", message)}


# ---------------------------------------------------------------- torch.compile


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_compiled_model_matches_eager_in_training_eval_and_channels_last(gen, fresh_dynamo):
    """fullgraph compile of a converted model: 3 SGD steps, then eval, then channels_last."""
    theirs = make_model(gen)
    eager = fbt.convert(copy.deepcopy(theirs))
    model = fbt.convert(copy.deepcopy(theirs))
    assert isinstance(model[1], fbt.BatchNorm2d) and isinstance(model[5], fbt.BatchNorm1d)
    graphs = []
    compiled = torch.compile(model, backend=recording_inductor(graphs), fullgraph=True)
    dy_shape = (BATCH, LINEAR_OUT)

    for step in range(3):
        x = model_input(gen)
        dy = make_input(gen, dy_shape)
        mine = run(compiled, model, x, dy)
        context = f"training step {step}"
        assert_all_close(mine, run(eager, eager, x, dy), TOL64, context)
        assert_all_close(mine, run(theirs, theirs, x, dy), TOL64, f"{context}, torch's")
        for m in (model, eager, theirs):
            sgd_step(m)
        assert_buffers_close(model, eager, TOL64, context)
        assert_buffers_close(model, theirs, TOL64, f"{context}, torch's")
    assert int(model[1].num_batches_tracked) == 3 and int(model[5].num_batches_tracked) == 3
    # One graph for the three steps, on fastbn's training op.
    assert len(graphs) == 1
    assert batch_norm_ops(graphs) == [TRAIN_OP] * 2

    before = {name: b.clone() for name, b in model.named_buffers()}
    for m in (compiled, eager, theirs):
        m.eval()
    assert not model.training and not model[1].training
    x = model_input(gen)
    dy = make_input(gen, dy_shape)
    mine = run(compiled, model, x, dy)
    assert_all_close(mine, run(eager, eager, x, dy), TOL64, "eval")
    assert_all_close(mine, run(theirs, theirs, x, dy), TOL64, "eval, torch's")
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name
    assert len(graphs) == 2
    assert batch_norm_ops(graphs[1:]) == [EVAL_OP] * 2

    for m in (compiled, eager, theirs):
        m.train()
    x = model_input(gen, memory_format=CL)
    assert not x.is_contiguous() and x.is_contiguous(memory_format=CL)
    dy = make_input(gen, dy_shape)
    mine = run(compiled, model, x, dy)
    assert_all_close(mine, run(eager, eager, x, dy), TOL64, "channels_last")
    assert_all_close(mine, run(theirs, theirs, x, dy), TOL64, "channels_last, torch's")
    assert_buffers_close(model, eager, TOL64, "channels_last")
    assert_buffers_close(model, theirs, TOL64, "channels_last, torch's")
    assert int(model[1].num_batches_tracked) == 4
    assert batch_norm_ops(graphs[2:]) == [TRAIN_OP] * 2


def test_nonfinite_batch_under_compile_leaves_running_stats(gen, fresh_dynamo):
    """NaN in channel 2: compiled and eager keep the running statistics; eager warns."""
    theirs = nn.BatchNorm2d(5, momentum=None, dtype=F64)
    random_affine(gen, theirs)
    model = fbt.convert(copy.deepcopy(theirs))
    eager = fbt.convert(copy.deepcopy(theirs))
    graphs = []
    compiled = torch.compile(model, backend=recording_inductor(graphs), fullgraph=True)
    shape = (4, 5, 3, 3)

    def all_three(x):
        return compiled(x).detach(), eager(x).detach(), theirs(x).detach()

    for _ in range(2):  # clean batches: running statistics away from their start
        ys = all_three(make_input(gen, shape))
        for y in ys[:2]:
            torch.testing.assert_close(y, ys[2], rtol=TOL64, atol=TOL64)
    assert batch_norm_ops(graphs) == [TRAIN_OP]
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    saved = {m: [getattr(m, b).clone() for b in buffers] for m in (model, eager)}
    untouched = copy.deepcopy(theirs.state_dict())

    bad = make_input(gen, shape)
    bad[1, 2, 0, 1] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # none required under compile
        y_compiled = compiled(bad).detach()
    with pytest.warns(RuntimeWarning) as record:
        y_eager = eager(bad).detach()
    y_theirs = theirs(bad).detach()
    messages = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    assert any(2 in numbers_in(m) and not numbers_in(m) & {0, 1, 3, 4} for m in messages), messages

    for m in (model, eager):
        for name, before in zip(buffers, saved[m], strict=True):
            assert torch.equal(getattr(m, name), before), (type(m), name)
    assert torch.isnan(theirs.running_mean[2]) and int(theirs.num_batches_tracked) == 3
    for y in (y_compiled, y_eager):
        torch.testing.assert_close(y, y_theirs, rtol=TOL64, atol=TOL64, equal_nan=True)
        assert torch.isnan(y[:, 2]).all() and torch.isfinite(y[:, [0, 1, 3, 4]]).all()

    # The next clean batch goes on as if the bad one never came (momentum None: counter 2).
    theirs.load_state_dict(untouched)
    x = make_input(gen, shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ys = all_three(x)
    for m, y in zip((model, eager), ys[:2], strict=True):
        torch.testing.assert_close(y, ys[2], rtol=TOL64, atol=TOL64)
        for name in buffers:
            torch.testing.assert_close(getattr(m, name), getattr(theirs, name), rtol=0, atol=TOL64)
    assert int(model.num_batches_tracked) == 3
    assert len(graphs) == 1


# name -> (make the layer, input shape, memory format, the batch norm op its training
# graph calls: None for ghost batches, computed in torch ops under compile).
# Each configuration is away from the default somewhere the compiled path computes:
# momentum (the running-statistics factor), momentum None (the cumulative average),
# eps, no weight and bias, no running statistics, a fused ReLU, renorm, ghost batches.
COMPILED_LAYERS = {
    "BatchNorm1d_momentum_0.5": (lambda: fbt.BatchNorm1d(C, momentum=0.5), (6, C), None, TRAIN_OP),
    "BatchNorm2d_momentum_none_channels_last": (
        lambda: fbt.BatchNorm2d(C, momentum=None),
        (2, C, 4, 5),
        CL,
        TRAIN_OP,
    ),
    # 6 MiB of float64 data: the parallel kernels in eager mode.
    "BatchNorm2d_momentum_0.5_6MiB": (
        lambda: fbt.BatchNorm2d(C, momentum=0.5),
        (16, C, 128, 128),
        None,
        TRAIN_OP,
    ),
    "BatchNorm2d_momentum_0.5_6MiB_channels_last": (
        lambda: fbt.BatchNorm2d(C, momentum=0.5),
        (16, C, 128, 128),
        CL,
        TRAIN_OP,
    ),
    "BatchNorm3d_eps_0.1_momentum_0.3": (
        lambda: fbt.BatchNorm3d(C, eps=0.1, momentum=0.3),
        (2, C, 2, 3, 4),
        CL3,
        TRAIN_OP,
    ),
    "BatchNorm2d_affine_false_momentum_0.5": (
        lambda: fbt.BatchNorm2d(C, affine=False, momentum=0.5),
        (3, C, 2, 3),
        None,
        TRAIN_OP,
    ),
    "BatchNorm1d_untracked": (
        lambda: fbt.BatchNorm1d(C, track_running_stats=False),
        (4, C, 5),
        None,
        TRAIN_OP,
    ),
    "BatchNormReLU2d_momentum_0.5_eps_0.1": (
        lambda: fbt.BatchNormReLU2d(C, momentum=0.5, eps=0.1),
        (2, C, 4, 5),
        CL,
        TRAIN_OP,
    ),
    "BatchNormReLU1d_momentum_none_affine_false": (
        lambda: fbt.BatchNormReLU1d(C, momentum=None, affine=False),
        (6, C),
        None,
        TRAIN_OP,
    ),
    "BatchRenorm2d_momentum_0.5": (
        lambda: fbt.BatchRenorm2d(C, momentum=0.5, renorm_clipping={"rmax": 1.5, "dmax": 0.5}),
        (3, C, 2, 3),
        None,
        RENORM_OP,
    ),
    "BatchRenorm1d_momentum_none_affine_false_eps_0.1": (
        lambda: fbt.BatchRenorm1d(C, momentum=None, affine=False, eps=0.1),
        (8, C),
        None,
        RENORM_OP,
    ),
    "ghost_BatchNorm2d_momentum_0.5": (
        lambda: fbt.BatchNorm2d(C, momentum=0.5, virtual_batch_size=2),
        (4, C, 2, 3),
        None,
        None,
    ),
    "ghost_BatchNormReLU1d_momentum_none": (
        lambda: fbt.BatchNormReLU1d(C, momentum=None, virtual_batch_size=3),
        (6, C),
        None,
        None,
    ),
}


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("name", COMPILED_LAYERS)
def test_compiled_layer_matches_eager(gen, fresh_dynamo, name):
    """fullgraph compile of one layer: 3 training steps, then eval, against the eager layer.

    float64, 1e-10: outputs, input and parameter gradients after each step,
    and running_mean, running_var and num_batches_tracked, which under
    compile come from the branch-free rule (`fastbn.torch._ops.fold_torch`)
    and eagerly from fastbn's kernels' fold. The running statistics start
    away from 0 and 1, and the parameters move between steps (SGD).
    """
    make, shape, fmt, train_op = COMPILED_LAYERS[name]
    eager = make().double()
    if eager.affine:
        random_affine(gen, eager)
    if eager.track_running_stats:
        with torch.no_grad():
            eager.running_mean.uniform_(-1, 1, generator=gen)
            eager.running_var.uniform_(0.5, 2, generator=gen)
    module = copy.deepcopy(eager)
    graphs = []
    compiled = torch.compile(module, backend=recording_inductor(graphs), fullgraph=True)
    start = {key: value.clone() for key, value in eager.named_buffers()}
    for step in range(4):
        training = step < 3
        for m in (module, eager):
            m.train(training)
        x = make_input(gen, shape, F64, fmt)
        dy = make_input(gen, shape)
        mine = run(compiled, module, x, dy)
        context = f"{name}, step {step}, training={training}"
        assert_all_close(mine, run(eager, eager, x, dy), TOL64, context)
        if fmt is not None:
            assert mine["y"].is_contiguous(memory_format=fmt), context
        if getattr(eager, "fused_relu", False):  # not vacuous: the ReLU cuts, and lets through
            assert bool((mine["y"] == 0).any()) and bool((mine["y"] > 0).any()), context
        assert_buffers_close(module, eager, TOL64, context)
        if eager.affine:
            sgd_step(module)
            sgd_step(eager)
    if eager.track_running_stats:
        slices = shape[0] // (eager.__dict__.get("virtual_batch_size") or shape[0])
        assert int(module.num_batches_tracked) == 3 * slices
        for key in ("running_mean", "running_var"):  # the steps moved them
            assert (getattr(module, key) - start[key]).abs().min() > 1e-3, key
    else:
        assert list(module.named_buffers()) == []
    # The compiled path took the calls: one graph for training, one for eval, calling fastbn's
    # ops (eval without running statistics normalizes with the batch's: the training op).
    expected = [] if train_op is None else [train_op]
    expected.append(EVAL_OP if eager.track_running_stats else TRAIN_OP)
    assert batch_norm_ops(graphs) == expected
    assert len(graphs) == 2


FUNCTIONAL_CALLS = {
    # name -> (running statistics given, training)
    "train_tracking": (True, True),
    "train_untracked": (False, True),
    "eval": (True, False),
}


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("call", FUNCTIONAL_CALLS)
def test_compiled_functional_batch_norm_matches_eager_and_torch(gen, fresh_dynamo, call):
    """fbt.batch_norm itself under torch.compile(fullgraph=True): momentum 0.5, eps 1e-3.

    Three calls on channels_last input, float64, 1e-10 against the same call
    eagerly and against torch's F.batch_norm: outputs, input, weight and bias
    gradients, and the running statistics, updated in place by each.
    """
    tracking, training = FUNCTIONAL_CALLS[call]
    graphs = []

    def batch_norm(x, running_mean, running_var, weight, bias, f=fbt.batch_norm):
        return f(x, running_mean, running_var, weight, bias, training, 0.5, 1e-3)

    compiled = torch.compile(batch_norm, backend=recording_inductor(graphs), fullgraph=True)
    stats = [vector(gen, F64), vector(gen, F64, positive=True)] if tracking else [None, None]
    running = {
        which: [None if t is None else t.clone() for t in stats]
        for which in ("compiled", "eager", "torch")
    }
    weight, bias = vector(gen, F64, positive=True), vector(gen, F64)
    calls = {
        "compiled": compiled,
        "eager": batch_norm,
        "torch": lambda *args: batch_norm(*args, f=torch.nn.functional.batch_norm),
    }
    for step in range(3):
        x = make_input(gen, (2, C, 4, 5), F64, CL)
        dy = make_input(gen, (2, C, 4, 5))
        results = {}
        for which, f in calls.items():
            xi = x.clone().requires_grad_()
            w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
            y = f(xi, *running[which], w, b)
            y.backward(dy)
            results[which] = {"y": y.detach(), "dx": xi.grad, "dweight": w.grad, "dbias": b.grad}
        for which in ("eager", "torch"):
            context = f"step {step}, against {which}"
            assert_all_close(results["compiled"], results[which], TOL64, context)
            for mine, expected in zip(running["compiled"], running[which], strict=True):
                if expected is not None:
                    torch.testing.assert_close(mine, expected, rtol=TOL64, atol=TOL64)
        assert results["compiled"]["y"].is_contiguous(memory_format=CL)
    if tracking and training:  # the calls moved the running statistics
        for mine, before in zip(running["compiled"], stats, strict=True):
            assert (mine - before).abs().min() > 1e-3
    elif tracking:
        for mine, before in zip(running["compiled"], stats, strict=True):
            assert torch.equal(mine, before)
    assert batch_norm_ops(graphs) == [TRAIN_OP if training else EVAL_OP]


def test_bfloat16_model_compiled_gives_torchs_results(gen, fresh_dynamo):
    """bfloat16 is not fastbn's: compiled, the converted model is torch's compiled model.

    momentum 0.1: with momentum None torch's own module does not compile with
    fullgraph=True (``1 / float(num_batches_tracked)`` is data-dependent), nor
    does the fallback, which is torch's rule.
    """
    theirs = make_model(gen, torch.bfloat16, momentum=0.1)
    model = fbt.convert(copy.deepcopy(theirs))
    eager_theirs = copy.deepcopy(theirs)
    graphs = []
    compiled = torch.compile(model, backend=recording_inductor(graphs), fullgraph=True)
    compiled_theirs = torch.compile(theirs, fullgraph=True)
    x = model_input(gen, torch.bfloat16)
    dy = make_input(gen, (BATCH, LINEAR_OUT), torch.bfloat16)

    mine = run(compiled, model, x, dy)
    assert mine["y"].dtype == torch.bfloat16
    assert batch_norm_ops(graphs) == [EVAL_OP] * 2  # torch's batch_norm, with torch's rule
    # Torch's model compiled the same way: the same graph, the same numbers.
    assert_all_close(mine, run(compiled_theirs, theirs, x, dy), 0.0, "torch's compiled")
    assert_buffers_close(model, theirs, 0.0, "torch's compiled")
    # Eager torch: within bfloat16 rounding (compiled and eager round differently).
    expected = run(eager_theirs, eager_theirs, x, dy)
    for key in ("y", "dx"):
        torch.testing.assert_close(mine[key], expected[key], rtol=0.02, atol=0.05)
    assert_buffers_close(model, eager_theirs, 0.02, "torch's eager")


# ---------------------------------------------------------------- export


def trained_eval_model(gen, dtype=torch.float32):
    """A converted model after one training batch, in eval mode, and torch's copy of it."""
    model = fbt.convert(make_model(gen, dtype))
    with torch.no_grad():
        model(model_input(gen, dtype))
    model.eval()
    theirs = fbt.revert(copy.deepcopy(model))
    assert type(theirs[1]) is nn.BatchNorm2d and type(model[1]) is fbt.BatchNorm2d
    return model, theirs


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_onnx_export_gives_torchs_graph(gen, dynamo):
    onnx = pytest.importorskip("onnx")
    if dynamo:
        pytest.importorskip("onnxscript")
    from onnx.reference import ReferenceEvaluator

    model, theirs = trained_eval_model(gen)
    x = model_input(gen, torch.float32)

    def export(m):
        f = io.BytesIO()
        torch.onnx.export(m, (x,), f, dynamo=dynamo)
        return onnx.load_from_string(f.getvalue())

    mine, expected = export(model), export(theirs)
    assert type(model[1]) is fbt.BatchNorm2d  # export leaves the model as it was
    op_types = [node.op_type for node in mine.graph.node]
    assert op_types == [node.op_type for node in expected.graph.node]
    assert "Conv" in op_types and "Gemm" in op_types
    # The exported graph computes the model.
    with torch.no_grad():
        y = theirs(x)
    (out,) = ReferenceEvaluator(mine).run(None, {mine.graph.input[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), y, rtol=1e-5, atol=1e-5)


def test_torch_export_gives_torchs_ops(gen):
    """An exported converted model is a graph of torch's ops: it runs without fastbn."""
    model, theirs = trained_eval_model(gen)
    x = model_input(gen, torch.float32)
    program = torch.export.export(model, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert sum("aten" in t and "batch_norm" in t for t in targets) == 2, targets
    assert not any("fastbn" in t for t in targets), targets
    with torch.no_grad():
        y = program.module()(x)
        torch.testing.assert_close(y, theirs(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- double backward


GRADGRAD_LAYOUTS = {
    "nc": ((5, C), None),
    "ncl": ((4, C, 5), None),
    "nchw_channels_last": ((2, C, 4, 4), CL),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", GRADGRAD_LAYOUTS)
def test_gradgradcheck_batch_norm(gen, layout, training):
    shape, fmt = GRADGRAD_LAYOUTS[layout]
    x = make_input(gen, shape, F64, fmt, requires_grad=True)
    weight = vector(gen, F64, requires_grad=True)
    bias = vector(gen, F64, requires_grad=True)
    running_mean = vector(gen, F64)
    running_var = vector(gen, F64, positive=True)

    def batch_norm(x, weight, bias):
        return fbt.batch_norm(
            x, running_mean.clone(), running_var.clone(), weight, bias, training=training
        )

    assert torch.autograd.gradcheck(batch_norm, (x, weight, bias))
    assert torch.autograd.gradgradcheck(batch_norm, (x, weight, bias))
