"""The float64 NumPy LeNet-BN training reference (`common.lenet_reference`) is itself verified
(finite differences, the inference forward, closed-form running statistics), every backend's
`lenet_train` is checked against it, and `check_trajectory` is shown to fail on real bugs and NaN.
"""
import math

import numpy as np
import pytest

import backends
from common import data, lenet
from common import lenet_reference as ref
from common.reference import bn_step as real_bn_step
from common.spec import effective_decay
from conftest import backend_impls, load_backend

CASES = backend_impls()


def _perturbed_params(seed=0):
    """init_params with non-trivial gamma, beta and running statistics."""
    rng = np.random.default_rng(seed)
    p = lenet.init_params(seed)
    for layer, c in lenet.BN_LAYERS.items():
        p[f"{layer}.gamma"] = rng.uniform(0.5, 1.5, c)
        p[f"{layer}.beta"] = rng.normal(0, 0.3, c)
        p[f"{layer}.running_mean"] = rng.normal(0, 0.3, c)
        p[f"{layer}.running_var"] = rng.uniform(0.5, 2, c)
    for name in ("conv1.bias", "fc3.bias"):
        p[name] = rng.normal(0, 0.1, p[name].shape)
    return p


def _batches(sample_dir, steps, batch_size, dtype=np.float64):
    images, labels = data.load("train", sample_dir, limit=steps * batch_size)
    x = data.to_nchw_float(images, np.dtype(dtype))
    return [(x[i], labels[i]) for i in data.batch_indices(len(x), batch_size, seed=0)]


# -- the reference itself -------------------------------------------------------------------------
def test_gradients_match_central_finite_differences():
    """Three random entries of every trainable tensor. Central differences with h = 1e-5 carry a
    truncation error ~h²·|f'''|/6 ~ 1e-11 and a round-off error ~eps64·|L|/h ~ 5e-11 (measured
    worst |analytic − numeric| 3.6e-10 over all entries); 2e-9 + 1e-7·|g| is 5× above that,
    while a real mistake (e.g. batch norm's backward without the mean terms) is ≥ 1e-4."""
    rng = np.random.default_rng(0)
    p = _perturbed_params(0)
    x, y = rng.uniform(0, 1, (6, 1, 28, 28)), rng.integers(0, 10, 6)
    loss, grads = ref.loss_and_grads(p, x, y)
    assert set(grads) == set(ref.TRAINABLE) and len(ref.TRAINABLE) == 18
    h = 1e-5
    for name in ref.TRAINABLE:
        assert grads[name].shape == p[name].shape
        for _ in range(3):
            i = tuple(int(rng.integers(0, s)) for s in p[name].shape)
            plus, minus = dict(p), dict(p)
            plus[name], minus[name] = p[name].copy(), p[name].copy()
            plus[name][i] += h
            minus[name][i] -= h
            numeric = (ref.loss_and_grads(plus, x, y)[0] - ref.loss_and_grads(minus, x, y)[0]) / (2 * h)
            err = abs(grads[name][i] - numeric)
            assert err <= 2e-9 + 1e-7 * abs(numeric), f"{name}{i}: analytic {grads[name][i]}, numeric {numeric}"
    # A bias before batch norm has no effect on the loss (BN subtracts the batch mean); fc3.bias does.
    assert np.abs(grads["conv1.bias"]).max() < 1e-12 and np.abs(grads["fc3.bias"]).max() > 1e-3


def test_inference_activations_match_reference_logits():
    rng = np.random.default_rng(1)
    p = _perturbed_params(1)
    x = rng.uniform(0, 1, (5, 1, 28, 28))
    acts = ref.activations(p, x)
    assert tuple(acts) == lenet.LAYERS
    shapes = {"conv1": (5, 6, 24, 24), "pool1": (5, 6, 12, 12), "pool2": (5, 16, 4, 4),
              "flatten": (5, 256), "bn3": (5, 120), "fc3": (5, 10)}
    assert all(acts[k].shape == s for k, s in shapes.items())
    # Two independent codes: bn_step(training=False) here, _bn_inference in reference_logits.
    assert np.abs(acts["fc3"] - lenet.reference_logits(p, x)).max() <= 1e-12
    # Training mode normalises with the batch statistics instead.
    train_acts = ref.activations(p, x, training=True)
    np.testing.assert_allclose(train_acts["bn3"].mean(axis=0), p["bn3.beta"], atol=1e-12)
    assert np.abs(train_acts["fc3"] - acts["fc3"]).max() > 1e-3


