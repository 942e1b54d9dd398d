"""MXNet-specific checks: the MXNet source's momentum convention (the inverse of the PyTorch
source), one from-scratch batch norm imperative and hybridized (in both modes), the native Gluon
layer's conventions as facts of this CPU build, parameters through save/load, LeNet-BN across
impls, a real training run, device errors and a printed (not asserted) throughput comparison.
Expected values come from common.reference (float64 NumPy) or closed forms, never from the code
under test."""
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from backends import DeviceUnavailable, UnsupportedSetting
from common import data as cdata
from common import lenet as clenet
from common import reference as ref
from common import spec
from conftest import REPO, TEXTBOOK_CASES, assert_matches_textbook, load_backend

mxb = load_backend("mxnet")  # fails, or skips with the reason if allowed (conftest)

import mxnet as mx  # noqa: E402
from mxnet import autograd, gluon  # noqa: E402

from backends.mxnet import bn as mbn  # noqa: E402

SHAPES = [(16, 5), (6, 4, 5, 3)]
F64_TOL = 1e-10
DECAY_EXACT_IN_F32 = 0.875  # native MXNet applies momentum as float32; 0.875 is exact there


def _nd(a, dtype=np.float64):
    return mx.nd.array(np.asarray(a), dtype=dtype)


def _close(got, want, dtype=np.float64):
    got = got.asnumpy() if isinstance(got, mx.nd.NDArray) else np.asarray(got)
    assert ref.within_tolerance(got, want, dtype), ref.error(got, want)


def _batch_stats(x):
    axes = ref.reduce_axes(x.ndim)
    return x.mean(axis=axes), x.var(axis=axes)


def _scratch_layer(case, dtype=np.float64, **kw):
    x = case["x"]
    layer = mbn.BatchNorm(x.shape[1], x.ndim, **kw)
    layer.initialize()
    layer.cast(dtype)
    for k in ("gamma", "beta", "running_mean", "running_var"):
        getattr(layer, k).set_data(_nd(case[k], dtype))
    return layer


def _step(layer, case, training, dtype=np.float64):
    """One recorded step: (y, dx, running_mean, running_var) as NumPy."""
    x = _nd(case["x"], dtype)
    x.attach_grad()
    with autograd.record(train_mode=training):
        y = layer(x)
    y.backward(_nd(case["dy"], dtype), train_mode=training)
    return (y.asnumpy(), x.grad.asnumpy(), layer.running_mean.data().asnumpy(),
            layer.running_var.data().asnumpy())


# --- the MXNet source's convention ---------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_source_momentum_is_the_torch_source_with_one_minus_momentum(shape, momentum):
    case = ref.random_case(shape, seed=3, mean=1.5, scale=2.0)
    y, mm, mv = mbn.batch_norm(*(_nd(case[k]) for k in ("x", "gamma", "beta", "running_mean",
                                                        "running_var")),
                               1e-5, momentum, training=True)
    want = ref.bn_step(**case, training=True, eps=1e-5, decay=1 - momentum)
    _close(y, want["y"])
    _close(mm, want["running_mean"])
    _close(mv, want["running_var"])
    # The PyTorch source written out: moving = m_t * moving + (1 - m_t) * batch, m_t = 1 - m.
    m_t = 1 - momentum
    mean, var = _batch_stats(case["x"])
    _close(mm, m_t * case["running_mean"] + (1 - m_t) * mean)
    _close(mv, m_t * case["running_var"] + (1 - m_t) * var)
    assert spec.translate_momentum(momentum, "mxnet-source", "torch-source") == pytest.approx(m_t)
    assert spec.momentum_from_decay(1 - momentum, "mxnet-source") == pytest.approx(momentum)
    if momentum != 0.5:  # reading momentum as the canonical decay gives other statistics
        misread = ref.bn_step(**case, training=True, eps=1e-5, decay=momentum)
        assert np.max(np.abs(mm.asnumpy() - misread["running_mean"])) > 1e-3


def _recorded(fn, case, training, params_shape):
    """fn(x, gamma, beta, moving_mean, moving_var) on float64 NDArrays (params reshaped to
    `params_shape`) under autograd.record(train_mode=training), backward with case["dy"]:
    {y, dx, dgamma, dbeta, running_mean, running_var} as NumPy, the last four as (C,)."""
    x, g, b, mm, mv = (_nd(case[k]) for k in ("x", "gamma", "beta", "running_mean", "running_var"))
    g, b, mm, mv = (a.reshape(params_shape) for a in (g, b, mm, mv))
    for a in (x, g, b):
        a.attach_grad()
    with autograd.record(train_mode=training):
        y, mm, mv = fn(x, g, b, mm, mv)
    y.backward(_nd(case["dy"]), train_mode=training)
    out = dict(y=y, dx=x.grad, dgamma=g.grad, dbeta=b.grad, running_mean=mm, running_var=mv)
    return {k: v.asnumpy() if k in ("y", "dx") else v.asnumpy().reshape(-1)
            for k, v in out.items()}


