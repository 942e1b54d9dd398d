"""The float64 reference is itself verified: finite differences, closed forms, bad input."""
import numpy as np
import pytest

from common.reference import bn_step, random_case, reduce_axes

SHAPES = [(7, 4), (5, 3, 4, 6)]


def _numeric_grads(case, training, eps, h=1e-6):
    """Central differences of L = sum(y * dy) w.r.t. x, gamma, beta."""
    def loss(**over):
        args = {**case, **over}
        return float(np.sum(bn_step(**args, training=training, eps=eps)["y"] * case["dy"]))

    grads = {}
    for name in ("x", "gamma", "beta"):
        g = np.zeros_like(case[name])
        it = np.nditer(case[name], flags=["multi_index"])
        for _ in it:
            i = it.multi_index
            plus, minus = case[name].copy(), case[name].copy()
            plus[i] += h
            minus[i] -= h
            g[i] = (loss(**{name: plus}) - loss(**{name: minus})) / (2 * h)
        grads[name] = g
    return grads


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_gradients_match_finite_differences(shape, training):
    case = random_case(shape, seed=1)
    out = bn_step(**case, training=training, eps=1e-3)
    num = _numeric_grads(case, training, 1e-3)
    # Central differences: truncation O(h^2) ~1e-12, round-off ~1e-16/h ~1e-10.
    np.testing.assert_allclose(out["dx"], num["x"], rtol=0, atol=1e-8)
    np.testing.assert_allclose(out["dgamma"], num["gamma"], rtol=0, atol=1e-8)
    np.testing.assert_allclose(out["dbeta"], num["beta"], rtol=0, atol=1e-8)


@pytest.mark.parametrize("shape", SHAPES)
def test_training_output_is_normalised_per_channel(shape):
    case = random_case(shape, seed=2, mean=3.0, scale=2.0)
    eps = 1e-5
    y = bn_step(**case, training=True, eps=eps)["y"]
    axes = reduce_axes(len(shape))
    var = case["x"].var(axis=axes)
    np.testing.assert_allclose(y.mean(axis=axes), case["beta"], atol=1e-12)
    np.testing.assert_allclose(y.std(axis=axes), case["gamma"] * np.sqrt(var / (var + eps)), rtol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("decay", [0.0, 0.1, 0.9, 0.99])
def test_running_statistics_match_closed_form_after_k_steps(shape, unbiased, decay):
    rng = np.random.default_rng(3)
    case = random_case(shape, seed=3)
    rm0, rv0 = case["running_mean"].copy(), case["running_var"].copy()
    rm, rv = rm0, rv0
    means, variances = [], []
    k = 5
    for _ in range(k):
        x = rng.normal(rng.normal(), rng.uniform(0.5, 3), size=shape)
        # per-channel statistics computed independently of the reference: move C to the front
        per_channel = np.moveaxis(x, 1, 0).reshape(shape[1], -1)
        means.append(per_channel.mean(axis=1))
        variances.append(per_channel.var(axis=1, ddof=1 if unbiased else 0))
        out = bn_step(x, case["gamma"], case["beta"], rm, rv, case["dy"], training=True,
                      decay=decay, unbiased=unbiased)
        rm, rv = out["running_mean"], out["running_var"]
    weights = [(1 - decay) * decay ** (k - 1 - i) for i in range(k)]
    np.testing.assert_allclose(rm, decay**k * rm0 + sum(w * s for w, s in zip(weights, means)), atol=1e-12)
    np.testing.assert_allclose(rv, decay**k * rv0 + sum(w * s for w, s in zip(weights, variances)), atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_inference_uses_running_statistics_and_leaves_them(shape):
    case = random_case(shape, seed=4)
    eps = 1e-4
    out = bn_step(**case, training=False, eps=eps)
    bc = (1, -1) + (1,) * (len(shape) - 2)
    scale = (case["gamma"] / np.sqrt(case["running_var"] + eps)).reshape(bc)
    expected = (case["x"] - case["running_mean"].reshape(bc)) * scale + case["beta"].reshape(bc)
    np.testing.assert_allclose(out["y"], expected, atol=1e-12)
    np.testing.assert_allclose(out["dx"], case["dy"] * scale, atol=1e-12)
    np.testing.assert_array_equal(out["running_mean"], case["running_mean"])
    np.testing.assert_array_equal(out["running_var"], case["running_var"])


def test_output_is_float64_for_float32_input():
    case = random_case((6, 3), seed=5, dtype=np.float32)
    out = bn_step(**case, training=True)
    assert all(v.dtype == np.float64 for v in out.values())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(x=c["x"][:, :, 0], dy=c["dy"][:, :, 0]), "2-D .* or 4-D"),
        (lambda c: c.update(gamma=c["gamma"][:-1]), "gamma must have shape"),
        (lambda c: c.update(running_var=np.ones((1, 3))), "running_var must have shape"),
        (lambda c: c.update(dy=c["dy"][:1]), "dy must have"),
        (lambda c: c.update(x=c["x"][:1, :, :1, :1], dy=c["dy"][:1, :, :1, :1]), "more than 1 value per channel"),
        (lambda c: c["x"].__setitem__((0, 0, 0, 0), np.nan), "x contains non-finite"),
        (lambda c: c["beta"].__setitem__(0, np.inf), "beta contains non-finite"),
    ],
)
def test_bad_input_raises_clear_value_error(change, message):
    case = random_case((4, 3, 2, 2), seed=6)
    change(case)
    with pytest.raises(ValueError, match=message):
        bn_step(**case, training=True)


