"""Checkpoints in each framework's own format, conversion between them, and per-layer activations.

Ground truth: the float64 NumPy forward `common.lenet.reference_logits` (float64 tolerance 1e-10:
the frameworks differ from it only in summation order, ~1e-15 here; float32 1e-4, the issue's
target for a ported model's logits: float32 rounding grows to ~1e-6 over the network), the
frameworks' own modules (torch.nn.Sequential, gluon.nn.HybridSequential, LeNetBN.load_state_dict,
flax.serialization.from_bytes) and bit-for-bit file bytes."""
import io
import pathlib

import numpy as np
import pytest

import backends
from common import checkpoint, convert, divergence, lenet
from conftest import backend_impls, load_backend
from test_convert import same, trained_like

NAMES = backends.names()
PAIRS = [(a, b) for a in NAMES for b in NAMES if a != b]
CASES = backend_impls()  # (backend, impl); an unavailable backend's tests fail or skip (conftest)
TOL = {np.float64: 1e-10, np.float32: 1e-4}


def backend(name):
    return load_backend(name)


def config_for(name, impl, **kw):
    """A bn_config the impl can run: non-default eps and decay, its own variance estimator."""
    cfg = {"eps": 1e-2, "decay": 0.75, "unbiased": False, **kw}
    return convert.target_config(cfg, name, impl)[0]


def images(n=16, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n,) + lenet.IMAGE_SHAPE)


def files(path):
    path = pathlib.Path(path)
    return path.read_bytes(), checkpoint.sidecar_path(path).read_bytes()


def one_line_error(fn, *args, **kw) -> str:
    with pytest.raises(ValueError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


# --- save / load ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, impl", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_save_load_is_the_identity_bit_for_bit(name, impl, dtype, tmp_path):
    b = backend(name)
    p = trained_like(dtype=dtype)
    cfg = config_for(name, impl, num_batches_tracked=7)
    path = tmp_path / "model.ckpt"
    b.save_checkpoint(p, path, impl=impl, bn_config=cfg)
    r = b.read_checkpoint(path)
    assert same(r["params"], p)
    assert r["bn_config"] == cfg and r["impl"] == impl and r["layout"] == "lenet"
    assert r["sidecar"] == str(checkpoint.sidecar_path(path))
    before = files(path)
    b.save_checkpoint(r["params"], path, impl=impl, bn_config=r["bn_config"])
    assert files(path) == before
    assert sorted(q.name for q in tmp_path.iterdir()) == ["model.ckpt", "model.ckpt.bn.json"]


@pytest.mark.parametrize("source, target", PAIRS)
@pytest.mark.parametrize("impl", ["native", "scratch"])
def test_round_trip_through_another_framework_is_bit_for_bit(source, target, impl, tmp_path):
    a, b = backend(source), backend(target)
    cfg = config_for(source, impl, num_batches_tracked=5)
    a.save_checkpoint(trained_like(dtype=np.float32), tmp_path / "a", impl=impl, bn_config=cfg)
    params, got = a.load_checkpoint(tmp_path / "a")
    b.save_checkpoint(params, tmp_path / "b", impl=impl,
                      bn_config=convert.target_config(got, target, impl)[0])
    params, got = b.load_checkpoint(tmp_path / "b")
    a.save_checkpoint(params, tmp_path / "a2", impl=impl,
                      bn_config=convert.target_config(got, source, impl)[0])
    assert files(tmp_path / "a2")[0] == files(tmp_path / "a")[0]
    side = [checkpoint.sidecar_path(tmp_path / f).read_text() for f in ("a", "a2")]
    assert side[0] == side[1]


@pytest.mark.parametrize("source, target", PAIRS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_converted_checkpoint_gives_the_reference_logits(source, target, dtype, tmp_path):
    """Saved natively in `source`, converted through the files, run by `target` with the
    checkpoint's eps: the logits of the NumPy forward with the same parameters and eps."""
    a, b = backend(source), backend(target)
    p = trained_like(seed=2, dtype=dtype)
    cfg = config_for(source, "native")
    a.save_checkpoint(p, tmp_path / "a", impl="native", bn_config=cfg)
    params, got = a.load_checkpoint(tmp_path / "a")
    b.save_checkpoint(params, tmp_path / "b", impl="native",
                      bn_config=convert.target_config(got, target, "native")[0])
    params, got = b.load_checkpoint(tmp_path / "b")
    assert got["eps"] == cfg["eps"] == 1e-2
    x = images(32, seed=1)
    ref = lenet.reference_logits(p, x, eps=cfg["eps"])
    out = b.lenet_eval(params, x.astype(dtype), impl="native", dtype=dtype, eps=got["eps"])
    assert out.dtype == dtype
    err = float(np.max(np.abs(out.astype(np.float64) - ref)))
    assert err <= TOL[dtype], f"{source}->{target} {dtype.__name__}: {err:.3g}"
    assert np.array_equal(out.argmax(1), ref.argmax(1))
    default_eps = lenet.reference_logits(p, x)  # the eps matters for this check
    assert np.max(np.abs(default_eps - ref)) > 10 * TOL[dtype]


# --- the framework's own modules read and write the same files ----------------------------------

def test_torch_textbook_sequential_state_dict_loads(tmp_path):
    tb = backend("torch")
    import torch
    from torch import nn

    torch.manual_seed(0)
    pool = nn.MaxPool2d(2, 2)
    seq = nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5), nn.BatchNorm2d(6), nn.Sigmoid(), pool,
        nn.Conv2d(6, 16, 5), nn.BatchNorm2d(16), nn.Sigmoid(), pool, nn.Flatten(),
        nn.Linear(256, 120), nn.BatchNorm1d(120), nn.Sigmoid(), nn.Linear(120, 84),
        nn.BatchNorm1d(84), nn.Sigmoid(), nn.Linear(84, 10)).double()
    x = torch.tensor(images(32, seed=3))
    with torch.no_grad():  # trained-looking statistics: three training-mode forwards
        for i in range(3):
            seq.train()(x * (1 + i) + 0.1 * i)
        for m in seq:
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
        want = seq.eval()(x).numpy()
    torch.save(seq.state_dict(), tmp_path / "lenet.pt")
    r = tb.read_checkpoint(tmp_path / "lenet.pt")
    assert r["layout"] == "sequential" and r["impl"] == "native" and r["sidecar"] is None
    # no sidecar: nn.BatchNorm*d's defaults, momentum 0.1 weighing the new batch
    assert r["bn_config"] == {"eps": 1e-5, "decay": 0.9, "unbiased": True,
                              "num_batches_tracked": 3}
    got = tb.lenet_eval(r["params"], x.numpy(), impl="native", eps=r["bn_config"]["eps"])
    assert np.max(np.abs(got - want)) <= 1e-12
    assert np.max(np.abs(got - lenet.reference_logits(r["params"], x.numpy()))) <= 1e-10


