"""PyTorch-specific checks: the source's momentum convention, its is_grad_enabled mode test,
registered buffers, the closed-form backward, LeNet-BN across impls, and a real training run.
Expected values come from common.reference (float64 NumPy) or closed forms, never from the
code under test."""

import numpy as np
import pytest

from conftest import TEXTBOOK_CASES, assert_matches_textbook, load_backend

tb = load_backend("torch")  # fails, or skips with the reason if allowed (conftest)
import torch  # noqa: E402

from backends import DeviceUnavailable, UnsupportedSetting  # noqa: E402
from common import conventions as cconv  # noqa: E402
from common import data as cdata  # noqa: E402
from common import lenet as clenet  # noqa: E402
from common import reference as ref  # noqa: E402
from common import spec  # noqa: E402

from backends.torch import bn as tbn  # noqa: E402

SHAPES = [(16, 5), (6, 4, 5, 3)]
F64_TOL = 1e-10


def _t(a):
    return torch.tensor(np.asarray(a, dtype=np.float64))


def _close(a, b, tol=F64_TOL):
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    np.testing.assert_allclose(a, b, rtol=0, atol=tol)


def _layer(case, **kw):
    layer = tbn.BatchNorm(case["x"].shape[1], case["x"].ndim, dtype=torch.float64, **kw)
    with torch.no_grad():
        layer.gamma.copy_(_t(case["gamma"]))
        layer.beta.copy_(_t(case["beta"]))
        layer.running_mean.copy_(_t(case["running_mean"]))
        layer.running_var.copy_(_t(case["running_var"]))
    return layer


def _textbook(case, momentum, dy=None):
    """`textbook_batch_norm` on a NumPy case, in the mode the caller's grad mode sets:
    {"y", "running_mean", "running_var"} (C-vectors), plus "dx", "dgamma", "dbeta" for `dy`.
    Under no_grad (the source's prediction mode) reverse-mode autograd records nothing, so the
    derivatives come from the forward-mode Jacobian, which no_grad leaves on."""
    shape = (1, -1) + (1,) * (case["x"].ndim - 2)  # the source's broadcast shape
    x = _t(case["x"])
    g, b, mm, mv = (_t(case[k]).reshape(shape) for k in ("gamma", "beta", "running_mean",
                                                          "running_var"))
    if torch.is_grad_enabled():
        for a in (x, g, b):
            a.requires_grad_(True)
    y, mm, mv = tbn.textbook_batch_norm(x, g, b, mm, mv, 1e-5, momentum)
    out = dict(y=y, running_mean=mm.reshape(-1), running_var=mv.reshape(-1))
    if dy is not None and torch.is_grad_enabled():
        y.backward(_t(dy))
        out.update(dx=x.grad, dgamma=g.grad.reshape(-1), dbeta=b.grad.reshape(-1))
    elif dy is not None:
        jac = torch.func.jacfwd(
            lambda x, g, b: tbn.textbook_batch_norm(x, g, b, mm, mv, 1e-5, momentum)[0],
            argnums=(0, 1, 2))(x.detach(), g.detach(), b.detach())
        dx, dg, db = (torch.tensordot(_t(dy), j, dims=x.dim()) for j in jac)
        out.update(dx=dx, dgamma=dg.reshape(-1), dbeta=db.reshape(-1))
    return {k: v.detach().numpy() for k, v in out.items()}


def _kernel(fn, case, momentum, training):
    """A functional kernel (batch_norm, batch_norm_analytic) with autograd, C-vector params."""
    x, g, b = (_t(case[k]).requires_grad_(True) for k in ("x", "gamma", "beta"))
    y, mm, mv = fn(x, g, b, _t(case["running_mean"]), _t(case["running_var"]), 1e-5, momentum,
                   training)
    y.backward(_t(case["dy"]))
    return {k: v.detach().numpy() for k, v in dict(
        y=y, dx=x.grad, dgamma=g.grad, dbeta=b.grad, running_mean=mm, running_var=mv).items()}


