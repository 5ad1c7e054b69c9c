"""Property tests of the functional API (hypothesis; CI profile in conftest.py).

Random shapes (one feature, two examples, M past the parallel threshold),
feature axes, memory orders, dtypes, scales from 1e-20 to 1e20, and NaN/inf
planted in one feature. Every output is compared with ``fastbn.reference``
run in float64 on the same values; inputs must come back unmodified, NaN and
inf must stay in their feature, ``out=`` aliasing must follow the contract's rules
and two identical calls must agree bit for bit.
"""

import numpy as np
import pytest
from conftest import ORDERS, feature_slice, layout, ref_backward, ref_train
from hypothesis import given, settings
from hypothesis import strategies as st

import fastbn

# The contract's accuracy: float64 to 1e-10 on unit-scale data, float32 y to 1e-4.
# Here every comparison is scaled by the magnitude of what is compared.
PROP_TOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}

# Shapes past the parallel threshold (32768 values): few features with many
# values, and the reverse, in each family.
LARGE = [
    ((2, 40_009), 0),
    ((40_009, 2), 1),
    ((1, 65_536), 0),
    ((3, 5, 4_099), 1),
    ((2_050, 3, 7), -1),
]


@st.composite
def shapes_and_axes(draw):
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from(LARGE))
    ndim = draw(st.integers(2, 4))
    shape = list(draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    special = draw(st.sampled_from(["none", "one_feature", "two_examples"]))
    if special == "one_feature":
        shape[axis] = 1
    elif special == "two_examples":
        # Exactly two values per feature: every other axis 1 but one, which is 2.
        others = [a for a in range(ndim) if a != axis % ndim]
        for a in others:
            shape[a] = 1
        shape[draw(st.sampled_from(others))] = 2
    if np.prod(shape) // shape[axis] < 2:  # M == 1 cannot train
        shape[next(a for a in range(ndim) if a != axis % ndim)] = 2
    return tuple(shape), axis


@st.composite
def problems(draw, with_nonfinite=False):
    shape, axis = draw(shapes_and_axes())
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    order = draw(st.sampled_from(ORDERS))
    scale = 10.0 ** draw(st.sampled_from([-20, -8, -2, 0, 0, 3, 10, 20]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    c = shape[axis]
    # |mean| / std up to 10, the contract's float32 guarantee reaches 1e3.
    offset = rng.uniform(-10, 10, c).reshape(
        [-1 if a == axis % len(shape) else 1 for a in range(len(shape))]
    )
    x = (scale * (rng.standard_normal(shape) + offset)).astype(dtype)
    bad_feature = None
    if with_nonfinite:
        bad_feature = draw(st.integers(0, c - 1))
        value = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        sel = x[feature_slice(x.ndim, axis, bad_feature)]
        flat_index = draw(st.integers(0, sel.size - 1))
        np.put(sel, flat_index, value)  # sel is a view of x
    dy = rng.standard_normal(shape).astype(dtype)
    gamma = (rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)).astype(dtype)
    beta = rng.standard_normal(c).astype(dtype)
    if draw(st.booleans()):
        gamma = beta = None
    return {
        "x": layout(x, order),
        "order": order,
        "dy": layout(dy, draw(st.sampled_from(ORDERS))),
        "gamma": gamma,
        "beta": beta,
        "axis": axis,
        "dtype": dtype,
        "bad_feature": bad_feature,
    }


def _per_feature_bound(terms, axis):
    """sum |terms| over each feature, broadcast to terms' shape: the error budget of a sum."""
    axes = tuple(a for a in range(terms.ndim) if a != axis % terms.ndim)
    return np.sum(np.abs(terms), axis=axes, keepdims=True)


def _check_close(actual, expected, tol, scale, what):
    """|actual - expected| <= tol * scale elementwise (NaN and inf must match exactly)."""
    actual = np.asarray(actual, dtype=np.float64)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(actual), finite, err_msg=f"{what}: finiteness")
    scale = np.broadcast_to(scale, expected.shape)
    err = np.abs(actual - expected)[finite]
    bound = (tol * (scale + np.abs(expected)))[finite]
    assert np.all(err <= bound), (
        f"{what}: max error {np.max(err - bound, initial=0)} over the bound"
    )


def _run_all(p):
    x, dy, gamma, beta, axis = p["x"], p["dy"], p["gamma"], p["beta"], p["axis"]
    y, mean, invstd = fastbn.batch_norm_train(x, gamma, beta, axis=axis)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, axis=axis)
    return y, mean, invstd, dx, dgamma, dbeta