def test_torch_checkpoint_is_lenetbn_state_dict(tmp_path):
    tb = backend("torch")
    import torch
    from backends.torch.lenet import build_lenet, get_params

    p = trained_like()
    for impl in tb.IMPLS:
        tb.save_checkpoint(p, tmp_path / impl, impl=impl, bn_config=config_for("torch", impl))
        model = build_lenet(impl, dtype=torch.float64)
        model.load_state_dict(torch.load(tmp_path / impl, weights_only=True))  # strict keys
        assert same(get_params(model), p)


def test_flax_checkpoint_restores_into_the_modules_variables(tmp_path):
    jb = backend("jax")
    import flax.serialization
    import jax
    from backends.jax import lenet as jlenet

    p = trained_like(dtype=np.float32)
    for impl in jb.IMPLS:
        jb.save_checkpoint(p, tmp_path / impl, impl=impl, bn_config=config_for("jax", impl))
        model = jlenet.build(impl, eps=1e-2, decay=0.75, unbiased=False)
        init = model.init(jax.random.PRNGKey(0), np.zeros((1, 28, 28, 1), np.float32), train=False)
        restored = flax.serialization.from_bytes(init, (tmp_path / impl).read_bytes())
        assert same(convert.from_flax(jax.device_get(restored)), p)
        x = images(8, seed=4).astype(np.float32)
        got = model.apply(restored, np.moveaxis(x, 1, -1), train=False)
        ref = lenet.reference_logits(p, x, eps=1e-2)
        assert np.max(np.abs(np.asarray(got, np.float64) - ref)) <= 1e-4