# torch.func's forward-mode AD registers its decompositions with torch.jit.script on first use
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("training", [True, False], ids=["train", "inference"])
@pytest.mark.parametrize("shape, mean", TEXTBOOK_CASES.values(), ids=TEXTBOOK_CASES.keys())
def test_every_scratch_impl_equals_the_textbook_formulation(shape, mean, training):
    """The speed-tuned kernels (autograd and closed-form, as functions and as the layers
    make_layer builds) compute what the textbook function computes: y, dx, dgamma, dbeta and the
    moving statistics, in training and in prediction."""
    case = ref.random_case(shape, seed=13, mean=mean)
    momentum = 0.7  # the source's meaning: weight on the old value (canonical decay)
    with torch.set_grad_enabled(training):
        want = _textbook(case, momentum, case["dy"])
    moved = np.max(np.abs(want["running_mean"] - case["running_mean"]))
    assert moved > 1e-3 if training else moved == 0
    runs = {impl: tb.bn_step(**case, training=training, decay=momentum, impl=impl)
            for impl in ("scratch", "scratch-analytic")}
    runs["reference"] = ref.bn_step(**case, training=training, decay=momentum)  # the textbook too
    runs.update({f"{fn.__name__}()": _kernel(fn, case, momentum, training)
                 for fn in (tbn.batch_norm, tbn.batch_norm_analytic)})
    assert_matches_textbook(runs, want, mean)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("fn", [tbn.batch_norm, tbn.batch_norm_analytic],
                         ids=["autograd", "analytic"])
def test_source_momentum_is_canonical_decay(shape, momentum, fn):
    case = ref.random_case(shape, seed=3, mean=1.5, scale=2.0)
    want = ref.bn_step(**case, training=True, eps=1e-5, decay=momentum)
    y, mm, mv = fn(_t(case["x"]), _t(case["gamma"]), _t(case["beta"]), _t(case["running_mean"]),
                   _t(case["running_var"]), 1e-5, momentum, True)
    _close(y, want["y"])
    _close(mm, want["running_mean"])
    _close(mv, want["running_var"])
    assert spec.momentum_from_decay(momentum, "torch-source") == momentum
    if momentum != 0.5:  # the other reading of momentum gives different statistics
        flipped = ref.bn_step(**case, training=True, eps=1e-5, decay=1 - momentum)
        assert np.max(np.abs(mm.numpy() - flipped["running_mean"])) > 1e-3


def test_native_refuses_a_biased_running_variance_only_in_training():
    """Every impl vs the reference is in test_contract.py; here: native PyTorch has no biased
    running-variance option, which only matters when statistics are updated."""
    case = ref.random_case((6, 3, 2, 2), seed=11)
    with pytest.raises(UnsupportedSetting, match="unbiased"):
        tb.bn_step(**case, training=True, unbiased=False, impl="native")
    got = tb.bn_step(**case, training=False, unbiased=False, impl="native")
    want = ref.bn_step(**case, training=False)
    np.testing.assert_allclose(got["y"], want["y"], rtol=0, atol=F64_TOL)


def test_bn_step_rejects_bad_input():
    case = ref.random_case((4, 3), seed=0)
    with pytest.raises(ValueError, match="dtype must be one of float64, float32, float16, bfloat16"):
        tb.bn_step(**{k: v.astype(np.int64) for k, v in case.items()}, training=True)
    with pytest.raises(ValueError, match="2-D"):
        tb.bn_step(**{**case, "x": case["x"][:, :, None], "dy": case["dy"][:, :, None]},
                   training=True)


