"""Every backend conforms to the contract (backends/contract.py), signatures included, and every
backend × impl agrees with the float64 reference through it.

Tolerances: float64 max abs error ≤ 1e-10 (the reference and a float64 implementation differ
only in summation order, ~1e-14 relative on these sizes); float32 ≤ 1e-5 relative to the
largest reference magnitude (float32 epsilon is 1.2e-7; sums over up to a few hundred elements).
"""
import functools
import types
from typing import Protocol

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import backends
from backends import contract
from common import conventions as conv
from common import data, lenet, testing
from common.spec import CONVENTION_FIELDS, effective_decay
from common.reference import RESULT_KEYS, bn_step as reference_step, error, random_case, within_tolerance
from conftest import load_backend, backend_impls

SHAPES = {"2d": (16, 5), "4d": (4, 3, 5, 6), "small-batch": (2, 4)}
SETTINGS = [(0.9, 1e-5), (0.1, 1e-3), (0.99, 1e-2)]  # (decay, eps)
CASES = backend_impls()


# --- the contract as code ----------------------------------------------------------------------

@pytest.mark.parametrize("name", backends.names())
def test_backend_conforms_to_the_contract(name):
    b = load_backend(name)
    assert contract.check(b) == []
    exported = {n for n in contract.names() if hasattr(b, n)}  # optional members only if there
    assert exported <= set(b.__all__), "the contract is the backend's public API"


def conforming_fake(protocol=contract.Backend) -> types.ModuleType:
    """A module whose functions are the contract's own stubs (their `self` bound away)."""
    fake = types.ModuleType("fake_backend")
    fake.IMPLS = fake.SYNC_IMPLS = ("scratch", "native")
    for name, stub in contract.functions(protocol).items():
        if not contract.is_optional(stub):
            setattr(fake, name, functools.partial(stub, None))
    return fake


def _speed_with_an_option(*, impl, device="auto", batch_size=256, dtype="float32", steps=50,
                          repeats=5, path="auto"):
    """torch's speed: an extra keyword-only option with a default, which the contract allows."""


def test_a_fake_built_from_the_contract_conforms():
    fake = conforming_fake()
    assert contract.check(fake) == []
    assert contract.names() == ["IMPLS", "SYNC_IMPLS", *contract.functions()]
    fake.speed = _speed_with_an_option
    fake.IMPLS = ("scratch", "scratch-analytic", "native")
    assert contract.check(fake) == []


def _bn_step(x, gamma, beta, running_mean, running_var, dy, *, training, eps=1e-3, decay=0.9,
             unbiased=False, impl="scratch", accumulate="float32", device="cpu"):
    """eps default 1e-3 (Keras' and MXNet's operator default) instead of 1e-5."""


# One lie each (member, replacement, the problem check() must report, alone).
WRONG = {
    "missing function": ("fit", None, ["fit: missing"]),
    "framework momentum instead of canonical decay (jax's make_layer before)": (
        "make_layer", lambda impl, *, momentum=None, eps=None, unbiased=False: None,
        ["make_layer: missing parameter(s) num_features, num_dims, decay, accumulate",
         "make_layer: parameter 'eps' has default None, the contract's has default 1e-05",
         "make_layer: parameter 'unbiased' has default False, the contract's has default None"]),
    "wrong default": ("bn_step", _bn_step,
                      ["bn_step: parameter 'eps' has default 0.001, the contract's has default "
                       "1e-05"]),
    "wrong order": ("experiment", lambda args, factory, kwargs=None, *, name, seed=0: None,
                    ["experiment: parameter order (args, factory, kwargs, name, seed), the "
                     "contract's is (factory, args, kwargs, name, seed)",
                     "experiment: parameter 'args' has no default, the contract's has default ()"]),
    "wrong kind": ("lenet_eval", lambda params, x, impl, *, dtype="float64", device="cpu", eps=1e-5,
                   fix_gamma=False: None,
                   ["lenet_eval: parameter 'impl' is positional or keyword, the contract's is "
                    "keyword-only"]),
    "renamed": ("lenet_train", lambda params, batches, *, lr, impl, eps=1e-5, momentum=0.9,
                unbiased=None, dtype="float64", device="cpu", record=False, loss_scale=None: None,
                ["lenet_train: missing parameter(s) decay"]),  # momentum=0.9 alone: an option
    "extra without default": (
        "speed_timer", lambda *, impl, device="auto", batch_size=256, dtype="float32", steps=50,
        path: None,
        ["speed_timer: extra parameter 'path' (keyword-only, no default): only keyword-only "
         "parameters with a default may be added"]),
    "swallows anything": ("speed", lambda *, impl, **options: None,
                          ["speed: missing parameter(s) device, batch_size, dtype, steps, repeats",
                           "speed: extra parameter 'options' (variadic keyword, no default): only "
                           "keyword-only parameters with a default may be added"]),
    "int default for a float": ("fit", lambda data, *, impl, epochs, batch_size=256, lr=1, seed=0,
                                device="auto", dtype="float32", eps=1e-5, decay=0.9, params=None,
                                progress=None, loss_scale=None: None,
                                ["fit: parameter 'lr' has default 1, the contract's has default "
                                 "1.0"]),
    "not a function": ("versions", {"torch": "2.13.0"},
                       ["versions: is a dict, not a function"]),
    "no signature": ("conventions", dict, None),  # None: inspect's own words follow the prefix
    "IMPLS lacks native": ("IMPLS", ("scratch",),
                           ["IMPLS: lacks 'native' (every backend has scratch and native), got "
                            "('scratch',)"]),
    "IMPLS not a tuple": ("IMPLS", ["scratch", "native"],
                          ["IMPLS: is a list, the contract's is tuple[str, ...]"]),
    "IMPLS empty": ("IMPLS", (), ["IMPLS: must be a non-empty tuple[str, ...], got ()"]),
}


