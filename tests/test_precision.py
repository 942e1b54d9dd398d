"""float16 and bfloat16: the dtype handling in common/, every backend × impl's bn_step against the
float64 reference with the tolerance derived from the dtype's epsilon, the accumulation switch
(statistics in the input dtype lose on a large-mean input, the float32 default does not), the
measured precision of each layer, LeNet-BN's mixed-precision path in every backend, loss
scaling, and the precision report's verdicts (a result that lies or crashes fails).

Tolerance (common.precision.tolerance): 2 eps(dtype) + log2(m) eps(float32) max_c |mean|/std,
relative to max(1, max |ref|); measured errors of the float32-statistics paths stay below a
third of it (see the precision report).
"""
import math

import numpy as np
import pytest

import backends
from common import dtypes, lenet, precision
from common.reference import RESULT_KEYS, bn_step as reference_step, error, random_case
from conftest import backend_impls, load_backend
from reports import precision as report

CASES = backend_impls()
LOW = dtypes.LOW
SHAPE = (16, 6, 8, 8)


# --- common/: dtypes, tolerances, the statistics-precision measurement -----------------------

def test_dtypes_accepts_the_four_formats_and_names_them_when_refusing():
    for name in dtypes.DTYPES:
        assert dtypes.float_dtype(name).name == name
        assert dtypes.float_dtype(np.zeros(2, dtype=name)).name == name
    assert dtypes.float_dtype(dtypes.BFLOAT16) == np.dtype("bfloat16")
    for bad in ("int8", np.int64, "float128", np.zeros(2, complex), object()):
        with pytest.raises(ValueError, match="dtype must be one of float64, float32, float16, bfloat16"):
            dtypes.float_dtype(bad)
    assert dtypes.eps("float16") == 2.0**-10 and dtypes.eps("bfloat16") == 2.0**-7
    assert dtypes.stats_dtype("float16") == np.float32 and dtypes.stats_dtype("float64") == np.float64
    assert dtypes.stats_dtype("bfloat16", "input").name == "bfloat16"
    with pytest.raises(ValueError, match="accumulate"):
        dtypes.check_accumulate("float16")
    # casts round to nearest (even), as the frameworks do
    assert float(dtypes.cast(1 + 0.75 * 2**-7, "bfloat16")) == 1 + 2**-7
    assert float(dtypes.cast(1 + 0.25 * 2**-7, "bfloat16")) == 1.0


def test_loss_scale_defaults_and_refusals():
    assert dtypes.loss_scale("float16") == 1024.0 and dtypes.loss_scale("bfloat16") == 1.0
    assert dtypes.loss_scale("float32") == 1.0 and dtypes.loss_scale("float16", 1) == 1.0
    for bad in (0, -1.0, float("nan"), float("inf"), True, "8"):
        with pytest.raises(ValueError, match="loss_scale"):
            dtypes.loss_scale("float16", bad)


def test_tolerance_follows_the_formula():
    unit = random_case(SHAPE, seed=0, dtype=np.float16)["x"]
    large = random_case(SHAPE, seed=0, mean=precision.large_mean("float16"),
                        dtype=np.float16)["x"]
    eps16, eps32 = 2.0**-10, 2.0**-23
    assert precision.tolerance("float16", unit) == pytest.approx(
        2 * eps16 + 10 * eps32 * precision.centring_amplification(unit))
    assert precision.tolerance("float16", unit) < 2.001 * eps16
    a = precision.centring_amplification(large)
    assert 400 < a < 700  # mean 512.25, std ~1
    assert precision.tolerance("float16", large) == pytest.approx(2 * eps16 + 10 * eps32 * a)
    assert precision.large_mean("float16") == 512.25 and precision.large_mean("bfloat16") == 64.25


@pytest.mark.parametrize("dtype", LOW)
def test_stats_precision_tells_the_candidates_apart(dtype):
    """Outputs computed (in NumPy) with statistics rounded to each candidate are classified as
    that candidate; an output off by a constant, or not finite, is neither float32 nor wider."""
    x = precision.probe_input(dtype)
    assert precision.stats_precision(x, precision.emulated_output(x, dtype, dtype))["stats_dtype"] == dtype
    for wide in ("float32", "float64"):
        got = precision.stats_precision(x, precision.emulated_output(x, wide, dtype))
        assert got["stats_dtype"] == "float32 or wider", got
    # the probe's mean (a sum of 64 multiples of 0.5, divided by 64) is exact in float32, so
    # float32 and float64 statistics cannot be told apart even in a float64 output
    exact = precision.emulated_output(x, "float64", "float64")
    assert precision.stats_precision(x, exact)["stats_dtype"] == "float32 or wider"
    wrong = precision.emulated_output(x, "float32", dtype).astype(np.float64) + 1.0
    assert precision.stats_precision(x, wrong)["stats_dtype"] != "float32 or wider"
    nan = np.full(x.shape, np.nan)
    assert precision.stats_precision(x, nan)["stats_dtype"] == "not finite"


