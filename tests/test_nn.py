"""fastbn.nn: gradients by finite differences, training, optimizers, folding, modes, dtypes."""

import copy

import numpy as np
import pytest
from conftest import central_difference

import fastbn
import fastbn.nn as nn


@pytest.fixture
def rng():
    return np.random.default_rng(20240611)


def check_gradients(layer, A, rng, loss_fn=None, labels=None):
    """Compare the layer's backward with finite differences of a scalar loss of its output.

    The loss is sum(R * layer(A)) for a fixed random R, or loss_fn(layer(A),
    labels) when given. Checks dA and every parameter's gradient.
    """
    if loss_fn is None:
        weights = rng.standard_normal(layer(A).shape)

        def loss_and_grad(output):
            return float(np.sum(weights * output)), weights

    else:

        def loss_and_grad(output):
            return loss_fn(output, labels)

    _, doutput = loss_and_grad(layer(A))
    dA = layer.backward(doutput)
    analytic = {name: grad.copy() for name, _, grad in layer.parameters()}

    def loss():
        return loss_and_grad(layer(A))[0]

    np.testing.assert_allclose(dA, central_difference(loss, A), rtol=1e-6, atol=1e-8)
    for name, param, _ in layer.parameters():
        np.testing.assert_allclose(
            analytic[name], central_difference(loss, param), rtol=1e-6, atol=1e-8, err_msg=name
        )


# ------------------------------------------------------------------ gradients


@pytest.mark.parametrize("bias", [True, False])
def test_dense_gradients(rng, bias):
    dense = nn.Dense(5, 3, bias=bias, rng=rng, dtype=np.float64)
    if bias:
        dense.b[...] = rng.standard_normal(3)
    check_gradients(dense, rng.standard_normal((5, 7)), rng)
    assert [name for name, _, _ in dense.parameters()] == (["W", "b"] if bias else ["W"])


def test_relu_gradients(rng):
    # Away from 0, where ReLU is not differentiable.
    A = rng.choice([-1.0, 1.0], (4, 6)) * rng.uniform(0.1, 2.0, (4, 6))
    check_gradients(nn.ReLU(), A, rng)


def test_softmax_cross_entropy_gradient_and_value(rng):
    logits = rng.standard_normal((4, 6))
    labels = rng.integers(0, 4, 6)
    loss, dlogits = nn.SoftmaxCrossEntropy()(logits, labels)
    # By hand: -log of the softmax probability of each true class, averaged.
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=0)
    assert loss == pytest.approx(-np.mean(np.log(probabilities[labels, np.arange(6)])), rel=1e-12)
    numeric = central_difference(lambda: nn.SoftmaxCrossEntropy()(logits, labels)[0], logits)
    np.testing.assert_allclose(dlogits, numeric, rtol=1e-6, atol=1e-9)


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1000.0, -1000.0], [0.0, 0.0]], np.float32)
    loss, dlogits = nn.SoftmaxCrossEntropy()(logits, np.array([1, 0]))
    # Each example's true class is exp(-1000) likely: a loss of 1000 each, and
    # softmax one-hot on the wrong class.
    assert loss == pytest.approx(1000.0)
    np.testing.assert_allclose(dlogits, [[0.5, -0.5], [-0.5, 0.5]], atol=1e-7)
    assert dlogits.dtype == np.float32


def test_sequential_with_batch_norm_gradients(rng):
    model = nn.Sequential(
        nn.Dense(4, 6, bias=False, rng=rng, dtype=np.float64),
        fastbn.BatchNorm(6, dtype=np.float64),
        nn.ReLU(),
        nn.Dense(6, 3, rng=rng, dtype=np.float64),
    )
    bn = model[1]
    bn.gamma[...] = rng.uniform(0.5, 2.0, 6)
    bn.beta[...] = rng.standard_normal(6)
    model[3].b[...] = rng.standard_normal(3)
    check_gradients(
        model, rng.standard_normal((4, 10)), rng, nn.SoftmaxCrossEntropy(), rng.integers(0, 3, 10)
    )
    assert [name for name, _, _ in model.parameters()] == [
        "0.W",
        "1.gamma",
        "1.beta",
        "3.W",
        "3.b",
    ]


