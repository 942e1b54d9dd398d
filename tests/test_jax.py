"""What is specific to the JAX/Flax backend: channels-last statistics, Flax's `batch_stats`
collection, the fast-variance formula of flax.linen.BatchNorm, the NHWC↔C×H×W flatten
conversion of LeNet-BN, float64 only where asked, and the jitted training paths.

Expectations come from the float64 NumPy reference (common.reference), closed forms, or an
independent NumPy LeNet-BN written here in PyTorch's NCHW layout."""
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

from conftest import REPO, TEXTBOOK_CASES, assert_matches_textbook, load_backend  # noqa: E402

jb = load_backend("jax")  # fails, or skips with the reason if allowed (conftest)
import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import backends  # noqa: E402
from backends.jax import bn as jbn  # noqa: E402
from backends.jax import device as jdevice  # noqa: E402
from backends.jax import lenet as jlenet  # noqa: E402
from common import convert, data, lenet  # noqa: E402
from common.reference import bn_step as reference_step, random_case  # noqa: E402
from common.spec import decay_from_momentum  # noqa: E402


def x64_on() -> bool:
    return jnp.asarray(np.float64(1.0)).dtype == np.float64


def nhwc_to_nchw(a):
    return np.moveaxis(np.asarray(a), -1, 1) if np.ndim(a) == 4 else np.asarray(a)


# --- float64 only where asked ------------------------------------------------------------------

def test_importing_the_backend_does_not_enable_x64():
    code = textwrap.dedent("""
        import numpy as np
        import backends.jax
        import jax.numpy as jnp
        print(jnp.asarray(np.float64(1.0)).dtype)
    """)
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "float32", "importing backends.jax enabled jax_enable_x64"


def test_float64_call_restores_x64_state():
    before = x64_on()
    case = dict(x=np.random.default_rng(0).normal(size=(6, 3)), gamma=np.ones(3), beta=np.zeros(3),
                running_mean=np.zeros(3), running_var=np.ones(3), dy=np.ones((6, 3)))
    out = jb.bn_step(**case, training=True)
    assert out["y"].dtype == np.float64
    assert x64_on() == before


# --- from-scratch batch_norm: per-channel statistics, channel axis last -------------------------