# --- every backend × impl ------------------------------------------------------------------

def _case(dtype, scale):
    mean, std = report.scales(dtype)[scale]
    return random_case(SHAPE, seed=3, mean=mean, scale=std, dtype=dtypes.float_dtype(dtype))


def _errors(backend, impl, case, accumulate):
    unbiased = backend.conventions()[impl]["running_var"] == "unbiased"
    out = backend.bn_step(**case, training=True, unbiased=unbiased, impl=impl,
                          accumulate=accumulate)
    ref = reference_step(**{k: np.asarray(v, np.float64) for k, v in case.items()},
                         training=True, unbiased=unbiased)
    return out, {k: error(out[k], ref[k])[1] for k in RESULT_KEYS}


@pytest.mark.parametrize("name, impl", CASES)
@pytest.mark.parametrize("dtype", LOW)
def test_bn_step_idiom_agrees_with_the_reference_at_every_scale(name, impl, dtype):
    """accumulate="float32" (the mixed-precision idioms and the from-scratch default): y and dx
    in the input dtype, parameters' gradients and running statistics in float32, every
    quantity within the tolerance, the large-mean and wide inputs included."""
    b = load_backend(name)
    for scale in report.scales(dtype):
        case = _case(dtype, scale)
        out, errs = _errors(b, impl, case, "float32")
        assert out["y"].dtype.name == dtype and out["dx"].dtype.name == dtype
        assert {out[k].dtype.name for k in ("dgamma", "dbeta", "running_mean", "running_var")} \
            == {"float32"}, {k: v.dtype for k, v in out.items()}
        tol = precision.tolerance(dtype, case["x"])
        bad = {k: e for k, e in errs.items() if not e <= tol}
        assert not bad, f"{name}/{impl} {dtype} {scale}: {bad} above {tol:.3g}"


@pytest.mark.parametrize("name, impl", CASES)
@pytest.mark.parametrize("dtype", LOW)
def test_statistics_in_the_input_dtype_lose_on_the_large_mean_input(name, impl, dtype):
    """accumulate="input" keeps the layer in the input dtype and fails the large-mean case
    (where the idiom passes, previous test); impls whose framework has no such switch refuse it
    with UnsupportedSetting."""
    b = load_backend(name)
    case = _case(dtype, "large mean")
    try:
        out, errs = _errors(b, impl, case, "input")
    except backends.UnsupportedSetting as e:
        assert impl == "native" and name in ("torch", "mxnet"), e
        assert "precision of its statistics" in str(e)
        return
    assert out["y"].dtype.name == dtype
    tol = precision.tolerance(dtype, case["x"])
    assert not all(e <= tol for e in errs.values()), f"{name}/{impl}: no loss {errs}"
    assert not errs["y"] <= tol, errs  # the normalised output itself is off


@pytest.mark.parametrize("name, impl", CASES)
def test_precision_probe_reads_what_the_layer_produces_and_keeps(name, impl):
    b = load_backend(name)
    for dtype in LOW:
        p = b.precision_probe(impl, dtype)
        assert (p["output_dtype"], p["grad_dtype"], p["param_dtype"], p["running_dtype"]) == \
            (dtype, dtype, "float32", "float32"), p
        assert p["stats_dtype"] == "float32 or wider" and p["device"].startswith("cpu")
        try:
            p = b.precision_probe(impl, dtype, accumulate="input")
        except backends.UnsupportedSetting:
            continue
        assert p["stats_dtype"] == dtype, p
        if impl.startswith("scratch"):  # the whole layer in the input dtype
            assert (p["param_dtype"], p["running_dtype"]) == (dtype, dtype)


# --- LeNet-BN in low precision ---------------------------------------------------------------

def _batches(sample_dir, n=2, size=16):
    from common import data

    images, labels = data.load("train", sample_dir, limit=n * size)
    x = data.to_nchw_float(images, np.float32)
    return [(x[i * size:(i + 1) * size], labels[i * size:(i + 1) * size]) for i in range(n)]


LENET_RUNS = [("torch", impl) for impl in ("scratch", "scratch-analytic", "native")] + \
    [("jax", "native"), ("mxnet", "native")]


