"""The conventions experiment's analysis (common/conventions.py) with no framework: a NumPy batch
norm with knobs stands in for a layer, so every field can be set to lie, crash or return NaN."""
import math

import numpy as np
import pytest

from common import conventions as conv
from common import spec
from common.reference import bn_step, reduce_axes
from common.spec import NEW, OLD


class NumpyBN:
    """A batch-norm layer in NumPy implementing the experiment's adapter protocol; each knob
    changes one convention."""

    def __init__(self, channels, *, momentum=0.1, weighs=NEW, eps=1e-5, unbiased=True,
                 update="forward", init_var=1.0, axis=1, gamma="learnable", running="EMA",
                 momentum_dtype="float64", nan=False, crash=False, float32=False):
        self.c, self.momentum, self.weighs, self.eps = channels, momentum, weighs, eps
        self.unbiased, self.update, self.axis, self.gamma_kind = unbiased, update, axis, gamma
        self.running, self.momentum_dtype, self.nan, self.crash = running, momentum_dtype, nan, crash
        self.float32 = float32
        self.rm, self.rv = np.zeros(channels), np.full(channels, init_var)
        self.g, self.b = np.ones(channels), np.zeros(channels)
        self.k = 0

    def prepare(self, x):
        pass

    def stats(self):
        if self.running == "none":
            return {"running_mean": None, "running_var": None}
        return {"running_mean": self.rm.copy(), "running_var": self.rv.copy()}

    def set_affine(self, gamma, beta):
        self.g, self.b = gamma, beta
        return {"gamma": self.gamma_kind != "absent", "beta": True}

    def _nchw(self, x):
        return np.moveaxis(x, -1, 1) if self.axis == -1 and x.ndim == 4 else x

    def _layer(self, y):
        return np.moveaxis(y, 1, -1) if self.axis == -1 and y.ndim == 4 else y

    def _bc(self, v, nd):
        return v.reshape((1, -1) + (1,) * (nd - 2))

    def _decay(self):
        if self.running == "cumulative":
            return 1.0 - 1.0 / self.k
        if self.running == "erratic":
            return (0.9, 0.5)[self.k % 2]
        m = float(np.float32(self.momentum)) if self.momentum_dtype == "float32" else self.momentum
        return 1.0 - m if self.weighs == NEW else m

    def _new_stats(self, x):
        axes = reduce_axes(x.ndim)
        n = x.size // x.shape[1]
        var = x.var(axis=axes) * (n / (n - 1) if self.unbiased else 1.0)
        d = self._decay()
        return d * self.rm + (1 - d) * x.mean(axis=axes), d * self.rv + (1 - d) * var

    def train_step(self, x, dy):
        if self.crash:
            raise RuntimeError("device lost")
        x = self._nchw(np.asarray(x, np.float64))
        g = self.g if self.gamma_kind == "learnable" else np.ones(self.c)
        grads = bn_step(x, g, self.b, np.zeros(self.c), np.ones(self.c), self._nchw(dy), training=True,
                        eps=self.eps)  # the closed-form gradients
        y = grads["y"]
        if self.float32:  # normalise in float32 arithmetic
            x32 = x.astype(np.float32)
            m32, v32 = x32.mean(axis=reduce_axes(x.ndim)), x32.var(axis=reduce_axes(x.ndim))
            y = (self._bc(g, x.ndim).astype(np.float32) * (x32 - self._bc(m32, x.ndim))
                 / np.sqrt(self._bc(v32, x.ndim) + np.float32(self.eps)) + self._bc(self.b, x.ndim)).astype(np.float64)
        if self.nan:
            y = y * np.nan
        self.k += 1
        before = self.stats()
        if self.running != "none":
            self.rm, self.rv = self._new_stats(x)
        after = self.stats()
        forward = after if self.update == "forward" else before
        return {"y": self._layer(y), "dx": self._layer(grads["dx"]),
                "dgamma": None if self.gamma_kind == "absent" else grads["dgamma"],
                "dbeta": grads["dbeta"], "after_forward": forward, "after_backward": after}

    def eval(self, x):
        x = self._nchw(np.asarray(x, np.float64))
        g = self.g if self.gamma_kind == "learnable" else np.ones(self.c)
        if self.running == "none":
            axes = reduce_axes(x.ndim)
            mean, var = x.mean(axis=axes), x.var(axis=axes)
        else:
            mean, var = self.rm, self.rv
        nd = x.ndim
        return self._layer(self._bc(g, nd) * (x - self._bc(mean, nd)) / np.sqrt(self._bc(var, nd) + self.eps)
                           + self._bc(self.b, nd))