@pytest.mark.parametrize("training", [True, False], ids=["train", "inference"])
@pytest.mark.parametrize("shape, mean", TEXTBOOK_CASES.values(), ids=TEXTBOOK_CASES.keys())
def test_every_scratch_impl_equals_the_textbook_formulation(shape, mean, training):
    """The tuned `batch_norm` (imperative) and the hybridized scratch layer that make_layer
    builds compute what `textbook_batch_norm` computes: y, dx, dgamma, dbeta and the moving
    statistics, with the mode from autograd.is_training() in both."""
    case = ref.random_case(shape, seed=13, mean=mean)
    momentum = 0.3  # the source's meaning: weight on the NEW batch statistic
    decay = spec.decay_from_momentum(momentum, "mxnet-source")  # 0.7 kept on the old value
    source_shape = (1, -1) + (1,) * (len(shape) - 2)
    want = _recorded(lambda *a: mbn.textbook_batch_norm(*a, 1e-5, momentum), case, training,
                     source_shape)
    moved = np.max(np.abs(want["running_mean"] - case["running_mean"]))
    assert moved > 1e-3 if training else moved == 0
    runs = {"batch_norm()": _recorded(lambda *a: mbn.batch_norm(*a, 1e-5, momentum), case,
                                      training, (-1,)),
            "scratch": mxb.bn_step(**case, training=training, decay=decay),
            "reference": ref.bn_step(**case, training=training, decay=decay)}  # the textbook too
    assert_matches_textbook(runs, want, mean)


def _ema_closed_form(r0, stats, decay):
    """r_k = d^k r0 + (1 - d) * sum_j d^(k-1-j) b_j."""
    k = len(stats)
    return decay**k * r0 + (1 - decay) * sum(decay ** (k - 1 - j) * b for j, b in enumerate(stats))


def test_literal_0_9_in_both_sources_differs_as_the_closed_form_predicts():
    """Both seeds write momentum=0.9: the PyTorch source keeps 90% of the old value (decay 0.9),
    the MXNet source 10% (decay 0.1)."""
    k = 5
    cases = [ref.random_case((8, 3, 4, 4), seed=s, mean=s, scale=1 + s) for s in range(k)]
    r0m, r0v = cases[0]["running_mean"], cases[0]["running_var"]
    mx_m, mx_v, torch_m, torch_v = _nd(r0m), _nd(r0v), r0m, r0v
    for c in cases:
        _, mx_m, mx_v = mbn.batch_norm(_nd(c["x"]), _nd(c["gamma"]), _nd(c["beta"]), mx_m, mx_v,
                                       1e-5, 0.9, training=True)
        step = ref.bn_step(**dict(c, running_mean=torch_m, running_var=torch_v), training=True,
                           decay=0.9)  # the PyTorch source's 0.9 is the canonical decay
        torch_m, torch_v = step["running_mean"], step["running_var"]
    means, variances = zip(*(_batch_stats(c["x"]) for c in cases))
    for got_mx, got_torch, r0, stats in ((mx_m, torch_m, r0m, means),
                                         (mx_v, torch_v, r0v, variances)):
        mx_form, torch_form = _ema_closed_form(r0, stats, 0.1), _ema_closed_form(r0, stats, 0.9)
        _close(got_mx, mx_form)
        _close(got_torch, torch_form)
        _close(got_mx.asnumpy() - got_torch, mx_form - torch_form)
        assert np.max(np.abs(mx_form - torch_form)) > 0.1
        # the MXNet source's statistics are essentially the last batch's
        assert np.max(np.abs(got_mx.asnumpy() - stats[-1])) < np.max(np.abs(got_torch - stats[-1]))