@pytest.mark.parametrize("name, impl", LENET_RUNS)
def test_lenet_train_runs_mixed_precision_or_says_why_not(name, impl, sample_dir):
    """float32 master parameters come back, the first loss (a forward pass from the same
    parameters) is within FORWARD_LAYERS × eps/2 of float32's, and the loss scale is reported;
    MXNet on the CPU refuses, naming the missing kernels."""
    b = load_backend(name)
    batches = _batches(sample_dir)
    params = lenet.init_params(0)
    base = b.lenet_train(params, batches, lr=0.5, impl=impl, dtype="float32")
    for dtype in LOW:
        try:
            r = b.lenet_train(params, batches, lr=0.5, impl=impl, dtype=dtype)
        except backends.UnsupportedSetting as e:
            assert name == "mxnet", e
            assert ("gemm" in str(e)) if dtype == "float16" else ("bfloat16" in str(e))
            continue
        assert name != "mxnet"
        assert {v.dtype for v in r["params"].values()} == {np.dtype(np.float32)}
        lenet.validate_params(r["params"])
        tol = report.first_loss_tolerance(dtype, base["losses"][0])
        assert abs(r["losses"][0] - base["losses"][0]) <= tol, (r["losses"], base["losses"])
        assert all(math.isfinite(v) for v in r["losses"])
        prec = r["precision"]
        assert prec["compute"] == dtype and prec["params"] == "float32"
        assert prec["loss_scale"] == (1024.0 if dtype == "float16" else 1.0)
        assert prec["skipped_steps"] == 0
        moved = lenet.max_abs_diff(r["params"], base["params"])
        assert 0 < moved["fc3.weight"] < 0.5  # it trained, near float32's trajectory


def test_torch_fit_and_speed_timer_take_low_precision():
    from common import data

    tb = load_backend("torch")
    rng = np.random.default_rng(0)
    ds = data.Dataset(rng.random((64, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 64),
                      rng.random((32, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 32),
                      "synthetic")
    for dtype in LOW:
        r = tb.fit(ds, impl="scratch", epochs=1, batch_size=32, dtype=dtype, device="cpu")
        assert math.isfinite(r["final_loss"]) and r["precision"]["compute"] == dtype
        timer = tb.speed_timer(impl="native", device="cpu", batch_size=16, steps=2, dtype=dtype)
        assert timer.info["precision"]["compute"] == dtype and timer.run()["examples_per_s"] > 0


def test_mxnet_fit_and_speed_timer_refuse_low_precision_on_the_cpu():
    mb = load_backend("mxnet")
    for dtype in LOW:
        with pytest.raises(backends.UnsupportedSetting, match="float16|bfloat16"):
            mb.speed_timer(impl="native", device="cpu", batch_size=16, steps=2, dtype=dtype)


def test_torch_loss_scaling_skips_a_step_whose_gradients_overflow():
    import torch

    from backends.torch.precision import MixedPrecision

    layer = torch.nn.Linear(3, 1)
    mp = MixedPrecision("float16", torch.device("cpu"), 1024.0)
    x = torch.ones(2, 3)
    mp.backward(layer(x).sum(), layer.parameters())  # finite: unscaled in place
    assert torch.allclose(layer.weight.grad, torch.full((1, 3), 2.0)) and int(mp.skipped) == 0
    layer.zero_grad()
    mp.backward(layer(x).sum() * float("inf"), layer.parameters())
    assert int(mp.skipped) == 1 and torch.all(layer.weight.grad == 0)  # no update from it


def test_jax_loss_scaling_skips_an_update_whose_gradients_overflow():
    load_backend("jax")
    import jax.numpy as jnp

    from backends.jax.precision import MixedPrecision, optimizer

    tx = optimizer(1.0, 1024.0)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.array([1.0, jnp.inf, 0.0])}, state, params)
    assert float(jnp.abs(updates["w"]).max()) == 0.0
    assert MixedPrecision("float16").summary(state)["precision"]["skipped_steps"] == 1
    updates, state = tx.update({"w": jnp.ones(3)}, state, params)
    assert float(updates["w"][0]) == -1.0


# --- the report's verdicts -------------------------------------------------------------------

def _report_case(dtype="float16", scale="large mean"):
    return next(c for c in report.cases(0, [dtype]) if c["label"] == scale)


def _result(case, out, dtype_of=None):
    return {"result": {"values": {k: np.asarray(v, np.float64) for k, v in out.items()},
                       "dtypes": {k: (dtype_of or {}).get(k, case["dtype"] if k in ("y", "dx")
                                                           else "float32") for k in out}}}