@pytest.mark.parametrize("shape", SHAPES)
def test_analytic_backward_gradcheck(shape):
    case = ref.random_case(shape, seed=5)
    args = [_t(case[k]).requires_grad_(True) for k in ("x", "gamma", "beta")]
    assert torch.autograd.gradcheck(lambda x, g, b: tbn.BatchNormFunction.apply(x, g, b, 1e-3)[0],
                                     args, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("shape", SHAPES)
def test_analytic_and_autograd_gradients_agree_with_reference(shape):
    # a loss downstream of the layer, so dy is not ones and the mean/var paths matter
    case = ref.random_case(shape, seed=7, mean=2.0, scale=0.5)
    w = torch.tensor(np.random.default_rng(1).normal(size=shape))
    grads = {}
    for name, fn in (("autograd", tbn.batch_norm), ("analytic", tbn.batch_norm_analytic)):
        x, g, b = (_t(case[k]).requires_grad_(True) for k in ("x", "gamma", "beta"))
        y, _, _ = fn(x, g, b, _t(case["running_mean"]), _t(case["running_var"]), 1e-5, 0.9, True)
        (torch.tanh(y) * w).sum().backward()
        dy = ((1 - torch.tanh(y) ** 2) * w).detach().numpy()
        grads[name] = (x.grad, g.grad, b.grad, dy)
    for name, (dx, dg, db, dy) in grads.items():
        want = ref.bn_step(**{**case, "dy": dy}, training=True, eps=1e-5, decay=0.9)
        _close(dx, want["dx"])
        _close(dg, want["dgamma"])
        _close(db, want["dbeta"])


@pytest.mark.parametrize("analytic", [False, True])
def test_grad_enabled_mode_ignores_eval(analytic):
    """The source decides the mode by torch.is_grad_enabled(): eval() changes nothing while grad
    is on, and no_grad() means inference even in train(). mode="training" and native follow
    module.training instead."""
    case = ref.random_case((8, 3, 4, 4), seed=2, mean=1.0, scale=2.0)
    x = _t(case["x"])
    train_ref = ref.bn_step(**case, training=True, eps=1e-5, decay=0.9)
    infer_ref = ref.bn_step(**case, training=False, eps=1e-5, decay=0.9)

    def run(mode, module_training, grad):
        layer = _layer(case, momentum=0.9, mode=mode, analytic=analytic).train(module_training)
        with torch.set_grad_enabled(grad):
            y = layer(x)
        return y, layer.running_mean, layer.running_var

    def check(result, want):
        for got, k in zip(result, ("y", "running_mean", "running_var")):
            _close(got, want[k])

    check(run("grad_enabled", False, True), train_ref)   # eval() ignored: batch stats, updated
    check(run("grad_enabled", True, False), infer_ref)   # train() ignored under no_grad
    check(run("training", False, True), infer_ref)
    check(run("training", True, False), train_ref)
    with torch.no_grad():  # the textbook function decides the same way
        check(_textbook(case, 0.9).values(), infer_ref)
    check(_textbook(case, 0.9).values(), train_ref)

    native = torch.nn.BatchNorm2d(3, momentum=0.1, dtype=torch.float64).eval()
    with torch.no_grad():
        native.weight.copy_(_t(case["gamma"]))
        native.bias.copy_(_t(case["beta"]))
        native.running_mean.copy_(_t(case["running_mean"]))
        native.running_var.copy_(_t(case["running_var"]))
    _close(native(x), infer_ref["y"])


class _PlainAttributeBN(torch.nn.Module):
    """The source's layout: moving statistics as plain tensor attributes."""

    def __init__(self, c):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.ones(c))
        self.beta = torch.nn.Parameter(torch.zeros(c))
        self.moving_mean, self.moving_var = torch.zeros(c), torch.ones(c)


def test_buffers_survive_state_dict_round_trip():
    case = ref.random_case((10, 4), seed=9, mean=3.0)
    layer = _layer(case).train()
    with torch.no_grad():
        layer(_t(case["x"]))
    want = ref.bn_step(**case, training=True, eps=1e-5, decay=0.9)
    sd = layer.state_dict()
    assert {"running_mean", "running_var"} <= set(sd)
    assert "running_mean" not in dict(layer.named_parameters())  # SGD must not touch them
    fresh = tbn.BatchNorm(4, 2, dtype=torch.float64)
    fresh.load_state_dict(sd)
    _close(fresh.running_mean, want["running_mean"])
    _close(fresh.running_var, want["running_var"])
    moved = tbn.BatchNorm(4, 2).to(torch.float64)
    assert moved.running_mean.dtype == moved.running_var.dtype == torch.float64
    assert "moving_mean" not in _PlainAttributeBN(4).state_dict()  # what the source loses
    assert _PlainAttributeBN(4).to(torch.float64).moving_mean.dtype == torch.float32