# --- one from-scratch implementation, imperative and hybridized -------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_scratch_layer_imperative_and_hybridized_in_both_modes(shape, dtype):
    """The hybridized layer keeps one graph per mode: training, then inference, then training
    again each match the reference (a single cached graph would reuse the first mode's)."""
    case = ref.random_case(shape, seed=7, dtype=dtype, mean=-2.0, scale=3.0)
    decay, eps = 0.8, 1e-3
    momentum = spec.momentum_from_decay(decay, "mxnet-source")
    for hybridize in (False, True):
        layer = _scratch_layer(case, dtype, eps=eps, momentum=momentum)
        if hybridize:
            layer.hybridize()
        state = dict(case)
        for training in (True, False, True):
            want = ref.bn_step(**state, training=training, eps=eps, decay=decay)
            y, dx, rm, rv = _step(layer, state, training, dtype)
            for k, got in (("y", y), ("dx", dx), ("running_mean", rm), ("running_var", rv)):
                assert ref.within_tolerance(got, want[k], dtype), (hybridize, training, k)
            _close(layer.gamma.grad(), want["dgamma"], dtype)
            _close(layer.beta.grad(), want["dbeta"], dtype)
            state = dict(state, running_mean=want["running_mean"].astype(dtype),
                         running_var=want["running_var"].astype(dtype))


def test_scratch_unbiased_option_and_initial_running_var():
    case = ref.random_case((5, 2, 3, 2), seed=2)
    layer = _scratch_layer(case, momentum=0.3, unbiased=True)
    layer.hybridize()
    _, _, _, rv = _step(layer, case, True)
    _close(rv, ref.bn_step(**case, training=True, decay=0.7, unbiased=True)["running_var"])
    for kw, want in (({}, 0.0), ({"initial_running_var": 1.0}, 1.0)):
        fresh = mbn.BatchNorm(3, 4, **kw)
        fresh.initialize()
        assert np.all(fresh.running_var.data().asnumpy() == want)
        assert fresh.running_mean.grad_req == fresh.running_var.grad_req == "null"
    assert mbn.BatchNorm(3, 4).momentum == 0.9  # the source's literal


def test_save_load_round_trip_keeps_running_statistics(tmp_path):
    case = ref.random_case((6, 3, 4, 4), seed=5, dtype=np.float32)
    layer = _scratch_layer(case, np.float32, momentum=0.4)
    layer.hybridize()
    _step(layer, case, True, np.float32)
    path = str(tmp_path / "bn.params")
    layer.save_parameters(path)
    saved = sorted(mx.nd.load(path))
    assert [k for k in saved if k.endswith("running_mean") or k.endswith("running_var")], saved
    fresh = mbn.BatchNorm(3, 4, initial_running_var=1.0)
    fresh.load_parameters(path)
    for k in ("gamma", "beta", "running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(fresh, k).data().asnumpy(),
                                      getattr(layer, k).data().asnumpy())
    assert np.max(np.abs(fresh.running_var.data().asnumpy() - 1.0)) > 1e-3  # really loaded
    x = _nd(case["x"], np.float32)
    np.testing.assert_array_equal(fresh(x).asnumpy(), layer(x).asnumpy())  # inference


# --- the native Gluon layer: conventions of this build, tested as facts -----------------------

@pytest.mark.parametrize("shape", [(6, 4), (4, 3, 5, 5)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_native_updates_in_backward_with_old_weight_and_biased_variance(shape, dtype):
    case = ref.random_case(shape, seed=9, dtype=dtype, mean=1.0, scale=2.0)
    layer = gluon.nn.BatchNorm(in_channels=shape[1], momentum=0.9)
    layer.initialize()
    layer.cast(dtype)
    for k in ("gamma", "beta", "running_mean", "running_var"):
        getattr(layer, k).set_data(_nd(case[k], dtype))
    x = _nd(case["x"], dtype)
    with autograd.train_mode():
        layer(x).wait_to_read()
    with autograd.record():
        y = layer(x)
        y.wait_to_read()
    unchanged = (layer.running_mean.data().asnumpy(), layer.running_var.data().asnumpy())
    np.testing.assert_array_equal(unchanged[0], case["running_mean"])
    np.testing.assert_array_equal(unchanged[1], case["running_var"])
    y.backward(_nd(case["dy"], dtype))
    mean, var = _batch_stats(case["x"].astype(np.float64))
    m = x.size // shape[1]
    m32 = float(np.float32(0.9))  # momentum is a float32 operator parameter
    got_m, got_v = layer.running_mean.data().asnumpy(), layer.running_var.data().asnumpy()
    _close(got_m, m32 * case["running_mean"] + (1 - m32) * mean, dtype)
    _close(got_v, m32 * case["running_var"] + (1 - m32) * var, dtype)
    unbiased = m32 * case["running_var"] + (1 - m32) * var * m / (m - 1)
    assert np.max(np.abs(got_v - unbiased)) > 1e-3
    if dtype == np.float64:  # the float32 momentum shows at float64 precision
        exact_09 = 0.9 * case["running_mean"] + 0.1 * mean
        assert np.max(np.abs(got_m - exact_09)) > 1e-9


def test_operator_level_batchnorm_fixes_gamma_with_eps_1e_3():
    x = np.array([[1.0], [-2.0], [0.5]])
    one = mx.nd.ones((1,), dtype="float64")
    y = mx.nd.BatchNorm(_nd(x), 3 * one, 0 * one, 0 * one, one).asnumpy()  # inference, defaults
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-3), rtol=1e-8)  # gamma=3 ignored
    assert mbn.operator_defaults() == {"fix_gamma": True, "eps": 1e-3}
    native = mxb.conventions()["native"]
    assert (native["default_eps"], native["default_momentum"]) == (1e-5, 0.9)  # Gluon's own
    assert native["momentum_dtype"] == "float32"