def d2l_published_batch_norm(X, gamma, beta, moving_mean, moving_var, eps, momentum, training):
    """The bug seen in published JAX code: NCHW axes (0, 2, 3) applied to an NHWC tensor."""
    if not training:
        return jbn.batch_norm(X, gamma, beta, moving_mean, moving_var, eps, momentum, False)
    mean = X.mean(axis=(0, 2, 3), keepdims=True)
    var = ((X - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
    X_hat = (X - mean) / jnp.sqrt(var + eps)
    return (gamma * X_hat + beta, momentum * moving_mean + (1 - momentum) * mean.ravel(),
            momentum * moving_var + (1 - momentum) * var.ravel())


def per_channel_error(fn):
    """Max error of `fn` against the reference on NHWC input with H = W = C (so wrong reduction
    axes still broadcast) and very different per-channel offsets and scales."""
    rng = np.random.default_rng(0)
    n, h, w, c = 4, 5, 5, 5
    x = rng.normal(size=(n, h, w, c)) * (1 + np.arange(c)) + 10.0 * np.arange(c)
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.normal(0, 0.5, c)
    rm, rv, eps, momentum = np.zeros(c), np.ones(c), 1e-5, 0.9
    ref = reference_step(nhwc_to_nchw(x), gamma, beta, rm, rv, np.zeros((n, c, h, w)),
                         training=True, eps=eps, decay=momentum)
    with jbn.x64_mode(np.float64):
        y, mm, mv = fn(jnp.asarray(x), gamma, beta, rm, rv, eps, momentum, True)
        y, mm, mv = np.asarray(y), np.asarray(mm), np.asarray(mv)
    # closed form: each channel of y has mean beta and biased variance gamma² var / (var + eps)
    ch_var = x.var(axis=(0, 1, 2))
    closed = max(np.abs(y.mean(axis=(0, 1, 2)) - beta).max(),
                 np.abs(y.var(axis=(0, 1, 2)) - gamma**2 * ch_var / (ch_var + eps)).max(),
                 np.abs(mm - (1 - momentum) * x.mean(axis=(0, 1, 2))).max())
    return max(np.abs(nhwc_to_nchw(y) - ref["y"]).max(), np.abs(mm - ref["running_mean"]).max(),
               np.abs(mv - ref["running_var"]).max(), closed)


def test_batch_norm_statistics_are_per_channel_in_nhwc():
    assert per_channel_error(jbn.batch_norm) <= 1e-10


def test_the_per_channel_check_catches_nchw_axes_on_nhwc():
    assert per_channel_error(d2l_published_batch_norm) > 1.0


def _vjp(fn, case, params_shape):
    """fn(x, gamma, beta, moving_mean, moving_var) -> (y, moving_mean, moving_var) on the
    channels-last float64 form of an NCHW case (params reshaped to `params_shape`), with
    jax.vjp at case["dy"]: {y, dx (NCHW), dgamma, dbeta, running_mean, running_var (C,)}."""
    with jbn.x64_mode(np.float64):
        x, dy = (jnp.asarray(jlenet.nchw_to_nhwc(case[k])) for k in ("x", "dy"))
        g, b, rm, rv = (jnp.asarray(case[k]).reshape(params_shape)
                        for k in ("gamma", "beta", "running_mean", "running_var"))

        def forward(x, g, b):
            y, mm, mv = fn(x, g, b, rm, rv)
            return y, (mm, mv)

        y, vjp, (mm, mv) = jax.vjp(forward, x, g, b, has_aux=True)
        dx, dg, db = vjp(dy)
        out = dict(y=nhwc_to_nchw(y), dx=nhwc_to_nchw(dx), dgamma=dg.reshape(-1),
                   dbeta=db.reshape(-1), running_mean=mm.reshape(-1), running_var=mv.reshape(-1))
        return {k: np.asarray(v, np.float64) for k, v in out.items()}


@pytest.mark.parametrize("training", [True, False], ids=["train", "inference"])
@pytest.mark.parametrize("shape, mean", TEXTBOOK_CASES.values(), ids=TEXTBOOK_CASES.keys())
def test_every_scratch_impl_equals_the_textbook_formulation(shape, mean, training):
    """`batch_norm` and the Flax `BatchNorm` module that make_layer builds (through bn_step)
    compute what `textbook_batch_norm` computes: y, dx, dgamma, dbeta (vjp) and the moving
    statistics, channels-last, in training and in prediction (`deterministic`)."""
    case = random_case(shape, seed=13, mean=mean)
    momentum = 0.7  # the source's meaning: weight on the old value (canonical decay)
    source_shape = (1,) * (len(shape) - 1) + (-1,)  # (1, C) or (1, 1, 1, C)
    want = _vjp(lambda *a: jbn.textbook_batch_norm(a[0], not training, *a[1:], 1e-5, momentum),
                case, source_shape)
    moved = np.max(np.abs(want["running_mean"] - case["running_mean"]))
    assert moved > 1e-3 if training else moved == 0
    runs = {"batch_norm()": _vjp(lambda *a: jbn.batch_norm(*a, 1e-5, momentum, training), case,
                                 (-1,)),
            "scratch": jb.bn_step(**case, training=training, decay=momentum, impl="scratch"),
            "reference": reference_step(**case, training=training, decay=momentum)}
    assert_matches_textbook(runs, want, mean)


# --- Flax modules: the batch_stats collection ---------------------------------------------------

@pytest.mark.parametrize("impl", jb.IMPLS)
def test_batch_stats_unchanged_in_inference_updated_in_training(impl):
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, size=(8, 4, 4, 3))
    g, b = rng.uniform(0.5, 1.5, 3), rng.normal(0, 0.5, 3)
    rm, rv = rng.normal(0, 0.5, 3), rng.uniform(0.5, 2, 3)
    layer = jbn.own_layer(impl)  # the impl's own default momentum
    decay = decay_from_momentum(layer.momentum, jbn.CONVENTION[impl])
    dy = np.zeros((8, 3, 4, 4))
    with jbn.x64_mode(np.float64):
        fresh = layer.init(jax.random.PRNGKey(0), jnp.asarray(x), use_running_average=False)
        init_stats = jbn.stats_of(impl, fresh["batch_stats"])
        np.testing.assert_array_equal(init_stats["running_mean"], 0.0)  # init does not update
        np.testing.assert_array_equal(init_stats["running_var"], 1.0)
        v = jax.tree_util.tree_map(jnp.asarray, jbn.to_variables(impl, g, b, rm, rv))
        y_inf, s_inf = layer.apply(v, jnp.asarray(x), use_running_average=True,
                                   mutable=["batch_stats"])
        y_tr, s_tr = layer.apply(v, jnp.asarray(x), use_running_average=False,
                                 mutable=["batch_stats"])
        with pytest.raises(flax.errors.ModifyScopeVariableError):
            layer.apply(v, jnp.asarray(x), use_running_average=False)  # batch_stats immutable
        s_inf = jbn.stats_of(impl, s_inf["batch_stats"])
        s_tr = jbn.stats_of(impl, s_tr["batch_stats"])
    np.testing.assert_array_equal(s_inf["running_mean"], rm)
    np.testing.assert_array_equal(s_inf["running_var"], rv)
    ref_inf = reference_step(nhwc_to_nchw(x), g, b, rm, rv, dy, training=False)
    ref_tr = reference_step(nhwc_to_nchw(x), g, b, rm, rv, dy, training=True, decay=decay)
    assert np.abs(nhwc_to_nchw(y_inf) - ref_inf["y"]).max() <= 1e-10
    assert np.abs(nhwc_to_nchw(y_tr) - ref_tr["y"]).max() <= 1e-10
    for k in ("running_mean", "running_var"):
        assert np.abs(np.asarray(s_tr[k]) - ref_tr[k]).max() <= 1e-10
        before = np.asarray(v["batch_stats"][jbn.VARIABLE_NAMES[impl][k]])
        assert np.abs(np.asarray(s_tr[k]) - before).max() > 1e-3


def test_native_refuses_unbiased_running_variance():
    case = dict(x=np.ones((4, 2)) * np.arange(4)[:, None], gamma=np.ones(2), beta=np.zeros(2),
                running_mean=np.zeros(2), running_var=np.ones(2), dy=np.ones((4, 2)))
    with pytest.raises(backends.UnsupportedSetting, match="biased"):
        jb.bn_step(**case, training=True, unbiased=True, impl="native")


# --- flax.linen.BatchNorm's fast variance -------------------------------------------------------

def native_running_var_error(x_nhwc, fast_variance):
    """Max |running_var − reference| after one step with decay 0 (running_var = batch var)."""
    c = x_nhwc.shape[-1]
    dt = x_nhwc.dtype
    ones, zeros = np.ones(c, dt), np.zeros(c, dt)
    ref = reference_step(nhwc_to_nchw(x_nhwc), ones, zeros, zeros, ones,
                         np.zeros(nhwc_to_nchw(x_nhwc).shape), training=True, decay=0.0)
    layer = jbn.make_layer("native", c, 4, decay=0.0, fast_variance=fast_variance)
    with jbn.x64_mode(dt):
        v = jbn.to_variables("native", ones, zeros, zeros, ones)
        v = jax.tree_util.tree_map(jnp.asarray, v)
        _, updated = layer.apply(v, jnp.asarray(x_nhwc), use_running_average=False,
                                 mutable=["batch_stats"])
        var = np.asarray(updated["batch_stats"]["var"], np.float64)
    return float(np.abs(var - ref["running_var"]).max())


@pytest.mark.skipif(not jbn.has_fast_variance_option(), reason="this Flax has no use_fast_variance")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_variance_loses_precision_for_large_mean_inputs(dtype):
    """E[x²] − E[x]² on mean 1e4, std 1 data cancels two numbers near 1e8: the error is of order
    machine-eps · mean² (float32: ~12, larger than the variance itself, so it may clip to 0;
    float64: ~2e-8, above the contract's 1e-10). The two-pass E[(x − E[x])²] of the reference has
    no such cancellation."""
    mean = 1e4
    x = np.random.default_rng(0).normal(mean, 1.0, size=(64, 8, 8, 4)).astype(dtype)
    scale = np.finfo(dtype).eps * mean**2
    fast = native_running_var_error(x, True)
    two_pass = native_running_var_error(x, False)
    print(f"{np.dtype(dtype).name}: |var error| fast {fast:.3g}, two-pass {two_pass:.3g}, "
          f"eps·mean² {scale:.3g}")
    assert 0.1 * scale <= fast <= 100 * scale
    assert jbn.native_defaults()["use_fast_variance"] is True  # Flax's default is the fast one
    if dtype == np.float64:
        assert fast > 1e-10 and two_pass <= 1e-12
    else:
        assert fast > 0.5 and two_pass <= 1e-3  # float32 two-pass: rounding of x - mean only


# --- LeNet-BN: layout conversion, agreement, training -------------------------------------------

def np_conv(x, w, b):
    win = np.lib.stride_tricks.sliding_window_view(x, w.shape[2:], axis=(2, 3))
    return np.einsum("nchwij,ocij->nohw", win, w) + b[None, :, None, None]


def np_bn(x, p, layer, train, eps=1e-5):
    shape = (1, -1, 1, 1) if x.ndim == 4 else (1, -1)
    axes = (0, 2, 3) if x.ndim == 4 else (0,)
    mean, var = ((x.mean(axes), x.var(axes)) if train
                 else (p[f"{layer}.running_mean"], p[f"{layer}.running_var"]))
    xhat = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    return p[f"{layer}.gamma"].reshape(shape) * xhat + p[f"{layer}.beta"].reshape(shape)


def np_lenet(p, x, *, train=False, flatten="chw"):
    """LeNet-BN in float64 NumPy, NCHW, PyTorch parameter layout."""
    sig = lambda a: 1 / (1 + np.exp(-a))
    def pool(a):
        n, c, h, w = a.shape
        return a.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
    h = pool(sig(np_bn(np_conv(x, p["conv1.weight"], p["conv1.bias"]), p, "bn1", train)))
    h = pool(sig(np_bn(np_conv(h, p["conv2.weight"], p["conv2.bias"]), p, "bn2", train)))
    h = h.reshape(len(h), -1) if flatten == "chw" else h.transpose(0, 2, 3, 1).reshape(len(h), -1)
    h = sig(np_bn(h @ p["fc1.weight"].T + p["fc1.bias"], p, "bn3", train))
    h = sig(np_bn(h @ p["fc2.weight"].T + p["fc2.bias"], p, "bn4", train))
    return h @ p["fc3.weight"].T + p["fc3.bias"]


def np_cross_entropy(logits, y):
    z = logits - logits.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))