def measure(**knobs):
    def build(momentum=conv.UNSET):
        kw = dict(knobs)
        if momentum is not conv.UNSET:
            kw["momentum"] = momentum
        return NumpyBN(conv.CHANNELS, **kw)

    obs = conv.observe(build)
    return obs, conv.measure(obs)


TORCH_LIKE = dict(momentum_weighs=NEW, default_momentum=0.1, default_eps=1e-5, running_var="unbiased",
                  stats_update="forward", layout="NCHW", initial_running_var=1.0, running_stats="EMA",
                  gamma="learnable", momentum_dtype="float64")


def test_an_honest_layer_measures_as_it_is_built_and_matches_the_reference():
    obs, m = measure()
    assert {f: m[f] for f in spec.CONVENTION_FIELDS} == pytest.approx(TORCH_LIKE)
    assert m["decay"] == pytest.approx(0.9, abs=1e-12) and m["problems"] == []
    assert all(c["agrees"] for c in conv.compare(TORCH_LIKE, m).values())
    agreement = conv.agreement(obs, m)
    assert all(a["pass"] for a in agreement.values()), agreement


# field -> (knobs that make the layer do something else, the value that must be measured)
LIES = {
    "momentum_weighs": (dict(weighs=OLD, momentum=0.9), OLD),
    "default_momentum": (dict(momentum=0.3), 0.3),
    "default_eps": (dict(eps=1e-3), 1e-3),
    "running_var": (dict(unbiased=False), "biased"),
    "stats_update": (dict(update="backward"), "backward"),
    "layout": (dict(axis=-1), "NHWC"),
    "initial_running_var": (dict(init_var=0.0), 0.0),
    "running_stats": (dict(running="cumulative"), "cumulative average"),
    "gamma": (dict(gamma="fixed to 1"), "fixed to 1"),
    "momentum_dtype": (dict(momentum_dtype="float32"), "float32"),
}


@pytest.mark.parametrize("field", spec.CONVENTION_FIELDS)
def test_each_field_is_measured_independently_of_the_claim(field):
    knobs, value = LIES[field]
    _, m = measure(**knobs)
    check = conv.compare(TORCH_LIKE, m)
    assert check[field]["agrees"] is False and check[field]["measured"] == pytest.approx(value)
    others = {f for f, c in check.items() if c["agrees"] is False} - {field}
    if field == "momentum_weighs":  # the 0.9 it keeps is the same decay 0.1 would give torch
        others.discard("default_momentum")
    assert not others, (field, others)


def test_several_steps_tell_apart_what_one_step_cannot():
    _, cma = measure(running="cumulative")
    assert cma["running_stats"] == "cumulative average" and cma["decays"][:2] == pytest.approx([0.0, 0.5])
    assert cma["default_momentum"] is None  # no constant momentum reproduces it
    _, none = measure(running="none")
    assert none["running_stats"] == "none" and none["eval"] == "batch statistics"
    _, erratic = measure(running="erratic")
    assert erratic["running_stats"].startswith("not an EMA: decays per step [0.5, 0.9, 0.5, 0.9]")


def test_a_crashing_layer_is_refused_as_not_batch_norm():
    with pytest.raises(conv.ProbeInputError, match="not a batch-norm layer.*RuntimeError: device lost"):
        measure(crash=True)