def test_sequential_in_eval_mode_gradients(rng):
    model = nn.Sequential(fastbn.BatchNorm(3, dtype=np.float64), nn.Dense(3, 2, dtype=np.float64))
    model[0].running_mean[...] = rng.standard_normal(3)
    model[0].running_var[...] = rng.uniform(0.5, 2.0, 3)
    model.eval()
    check_gradients(model, rng.standard_normal((3, 5)), rng)


# ----------------------------------------------------------- the parameters


def test_parameters_are_the_layers_arrays_and_grads_are_overwritten_in_place(rng):
    dense = nn.Dense(3, 2, rng=rng)
    bn = fastbn.BatchNorm(2)
    model = nn.Sequential(dense, bn)
    params = model.parameters()
    assert params[0][1] is dense.W and params[0][2] is dense.dW
    assert params[2][1] is bn.gamma and params[2][2] is bn.dgamma
    grads_before = [grad for _, _, grad in params]
    for _ in range(2):
        A = rng.standard_normal((3, 4)).astype(np.float32)
        model.backward(np.ones_like(model(A)))
    assert all(g is h for g, (_, _, h) in zip(grads_before, model.parameters(), strict=True))
    # The last backward's dW, not a sum over both: dZ = bn's dx, A the last input.
    dZ = bn.backward(np.ones((2, 4), np.float32))
    np.testing.assert_allclose(dense.dW, dZ @ A.T, rtol=1e-5, atol=1e-6)