@pytest.fixture(scope="module")
def sample(sample_dir):
    images, labels = data.load("train", sample_dir, limit=96)
    return data.to_nchw_float(images, np.float64), labels


def nontrivial_params(seed=1):
    params = lenet.init_params(seed)
    rng = np.random.default_rng(seed)
    for layer, c in lenet.BN_LAYERS.items():
        params[f"{layer}.gamma"] = rng.uniform(0.5, 1.5, c)
        params[f"{layer}.beta"] = rng.normal(0, 0.3, c)
        params[f"{layer}.running_mean"] = rng.normal(0, 0.3, c)
        params[f"{layer}.running_var"] = rng.uniform(0.5, 2, c)
    return params


@pytest.mark.parametrize("impl", jb.IMPLS)
def test_canonical_flax_round_trip_is_exact(impl):
    params = nontrivial_params()
    back = convert.from_flax(jlenet.variables_of(params, impl, np.float64))
    assert max(lenet.max_abs_diff(back, params).values()) == 0.0


def test_lenet_eval_converts_the_chw_flatten_order(sample):
    x = sample[0][:16]
    params = nontrivial_params()
    ref = np_lenet(params, x)
    wrong = np_lenet(params, x, flatten="hwc")  # what an unconverted fc1 would compute
    assert np.abs(wrong - ref).max() > 1e-3, "the flatten order must matter for this check"
    for impl in jb.IMPLS:
        got = jb.lenet_eval(params, x, impl=impl)
        assert got.dtype == np.float64 and got.shape == (16, 10)
        assert np.abs(got - ref).max() <= 1e-10, impl