@pytest.mark.parametrize("lie", WRONG.values(), ids=WRONG.keys())
def test_check_reports_each_departure_from_the_contract(lie):
    member, replacement, expected = lie
    fake = conforming_fake()
    if replacement is None:
        delattr(fake, member)
    else:
        setattr(fake, member, replacement)
    problems = contract.check(fake)
    if expected is None:
        assert len(problems) == 1, problems
        assert problems[0].startswith(f"{member}: has no inspectable signature ("), problems
    else:
        assert problems == expected


class Extended(contract.Backend, Protocol):
    """The contract as a parallel branch extends it: one required stub, one optional."""

    def lenet_gradients(self, params, x, *, impl, dtype="float64") -> dict:
        """Named gradients of LeNet-BN."""

    @contract.optional
    def export_onnx(self, params, path, *, impl, bn_config) -> None:
        """Only some backends have it yet."""


def test_an_extension_is_one_stub_and_optional_members_are_checked_only_when_present():
    fake = conforming_fake()
    assert contract.check(fake, Extended) == ["lenet_gradients: missing"]
    assert contract.check(conforming_fake(Extended), Extended) == []  # export_onnx absent
    assert contract.names(Extended)[-2:] == ["lenet_gradients", "export_onnx"]
    assert "export_onnx" not in contract.names(Extended, include_optional=False)
    fake = conforming_fake(Extended)
    fake.export_onnx = lambda params, path, *, impl: None
    assert contract.check(fake, Extended) == ["export_onnx: missing parameter(s) bn_config"]
    fake.export_onnx = lambda params, path, *, impl, bn_config, compress=False: None
    assert contract.check(fake, Extended) == []


@pytest.mark.parametrize("name, impl", CASES)
def test_make_layer_takes_canonical_terms_and_refuses_bad_ones(name, impl):
    b = load_backend(name)
    b.make_layer(impl, 3, 4)  # the defaults: canonical decay 0.9, eps 1e-5, the impl's own estimator
    b.make_layer(impl, 3, 2, eps=1e-3, decay=0.5)
    for bad, match in ((dict(num_features=0), "num_features"), (dict(num_features=2.5), "num_features"),
                       (dict(num_dims=3), "num_dims"), (dict(decay=1.5), "decay"),
                       (dict(eps=0.0), "eps")):
        args = {"num_features": 3, "num_dims": 4, **bad}
        with pytest.raises(ValueError, match=match):
            b.make_layer(impl, args.pop("num_features"), args.pop("num_dims"), **args)
    with pytest.raises(ValueError, match="impl"):
        b.make_layer("no-such-impl", 3, 4)


def test_epoch_line_is_one_line_the_same_for_every_backend():
    row = dict(epoch=2, loss=0.123456, train_acc=0.9, test_acc=0.85, examples_per_s=12345.6)
    assert backends.epoch_line(row, 10, "cpu") == (
        "epoch 2/10: loss 0.1235, train acc 0.900, test acc 0.850, 12,346 examples/s on cpu")


# --- every backend × impl against the reference --------------------------------------------------

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


@pytest.mark.parametrize("name", backends.names())
@pytest.mark.parametrize("impl", ["scratch", "native"])
def test_source_timer_trains_the_way_the_sources_do(name, impl):
    """The speed report's baseline: the textbook model and loop, on the host-to-device path."""
    b = load_backend(name)
    timer = b.source_timer(impl=impl, device="cpu", batch_size=16, steps=2)
    assert timer.info["device"].startswith("cpu") and timer.info["path"].startswith("source style")
    before = timer.loss_sum
    assert timer.run()["examples_per_s"] > 0
    assert np.isfinite(timer.loss_sum) and timer.loss_sum > before  # losses were read back per batch
    with pytest.raises(ValueError, match="impl"):
        b.source_timer(impl="scratch-analytic", device="cpu", batch_size=16, steps=2)


def test_speed_timers_hold_at_most_a_training_set_of_synthetic_images():
    assert backends.synthetic_batches(256, 16) == 16
    assert backends.synthetic_batches(5_000, 16) == 12  # 60,000 images at most
    assert backends.synthetic_batches(60_000, 50) == 1 and backends.synthetic_batches(100_000, 50) == 1