def test_native_bn_step_refusals_and_what_it_can_express():
    case = ref.random_case((6, 3, 2, 2), seed=11)
    with pytest.raises(UnsupportedSetting, match="biased"):
        mxb.bn_step(**case, training=True, unbiased=True, impl="native")
    # float64 with a decay not exact in float32: the operator applies float32(momentum).
    got = mxb.bn_step(**case, training=True, decay=0.9, impl="native")
    assert np.abs(got["running_mean"] - ref.bn_step(**case, training=True, decay=0.9)["running_mean"]).max() > 1e-10
    _close(got["running_mean"], ref.bn_step(**case, training=True, decay=float(np.float32(0.9)))["running_mean"])
    for kw in (dict(training=True, decay=DECAY_EXACT_IN_F32), dict(training=False, decay=0.9)):
        got = mxb.bn_step(**case, impl="native", **kw)
        want = ref.bn_step(**case, **kw)
        for k in ref.RESULT_KEYS:
            _close(got[k], want[k])
    case32 = {k: v.astype(np.float32) for k, v in case.items()}
    got = mxb.bn_step(**case32, training=True, decay=0.9, impl="native")
    want = ref.bn_step(**case32, training=True, decay=0.9)
    for k in ref.RESULT_KEYS:
        _close(got[k], want[k], np.float32)


# --- LeNet-BN ------------------------------------------------------------------------------

def _sample(sample_dir, n, dtype=np.float64, split="train"):
    images, labels = cdata.load(split, sample_dir, limit=n)
    return cdata.to_nchw_float(images, dtype), labels


def _batches(x, y, batch_size=32):
    return [(x[i], y[i]) for i in cdata.batch_indices(len(x), batch_size, seed=0)]


def test_lenet_scratch_and_native_agree_over_sgd_steps(sample_dir):
    x, y = _sample(sample_dir, 96)
    batches = _batches(x, y)
    params = clenet.init_params(0)
    runs = {impl: mxb.lenet_train(params, batches, lr=0.5, impl=impl, decay=DECAY_EXACT_IN_F32,
                                  dtype="float64") for impl in mxb.IMPLS}
    np.testing.assert_allclose(runs["scratch"]["losses"], runs["native"]["losses"], rtol=0,
                               atol=1e-10)
    diffs = clenet.max_abs_diff(runs["scratch"]["params"], runs["native"]["params"])
    assert max(diffs.values()) <= 1e-9, diffs
    moved = clenet.max_abs_diff(runs["native"]["params"], params)
    assert moved["fc3.weight"] > 1e-3 and moved["bn1.running_var"] > 1e-3
    # decay 0.9: the same losses and weights; running statistics apart by the float32 momentum
    runs = {impl: mxb.lenet_train(params, batches, lr=0.5, impl=impl, decay=0.9, dtype="float64")
            for impl in mxb.IMPLS}
    np.testing.assert_allclose(runs["scratch"]["losses"], runs["native"]["losses"], atol=1e-10)
    diffs = clenet.max_abs_diff(runs["scratch"]["params"], runs["native"]["params"])
    running = {k: v for k, v in diffs.items() if clenet.is_running_stat(k)}
    assert max(v for k, v in diffs.items() if k not in running) <= 1e-9
    assert 1e-10 < max(running.values()) < 1e-6
    # float32 follows float64 closely
    f32 = mxb.lenet_train(params, batches[:1], lr=0.5, impl="scratch", dtype="float32")
    np.testing.assert_allclose(f32["losses"], runs["scratch"]["losses"][:1], rtol=1e-5)