@pytest.mark.parametrize("impl", tbn.IMPLS)
def test_the_experiment_sees_the_closed_form_running_statistics(impl):
    """The experiment's record of a default-built layer, checked by hand: after each step the
    running statistics are the closed form of the impl's own meaning of momentum, in forward."""
    claimed = tb.conventions()[impl]
    obs = tb.observe(impl)["observations"]
    p = cconv.plan(obs["seed"], obs["channels"])
    weighs, m = claimed["momentum_weighs"], claimed["default_momentum"]
    decay = m if weighs == spec.OLD else 1 - m
    rm, rv = np.zeros(3), np.ones(3)
    for x, step in zip(p["train"][4], obs["steps"]):
        n = x.size // 3
        var = x.var(axis=(0, 2, 3)) * (n / (n - 1) if claimed["running_var"] == "unbiased" else 1)
        rm, rv = decay * rm + (1 - decay) * x.mean(axis=(0, 2, 3)), decay * rv + (1 - decay) * var
        _close(step["after_forward"]["running_mean"], rm, 1e-12)
        _close(step["after_forward"]["running_var"], rv, 1e-12)
        _close(step["after_backward"]["running_var"], step["after_forward"]["running_var"], 0)


def test_native_defaults_are_read_from_torch():
    fresh = torch.nn.BatchNorm2d(1)
    conv = tb.conventions()["native"]
    assert (conv["default_momentum"], conv["default_eps"]) == (fresh.momentum, fresh.eps)
    assert conv["momentum_weighs"] == spec.NEW and conv["running_var"] == "unbiased"


@pytest.fixture(scope="module")
def sample(sample_dir):
    return cdata.load_dataset(sample_dir, limit_train=2000, download=False)


def test_lenet_impls_agree_over_sgd_steps(sample):
    params = clenet.init_params(3)
    x = sample.train_x[:192].astype(np.float64)
    batches = [(x[i:i + 64], sample.train_y[i:i + 64]) for i in range(0, 192, 64)]
    runs = {impl: tb.lenet_train(params, batches, lr=0.5, impl=impl, eps=1e-5, decay=0.9,
                                 unbiased=True, dtype="float64") for impl in tbn.IMPLS}
    native = runs["native"]
    assert len(native["losses"]) == 3 and all(isinstance(v, float) for v in native["losses"])
    assert native["losses"][0] == pytest.approx(np.log(10), abs=0.5)
    for impl, run in runs.items():
        np.testing.assert_allclose(run["losses"], native["losses"], rtol=0, atol=1e-10)
        clenet.validate_params(run["params"])
        assert max(clenet.max_abs_diff(run["params"], native["params"]).values()) <= 1e-9, impl
    moved = clenet.max_abs_diff(native["params"], params)
    assert min(moved[f"bn{i}.running_var"] for i in range(1, 5)) > 1e-6  # stats did update
    biased = tb.lenet_train(params, batches, lr=0.5, impl="scratch", unbiased=False,
                            dtype="float64")
    assert np.max(np.abs(biased["params"]["bn3.running_var"]
                         - native["params"]["bn3.running_var"])) > 1e-6
    logits = {impl: tb.lenet_eval(native["params"], x[:32], impl=impl) for impl in tbn.IMPLS}
    for impl in tbn.IMPLS:
        np.testing.assert_allclose(logits[impl], logits["native"], rtol=0, atol=1e-10)


