"""The framework-free converter (common.convert), checkpoint sidecars (common.checkpoint) and
per-layer comparison (common.divergence). Expected values come from explicit index loops,
NumPy's own reshape/moveaxis semantics or common.spec's formulas, not from the code under test."""
import json
import math
import pathlib

import numpy as np
import pytest

from common import checkpoint, convert, divergence, lenet, spec


def trained_like(seed=1, dtype=np.float64):
    """Canonical params with non-default BN parameters and statistics (small variances too)."""
    rng = np.random.default_rng(seed)
    p = lenet.init_params(seed)
    for layer, c in lenet.BN_LAYERS.items():
        p[f"{layer}.gamma"] = rng.uniform(0.5, 1.5, c)
        p[f"{layer}.beta"] = rng.normal(0, 0.3, c)
        p[f"{layer}.running_mean"] = rng.normal(0, 0.3, c)
        p[f"{layer}.running_var"] = rng.uniform(0.05, 2, c)
    return lenet.cast(p, dtype)


def same(a, b):
    """Bit for bit: same keys, dtypes, shapes and bytes."""
    return set(a) == set(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
        for k in a)


# --- layouts ------------------------------------------------------------------------------------

def test_fc1_permutation_is_the_nhwc_flatten_order():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3,) + lenet.LAYER_SHAPES["pool2"])
    chw, hwc = a.reshape(3, -1), np.moveaxis(a, 1, -1).reshape(3, -1)
    np.testing.assert_array_equal(chw[:, convert.FC1_HWC_FROM_CHW], hwc)
    np.testing.assert_array_equal(hwc[:, convert.FC1_CHW_FROM_HWC], chw)
    np.testing.assert_array_equal(convert.nhwc_activation("flatten", chw, is_input=False), hwc)
    np.testing.assert_array_equal(convert.nchw_activation("fc1", hwc, is_input=True), chw)
    np.testing.assert_array_equal(convert.nhwc_activation("pool2", a, is_input=False),
                                  np.moveaxis(a, 1, -1))
    # fc1 fed the NHWC flatten through the converted kernel computes the canonical fc1
    p = trained_like()
    v = convert.to_flax(p, "native")
    np.testing.assert_allclose(hwc @ v["params"]["fc1"]["kernel"], chw @ p["fc1.weight"].T,
                               rtol=0, atol=1e-12)


def test_flax_kernels_by_index():
    p = trained_like()
    k = convert.to_flax(p, "scratch")["params"]
    w = p["conv2.weight"]
    for o, i, h, x in [(0, 0, 0, 0), (15, 5, 4, 4), (3, 2, 1, 4), (7, 1, 4, 0)]:
        assert k["conv2"]["kernel"][h, x, i, o] == w[o, i, h, x]
    np.testing.assert_array_equal(k["fc3"]["kernel"], p["fc3.weight"].T)
    assert set(k["bn1"]) == {"gamma", "beta"}
    native = convert.to_flax(p, "native")
    assert set(native["params"]["bn1"]) == {"scale", "bias"}
    assert set(native["batch_stats"]["bn2"]) == {"mean", "var"}
    np.testing.assert_array_equal(native["batch_stats"]["bn2"]["var"], p["bn2.running_var"])