def test_lenet_scratch_updates_running_statistics_in_the_hybridized_forward(sample_dir):
    from backends.mxnet import lenet as mlenet

    x, _ = _sample(sample_dir, 16, np.float32)
    for impl, changes in (("scratch", True), ("native", False)):
        net = mlenet.build(impl)
        mlenet.load_params(net, clenet.init_params(0), "float32", mx.cpu())
        net.hybridize()
        before = mlenet.to_canonical(net)
        with autograd.record():
            net(_nd(x, np.float32)).wait_to_read()
        after = mlenet.to_canonical(net)
        moved = max(np.max(np.abs(after[k] - before[k]))
                    for k in after if clenet.is_running_stat(k))
        assert (moved > 1e-3) == changes, (impl, moved)
        logits = net(_nd(x, np.float32)).asnumpy()  # inference graph: running statistics
        want = clenet.reference_logits(after, x.astype(np.float64))
        np.testing.assert_allclose(logits, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("impl", ["scratch", "native"])
def test_fit_steps_give_lenet_train_losses(sample_dir, impl):
    """fit's hybridized gluon.Trainer path and lenet_train agree (float64, lr exact in float32)."""
    x, y = _sample(sample_dir, 96)
    tx, ty = _sample(sample_dir, 32, split="test")
    ds = cdata.Dataset(x, y, tx, ty)
    params = clenet.init_params(0)
    out = mxb.fit(ds, impl=impl, epochs=1, batch_size=32, lr=0.5, dtype="float64",
                  decay=DECAY_EXACT_IN_F32, params=params, device="cpu")
    plain = mxb.lenet_train(params, _batches(x, y), lr=0.5, impl=impl, decay=DECAY_EXACT_IN_F32)
    want = sum(loss * len(b[1]) for loss, b in zip(plain["losses"], _batches(x, y))) / len(x)
    assert out["history"][0]["loss"] == pytest.approx(want, abs=1e-10)
    assert out["device"] == "cpu"


@pytest.mark.parametrize("impl", ["scratch", "native"])
def test_short_training_run_learns(sample_dir, impl):
    x, y = _sample(sample_dir, 2000, np.float32)
    tx, ty = _sample(sample_dir, 2000, np.float32, split="test")
    out = mxb.fit(cdata.Dataset(x, y, tx, ty), impl=impl, epochs=3, batch_size=64, lr=0.5)
    assert len(out["history"]) == 3 and out["examples_per_s"] > 0
    assert out["history"][-1]["loss"] < out["history"][0]["loss"]
    assert out["test_acc"] > 0.5, out["history"]


# --- devices, imports, speed ---------------------------------------------------------------

def test_gpu_request_on_a_cpu_build_names_the_cuda_builds():
    if mx.runtime.Features().is_enabled("CUDA"):
        pytest.skip("this MXNet build has CUDA")
    ds = cdata.Dataset(*(np.zeros((2, 1, 28, 28), np.float32), np.zeros(2, np.int64)) * 2)
    for call in (lambda: mxb.fit(ds, impl="scratch", epochs=1, device="gpu"),
                 lambda: mxb.speed(impl="native", device="gpu")):
        with pytest.raises(DeviceUnavailable, match=r"mxnet-cu1\d\d"):
            call()
    assert mxb.fit(ds, impl="scratch", epochs=1, device="auto")["device"] == "cpu"


def test_missing_mxnet_is_reported_unavailable_and_the_numpy_shim_lives_in_one_place():
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        sys.modules["mxnet"] = None  # as on a machine without MXNet: import raises ImportError
        import backends
        try:
            backends.load("mxnet")
        except backends.BackendUnavailable as e:
            print("UNAVAILABLE", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "UNAVAILABLE" in out.stdout and "pip install mxnet" in out.stdout, out.stderr
    shim = re.compile(r"\b(np|numpy)\.bool\s*=[^=]")
    home = pathlib.Path(REPO, "backends", "mxnet", "__init__.py")
    places = [p for p in pathlib.Path(REPO).rglob("*.py") if shim.search(p.read_text())]
    assert places == [home]


def test_training_throughput_scratch_vs_native_is_reported():
    """Printed, not asserted (shared CPUs make timings noisy); issue 4 targets scratch step time
    within 1.25x of native. Interleaved runs, best of each."""
    best = {impl: 0.0 for impl in mxb.IMPLS}
    for _ in range(2):
        for impl in mxb.IMPLS:
            r = mxb.speed(impl=impl, device="cpu", steps=15, repeats=3)
            assert r["device"] == "cpu" and r["compile_s"] > 0 and len(r["runs"]) == 3
            best[impl] = max(best[impl], max(r["runs"]))
    ratio = best["native"] / best["scratch"]
    print(f"\nmxnet CPU batch 256 training: scratch {best['scratch']:.0f} examples/s, native "
          f"{best['native']:.0f} examples/s; scratch step time = {ratio:.2f}x native")
    assert all(v > 0 for v in best.values())
