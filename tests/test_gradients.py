"""batch_norm_backward is the true gradient: central finite differences in float64.

The loss is a random projection L = sum(y * w), so dL/dy = w; the analytic
dx, dgamma, dbeta from batch_norm_backward(w, ...) must match the finite
differences of L through batch_norm_train (training=True, batch statistics
depend on x) and through batch_norm_eval (training=False, fixed running stats).
"""

import numpy as np
import pytest
from conftest import central_difference, feature_slice, layout, make_params, make_running

import fastbn

# Small on purpose: one loss evaluation per perturbed coordinate, twice.
GRAD_LAYOUTS = {
    "features_first": ((3, 5), 0),
    "batch_first": ((6, 3), -1),
    "nchw": ((2, 3, 2, 2), 1),
    "nhwc": ((2, 2, 2, 3), -1),
}
H = 1e-5


def _gamma_arg(gamma, with_gamma):
    """gamma, or None (meaning 1) while the all-ones gamma of a gamma=None case is unperturbed."""
    return None if not with_gamma and np.array_equal(gamma, 1) else gamma


def _assert_grad(analytic, numeric, what):
    # Central differences with h = H in float64: truncation ~ h**2 * |L'''| / 6 ~ 1e-11
    # and rounding ~ 1e-16 * |L| / h ~ 1e-10 for |L| ~ 10 (measured <= 6e-10 absolute on
    # these O(1) gradients): 1e-8 keeps a margin of 10 or more.
    np.testing.assert_allclose(analytic, numeric, rtol=1e-8, atol=1e-8, err_msg=what)


def _inputs(rng, name, order, with_gamma):
    shape, axis = GRAD_LAYOUTS[name]
    c = shape[axis]
    x = layout(0.5 + 2.0 * rng.standard_normal(shape), order)
    w = rng.standard_normal(shape)
    gamma, beta = make_params(rng, c, np.float64)
    if not with_gamma:
        gamma = np.ones(c)  # perturbed for the check; None is what is passed to backward
    return x, w, gamma, beta, axis, c


@pytest.mark.parametrize("with_gamma", [True, False], ids=["gamma", "gamma_none"])
@pytest.mark.parametrize("eps", [1e-5, 0.1])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("name", GRAD_LAYOUTS)
def test_training_gradient(rng, name, order, eps, with_gamma):
    """training=True: dx, dgamma, dbeta are the gradients through the batch statistics."""
    x, w, gamma, beta, axis, _ = _inputs(rng, name, order, with_gamma)

    def loss():
        g = _gamma_arg(gamma, with_gamma)
        y = fastbn.batch_norm_train(x, g, beta, axis=axis, eps=eps)[0]
        return float(np.sum(y * w))

    _, mean, invstd = fastbn.batch_norm_train(x, gamma, beta, axis=axis, eps=eps)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        w, x, mean, invstd, gamma if with_gamma else None, axis=axis, training=True
    )
    _assert_grad(dx, central_difference(loss, x, H), "dx")
    _assert_grad(dgamma, central_difference(loss, gamma, H), "dgamma")
    _assert_grad(dbeta, central_difference(loss, beta, H), "dbeta")


@pytest.mark.parametrize("with_gamma", [True, False], ids=["gamma", "gamma_none"])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("name", GRAD_LAYOUTS)
def test_eval_gradient(rng, name, order, with_gamma):
    """training=False: with running stats as constants, dx = gamma * invstd * dy."""
    x, w, gamma, beta, axis, c = _inputs(rng, name, order, with_gamma)
    rm, rv = make_running(rng, c, np.float64)
    eps = 1e-3

    def loss():
        g = _gamma_arg(gamma, with_gamma)
        y = fastbn.batch_norm_eval(x, rm, rv, g, beta, axis=axis, eps=eps)
        return float(np.sum(y * w))

    invstd = 1.0 / np.sqrt(rv + eps)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(
        w, x, rm, invstd, gamma if with_gamma else None, axis=axis, training=False
    )
    _assert_grad(dx, central_difference(loss, x, H), "dx")
    _assert_grad(dgamma, central_difference(loss, gamma, H), "dgamma")
    _assert_grad(dbeta, central_difference(loss, beta, H), "dbeta")


@pytest.mark.parametrize("eps", [1e-5, 0.1])
@pytest.mark.parametrize("name", GRAD_LAYOUTS)
def test_training_gradient_projections(rng, name, eps):
    """Per feature, training dx sums to 0 and sum(dx * x_hat) = gamma * invstd**3 * eps * dgamma.

    (The batch mean absorbs any shift of x; with eps = 0 the batch variance would
    absorb any scaling too, and eps leaves exactly this remainder.)
    """
    shape, axis = GRAD_LAYOUTS[name]
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    gamma = make_params(rng, shape[axis], np.float64)[0]
    _, mean, invstd = fastbn.batch_norm_train(x, axis=axis, eps=eps)
    dx, dgamma, _ = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, axis=axis)
    for c in range(shape[axis]):
        fs = feature_slice(x.ndim, axis, c)
        x_hat = (x[fs] - mean[c]) * invstd[c]
        assert abs(dx[fs].sum()) < 1e-12
        expected = gamma[c] * invstd[c] ** 3 * eps * dgamma[c]
        assert abs((dx[fs] * x_hat).sum() - expected) < 1e-12


@pytest.mark.parametrize(("shape", "axis"), [((6, 3), 1), ((2, 3, 4, 5), 1), ((3, 8), 0)])
def test_training_gradient_matches_torch(rng, shape, axis):
    """Cross-check against PyTorch autograd through F.batch_norm, an independent code."""
    torch = pytest.importorskip("torch")
    x = rng.standard_normal(shape)
    w = rng.standard_normal(shape)
    gamma, beta = make_params(rng, shape[axis], np.float64)
    # torch wants channels at dim 1: features-first (n, m) is the (1, n, m) view.
    view = (lambda a: a[None]) if axis == 0 else (lambda a: a)
    xt = torch.tensor(view(x), requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    yt = torch.nn.functional.batch_norm(xt, None, None, gt, bt, training=True, eps=1e-5)
    (yt * torch.tensor(view(w))).sum().backward()

    y, mean, invstd = fastbn.batch_norm_train(x, gamma, beta, axis=axis)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(w, x, mean, invstd, gamma, axis=axis)
    np.testing.assert_allclose(view(y), yt.detach().numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(view(dx), xt.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dgamma, gt.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dbeta, bt.grad.numpy(), rtol=1e-10, atol=1e-10)