def test_lenet_scratch_and_native_agree_over_three_float64_steps(sample):
    x, y = sample
    batches = [(x[i], y[i]) for i in data.batch_indices(len(x), 32, seed=0)]
    params = lenet.init_params(0)
    runs = {impl: jb.lenet_train(params, batches, lr=0.5, impl=impl) for impl in jb.IMPLS}
    first = np_cross_entropy(np_lenet(params, batches[0][0], train=True), batches[0][1])
    for impl, run in runs.items():
        assert len(run["losses"]) == 3 and all(isinstance(v, float) for v in run["losses"])
        assert abs(run["losses"][0] - first) <= 1e-10, impl  # independent NumPy forward
        assert run["params"]["fc3.weight"].dtype == np.float64
    np.testing.assert_allclose(runs["scratch"]["losses"], runs["native"]["losses"], rtol=0,
                               atol=1e-10)
    diffs = lenet.max_abs_diff(runs["scratch"]["params"], runs["native"]["params"])
    assert max(diffs.values()) <= 1e-9, max(diffs, key=diffs.get)
    moved = lenet.max_abs_diff(runs["native"]["params"], params)
    assert min(moved["fc3.weight"], moved["bn1.running_mean"], moved["bn4.running_var"]) > 1e-4


def dataset(sample_dir, n_train, n_test, dtype=np.float32):
    (xtr, ytr), (xte, yte) = (data.load(s, sample_dir, limit=k)
                              for s, k in (("train", n_train), ("test", n_test)))
    return types.SimpleNamespace(train_x=data.to_nchw_float(xtr, dtype), train_y=ytr,
                                 test_x=data.to_nchw_float(xte, dtype), test_y=yte)