@np.errstate(invalid="ignore", over="ignore")
def _check_against_reference(p, got):
    x, dy, gamma, beta, axis, dtype = (p[k] for k in ("x", "dy", "gamma", "beta", "axis", "dtype"))
    y, mean, invstd, dx, dgamma, dbeta = got
    tol = PROP_TOL[dtype]
    for a in (y, dx):
        assert a.shape == x.shape and a.dtype == dtype
    for a in (dgamma, dbeta):
        assert a.shape == (x.shape[axis],) and a.dtype == dtype
    assert mean.dtype == invstd.dtype == np.float64

    y_ref, mean_ref, invstd_ref = ref_train(x, gamma, beta, axis=axis)
    nd = x.ndim
    bshape = [-1 if a == axis % nd else 1 for a in range(nd)]
    # Statistics: the contract's accuracy, mean against |mean| + std, invstd relative.
    _check_close(mean, mean_ref, tol / 100, 1.0 / invstd_ref, "mean")
    _check_close(invstd, invstd_ref, tol / 100, 0.0, "invstd")
    g = 1.0 if gamma is None else np.abs(gamma.astype(np.float64)).reshape(bshape)
    _check_close(y, y_ref, tol, g, "y")

    dx_ref, dgamma_ref, dbeta_ref = ref_backward(dy, x, mean_ref, invstd_ref, gamma, axis=axis)
    dy64 = dy.astype(np.float64)
    x_hat = (x.astype(np.float64) - mean_ref.reshape(bshape)) * invstd_ref.reshape(bshape)
    # dx's natural scale: gamma * invstd * (|dy| + mean |dy| + |x_hat| mean |dy x_hat|).
    m = x.size // x.shape[axis]
    with np.errstate(invalid="ignore", over="ignore"):
        dx_scale = (
            g
            * invstd_ref.reshape(bshape)
            * (
                np.abs(dy64)
                + _per_feature_bound(dy64, axis) / m
                + np.abs(x_hat) * _per_feature_bound(dy64 * x_hat, axis) / m
            )
        )
        dgamma_scale = _per_feature_bound(dy64 * x_hat, axis).reshape(-1)
    _check_close(dx, dx_ref, tol, dx_scale, "dx")
    _check_close(dgamma, dgamma_ref, tol, dgamma_scale, "dgamma")
    _check_close(dbeta, dbeta_ref, tol, _per_feature_bound(dy64, axis).reshape(-1), "dbeta")


@settings(max_examples=150)
@given(problems())
def test_matches_reference_and_leaves_inputs_alone(p):
    keys = [k for k in ("x", "dy", "gamma", "beta") if p[k] is not None]
    before = {k: (p[k].copy(), p[k].strides) for k in keys}
    got = _run_all(p)
    for k, (a, strides) in before.items():
        assert p[k].tobytes() == a.tobytes() and p[k].strides == strides, f"{k} modified"
    _check_against_reference(p, got)
    # Deterministic: the same call again gives the same bits.
    again = _run_all(p)
    for a, b in zip(got, again, strict=True):
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


@settings(max_examples=80)
@given(problems(with_nonfinite=True))
def test_nan_and_inf_stay_in_their_feature(p):
    x, axis, bad = p["x"], p["axis"], p["bad_feature"]
    x_before = x.copy()
    got = _run_all(p)
    np.testing.assert_array_equal(x, x_before)
    y, mean, invstd, dx, _, _ = got
    # The affected feature: no finite statistic or output survives.
    assert not (np.isfinite(mean[bad]) and np.isfinite(invstd[bad]) and invstd[bad] > 0)
    sel = feature_slice(x.ndim, axis, bad)
    assert not np.isfinite(y[sel]).any()
    assert not np.isfinite(dx[sel]).any()
    # Every other feature: exactly as the reference (which works feature by feature).
    _check_against_reference(p, got)


@settings(max_examples=50)
@given(problems())
def test_out_aliasing_rules(p):
    x, dy, gamma, beta, axis = p["x"], p["dy"], p["gamma"], p["beta"], p["axis"]
    y, mean, invstd = fastbn.batch_norm_train(x, gamma, beta, axis=axis)
    var = 1.0 / invstd**2 - 1e-5
    y_eval = fastbn.batch_norm_eval(x, mean, var, gamma, beta, axis=axis)
    dx, _, _ = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, axis=axis)

    # eval may write into x itself, backward into dy itself: same bits as a fresh output.
    x_inplace = layout(x.copy(), p["order"])  # a copy in the same memory order
    res = fastbn.batch_norm_eval(x_inplace, mean, var, gamma, beta, axis=axis, out=x_inplace)
    assert res is x_inplace
    np.testing.assert_array_equal(res, y_eval)
    dy_inplace = dy.copy()
    res = fastbn.batch_norm_backward(
        dy_inplace, x, mean, invstd, gamma, axis=axis, out=dy_inplace
    )[0]
    assert res is dy_inplace
    np.testing.assert_array_equal(res, dx)

    # A separate out of any layout gets the same values.
    out = layout(np.zeros(x.shape, x.dtype), "F" if x.flags.c_contiguous else "C")
    assert fastbn.batch_norm_train(x, gamma, beta, axis=axis, out=out)[0] is out
    np.testing.assert_array_equal(out, y)

    # train may not write into x; nothing may write into a different view of an input.
    x_before = x.copy()
    with pytest.raises(ValueError, match="out overlaps the input x"):
        fastbn.batch_norm_train(x, gamma, beta, axis=axis, out=x)
    np.testing.assert_array_equal(x, x_before)
    if x.size > 1:
        flipped = x[tuple(slice(None, None, -1) for _ in x.shape)]
        with pytest.raises(ValueError, match="out overlaps the input x"):
            fastbn.batch_norm_eval(x, mean, var, gamma, beta, axis=axis, out=flipped)
        np.testing.assert_array_equal(x, x_before)