def test_dense_he_initialisation_is_reproducible_and_scaled():
    dense = nn.Dense(400, 300, rng=np.random.default_rng(3))
    again = nn.Dense(400, 300, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(dense.W, again.W)
    assert dense.W.dtype == np.float32 and dense.W.shape == (300, 400)
    # 120000 draws of variance 2 / 400: the sample std is within 1% of sqrt(2 / 400).
    assert dense.W.std() == pytest.approx(np.sqrt(2 / 400), rel=0.01)
    np.testing.assert_array_equal(dense.b, np.zeros(300, np.float32))


# ------------------------------------------------------------------ training


def test_training_a_small_problem_reaches_a_low_loss(rng):
    # Three Gaussian blobs in 2-D, well separated: a network that learns gets
    # the mean loss well below chance (log 3 = 1.10).
    centers = np.array([[3.0, 0.0], [-3.0, 3.0], [-3.0, -3.0]])
    labels = rng.integers(0, 3, 300)
    X = (centers[labels] + rng.standard_normal((300, 2))).T.astype(np.float32)
    model = nn.Sequential(
        nn.Dense(2, 16, bias=False, rng=rng),
        fastbn.BatchNorm(16),
        nn.ReLU(),
        nn.Dense(16, 3, rng=rng),
    )
    loss_fn = nn.SoftmaxCrossEntropy()
    optimizer = nn.Adam(model.parameters(), lr=0.01)
    for _ in range(20):
        for X_batch, y_batch in nn.minibatches(X, labels, 30, rng):
            _, dlogits = loss_fn(model(X_batch), y_batch)
            model.backward(dlogits)
            optimizer.step()
    loss, _ = loss_fn(model.eval()(X), labels)
    assert loss < 0.1
    assert np.mean(model(X).argmax(axis=0) == labels) > 0.97


# ---------------------------------------------------------------- optimizers


def make_param(values):
    param = np.array(values, np.float64)
    return param, np.zeros_like(param)


def test_sgd_without_momentum_step_by_hand():
    param, grad = make_param([1.0, -2.0])
    optimizer = nn.SGD([("p", param, grad)], lr=0.1)
    grad[...] = [0.5, -1.0]
    optimizer.step()
    np.testing.assert_allclose(param, [1.0 - 0.05, -2.0 + 0.1], rtol=1e-15)


def test_sgd_with_momentum_steps_by_hand():
    param, grad = make_param([1.0])
    optimizer = nn.SGD([("p", param, grad)], lr=0.1, momentum=0.9)
    grad[...] = 2.0
    optimizer.step()  # v = 2, p = 1 - 0.2
    grad[...] = -1.0
    optimizer.step()  # v = 0.9 * 2 - 1 = 0.8, p = 0.8 - 0.08
    np.testing.assert_allclose(param, [0.72], rtol=1e-14)


def test_adam_steps_by_hand():
    param, grad = make_param([1.0])
    optimizer = nn.Adam([("p", param, grad)], lr=0.1, betas=(0.5, 0.75), eps=1e-8)
    grad[...] = 2.0
    optimizer.step()
    # m = 1, v = 1; corrected 2 and 4: step 0.1 * 2 / (2 + 1e-8).
    expected = 1.0 - 0.1 * 2 / (2 + 1e-8)
    np.testing.assert_allclose(param, [expected], rtol=1e-14)
    grad[...] = -1.0
    optimizer.step()
    # m = 0.5 - 0.5 = 0, so no move whatever v is.
    np.testing.assert_allclose(param, [expected], rtol=1e-14)
    grad[...] = 4.0
    optimizer.step()
    # m = 0 + 0.5 * 4 = 2, v = 0.75 * 1 + 0.25 * 16 = 4.75 (v was 1 after steps 1 and 2);
    # corrections 1 - 0.125 and 1 - 0.421875.
    m_hat = 2 / (1 - 0.5**3)
    v_hat = 4.75 / (1 - 0.75**3)
    np.testing.assert_allclose(
        param, [expected - 0.1 * m_hat / (np.sqrt(v_hat) + 1e-8)], rtol=1e-14
    )


def test_optimizers_keep_float32_and_update_the_models_arrays(rng):
    model = nn.Sequential(nn.Dense(3, 2, rng=rng), fastbn.BatchNorm(2))
    W = model[0].W
    for optimizer in (nn.SGD(model.parameters(), 0.1, 0.5), nn.Adam(model.parameters())):
        before = W.copy()
        model(rng.standard_normal((3, 5)).astype(np.float32))
        model.backward(rng.standard_normal((2, 5)).astype(np.float32))
        optimizer.step()
        assert model[0].W is W and W.dtype == np.float32
        assert not np.array_equal(W, before)


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda p: nn.SGD(p, lr=0.0), ValueError),
        (lambda p: nn.SGD(p, lr=0.1, momentum=1.0), ValueError),
        (lambda p: nn.SGD([], lr=0.1), ValueError),
        (lambda p: nn.Adam(p, betas=(0.9, 1.0)), ValueError),
        (lambda p: nn.Adam(p, eps=0.0), ValueError),
        (lambda p: nn.Adam(p, lr="1e-3"), TypeError),
    ],
)
def test_optimizer_arguments_are_checked(make, error):
    with pytest.raises(error):
        make([("p", *make_param([1.0]))])


# ------------------------------------------------------------------- folding