def test_a_layer_computing_in_float32_is_refused_saying_so():
    with pytest.raises(conv.ProbeInputError, match="does not compute in float64: its training output "
                                                   r"moves by \d\.\de-0[78]"):
        measure(float32=True)


def test_nan_output_is_never_measured_as_something_or_passed():
    with pytest.raises(conv.ProbeInputError, match="not a batch-norm layer"):
        measure(nan=True)  # NaN is never "invariant to a shift"
    obs, m = measure()
    lying = {**obs, "steps": [dict(obs["steps"][0], y=obs["steps"][0]["y"] * np.nan), *obs["steps"][1:]]}
    m_nan = conv.measure(lying)
    assert m_nan["default_eps"] is None and m_nan["gamma"] is None and m_nan["problems"]
    assert "skipped" in conv.agreement(lying, m_nan)
    obs["steps"][1]["dx"] = obs["steps"][1]["dx"] * np.nan
    a = conv.agreement(obs, m)
    assert math.isnan(a["dx"]["error"]) and a["dx"]["pass"] is False
    nan_claim = conv.compare(dict(TORCH_LIKE, default_eps=float("nan")), m)
    assert nan_claim["default_eps"]["agrees"] is False


def test_claims_come_from_documented_facts_and_constructor_arguments():
    torch_cma = spec.claims("torch-native", {"momentum": None, "eps": 1e-3})
    assert torch_cma["running_stats"] == "cumulative average" and torch_cma["default_momentum"] is None
    assert torch_cma["default_eps"] == 1e-3 and torch_cma["running_var"] == "unbiased"
    untracked = spec.claims("torch-native", {"track_running_stats": False})
    assert untracked["running_stats"] == "none" and untracked["initial_running_var"] is None
    gluon = spec.claims("mxnet-native", {"scale": False, "axis": 3, "running_variance_initializer": object()})
    assert (gluon["gamma"], gluon["layout"], gluon["initial_running_var"]) == ("fixed to 1", "NHWC", None)
    unknown = spec.claims(None, {"momentum": 0.5, "epsilon": 1e-4})
    assert unknown["default_momentum"] == 0.5 and unknown["default_eps"] == 1e-4
    assert unknown["momentum_weighs"] is None and unknown["running_var"] is None


def test_signature_arguments_and_missing_arguments():
    def layer(num_features, out_size, momentum=0.1, *, eps=1e-5):
        return None

    assert conv.signature_arguments(layer, (3,), {"out_size": 2}) == dict(
        num_features=3, out_size=2, momentum=0.1, eps=1e-5)
    with pytest.raises(conv.ProbeInputError, match="needs arguments it was not given: out_size"):
        conv.call_arguments(layer, (), {}, name="layer")
    args, kwargs, channels = conv.call_arguments(layer, (), {"out_size": 1, "num_features": 5}, name="layer")
    assert channels == 5 and kwargs == {"out_size": 1, "num_features": 5}
    with pytest.raises(conv.ProbeInputError, match="not a layer class or factory"):
        conv.call_arguments(np, (), {}, name="numpy")


@pytest.mark.parametrize("text, parsed", [
    ("torch:torch.nn.BatchNorm2d", ("torch", "torch.nn.BatchNorm2d", [], {})),
    ("torch:torch.nn.BatchNorm2d(momentum=None)", ("torch", "torch.nn.BatchNorm2d", [], {"momentum": None})),
    ("flax:flax.linen.BatchNorm(momentum=0.9, use_fast_variance=False)",
     ("jax", "flax.linen.BatchNorm", [], {"momentum": 0.9, "use_fast_variance": False})),
    ("torch:mypkg.layers:MyBN(4, axes=(0, 2))", ("torch", "mypkg.layers:MyBN", [4], {"axes": (0, 2)})),
])
def test_layer_specs_are_parsed_as_literals(text, parsed):
    t = conv.parse_layer(text)
    assert (t["backend"], t["path"], t["args"], t["kwargs"]) == parsed


