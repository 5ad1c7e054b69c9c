"""Tests for mutants that survived issue 17's after-run (fastbn.torch).

Each test names the mutant behaviour it pins down. References are torch's own
modules and functions, or torch's running-statistics recurrence written out
in float64.
"""

import re

import pytest

torch = pytest.importorskip("torch")

import torch.autograd.forward_ad as forward_ad  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastbn.torch as fbt  # noqa: E402

C = 3
TOL = 1e-10  # float64, unit-scale data (the contract's accuracy and PyTorch bridge)


@pytest.fixture
def gen():
    """A torch generator with a fixed seed for every test."""
    return torch.Generator().manual_seed(20240611)


def shifted_input(gen, shape):
    """float64 data, each channel (dimension 1) with its own offset and scale."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    view = (1, -1) + (1,) * (len(shape) - 2)
    offset = torch.empty(shape[1], dtype=torch.float64).uniform_(-1, 1, generator=gen)
    scale = torch.empty(shape[1], dtype=torch.float64).uniform_(0.5, 2, generator=gen)
    return x * scale.view(view) + offset.view(view)


# ------------------------------------------------ _ops.fold_torch, momentum None


def test_ghost_torch_ops_path_folds_each_slice_with_its_cumulative_factor(gen):
    """momentum=None through the torch-ops path (forward-mode AD here): slice g of a
    batch is folded with 1 / (num_batches_tracked + g + 1), as eagerly.

    Pins the mutant ``counter + (g % 1)`` in `fastbn.torch._ops.fold_torch`
    (every slice folded with 1 / num_batches_tracked). The reference is
    torch's recurrence written out in float64, slice after slice.
    """
    k, slices, before = 2, 3, 5
    x = shifted_input(gen, (k * slices, C))
    modules = [
        fbt.BatchNorm1d(C, momentum=None, virtual_batch_size=k, dtype=torch.float64)
        for _ in range(2)
    ]
    for m in modules:
        with torch.no_grad():
            m.running_mean.uniform_(-1, 1, generator=gen)
            m.running_var.uniform_(0.5, 2, generator=gen)
            m.num_batches_tracked.fill_(before)
    modules[1].load_state_dict(modules[0].state_dict())
    expected_mean = modules[0].running_mean.clone()
    expected_var = modules[0].running_var.clone()
    for g, piece in enumerate(x.split(k)):
        f = 1.0 / (before + g + 1)
        expected_mean = (1 - f) * expected_mean + f * piece.mean(0)
        expected_var = (1 - f) * expected_var + f * piece.var(0, correction=1)

    eager = modules[0]
    eager(x)
    taken = modules[1]
    with forward_ad.dual_level():  # a tangent: the call takes the torch-ops path
        taken(forward_ad.make_dual(x, torch.ones_like(x)))
    for m in (eager, taken):
        torch.testing.assert_close(m.running_mean, expected_mean, rtol=TOL, atol=TOL)
        torch.testing.assert_close(m.running_var, expected_var, rtol=TOL, atol=TOL)
        assert int(m.num_batches_tracked) == before + slices


# ------------------------------------------------ functional.verify_batch_size


@pytest.mark.parametrize("shape", [(1, C, 5), (1, C, 2, 3)], ids=["ncl", "nchw"])
def test_one_example_with_many_positions_trains_as_torch_does(gen, shape):
    """N == 1 with more than one position per channel is a valid training batch.

    Pins the mutant ``len(size) >= 2`` in `fastbn.torch.functional.verify_batch_size`,
    which refused every batch of one example. Against torch's F.batch_norm and
    its module, outputs and running statistics.
    """
    x = shifted_input(gen, shape)
    running = (torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64))
    theirs = (running[0].clone(), running[1].clone())
    y = fbt.batch_norm(x, *running, training=True, momentum=0.1)
    y_ref = F.batch_norm(x, *theirs, training=True, momentum=0.1)
    torch.testing.assert_close(y, y_ref, rtol=TOL, atol=TOL)
    for mine, ref in zip(running, theirs, strict=True):
        torch.testing.assert_close(mine, ref, rtol=TOL, atol=TOL)

    ours_cls, theirs_cls = (
        (fbt.BatchNorm1d, torch.nn.BatchNorm1d)
        if len(shape) == 3
        else (fbt.BatchNorm2d, torch.nn.BatchNorm2d)
    )
    ours, ref_module = ours_cls(C, dtype=torch.float64), theirs_cls(C, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref_module(x), rtol=TOL, atol=TOL)
    torch.testing.assert_close(ours.running_var, ref_module.running_var, rtol=TOL, atol=TOL)


# ------------------------------------------------ BatchRenorm1d's input dimensions


@pytest.mark.parametrize("dim", [1, 4])
def test_batch_renorm1d_refuses_input_that_is_not_2d_or_3d(gen, dim):
    """BatchRenorm1d takes (N, C) and (N, C, L) only, with torch's BatchNorm1d's message.

    Pins the mutant ``input.dim() > 3`` in `BatchRenorm1d._check_input_dim`,
    which let 1-D input through.
    """
    shape = (C, 2, 2, 2)[:dim]
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    message = re.escape(f"expected 2D or 3D input (got {dim}D input)")
    with pytest.raises(ValueError, match=message):
        torch.nn.BatchNorm1d(C, dtype=torch.float64)(x)
    module = fbt.BatchRenorm1d(C, dtype=torch.float64)
    for training in (True, False):
        module.train(training)
        with pytest.raises(ValueError, match=message):
            module(x)