@pytest.mark.parametrize("unbiased", [False, True])
def test_step_updates_running_statistics_and_weights(unbiased):
    """decay 0: the running statistics become the batch's (÷(m−1) if unbiased), from the
    pre-BN activations; decay 0.9: 90% old; the weights move by −lr·grad."""
    rng = np.random.default_rng(2)
    p = _perturbed_params(2)
    x, y = rng.uniform(0, 1, (4, 1, 28, 28)), rng.integers(0, 10, 4)
    acts = ref.activations(p, x, training=True)
    loss, grads = ref.loss_and_grads(p, x, y)
    for decay in (0.0, 0.9):
        step_loss, new = ref.step(p, x, y, lr=0.3, decay=decay, unbiased=unbiased)
        assert step_loss == loss
        for layer, pre in (("bn1", "conv1"), ("bn2", "conv2"), ("bn3", "fc1"), ("bn4", "fc2")):
            z = acts[pre]
            axes = (0,) if z.ndim == 2 else (0, 2, 3)
            var = z.var(axis=axes, ddof=1 if unbiased else 0)
            np.testing.assert_allclose(new[f"{layer}.running_mean"],
                                       decay * p[f"{layer}.running_mean"] + (1 - decay) * z.mean(axis=axes),
                                       rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(new[f"{layer}.running_var"],
                                       decay * p[f"{layer}.running_var"] + (1 - decay) * var, rtol=1e-12)
        for name in ref.TRAINABLE:
            np.testing.assert_allclose(new[name], p[name] - 0.3 * grads[name], rtol=0, atol=1e-15)
    # The loss is the mean cross-entropy of the training-mode logits.
    logits = acts["fc3"]
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert abs(loss + logp[np.arange(4), y].mean()) < 1e-12


def test_maxpool_gradient_goes_to_the_first_maximum():
    inp = np.array([[[[1.0, 3.0], [3.0, 0.0]]]])  # a tie: row-major first wins
    g = ref._maxpool2_backward(inp, np.array([[[[5.0]]]]))
    np.testing.assert_array_equal(g, [[[[0.0, 5.0], [0.0, 0.0]]]])


def test_train_records_history_and_matches_repeated_steps():
    rng = np.random.default_rng(3)
    p = _perturbed_params(3)
    batches = [(rng.uniform(0, 1, (4, 1, 28, 28)), rng.integers(0, 10, 4)) for _ in range(3)]
    run = ref.train(p, batches, lr=0.5, decay=0.8, record=True)
    assert len(run["losses"]) == len(run["history"]) == 3
    q = p
    for (x, y), loss, hist in zip(batches, run["losses"], run["history"]):
        step_loss, q = ref.step(q, x, y, lr=0.5, decay=0.8)
        assert step_loss == loss and all(np.array_equal(q[n], hist[n]) for n in q)
    assert all(np.array_equal(run["params"][n], q[n]) for n in q)
    assert "history" not in ref.train(p, batches, lr=0.5)


@pytest.mark.parametrize("call, match", [
    (lambda p, x, y: ref.step(p, x[:, :, :27], y, lr=1.0), "N×1×28×28"),
    (lambda p, x, y: ref.step(p, x, y[:2], lr=1.0), "labels must have shape"),
    (lambda p, x, y: ref.step(p, x, y + 10, lr=1.0), r"labels must be integers in \[0, 10\)"),
    (lambda p, x, y: ref.step(p, np.where(x > 0.5, np.nan, x), y, lr=1.0), "non-finite"),
    (lambda p, x, y: ref.step(p, x, y, lr=-1.0), "lr must be a positive"),
    (lambda p, x, y: ref.step(p, x, y, lr=1.0, decay=1.5), "decay must be in"),
    (lambda p, x, y: ref.step(p, x, y, lr=1.0, eps=0.0), "eps must be a positive"),
    (lambda p, x, y: ref.step(dict(p, **{"bn1.gamma": np.ones(5)}), x, y, lr=1.0), "bn1.gamma has shape"),
    (lambda p, x, y: ref.step(p, x[:1], y[:1], lr=1.0), "more than 1 value per channel"),
    (lambda p, x, y: ref.activations(p, x[0]), "N×1×28×28"),
])
def test_bad_input_is_one_clear_value_error(call, match):
    rng = np.random.default_rng(4)
    p = lenet.init_params(0)
    x, y = rng.uniform(0, 1, (3, 1, 28, 28)), rng.integers(0, 10, 3)
    with pytest.raises(ValueError, match=match):
        call(p, x, y)


# -- every backend against the reference -----------------------------------------------------------
def _conventions(backend, impl):
    """(unbiased, decay) the impl really applies when asked for canonical decay 0.9: its own
    running-variance estimator (PyTorch native keeps only the unbiased one) and its momentum's
    precision (MXNet native rounds it to float32)."""
    claimed = backend.conventions()[impl]
    return claimed["running_var"] == "unbiased", effective_decay(0.9, claimed)


@pytest.mark.parametrize("name, impl", CASES)
def test_lenet_train_matches_the_reference_in_float64(name, impl, sample_dir):
    """5 steps at lr 1.0, batch 32. A float64 implementation differs from the reference only in
    summation order, ~1e-16 relative per operation. Measured (the trajectory report in
    float64, 20 steps at batches 64 and 256): worst local error 1.3e-13, worst global
    difference 2.6e-11 after 20 steps (it compounds); over 5 steps at batch 32 the project's
    float64 tolerance 1e-10 holds for both with a wide margin."""
    backend = load_backend(name)
    unbiased, decay = _conventions(backend, impl)
    batches = _batches(sample_dir, 5, 32)
    params = lenet.init_params(0)
    kw = dict(lr=1.0, impl=impl, decay=0.9, unbiased=unbiased, dtype="float64")
    run = backend.lenet_train(params, batches, record=True, **kw)
    check = ref.check_trajectory(params, batches, run, lr=1.0, decay=decay, unbiased=unbiased,
                                 dtype="float64")
    assert check["pass"], (check["problems"], check["local"]["first_failure"])
    assert check["local"]["max"]["ratio"] <= 1.0 and check["global"]["first_divergence"] is None
    assert check["global"]["max"]["loss"] <= 1e-10 and check["global"]["max"]["param"] <= 1e-10
    moved = lenet.max_abs_diff(run["params"], params)
    assert moved["conv1.weight"] > 1e-3 and moved["bn3.running_var"] > 1e-3, "training changed nothing"
    plain = backend.lenet_train(params, batches, **kw)
    assert "history" not in plain and plain["losses"] == run["losses"]


@pytest.mark.parametrize("name, impl", CASES)
def test_float32_run_passes_the_local_check_and_fails_under_the_other_convention(name, impl, sample_dir):
    """6 float32 steps at lr 1.0, batch 64. Measured worst local error over 20 steps at batches
    16/64/256 is 0.12 of the tolerance (local_tolerance's docstring); 0.5 leaves room for other
    CPUs' summation orders. The same run judged with the other running-variance estimator fails: bn3/bn4's
    running variances then differ by ~0.1·var/63 ≈ 2e-4, 25× their tolerance."""
    backend = load_backend(name)
    unbiased, decay = _conventions(backend, impl)
    batches = _batches(sample_dir, 6, 64, np.float32)
    params = lenet.init_params(0)
    run = backend.lenet_train(params, batches, lr=1.0, impl=impl, decay=0.9, unbiased=unbiased,
                              dtype="float32", record=True)
    assert len(run["history"]) == 6
    assert all(np.asarray(v).dtype == np.float32 for h in run["history"] for v in h.values())
    kw = dict(lr=1.0, decay=decay, dtype="float32")
    check = ref.check_trajectory(params, batches, run, unbiased=unbiased, **kw)
    assert check["pass"] and check["local"]["max"]["ratio"] <= 0.5, check["local"]["first_failure"]
    assert 0 < check["global"]["max"]["loss"]  # a float32 run, not the float64 numbers recast
    wrong = ref.check_trajectory(params, batches, run, unbiased=not unbiased, **kw)
    first = wrong["local"]["first_failure"]
    assert not wrong["pass"] and first["step"] == 0 and first["quantity"].endswith(".running_var"), first


# -- check_trajectory catches bugs and NaN ---------------------------------------------------------
def _fake_run(params, batches, dtype, step=ref.step, **kw):
    """A run that takes each step with `step` (float64) and keeps its state in `dtype`, as a
    backend's lenet_train(record=True) returns it."""
    p = lenet.cast(params, dtype)
    losses, history = [], []
    for x, y in batches:
        loss, new = step(lenet.cast(p, np.float64), x, y, lr=1.0, **kw)
        p = lenet.cast(new, dtype)
        losses.append(loss)
        history.append(p)
    return {"losses": losses, "params": p, "history": history}


def _unbiased_normalisation_bn_step(x, gamma, beta, running_mean, running_var, dy, *, training,
                                    eps, decay, unbiased):
    """Batch norm that normalises with the ÷(m−1) batch variance c·var (c = m/(m−1)), built
    from the real one: γ(x−μ)/√(c·var+ε) = (γ/√c)(x−μ)/√(var+ε/c)."""
    if not training:
        return real_bn_step(x, gamma, beta, running_mean, running_var, dy, training=False, eps=eps,
                            decay=decay, unbiased=unbiased)
    m = x.size // x.shape[1]
    c = m / (m - 1)
    r = real_bn_step(x, gamma / math.sqrt(c), beta, running_mean, running_var, dy, training=True,
                     eps=eps / c, decay=decay, unbiased=unbiased)
    return dict(r, dgamma=r["dgamma"] / math.sqrt(c))


@pytest.fixture(scope="module")
def f32_case(sample_dir):
    return lenet.init_params(0), _batches(sample_dir, 3, 64, np.float32)


def _check(params, batches, run, **kw):
    return ref.check_trajectory(params, batches, run, lr=1.0, dtype="float32", **kw)


def test_an_honest_float32_run_passes(f32_case):
    params, batches = f32_case
    check = _check(params, batches, _fake_run(params, batches, np.float32))
    assert check["pass"] and not check["problems"] and check["local"]["max"]["ratio"] < 0.1


def test_momentum_applied_the_wrong_way_fails(f32_case):
    """decay 0.1 (the MXNet source's momentum 0.9 read as canonical decay)."""
    params, batches = f32_case
    check = _check(params, batches, _fake_run(params, batches, np.float32, decay=0.1))
    first = check["local"]["first_failure"]
    assert not check["pass"] and (first["step"], first["quantity"]) == (0, "bn1.running_mean")
    assert first["error"] > 0.1


def test_unbiased_variance_used_for_normalisation_fails(f32_case, monkeypatch):
    params, batches = f32_case
    with monkeypatch.context() as m:
        m.setattr(ref, "bn_step", _unbiased_normalisation_bn_step)
        run = _fake_run(params, batches, np.float32)
    check = _check(params, batches, run)
    first = check["local"]["first_failure"]
    assert not check["pass"] and (first["step"], first["quantity"]) == (0, "loss"), first
    assert first["error"] > 2 * first["tolerance"]


def test_unbiased_running_variance_fails_unless_asked_for(f32_case):
    params, batches = f32_case
    run = _fake_run(params, batches, np.float32, unbiased=True)
    assert _check(params, batches, run, unbiased=True)["pass"]
    check = _check(params, batches, run)
    assert not check["pass"] and check["local"]["first_failure"]["quantity"].endswith("running_var")


@pytest.mark.parametrize("where", ["loss", "param", "inf param"])
def test_nan_or_inf_in_a_run_fails(f32_case, where):
    params, batches = f32_case
    run = _fake_run(params, batches, np.float32)
    if where == "loss":
        run["losses"][1] = float("nan")
    else:
        bad = np.float32("nan" if where == "param" else "inf")
        run["history"][1] = dict(run["history"][1], **{"fc3.weight": np.full((10, 84), bad, np.float32)})
    check = _check(params, batches, run)
    first = check["local"]["first_failure"]
    assert not check["pass"] and first["step"] == 1
    assert first["quantity"] == ("loss" if where == "loss" else "fc3.weight")
    if where != "loss":  # step 2 starts from a broken state: no reference, a NaN error, no crash
        assert math.isnan(check["local"]["ratio"][2]) and math.isnan(check["local"]["max"]["ratio"])


@pytest.mark.parametrize("defect, problem", [
    (lambda r: r["history"].pop(), "2 history entries for 3 batches"),
    (lambda r: r["losses"].append(1.0), "4 losses for 3 batches"),
    (lambda r: r.update(params=lenet.init_params(0)), "dtype float64, expected float32"),
    (lambda r: r.update(params=lenet.cast(lenet.init_params(0), np.float32)),
     "params differ from the last history entry"),
    (lambda r: r["history"][0].pop("bn2.beta"), "history[0]: missing bn2.beta"),
])
def test_a_malformed_run_fails_with_the_reason(f32_case, defect, problem):
    params, batches = f32_case
    run = _fake_run(params, batches, np.float32)
    defect(run)
    check = _check(params, batches, run)
    assert not check["pass"] and any(problem in p for p in check["problems"]), check["problems"]
    # what can still be compared is (a missing entry leaves nothing to compare)
    assert len(check["local"]["loss"]) == (0 if "missing" in problem else 2 if "2 history" in problem else 3)


def test_bad_arguments_are_value_errors(f32_case):
    params, batches = f32_case
    run = _fake_run(params, batches, np.float32)
    with pytest.raises(ValueError, match="record=True"):
        _check(params, batches, {"losses": run["losses"], "params": run["params"]})
    with pytest.raises(ValueError, match="at least one batch"):
        _check(params, [], run)
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        ref.check_trajectory(params, batches, run, lr=1.0, dtype="float16")
    with pytest.raises(ValueError, match="lr must be"):
        ref.check_trajectory(params, batches, run, lr=float("nan"), dtype="float32")


def test_tolerances_scale_with_batch_size_and_lr():
    t64, t256 = ref.local_tolerance("float32", 64), ref.local_tolerance("float32", 256)
    assert list(t64) == ref.quantities() and all(t256[q] > t64[q] for q in t64)
    lr2 = ref.local_tolerance("float32", 64, lr=2.0)
    assert lr2["conv1.weight"] == 2 * t64["conv1.weight"] and lr2["loss"] == t64["loss"]
    assert lr2["bn1.running_var"] == t64["bn1.running_var"]
    # the loss and the post-pool parameters are held far tighter than the pre-pool ones
    assert t64["loss"] < t64["fc3.weight"] < t64["conv1.weight"] / 10
    assert set(ref.local_tolerance("float64", 64).values()) == {1e-10}
    with pytest.raises(ValueError):
        ref.local_tolerance("float32", 0)
    # the sizes the tolerance uses are the network's: values per channel per example
    acts = ref.activations(lenet.init_params(0), np.zeros((2, 1, 28, 28)), training=True)
    for layer, pre in (("bn1", "conv1"), ("bn2", "conv2"), ("bn3", "fc1"), ("bn4", "fc2")):
        assert ref.SUMMED_PER_EXAMPLE[layer] == acts[pre][0, 0].size
    # a tolerance given explicitly replaces the derived one (0 fails any float32 run)
    run = {"losses": [2.3], "params": lenet.cast(lenet.init_params(0), np.float32)}
    run["history"] = [run["params"]]
    x = np.random.default_rng(0).uniform(0, 1, (4, 1, 28, 28)).astype(np.float32)
    assert not ref.check_trajectory(lenet.init_params(0), [(x, np.arange(4))], run, lr=1.0,
                                    dtype="float32", tolerance=0.0)["pass"]


def test_the_trajectory_reports_task_records_every_step_for_the_check(sample_dir):
    from reports import child, trajectory

    b = load_backend("torch")
    batches = _batches(sample_dir, 2, 8)
    args = {"params": lenet.init_params(0), "xs": [x for x, _ in batches], "ys": [y for _, y in batches],
            "lr": 1.0, "decay": 0.9, "dtype": "float64"}
    runs = child.find_task("trajectory.trajectory")(b, args)
    assert set(runs) == set(b.IMPLS)
    for impl, r in runs.items():
        assert len(r["history"]) == 2, impl
        assert all(np.array_equal(r["history"][-1][n], r["params"][n]) for n in r["params"])
    summary, failures = trajectory.summarise({f"torch/{i}": r for i, r in runs.items()}, args["params"],
                                             batches, lr=1.0, dtype="float64",
                                             claimed={"torch": b.conventions()})
    assert failures == [] and all(v["pass"] for v in summary.values())