def test_bad_eps_and_decay_raise():
    case = random_case((4, 3), seed=7)
    with pytest.raises(ValueError, match="eps"):
        bn_step(**case, training=True, eps=0.0)
    with pytest.raises(ValueError, match="decay"):
        bn_step(**case, training=True, decay=1.5)


def test_one_value_per_channel_is_fine_in_inference():
    case = random_case((1, 3), seed=8)
    out = bn_step(**case, training=False)
    assert out["y"].shape == (1, 3)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from common.testing import bn_cases  # noqa: E402


@settings(max_examples=60, deadline=None, derandomize=True)
@given(bn_cases(dtypes=("float64",), vary_eps=False), st.floats(0.01, 100))
def test_training_gradient_identities_and_shift_invariance(drawn, shift):
    """Properties of batch norm in training mode, whatever the shape and data: the input
    gradient sums to zero per channel (the mean is normalised away), its projection on x̂ is
    only what eps leaves of the variance normalisation, γ·σ⁻¹·Σ(dy·x̂)·eps/(var+eps), and adding a
    constant to x changes neither y nor dx."""
    case = drawn["inputs"]
    eps = 1e-5
    axes = reduce_axes(case["x"].ndim)
    out = bn_step(**case, training=True, eps=eps)
    shifted = bn_step(**dict(case, x=case["x"] + shift), training=True, eps=eps)
    centered = case["x"] - case["x"].mean(axis=axes, keepdims=True)
    var = centered.var(axis=axes)
    xhat = centered / np.sqrt(var + eps).reshape((1, -1) + (1,) * (case["x"].ndim - 2))
    # dx is of order γ/σ · |dy|: round-off scales with it (σ can be tiny for two close values)
    scale = max(1.0, float(np.abs(case["dy"]).sum() * np.max(case["gamma"] / np.sqrt(var + eps))))
    projection = case["gamma"] / np.sqrt(var + eps) * (case["dy"] * xhat).sum(axis=axes) * eps / (var + eps)
    np.testing.assert_allclose(out["dx"].sum(axis=axes), 0, atol=1e-12 * scale)
    np.testing.assert_allclose((out["dx"] * xhat).sum(axis=axes), projection, atol=1e-11 * scale)
    # a shift of up to 100 on data of spread >= 0.01 whose offset is at most 1000 spreads costs at
    # most ~1e-16 * (1000 + 100 / 0.01) = 1e-12 relative in centring
    np.testing.assert_allclose(shifted["y"], out["y"], atol=1e-9)
    np.testing.assert_allclose(shifted["dx"], out["dx"], atol=1e-9 * scale)
