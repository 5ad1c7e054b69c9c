"""The crossover command (`fastbn.bench.crossover`): its shapes, its rule and a tiny run."""

import math

import pytest

torch = pytest.importorskip("torch")

from fastbn.bench import crossover  # noqa: E402
from fastbn.torch import dispatch  # noqa: E402


@pytest.mark.parametrize("layout", ["batch_first", "channels_first", "channels_last"])
@pytest.mark.parametrize("channels", crossover.CHANNELS)
@pytest.mark.parametrize("numel", crossover.LADDER)
def test_shapes_have_the_channels_and_about_the_size(layout, channels, numel):
    shape = crossover.shape_for(layout, numel, channels)
    assert shape[1] == channels
    assert len(shape) == (2 if layout == "batch_first" else 4)
    if math.prod(shape) > 2 * channels:  # not the floor of two rows or one pixel
        assert 0.5 <= math.prod(shape) / numel <= 2.0


def test_the_crossover_is_where_fastbn_wins_at_that_size_and_every_larger_one():
    rows = [(1, 1.0, 2.0), (2, 2.0, 1.0), (4, 1.0, 2.0), (8, 2.0, 1.0), (16, 3.0, 1.0)]
    assert crossover.crossover(rows) == 8
    assert crossover.crossover(rows[:1] + rows[3:]) == 8
    assert crossover.crossover([(1, 2.0, 1.0), (2, 2.0, 1.0)]) == 1
    assert crossover.crossover([(1, 2.0, 1.0), (2, 1.0, 1.0)]) is None  # a tie is no win


def test_a_keys_crossover_holds_at_every_channel_count():
    assert crossover.key_crossover([1 << 16, 1 << 20, 1 << 18]) == 1 << 20
    assert crossover.key_crossover([1 << 16, None]) is None


def test_the_modules_are_torchs_and_fastbns_forced_onto_its_kernels():
    theirs, ours = crossover.make_pair((4, 8, 2, 2), torch.float64)
    assert type(theirs) is torch.nn.BatchNorm2d
    assert ours.implementation == "fastbn" and theirs.num_features == ours.num_features == 8
    x = crossover.make_input("channels_last", (4, 8, 2, 2), torch.float64)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def test_rounds_alternate_which_module_goes_first(monkeypatch):
    order = []
    monkeypatch.setattr(
        crossover, "call_time", lambda module, x, train, calls: order.append(module) or 1.0
    )
    torch_times, fastbn_times = crossover.measure(
        "channels_first", torch.float32, True, (4, 8, 2, 2), rounds=4, calls=1
    )
    assert len(torch_times) == len(fastbn_times) == 4
    timed = order[2:]  # after the two warm-ups
    firsts = [timed[i] for i in range(0, 8, 2)]
    assert firsts[0] is not firsts[1] and firsts[0] is firsts[2]


def test_a_tiny_run_prints_every_key_with_its_shipped_crossover(capsys):
    crossover.main(["--quick", "--calls", "1", "--ladder", "64"])
    out = capsys.readouterr().out
    for layout, dtype, mode in dispatch.CROSSOVER:
        if dtype == "float32":
            assert f"{layout} {dtype} {mode}: crossover" in out
    assert out.count("torch ") >= 3 * len(crossover.CHANNELS)