def _gluon_sequential(flatten: bool):
    from mxnet.gluon import nn

    seq = nn.HybridSequential()
    blocks = [nn.Conv2D(6, kernel_size=5), nn.BatchNorm(), nn.Activation("sigmoid"),
              nn.MaxPool2D(pool_size=2, strides=2), nn.Conv2D(16, kernel_size=5), nn.BatchNorm(),
              nn.Activation("sigmoid"), nn.MaxPool2D(pool_size=2, strides=2)]
    blocks += [nn.Flatten()] if flatten else []
    blocks += [nn.Dense(120), nn.BatchNorm(), nn.Activation("sigmoid"), nn.Dense(84),
               nn.BatchNorm(), nn.Activation("sigmoid"), nn.Dense(10)]
    seq.add(*blocks)
    return seq


@pytest.mark.parametrize("flatten", [False, True], ids=["d2l", "with-Flatten"])
def test_gluon_sequential_parameters_load(flatten, tmp_path):
    mb = backend("mxnet")
    import mxnet as mx

    seq = _gluon_sequential(flatten)
    seq.initialize(mx.init.Xavier())
    seq.cast("float64")
    x = mx.nd.array(images(32, seed=5), dtype="float64")
    seq(x)  # shapes
    rng = np.random.default_rng(5)
    for name, prm in seq.collect_params().items():  # trained-looking BN state
        if name.endswith(("gamma", "running_var")):
            prm.set_data(mx.nd.array(rng.uniform(0.3, 1.5, prm.shape), dtype="float64"))
        elif name.endswith(("beta", "running_mean")):
            prm.set_data(mx.nd.array(rng.normal(0, 0.3, prm.shape), dtype="float64"))
    want = seq(x).asnumpy()
    seq.save_parameters(str(tmp_path / "lenet.params"))
    r = mb.read_checkpoint(tmp_path / "lenet.params")
    assert r["layout"] == ("sequential-flatten" if flatten else "sequential")
    assert r["impl"] == "native" and r["bn_config"] == {"eps": 1e-5, "decay": 0.9, "unbiased": False}
    got = mb.lenet_eval(r["params"], x.asnumpy(), impl="native")
    assert np.max(np.abs(got - want)) <= 1e-12
    assert np.max(np.abs(got - lenet.reference_logits(r["params"], x.asnumpy()))) <= 1e-10


def test_gluon_checkpoint_loads_into_lenet(tmp_path):
    mb = backend("mxnet")
    import mxnet as mx
    from backends.mxnet import lenet as mlenet

    p = trained_like()
    for impl in mb.IMPLS:
        mb.save_checkpoint(p, tmp_path / impl, impl=impl, bn_config=config_for("mxnet", impl))
        net = mlenet.build(impl)
        net.load_parameters(str(tmp_path / impl), ctx=mx.cpu(), cast_dtype=True,
                            dtype_source="saved")
        assert same(mlenet.to_canonical(net), p)


def test_mxnet_sidecar_fix_gamma_gives_the_layers_gamma(tmp_path):
    """A sidecar saying fix_gamma=true loads gamma as 1: what the MXNet layer computes with."""
    mb = backend("mxnet")
    import json

    p = trained_like()
    path = tmp_path / "m.params"
    mb.save_checkpoint(p, path, impl="native", bn_config=config_for("mxnet", "native"))
    side = checkpoint.sidecar_path(path)
    doc = json.loads(side.read_text())
    doc["settings"]["fix_gamma"] = True
    side.write_text(json.dumps(doc))
    params, _ = mb.load_checkpoint(path)
    assert all(np.all(params[f"{b}.gamma"] == 1) for b in lenet.BN_LAYERS)
    assert np.array_equal(params["bn2.beta"], p["bn2.beta"])