def test_report_passes_the_reference_rounded_to_the_dtype_and_fails_what_lies():
    case = _report_case()
    ref = reference_step(**case["inputs"], training=True)
    rounded = {k: dtypes.cast(v, "float16") if k in ("y", "dx") else v for k, v in ref.items()}
    assert report.check_case(case, _result(case, rounded), False)["pass"]
    # float16 outputs computed with statistics in float16: the mean rounded to the dtype
    x = case["inputs"]["x"]
    mean16 = dtypes.cast(x.mean(axis=(0, 2, 3)), "float16").astype(np.float64).reshape(1, -1, 1, 1)
    wrong = dict(rounded, y=dtypes.cast(
        (x - mean16) / np.sqrt(x.var(axis=(0, 2, 3)).reshape(1, -1, 1, 1) + 1e-5)
        * case["inputs"]["gamma"].reshape(1, -1, 1, 1) + case["inputs"]["beta"].reshape(1, -1, 1, 1),
        "float16"))
    row = report.check_case(case, _result(case, wrong), False)
    assert not row["pass"] and row["worst"] == "y"
    nan = dict(rounded, dgamma=np.full_like(ref["dgamma"], np.nan))
    row = report.check_case(case, _result(case, nan), False)
    assert not row["pass"] and row["worst"] == "dgamma" and math.isnan(row["worst_error"])
    row = report.check_case(case, _result(case, rounded, {"y": "float32"}), False)
    assert not row["pass"] and row["wrong_dtype"] == ["y"]


def test_report_failure_policy_for_bn_step_rows():
    case = _report_case()
    ref = reference_step(**case["inputs"], training=True)
    good = _result(case, {k: dtypes.cast(v, "float16") if k in ("y", "dx") else v
                          for k, v in ref.items()})
    off = _result(case, dict(ref, y=ref["y"] + 0.25))  # a mean off by 0.25, as float16 gives
    part = lambda *rs: {"unbiased": False, "cases": [  # noqa: E731
        {"case": "large mean", "dtype": "float16", "accumulate": acc, **r} for acc, r in rs]}
    _, f = report.check_bn("x", "scratch", part(("float32", good), ("input", off)), [case])
    assert f == []
    _, f = report.check_bn("x", "scratch", part(("float32", off)), [case])
    assert len(f) == 1 and "above the tolerance" in f[0]
    _, f = report.check_bn("x", "scratch", part(("input", good)), [case])
    assert len(f) == 1 and "switch has no effect" in f[0]
    _, f = report.check_bn("x", "native", part(("input", {"unsupported": "no switch"})), [case])
    assert f == []
    _, f = report.check_bn("x", "native", part(("float32", {"error": "Boom: crashed"})), [case])
    assert len(f) == 1 and "Boom" in f[0]


def test_report_trajectory_fails_a_nan_loss_and_a_wrong_first_loss():
    params = lenet.init_params(0)
    run = lambda losses: {"result": {"losses": losses, "params": params}}  # noqa: E731
    ok, f = report.summarise_trajectory("x/native", {"float32": run([2.3, 2.2]),
                                                      "float16": run([2.3005, 2.21])})
    assert f == [] and ok["float16"]["first_loss_ok"]
    _, f = report.summarise_trajectory("x/native", {"float32": run([2.3, 2.2]),
                                                     "float16": run([2.3, float("nan")])})
    assert any("not finite" in m for m in f)
    _, f = report.summarise_trajectory("x/native", {"float32": run([2.3, 2.2]),
                                                     "bfloat16": run([2.5, 2.2])})
    assert any("first loss" in m for m in f)
    _, f = report.summarise_trajectory("x/native", {"float32": run([2.3, 2.2]),
                                                     "float16": {"unsupported": "no kernel"}})
    assert f == []


def test_mxnet_casts_float32_to_bfloat16_toward_zero():
    """A porting fact the precision report shows (MXNet's from-scratch layer, which casts its
    float32 output to bfloat16, has twice the others' error): MXNet 1.9's Cast truncates, where
    NumPy/ml_dtypes, PyTorch and JAX round to nearest."""
    load_backend("mxnet")
    import mxnet as mx

    from backends.mxnet.precision import BF16, numpy as to_numpy

    v = np.array([1 + 0.75 * 2**-7, -(1 + 0.75 * 2**-7)], np.float32)
    assert to_numpy(mx.nd.array(v).astype(BF16)).astype(np.float32).tolist() == [1.0, -1.0]
    assert dtypes.cast(v, "bfloat16").astype(np.float32).tolist() == [1 + 2**-7, -(1 + 2**-7)]