def test_fit_fast_paths_give_the_plain_losses(sample_dir):
    """lax.scan epoch and jitted-step loop vs lenet_train over the same batches, float64; 300
    examples in batches of 64 also exercise the short last batch."""
    ds = dataset(sample_dir, 300, 200, np.float64)
    params = lenet.init_params(0)
    order = data.batch_indices(300, 64, seed=3, epoch=0)
    plain = jb.lenet_train(params, [(ds.train_x[i], ds.train_y[i]) for i in order], lr=0.5,
                           impl="scratch")
    epoch_loss = sum(l * len(i) for l, i in zip(plain["losses"], order)) / 300
    logits = np_lenet(plain["params"], ds.test_x)
    test_acc = float(np.mean(logits.argmax(axis=1) == ds.test_y))
    for scan in (True, False):
        run = jb.fit(ds, impl="scratch", epochs=1, batch_size=64, lr=0.5, seed=3, device="cpu",
                     dtype="float64", params=params, scan=scan)
        assert abs(run["final_loss"] - epoch_loss) <= 1e-10, scan
        assert run["test_acc"] == test_acc, scan


def test_short_training_run_learns(sample_dir):
    ds = dataset(sample_dir, 2048, 1000)
    lines = []
    run = jb.fit(ds, impl="native", epochs=2, batch_size=64, lr=0.5, progress=lines.append)
    assert len(run["history"]) == 2 and len(lines) == 2
    assert set(run["history"][0]) >= {"epoch", "loss", "train_acc", "test_acc", "examples_per_s",
                                      "seconds"}
    assert run["history"][1]["loss"] < run["history"][0]["loss"]
    assert run["test_acc"] > 0.5, run["history"]
    assert run["examples_per_s"] > 0 and run["compile_s"] > 0
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    assert run["device"] == "cpu" if not gpus else run["device"].startswith("cuda:")


def test_gpu_request_without_gpu_raises_device_unavailable():
    if any(d.platform == "gpu" for d in jax.devices()):
        assert jdevice.select_device("gpu")[0].platform == "gpu"
        return
    ds = types.SimpleNamespace(
        train_x=np.zeros((4, 1, 28, 28), np.float32), train_y=np.zeros(4, np.int64),
        test_x=np.zeros((2, 1, 28, 28), np.float32), test_y=np.zeros(2, np.int64))
    with pytest.raises(backends.DeviceUnavailable, match="no GPU"):
        jb.fit(ds, impl="scratch", epochs=1, device="gpu")


def test_speed_reports_timed_runs_after_a_warm_up():
    r = jb.speed(impl="scratch", batch_size=32, steps=3, repeats=3)
    assert len(r["runs"]) == 3 and all(v > 0 for v in r["runs"])
    assert r["examples_per_s"] == sorted(r["runs"])[1]  # the median
    assert r["device"] and r["path"] and r["compile_s"] > 0


def test_bn_step_fast_variance_is_flax_natives_default_only():
    case = random_case((8, 3, 4, 4), seed=3, mean=1e4)
    with pytest.raises(backends.UnsupportedSetting, match="native"):
        jb.bn_step(**case, training=True, impl="scratch", fast_variance=True)
    ref = reference_step(**case, training=True)
    fast = jb.bn_step(**case, training=True, impl="native", fast_variance=True)
    two_pass = jb.bn_step(**case, training=True, impl="native")
    assert np.abs(fast["running_var"] - ref["running_var"]).max() > 1e-10
    assert np.abs(two_pass["running_var"] - ref["running_var"]).max() <= 1e-12