# --- bad files ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_corrupt_and_foreign_files_are_one_line_errors(name, tmp_path):
    b = backend(name)
    p = trained_like()
    for other in NAMES:
        backend(other).save_checkpoint(p, tmp_path / other, impl="native",
                                       bn_config=config_for(other, "native"))
    good = (tmp_path / name).read_bytes()
    (tmp_path / "truncated").write_bytes(good[: len(good) // 2])
    (tmp_path / "text").write_text("conv1.weight = 1\n")
    (tmp_path / "empty").write_bytes(b"")
    for f in ("truncated", "text"):
        assert str(tmp_path / f) in one_line_error(b.load_checkpoint, tmp_path / f)
    assert "is empty" in one_line_error(b.load_checkpoint, tmp_path / "empty")
    assert "cannot read" in one_line_error(b.load_checkpoint, tmp_path / "missing")
    for other in NAMES:
        if other != name:  # another framework's checkpoint
            one_line_error(b.load_checkpoint, tmp_path / other)
    (tmp_path / name).write_bytes(good)
    checkpoint.sidecar_path(tmp_path / name).write_text('{"format": "something else"}')
    assert "not a 'bn-compare" in one_line_error(b.load_checkpoint, tmp_path / name)


def test_mismatched_checkpoints_name_the_key(tmp_path):
    for name in NAMES:
        backend(name)
    import flax.serialization
    import mxnet as mx
    import torch

    state = {k: torch.from_numpy(v) for k, v in
             convert.to_flat("torch", trained_like(), "native").items()}
    state["fc1.weight"] = torch.zeros(120, 255, dtype=torch.float64)
    torch.save(state, tmp_path / "shape.pt")
    msg = one_line_error(backend("torch").load_checkpoint, tmp_path / "shape.pt")
    assert msg == f"{tmp_path / 'shape.pt'}: 'fc1.weight' has shape (120, 255), expected (120, 256)"
    torch.save({"model": state}, tmp_path / "nested.pt")
    assert "not a state_dict of tensors" in one_line_error(
        backend("torch").load_checkpoint, tmp_path / "nested.pt")
    v = convert.to_flax(trained_like(), "native")
    del v["params"]["bn2"]
    (tmp_path / "v.msgpack").write_bytes(flax.serialization.to_bytes(v))
    assert "missing params/bn2" in one_line_error(backend("jax").load_checkpoint,
                                                  tmp_path / "v.msgpack")
    arrays = {k: mx.nd.array(a, dtype=a.dtype) for k, a in
              convert.to_flat("mxnet", trained_like(), "native").items()}
    arrays["bn5.gamma"] = mx.nd.ones(3)
    mx.nd.save(str(tmp_path / "x.params"), arrays)
    assert "unexpected key 'bn5.gamma'" in one_line_error(backend("mxnet").load_checkpoint,
                                                          tmp_path / "x.params")
    # a sidecar whose impl contradicts the file's names
    tb = backend("torch")
    tb.save_checkpoint(trained_like(), tmp_path / "t.pt", impl="native",
                       bn_config=config_for("torch", "native"))
    buf = io.BytesIO()
    torch.save({k: torch.from_numpy(v) for k, v in convert.to_flat(
        "torch", trained_like(), "scratch").items()}, buf)
    side = checkpoint.sidecar_path(tmp_path / "t.pt")
    text = side.read_text()
    (tmp_path / "t.pt").write_bytes(buf.getvalue())
    side.write_text(text.replace(text.split('"sha256": "')[1][:64],
                                 checkpoint._sha256(tmp_path / "t.pt")))
    assert "says impl 'native', but" in one_line_error(tb.load_checkpoint, tmp_path / "t.pt")


@pytest.mark.parametrize("name", NAMES)
def test_settings_the_impl_cannot_run_are_refused(name, tmp_path):
    b = backend(name)
    cfg = {"eps": 1e-5, "decay": 0.9, "unbiased": not convert.NATIVE_UNBIASED[name]}
    with pytest.raises(backends.UnsupportedSetting, match="cannot be expressed"):
        b.save_checkpoint(trained_like(), tmp_path / "x", impl="native", bn_config=cfg)
    with pytest.raises(ValueError, match="unknown"):
        b.save_checkpoint(trained_like(), tmp_path / "x", impl="nope", bn_config=cfg)
    assert not list(tmp_path.iterdir())


def test_converter_tables_match_the_installed_frameworks():
    loaded = {name: backend(name) for name in NAMES}
    from backends.mxnet.bn import operator_defaults
    for name, b in loaded.items():
        assert set(b.IMPLS) == set(convert.spec.IMPL_CONVENTIONS[name])
        native = b.conventions()["native"]
        assert (native["running_var"] == "unbiased") == convert.NATIVE_UNBIASED[name]
        default_eps = operator_defaults()["eps"] if name == "mxnet" else native["default_eps"]
        assert default_eps == convert.DEFAULT_EPS[name]


# --- per-layer activations ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def layer_runs():
    p, x = trained_like(seed=4), images(8, seed=6)
    return p, x, {(n, i): backend(n).lenet_layers(p, x, impl=i) for n, i in CASES}


def test_layers_agree_across_frameworks_and_with_the_logits(layer_runs):
    p, x, runs = layer_runs
    ref = lenet.reference_logits(p, x)
    base = runs["torch", "native"]
    for key, acts in runs.items():
        assert list(acts) == list(lenet.LAYERS), key
        for layer in lenet.LAYERS:
            assert acts[layer].shape == (8,) + lenet.LAYER_SHAPES[layer], (key, layer)
        assert np.max(np.abs(acts["fc3"] - ref)) <= 1e-10, key
        errors = divergence.layer_errors(base, acts)
        assert max(errors.values()) <= 1e-10, (key, errors)
    # an independent check of two early layers
    np.testing.assert_allclose(base["conv1"], lenet._conv2d(x, p["conv1.weight"], p["conv1.bias"]),
                               rtol=0, atol=1e-12)
    np.testing.assert_array_equal(base["flatten"], base["pool2"].reshape(8, -1))


@pytest.mark.parametrize("name, impl", CASES)
def test_isolated_inputs_feed_each_layer(name, impl, layer_runs):
    p, x, runs = layer_runs
    b = backend(name)
    acts = runs[name, impl]
    same_inputs = b.lenet_layers(p, x, impl=impl, inputs=divergence.isolated_inputs(acts))
    assert max(divergence.layer_errors(acts, same_inputs).values()) <= 1e-12
    moved = dict(acts)
    moved["flatten"] = acts["flatten"] + 0.5  # fed to fc1 only
    fed = b.lenet_layers(p, x, impl=impl, inputs={"fc1": moved["flatten"]})
    errors = divergence.layer_errors(acts, fed)
    assert divergence.first_divergent(errors, 1e-10) == "fc1"
    assert errors["flatten"] == 0.0
    want_fc1 = moved["flatten"] @ p["fc1.weight"].T + p["fc1.bias"]
    assert np.max(np.abs(fed["fc1"] - want_fc1)) <= 1e-10
    with pytest.raises(ValueError, match="input for layer bn3 has shape"):
        b.lenet_layers(p, x, impl=impl, inputs={"bn3": acts["bn3"][:2]})


@pytest.mark.parametrize("name, impl", CASES)
def test_eval_honours_eps_and_fix_gamma(name, impl):
    b = backend(name)
    p, x = trained_like(seed=5), images(8, seed=7)
    got = b.lenet_eval(p, x, impl=impl, eps=0.05)
    assert np.max(np.abs(got - lenet.reference_logits(p, x, eps=0.05))) <= 1e-10
    fixed = b.lenet_eval(p, x, impl=impl, fix_gamma=True)
    want = lenet.reference_logits(convert.fixed_gamma(p), x)
    assert np.max(np.abs(fixed - want)) <= 1e-10
    assert np.max(np.abs(fixed - lenet.reference_logits(p, x))) > 1e-3


MISTAKE_LAYER = {"no-flatten-permutation": "fc1", "kernel-reshaped": "conv1",
                 "eps-default": "bn1", "fix-gamma": "bn1", "momentum-copied": None}


@pytest.mark.parametrize("source, target", PAIRS)
def test_each_porting_mistake_is_found_at_its_layer(source, target):
    """Cascaded and isolated, in float64, on trained-looking BN statistics; the source's eps is
    1e-4 so that every target's default differs from it."""
    p, x = trained_like(seed=6), images(8, seed=8)
    cfg = config_for(source, "native", eps=1e-4)
    src = backend(source).lenet_layers(p, x, impl="native", eps=cfg["eps"])
    found = {}
    for mistake in [None] + list(convert.MISTAKES):
        r = convert.port(p, cfg, source=source, target=target, mistake=mistake)
        kw = dict(impl="native", eps=r["bn_config"]["eps"], fix_gamma=r["fix_gamma"])
        b = backend(target)
        cascaded = divergence.compare(src, b.lenet_layers(r["params"], x, **kw), tol=1e-10)
        isolated = divergence.compare(
            src, b.lenet_layers(r["params"], x, inputs=divergence.isolated_inputs(src), **kw),
            tol=1e-10)
        layers = cascaded["first_divergent_layer"], isolated["first_divergent_layer"]
        found[mistake] = layers
        want = MISTAKE_LAYER.get(mistake) if r["applies"] else None
        assert layers == (want, want), (mistake, r["applies"], layers)
        if want:  # isolated: only that layer's own error, which the cascade carries on
            assert cascaded["errors"]["fc3"] > 1e-6 and isolated["errors"][want] > 1e-6
    assert found[None] == (None, None)
    assert found["eps-default"] == ("bn1", "bn1")