@pytest.mark.parametrize("text, message", [
    ("torch.nn.BatchNorm2d", "expected FRAMEWORK"),
    ("tensorflow:tf.keras.layers.BatchNormalization", "unknown framework"),
    ("torch:torch.nn.BatchNorm2d(momentum=__import__('os').getpid())", "Python literals"),
    ("torch:torch.nn.BatchNorm2d(**{'momentum': 0.1})", "Python literals"),
    ("torch:torch.nn.BatchNorm2d(momentum=0.1", "cannot parse"),
    ("torch:torch.nn.Batch Norm2d", "not an import path"),
    ("torch:torch.nn.BatchNorm2d(3)(4)", "one (...)"),
])
def test_bad_layer_specs_are_one_line_value_errors(text, message):
    with pytest.raises(ValueError, match=message):
        conv.parse_layer(text)


def test_expectations_parse_and_compare_nan_safely():
    expected = conv.parse_expect("decay=0.99, running_var=biased,momentum_weighs=old,eps=1e-5")
    assert expected == {"decay": 0.99, "running_var": "biased", "momentum_weighs": OLD, "default_eps": 1e-5}
    measured = {"decay": 0.9, "running_var": "biased", "momentum_weighs": OLD, "default_eps": float("nan")}
    assert conv.unmet(expected, measured) == {"decay": (0.99, 0.9), "default_eps": (1e-5, measured["default_eps"])}
    assert conv.unmet({"decay": 0.9}, {"decay": None}) == {"decay": (0.9, None)}
    for bad in ("colour=red", "decay", "decay=inf"):
        with pytest.raises(ValueError, match="--expect"):
            conv.parse_expect(bad)


def test_the_report_fails_a_contradicted_or_unmeasurable_claim_and_shows_the_measured_value():
    from reports import conventions as report

    obs, _ = measure(unbiased=False)
    row = report.check_row("fake/native", TORCH_LIKE, obs)
    assert report.row_failures(row) == ["fake/native claims differ from the experiment: running_var"]
    md = report.markdown([row], {"mxnet_source_0.9_as_torch_source": 0.1, "steps": 5, "runs": {}},
                         lambda width: [])
    assert "| fake/native | new batch statistic ✓ |" in md and "unbiased ✗ (measured biased)" in md
    obs, _ = measure(running="none")
    failures = report.row_failures(report.check_row("fake/untracked", TORCH_LIKE, obs))
    assert len(failures) == 2 and "could not measure momentum_weighs, default_momentum" in failures[1]
    honest = report.check_row("fake/honest", TORCH_LIKE, measure()[0])
    assert report.row_failures(honest) == [] and "✗" not in report.cell(honest["check"]["gamma"])


def test_the_measured_precision_is_shown_a_refusal_is_listed_and_a_crash_fails():
    """The precision columns come from precision_probe's answer as it is: a refusal is listed
    with its reason and does not fail; a probe that crashed fails the report."""
    from types import SimpleNamespace

    from reports import conventions as report

    obs, _ = measure()
    probe = {"stats_dtype": "float16", "running_dtype": "float32", "output_dtype": "float16"}
    answer = {"native": {"observations": obs, "precision": {
        "float16": probe, "bfloat16": {"unsupported": "no bfloat16 kernel on this device"}}},
        "scratch": {"observations": obs, "precision": {
            "float16": {"error": "RuntimeError: boom"}, "bfloat16": dict(probe)}}}
    session = SimpleNamespace(
        live=lambda: ["fake"], log=lambda line: None, missing_rows=lambda width: [],
        args=SimpleNamespace(seed=0), info=lambda name: {"conventions": {}},
        call=lambda name, task, args: {"result": answer} if task == "conventions.probe" else {})
    section = report.run(session)
    assert section.failures == ["fake/scratch precision_probe float16: RuntimeError: boom"]
    assert "| fake/native | float16 | float32 | float16 | refused | refused | refused |" in section.markdown
    assert "| fake/scratch | error | error | error | float16 | float32 | float16 |" in section.markdown
    assert "- **fake/native** bfloat16: no bfloat16 kernel on this device" in section.markdown