@pytest.mark.parametrize("impl", tbn.IMPLS)
def test_short_training_run_learns(sample, impl):
    lines = []
    r = tb.fit(sample, impl=impl, epochs=2, batch_size=32, lr=0.2, seed=0, device="cpu",
               progress=lines.append)
    assert r["device"] == "cpu" and len(r["history"]) == 2 and len(lines) == 2
    assert r["history"][1]["loss"] < r["history"][0]["loss"]
    assert r["test_acc"] > 0.5, r
    assert r["examples_per_s"] > 0 and r["wall_s"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is usable here")
def test_fit_on_missing_gpu_raises_device_unavailable(sample):
    with pytest.raises(DeviceUnavailable, match="CUDA") as info:
        tb.fit(sample, impl="native", epochs=1, device="gpu")
    assert "device='cpu'" in str(info.value)


# --- the speed path: DeviceSteps and speed() ------------------------------------------------
from backends.torch import train as ttrain  # noqa: E402
from backends.torch.lenet import build_lenet, get_params  # noqa: E402

STEP_TOL = {"float32": 1e-6, "float64": 1e-10}


def _device_steps_run(params, x, y, order, *, impl, dtype, device, path, lr=0.5):
    dev = torch.device(device)
    tdt = getattr(torch, dtype)
    model = build_lenet(impl, device=dev, dtype=tdt, params=params).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    steps = ttrain.DeviceSteps(model, opt, torch.as_tensor(x, dtype=tdt).to(dev),
                               torch.as_tensor(y, dtype=torch.int64).to(dev),
                               torch.as_tensor(order).to(dev), path)
    steps.run(len(order))
    return steps.losses.tolist(), get_params(model)


def _check_same_training(sample, impl, dtype, device, path):
    """The speed path's step (batches gathered on the device by index, step counter and losses
    on the device) trains exactly as lenet_train does on the same batches."""
    params = clenet.init_params(5)
    x, y = sample.train_x[:192], sample.train_y[:192]
    order = np.random.default_rng(0).permutation(192).reshape(3, 64)
    losses, got = _device_steps_run(params, x, y, order, impl=impl, dtype=dtype, device=device,
                                    path=path)
    want = tb.lenet_train(params, [(x[o], y[o]) for o in order], lr=0.5, impl=impl, dtype=dtype,
                          device=device)
    tol = STEP_TOL[dtype]
    np.testing.assert_allclose(losses, want["losses"], rtol=0, atol=tol)
    for name, v in want["params"].items():
        np.testing.assert_allclose(got[name], v, rtol=0, atol=tol * 10, err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("impl", tbn.IMPLS)
def test_speed_path_trains_like_lenet_train(sample, impl, dtype):
    _check_same_training(sample, impl, dtype, "cpu", "eager")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("path", ["eager", "cuda-graph", "compile"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("impl", tbn.IMPLS)
def test_cuda_speed_paths_train_like_lenet_train(sample, impl, dtype, path):
    if path == "compile" and dtype == "float64":
        pytest.skip("compile is timed in float32; one dtype keeps the compile time down")
    tb.exact_numerics()  # TF32 would differ from itself across cuDNN algorithms
    _check_same_training(sample, impl, dtype, "cuda", path)


def test_speed_reports_the_contract_fields():
    benchmark = torch.backends.cudnn.benchmark
    r = tb.speed(impl="scratch-analytic", device="cpu", batch_size=32, steps=2, repeats=2)
    assert set(r) >= {"examples_per_s", "runs", "compile_s", "device", "path"}
    assert r["device"] == "cpu" and r["path"] == "eager" and len(r["runs"]) == 2
    assert r["examples_per_s"] > 0 and r["compile_s"] >= 0
    assert torch.backends.cudnn.benchmark is benchmark  # restored
    with pytest.raises(ValueError, match="path"):
        tb.speed(impl="native", device="cpu", path="fastest")
    with pytest.raises(ValueError, match="steps"):
        tb.speed(impl="native", device="cpu", steps=0)
    with pytest.raises(DeviceUnavailable, match="CUDA"):
        tb.speed(impl="native", device="cpu", path="cuda-graph")


def test_exact_numerics_turns_tf32_off():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    try:
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        tb.exact_numerics()
        assert torch.backends.cuda.matmul.allow_tf32 is False
        assert torch.backends.cudnn.allow_tf32 is False
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])
