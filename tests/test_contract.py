"""Every backend × impl against the float64 reference, through the one contract.

Tolerances: float64 max abs error ≤ 1e-10 (the reference and a float64 implementation differ
only in summation order, ~1e-14 relative on these sizes); float32 ≤ 1e-5 relative to the
largest reference magnitude (float32 epsilon is 1.2e-7; sums over up to a few hundred elements).
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import backends
from common import conventions as conv
from common import data, lenet, testing
from common.spec import CONVENTION_FIELDS, effective_decay
from common.reference import RESULT_KEYS, bn_step as reference_step, error, random_case, within_tolerance
from conftest import load_backend, backend_impls

SHAPES = {"2d": (16, 5), "4d": (4, 3, 5, 6), "small-batch": (2, 4)}
SETTINGS = [(0.9, 1e-5), (0.1, 1e-3), (0.99, 1e-2)]  # (decay, eps)
CASES = backend_impls()


def assert_close(out, ref, dtype, keys=RESULT_KEYS, label=""):
    for k in keys:
        got = np.asarray(out[k])
        assert got.dtype == dtype, f"{label}{k}: dtype {got.dtype}, expected {dtype}"
        assert got.shape == ref[k].shape, f"{label}{k}: shape {got.shape}, expected {ref[k].shape}"
        assert within_tolerance(got, ref[k], dtype), f"{label}{k}: (abs, rel) error {error(got, ref[k])}"


def _step(backend, impl, case, **kw):
    try:
        return backend.bn_step(**case, impl=impl, **kw)
    except backends.UnsupportedSetting:
        # Allowed only where the impl's stated convention cannot express the request.
        claimed = backend.conventions()[impl]["running_var"]
        requested = "unbiased" if kw["unbiased"] else "biased"
        assert claimed != requested, f"{impl} refused unbiased={kw['unbiased']} but claims {claimed}"
        assert kw["training"], f"{impl} refused a running-variance setting in inference, where none is updated"
        return None


@pytest.mark.parametrize("name, impl", CASES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("decay, eps", SETTINGS)
@pytest.mark.parametrize("training, unbiased", [(True, False), (True, True), (False, False)],
                         ids=["train-biased", "train-unbiased", "inference"])
def test_bn_step_matches_reference(name, impl, shape, dtype, decay, eps, training, unbiased):
    backend = load_backend(name)
    case = random_case(shape, seed=hash((shape, decay)) % 1000, dtype=dtype)
    # An impl that applies its momentum in float32 (MXNet native) is held to that rounded decay.
    applied = effective_decay(decay, backend.conventions()[impl])
    ref = reference_step(**case, training=training, eps=eps, decay=applied, unbiased=unbiased)
    out = _step(backend, impl, case, training=training, eps=eps, decay=decay, unbiased=unbiased)
    if out is not None:  # None: a justified refusal, asserted in _step
        assert_close(out, ref, dtype)


@pytest.mark.parametrize("name, impl", CASES)
def test_every_impl_passes_the_users_helper_on_drawn_cases(name, impl):
    """common.testing's strategy and helper, as a user would run them, on every impl: drawn
    shapes (batches of two, constant channels, large offsets, eps near the variance) in both
    dtypes, training and inference, at a decay exact in float32 (MXNet's native momentum) and
    the impl's own running-variance estimator."""
    backend = load_backend(name)
    claims = {"decay": 0.75, "unbiased": backend.conventions()[impl]["running_var"] == "unbiased"}
    examples = 4 if name == "jax" else 10  # JAX compiles every new shape anew (~1.5 s a case here)

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(testing.bn_cases())
    def check(case):
        testing.assert_matches_reference(lambda *a, **k: backend.bn_step(*a, impl=impl, **k),
                                         conventions=claims, cases=[case])

    check()


@pytest.mark.parametrize("name, impl", CASES)
def test_bad_input_raises_value_error(name, impl):
    backend = load_backend(name)
    case = random_case((4, 3, 2, 2), seed=0)
    bad = dict(case, x=case["x"][:, :, 0], dy=case["dy"][:, :, 0])
    with pytest.raises(ValueError, match="2-D .* or 4-D"):
        backend.bn_step(**bad, training=True, impl=impl)
    with pytest.raises(ValueError, match="gamma must have shape"):
        backend.bn_step(**dict(case, gamma=case["gamma"][:2]), training=True, impl=impl)
    one = dict(case, x=case["x"][:1, :, :1, :1], dy=case["dy"][:1, :, :1, :1])
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        backend.bn_step(**one, training=True, impl=impl)
    with pytest.raises(ValueError, match="unknown impl|impl"):
        backend.bn_step(**case, training=True, impl="no-such-impl")


@pytest.mark.parametrize("name, impl", CASES)
def test_claimed_conventions_hold_in_an_experiment(name, impl):
    """conventions() says what the impl does (from signatures and documented facts); the
    several-step experiment on a fresh layer must measure every field and agree, and the layer
    must then match the reference under what was measured."""
    backend = load_backend(name)
    claimed = backend.conventions()[impl]
    missing = set(CONVENTION_FIELDS) - set(claimed)
    assert not missing, f"conventions()[{impl!r}] lacks {missing}"
    result = backend.observe(impl)
    measured = conv.measure(result["observations"])
    rows = conv.compare(claimed, measured)
    wrong = {f: (r["claimed"], r["measured"]) for f, r in rows.items() if r["agrees"] is not True}
    assert not wrong, f"{name}/{impl}: claimed vs measured differ: {wrong}; {measured['problems']}"
    assert result["claimed"] == {f: claimed[f] for f in CONVENTION_FIELDS}  # one claims path
    agreement = conv.agreement(result["observations"], measured)
    assert all(a["pass"] for a in agreement.values()), agreement


def _lenet_batches(sample_dir, n_batches=3, batch_size=32):
    images, labels = data.load("train", sample_dir, limit=n_batches * batch_size)
    x = data.to_nchw_float(images, np.float64)
    return [(x[i], labels[i]) for i in data.batch_indices(len(x), batch_size, seed=0)]


@pytest.mark.parametrize("name", backends.names())
def test_lenet_eval_matches_numpy_reference(name, sample_dir):
    backend = load_backend(name)
    params = lenet.init_params(1)
    rng = np.random.default_rng(1)
    for layer, c in lenet.BN_LAYERS.items():  # non-trivial running statistics
        params[f"{layer}.running_mean"] = rng.normal(0, 0.3, c)
        params[f"{layer}.running_var"] = rng.uniform(0.5, 2, c)
    x = _lenet_batches(sample_dir, 1)[0][0]
    ref = lenet.reference_logits(params, x)
    for impl in backend.IMPLS:
        got = backend.lenet_eval(params, x, impl=impl)
        err = float(np.max(np.abs(np.asarray(got, np.float64) - ref)))
        assert err <= 1e-10, f"{name}/{impl}: lenet_eval differs from the reference by {err:.3g}"


@pytest.mark.parametrize("name", backends.names())
def test_lenet_train_impls_agree_in_float64(name, sample_dir):
    """A few SGD steps from identical parameters: every impl gives the same losses and
    parameters once the running-variance estimator and the applied decay are matched to the
    native layer's."""
    backend = load_backend(name)
    native = backend.conventions()["native"]
    unbiased = native["running_var"] == "unbiased"
    decay = effective_decay(0.9, native)
    batches = _lenet_batches(sample_dir)
    params = lenet.init_params(0)
    runs = {impl: backend.lenet_train(params, batches, lr=0.5, impl=impl, unbiased=unbiased,
                                      decay=decay, dtype="float64") for impl in backend.IMPLS}
    base = runs["native"]
    assert len(base["losses"]) == len(batches)
    assert base["losses"][-1] < base["losses"][0] + 1.0  # finite and sane
    lenet.validate_params(base["params"])
    moved = lenet.max_abs_diff(base["params"], params)
    assert moved["fc3.weight"] > 1e-4 and moved["bn1.running_mean"] > 1e-4, "training changed nothing"
    for impl, run in runs.items():
        np.testing.assert_allclose(run["losses"], base["losses"], rtol=0, atol=1e-10, err_msg=impl)
        diffs = lenet.max_abs_diff(run["params"], base["params"])
        worst = max(diffs, key=diffs.get)
        assert diffs[worst] <= 1e-9, f"{name}/{impl} vs native: {worst} differs by {diffs[worst]:.3g}"


def test_lenet_trajectories_agree_across_backends(sample_dir):
    """The same canonical parameters and batches give the same float64 trajectory in every
    backend's from-scratch impl (biased running variance everywhere)."""
    loaded = {n: load_backend(n, skip=False) for n in backends.names() if backends.available([n])[n] is None}
    if len(loaded) < 2:
        pytest.skip(f"needs two backends, have {sorted(loaded)}")
    batches = _lenet_batches(sample_dir)
    params = lenet.init_params(0)
    runs = {n: b.lenet_train(params, batches, lr=0.5, impl="scratch", unbiased=False, dtype="float64")
            for n, b in loaded.items()}
    first = next(iter(runs))
    for n, run in runs.items():
        np.testing.assert_allclose(run["losses"], runs[first]["losses"], rtol=0, atol=1e-10, err_msg=n)
        diffs = lenet.max_abs_diff(run["params"], runs[first]["params"])
        worst = max(diffs, key=diffs.get)
        assert diffs[worst] <= 1e-9, f"{n} vs {first}: {worst} differs by {diffs[worst]:.3g}"


@pytest.mark.parametrize("name, impl", CASES)
def test_speed_timer_is_warm_on_creation_and_times_each_run(name, impl):
    b = load_backend(name)
    timer = b.speed_timer(impl=impl, device="cpu", batch_size=16, steps=2)
    assert timer.info["device"].startswith("cpu") and timer.info["path"]
    assert timer.info["compile_s"] > 0
    runs = [timer.run() for _ in range(2)]
    assert all(r["examples_per_s"] > 0 for r in runs)
    for bad in (dict(steps=0), dict(batch_size=2.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            b.speed_timer(impl=impl, device="cpu", **{"batch_size": 16, "steps": 2, **bad})