@pytest.mark.parametrize("impl", ["native", "scratch"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_flax_round_trip_is_exact(impl, dtype):
    p = trained_like(dtype=dtype)
    v = convert.to_flax(p, impl)
    assert convert.flax_family(v) == impl
    assert same(convert.from_flax(v), p)


@pytest.mark.parametrize("framework, layout", [(f, lay) for f in ("torch", "mxnet")
                                               for lay in convert.LAYOUTS[f]])
@pytest.mark.parametrize("impl", ["native", "scratch"])
def test_flat_layouts_round_trip_and_are_told_apart(framework, layout, impl):
    p = trained_like(dtype=np.float32)
    flat = convert.to_flat(framework, p, impl, layout=layout, num_batches_tracked=11)
    fmt = convert.flat_format(framework, flat)
    assert fmt["layout"] == layout
    # Gluon names gamma/beta the same in both impls, so its files cannot tell them apart
    assert fmt["family"] == (impl if framework == "torch" else None)
    assert fmt["num_batches_tracked"] == (11 if (framework, impl) == ("torch", "native") else None)
    assert same(convert.from_flat(framework, flat), p)


def test_textbook_sequential_keys():
    keys = list(convert.to_flat("torch", trained_like(), "native", layout="sequential"))
    assert keys[:7] == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                        "1.running_var", "1.num_batches_tracked"]
    assert keys[-2:] == ["15.weight", "15.bias"] and "9.weight" in keys and "13.running_var" in keys
    gluon = list(convert.to_flat("mxnet", trained_like(), "native", layout="sequential"))
    assert gluon[:6] == ["0.weight", "0.bias", "1.gamma", "1.beta", "1.running_mean",
                         "1.running_var"]
    assert "8.weight" in gluon and gluon[-1] == "14.bias"


def _error(fn, *args, **kw) -> str:
    with pytest.raises(ValueError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_mismatched_contents_name_the_key():
    p = trained_like()
    flat = convert.to_flat("torch", p, "native")
    missing = {k: v for k, v in flat.items() if k != "bn3.running_var"}
    assert "missing key 'bn3.running_var'" in _error(convert.from_flat, "torch", missing, "f.pt")
    extra = dict(flat, **{"fc4.weight": np.zeros(3)})
    assert "unexpected key 'fc4.weight'" in _error(convert.from_flat, "torch", extra)
    bad = dict(flat, **{"fc1.weight": np.zeros((120, 255))})
    msg = _error(convert.from_flat, "torch", bad, "f.pt")
    assert msg == "f.pt: 'fc1.weight' has shape (120, 255), expected (120, 256)"
    half = dict(flat, **{"conv1.weight": flat["conv1.weight"].astype(np.float16)})
    assert "'conv1.weight' has dtype float16" in _error(convert.from_flat, "torch", half)
    nan = dict(flat, **{"bn2.running_var": np.full(16, np.nan)})
    assert np.isnan(convert.from_flat("torch", nan)["bn2.running_var"]).all()  # read as it is
    assert "bn2.running_var contains non-finite" in _error(
        convert.to_flat, "torch", convert.from_flat("torch", nan), "native")  # never written
    mixed = dict(flat, **{"fc3.bias": flat["fc3.bias"].astype(np.float32)})
    assert "must all be float32 or all float64" in _error(convert.from_flat, "torch", mixed)
    counts = dict(flat, **{"bn2.num_batches_tracked": np.array(3)})
    assert "num_batches_tracked differs" in _error(convert.from_flat, "torch", counts)
    v = convert.to_flax(p, "native")
    del v["batch_stats"]["bn3"]["var"]
    assert "missing batch_stats/bn3/var" in _error(convert.from_flax, v)
    v = convert.to_flax(p, "native")
    v["params"]["fc1"]["kernel"] = v["params"]["fc1"]["kernel"].T
    assert "'params/fc1/kernel' has shape (120, 256), expected (256, 120)" in _error(
        convert.from_flax, v)
    v = convert.to_flax(p, "scratch")
    v["params"]["extra"] = {"w": np.zeros(1)}
    assert "unexpected params/extra/w" in _error(convert.from_flax, v)
    assert "must be {'params', 'batch_stats'}" in _error(convert.from_flax, {"params": {}})


# --- settings -----------------------------------------------------------------------------------

def test_settings_translate_momentum_through_spec():
    cfg = {"eps": 1e-3, "decay": 0.9, "unbiased": True}
    s = convert.framework_settings("torch", "native", cfg)
    assert s["eps"] == 1e-3 and s["unbiased"] is True
    assert s["momentum"] == pytest.approx(0.1, abs=1e-15)  # weighs the new batch
    assert convert.framework_settings("torch", "scratch", cfg)["momentum"] == 0.9
    cfg = dict(cfg, unbiased=False)
    assert convert.framework_settings("jax", "native", cfg) == {
        "momentum": 0.9, "epsilon": 1e-3, "unbiased": False}
    assert convert.framework_settings("mxnet", "scratch", cfg)["momentum"] == pytest.approx(0.1)
    assert convert.framework_settings("mxnet", "native", cfg)["fix_gamma"] is False
    for fw, impl in [("torch", "scratch-analytic"), ("jax", "scratch"), ("mxnet", "scratch"),
                     ("mxnet", "native"), ("jax", "native")]:
        for decay in (0.5, 0.9, 0.99, 0.999):  # exact through 1 - m for decay >= 0.5
            c = dict(cfg, decay=decay)
            assert convert.config_from_settings(fw, impl, convert.framework_settings(fw, impl, c)) == c


def test_native_variance_estimators_are_enforced_and_reported():
    with pytest.raises(spec.UnsupportedSetting, match="unbiased running variance"):
        convert.framework_settings("torch", "native", {"eps": 1e-5, "decay": 0.9, "unbiased": False})
    with pytest.raises(spec.UnsupportedSetting, match="biased running variance"):
        convert.framework_settings("jax", "native", {"eps": 1e-5, "decay": 0.9, "unbiased": True})
    cfg, changes = convert.target_config({"eps": 1e-5, "decay": 0.9, "unbiased": True},
                                         "mxnet", "native")
    assert cfg["unbiased"] is False and changes == [
        "running variance unbiased -> biased: mxnet native BatchNorm has no other"]
    assert convert.target_config(cfg, "jax", "scratch") == (cfg, [])


@pytest.mark.parametrize("bad, match", [
    ({"eps": 1e-5, "decay": 0.9}, "missing \\['unbiased'\\]"),
    ({"eps": 1e-5, "decay": 0.9, "unbiased": False, "momentum": 0.1}, "unknown \\['momentum'\\]"),
    ({"eps": -1.0, "decay": 0.9, "unbiased": False}, "eps must be a positive"),
    ({"eps": 1e-5, "decay": 1.5, "unbiased": False}, "decay must be in"),
    ({"eps": 1e-5, "decay": 0.9, "unbiased": "no"}, "unbiased must be True or False"),
    ({"eps": 1e-5, "decay": 0.9, "unbiased": False, "num_batches_tracked": -1}, "int >= 0"),
    ([1e-5, 0.9], "must be a dict"),
])
def test_bn_config_is_validated(bad, match):
    with pytest.raises(ValueError, match=match):
        convert.check_bn_config(bad)


# --- porting mistakes ---------------------------------------------------------------------------

CFG = {"eps": 1e-5, "decay": 0.9, "unbiased": False}


def test_momentum_copied_carries_the_literal():
    # torch native momentum 0.1 (weighs the new batch) read by Flax as weighing the old value
    r = convert.port(trained_like(), CFG, source="torch", target="jax", mistake="momentum-copied")
    assert r["applies"] and r["bn_config"]["decay"] == pytest.approx(0.1, abs=1e-15)
    assert same(r["params"], trained_like())
    # Flax and Gluon's momentum mean the same: copying it is right
    r = convert.port(trained_like(), CFG, source="jax", target="mxnet", mistake="momentum-copied")
    assert not r["applies"] and r["bn_config"]["decay"] == 0.9
    # the MXNet source's 0.9 weighs the new batch; into a Flax layer it keeps 90% of the old
    r = convert.port(trained_like(), dict(CFG, decay=0.1), source="mxnet", target="jax",
                     source_impl="scratch", target_impl="native", mistake="momentum-copied")
    assert r["bn_config"]["decay"] == pytest.approx(0.9)


def test_layout_mistakes_apply_only_across_nchw_and_nhwc():
    p = trained_like()
    for mistake in ("no-flatten-permutation", "kernel-reshaped"):
        r = convert.port(p, CFG, source="torch", target="mxnet", mistake=mistake)
        assert not r["applies"] and same(r["params"], p)
    r = convert.port(p, CFG, source="torch", target="jax", mistake="no-flatten-permutation")
    # Flax's fc1 kernel holds the canonical columns unpermuted: read back, they are permuted
    np.testing.assert_array_equal(r["params"]["fc1.weight"], p["fc1.weight"][:, convert.FC1_CHW_FROM_HWC])
    r = convert.port(p, CFG, source="jax", target="torch", mistake="kernel-reshaped")
    flax_kernel = p["conv1.weight"].transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(r["params"]["conv1.weight"], flax_kernel.reshape(6, 1, 5, 5))
    assert not np.array_equal(r["params"]["conv1.weight"], p["conv1.weight"])
    assert all(np.array_equal(r["params"][k], p[k]) for k in p if not k.startswith("conv"))


def test_eps_default_and_fix_gamma():
    p = trained_like()
    r = convert.port(p, CFG, source="torch", target="mxnet", mistake="eps-default")
    assert r["applies"] and r["bn_config"]["eps"] == 1e-3  # MXNet's operator default
    r = convert.port(p, CFG, source="mxnet", target="torch", mistake="eps-default")
    assert not r["applies"] and r["bn_config"]["eps"] == 1e-5
    r = convert.port(p, CFG, source="torch", target="mxnet", mistake="fix-gamma")
    assert r["fix_gamma"] and same(r["params"], p)
    r = convert.port(p, CFG, source="mxnet", target="jax", mistake="fix-gamma")
    assert not r["fix_gamma"] and all(np.all(r["params"][f"{b}.gamma"] == 1) for b in lenet.BN_LAYERS)
    assert np.array_equal(r["params"]["bn1.beta"], p["bn1.beta"])
    assert not convert.port(p, CFG, source="torch", target="jax", mistake="fix-gamma")["applies"]
    with pytest.raises(ValueError, match="nothing to port"):
        convert.port(p, CFG, source="jax", target="jax")
    with pytest.raises(ValueError, match="unknown mistake"):
        convert.port(p, CFG, source="jax", target="torch", mistake="typo")


# --- per-layer comparison -----------------------------------------------------------------------

def _acts(seed=0):
    rng = np.random.default_rng(seed)
    return {layer: rng.normal(size=(2,) + shape) for layer, shape in lenet.LAYER_SHAPES.items()}


def test_first_divergent_layer_in_forward_order():
    a = _acts()
    b = {k: v.copy() for k, v in a.items()}
    b["fc1"] += 1e-3
    b["fc3"] += 1.0
    r = divergence.compare(a, b, tol=1e-4)
    assert r["first_divergent_layer"] == "fc1"
    assert r["errors"]["fc1"] == pytest.approx(1e-3) and r["errors"]["conv1"] == 0.0
    assert divergence.compare(a, b, tol=2e-3)["first_divergent_layer"] == "fc3"
    assert divergence.compare(a, a, tol=0.0)["first_divergent_layer"] is None
    iso = divergence.isolated_inputs(a)
    assert "conv1" not in iso and iso["fc1"] is a["flatten"] and iso["bn1"] is a["conv1"]


def test_nan_is_divergent_and_bad_input_is_an_error():
    a = _acts()
    b = dict(a, bn2=np.where(np.arange(a["bn2"].size).reshape(a["bn2"].shape) == 5, np.nan, a["bn2"]))
    r = divergence.compare(a, b, tol=1e9)
    assert math.isnan(r["errors"]["bn2"]) and r["first_divergent_layer"] == "bn2"
    both = dict(a, conv1=np.full_like(a["conv1"], np.nan))
    assert divergence.compare(both, both, tol=1.0)["first_divergent_layer"] == "conv1"
    with pytest.raises(ValueError, match="layer pool1: source shape"):
        divergence.compare(a, dict(a, pool1=a["pool1"][:1]), tol=1.0)
    with pytest.raises(ValueError, match="target activations lack layer 'fc2'"):
        divergence.compare(a, {k: v for k, v in a.items() if k != "fc2"}, tol=1.0)
    with pytest.raises(ValueError, match="tolerance"):
        divergence.compare(a, a, tol=float("nan"))


def test_layer_inputs_are_checked():
    x = np.zeros((3,) + lenet.input_shape("fc1"))
    assert lenet.input_shape("conv1") == lenet.IMAGE_SHAPE and x.shape == (3, 256)
    assert lenet.check_layer_inputs({"fc1": x}, 3)["fc1"] is x
    with pytest.raises(ValueError, match="input for layer fc1 has shape \\(3, 256\\), expected \\(4, 256\\)"):
        lenet.check_layer_inputs({"fc1": x}, 4)
    with pytest.raises(ValueError, match="unknown layer 'fc9'"):
        lenet.check_layer_inputs({"fc9": x}, 3)


# --- checkpoint files ---------------------------------------------------------------------------

SETTINGS = {"momentum": 0.9, "epsilon": 1e-5, "unbiased": False}


def _save(path, data=b"weights"):
    checkpoint.save(path, checkpoint.write_bytes(data), framework="jax", impl="native",
                    settings=SETTINGS, bn_config=dict(CFG, num_batches_tracked=4))


def test_sidecar_belongs_to_its_file(tmp_path):
    f = tmp_path / "m.msgpack"
    _save(f)
    doc = checkpoint.read_sidecar(f, "jax")
    assert doc["settings"] == SETTINGS and doc["num_batches_tracked"] == 4
    f.write_bytes(b"other weights")  # the user overwrote the weights with their own file
    msg = _error(checkpoint.read_sidecar, f, "jax")
    assert "belongs to another version of m.msgpack" in msg
    _save(f)
    msg = _error(checkpoint.read_sidecar, f, "torch")
    assert "written for framework 'jax', not 'torch'" in msg
    checkpoint.sidecar_path(f).write_text("{not json")
    assert "unreadable settings sidecar" in _error(checkpoint.read_sidecar, f, "jax")
    checkpoint.sidecar_path(f).unlink()
    assert checkpoint.read_sidecar(f, "jax") is None


def test_failed_write_keeps_the_old_checkpoint(tmp_path):
    f = tmp_path / "m.msgpack"
    _save(f, b"old")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(tmp):
        pathlib.Path(tmp).write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.save(f, crash, framework="jax", impl="native", settings=SETTINGS,
                        bn_config=CFG)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert json.loads(checkpoint.sidecar_path(f).read_text())["impl"] == "native"


def test_unreadable_paths_are_one_line_errors(tmp_path):
    assert "cannot read checkpoint" in _error(checkpoint.read_bytes, tmp_path / "nope.pt")
    assert "cannot read checkpoint" in _error(checkpoint.read_bytes, tmp_path)
    (tmp_path / "empty").write_bytes(b"")
    assert "is empty" in _error(checkpoint.read_bytes, tmp_path / "empty")
    assert "is a directory" in _error(lambda: _save(tmp_path))