@pytest.mark.parametrize(("dtype", "tol"), [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("bias", [True, False])
def test_fold_batch_norm_matches_dense_then_eval_batch_norm(rng, dtype, tol, bias):
    dense = nn.Dense(6, 5, bias=bias, rng=rng, dtype=dtype)
    if bias:
        dense.b[...] = rng.standard_normal(5)
    bn = fastbn.BatchNorm(5, dtype=dtype)
    # Train the running statistics on a few batches, then move gamma and beta.
    for _ in range(5):
        bn(dense(rng.standard_normal((6, 16)).astype(dtype) * 2 + 1))
    bn.gamma[...] = rng.uniform(0.5, 2.0, 5) * rng.choice([-1, 1], 5)
    bn.beta[...] = rng.standard_normal(5)
    state = copy.deepcopy((dense.W, dense.b, bn.state_dict()))

    folded = nn.fold_batch_norm(dense, bn)
    A = rng.standard_normal((6, 9)).astype(dtype)
    expected = bn.eval()(dense(A))
    actual = folded(A)
    assert actual.dtype == dtype and folded.b is not None
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol)
    # dense and bn are unchanged.
    np.testing.assert_array_equal(dense.W, state[0])
    assert folded.W is not dense.W


def test_fold_batch_norm_rejects_what_it_cannot_fold(rng):
    dense = nn.Dense(3, 4, rng=rng)
    with pytest.raises(ValueError, match="num_features"):
        nn.fold_batch_norm(dense, fastbn.BatchNorm(5))
    with pytest.raises(TypeError, match="dtype"):
        nn.fold_batch_norm(dense, fastbn.BatchNorm(4, dtype=np.float64))
    with pytest.raises(ValueError, match="running statistics"):
        nn.fold_batch_norm(dense, fastbn.BatchNorm(4, track_running_stats=False))
    with pytest.raises(ValueError, match="axis"):
        nn.fold_batch_norm(dense, fastbn.BatchNorm(4, axis=1))


# --------------------------------------------------------------------- modes


def test_train_and_eval_set_every_batch_norm_mode(rng):
    inner = nn.Sequential(nn.Dense(4, 4, rng=rng), fastbn.BatchNorm(4))
    model = nn.Sequential(nn.Dense(3, 4, rng=rng), fastbn.BatchNorm(4), nn.ReLU(), inner)
    bns = [model[1], inner[1]]
    assert model.eval() is model
    assert not model.training and not inner.training and not any(bn.training for bn in bns)
    # In eval mode a forward uses (and leaves) the running statistics.
    model(rng.standard_normal((3, 8)).astype(np.float32))
    assert all(bn.num_batches_tracked == 0 for bn in bns)
    model.train()
    assert all(bn.training for bn in bns)
    model(rng.standard_normal((3, 8)).astype(np.float32))
    assert all(bn.num_batches_tracked == 1 for bn in bns)


# -------------------------------------------------------------------- dtypes


def test_float64_on_request_and_mixing_raises(rng):
    model = nn.Sequential(
        nn.Dense(3, 4, rng=rng, dtype=np.float64), fastbn.BatchNorm(4, dtype=np.float64)
    )
    assert model(rng.standard_normal((3, 5))).dtype == np.float64
    with pytest.raises(TypeError, match=r"dtype float32.*float64"):
        model(rng.standard_normal((3, 5)).astype(np.float32))
    dense32 = nn.Dense(3, 4, rng=rng)
    with pytest.raises(TypeError, match=r"A.astype\(np.float32\)"):
        dense32(rng.standard_normal((3, 5)))
    # A float32 Dense feeding a float64 BatchNorm: the BatchNorm's TypeError.
    mixed = nn.Sequential(dense32, fastbn.BatchNorm(4, dtype=np.float64))
    with pytest.raises(TypeError, match="layer's dtype is float64"):
        mixed(rng.standard_normal((3, 5)).astype(np.float32))


def test_dense_checks_its_arguments_and_inputs(rng):
    with pytest.raises(ValueError, match="n_out"):
        nn.Dense(3, 0)
    with pytest.raises(TypeError, match="Generator"):
        nn.Dense(3, 2, rng=0)
    with pytest.raises(TypeError, match="dtype"):
        nn.Dense(3, 2, dtype=np.int32)
    dense = nn.Dense(3, 2, rng=rng)
    with pytest.raises(ValueError, match=r"\(3, m\)"):
        dense(np.zeros((4, 5), np.float32))
    with pytest.raises(RuntimeError, match="forward"):
        dense.backward(np.zeros((2, 5), np.float32))


# --------------------------------------------------------------- minibatches


def test_minibatches_cover_every_example_once(rng):
    X = np.arange(20.0).reshape(2, 10)
    Y = np.arange(10)
    batches = list(nn.minibatches(X, Y, 4, rng))
    assert [y.size for _, y in batches] == [4, 4, 2]
    seen = np.concatenate([y for _, y in batches])
    assert sorted(seen) == list(range(10)) and not np.array_equal(seen, Y)
    for X_batch, y_batch in batches:
        np.testing.assert_array_equal(X_batch, X[:, y_batch])


def test_minibatches_in_order_and_drop_last():
    X = np.arange(10.0)[None, :]
    Y = np.arange(10)
    batches = list(nn.minibatches(X, Y, 3, None, shuffle=False, drop_last=True))
    assert [list(y) for _, y in batches] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(ValueError, match="Y has shape"):
        next(nn.minibatches(X, Y[:5], 3, None, shuffle=False))
