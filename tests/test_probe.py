"""`compare.py probe` and the experiment behind it on real layers: each framework's native layer
measures as its documentation says, momentum=None is a cumulative average,
track_running_stats=False keeps no statistics, and for every conventions field a lying layer
(its signature or documented family claims one thing, its arithmetic does another) gets ✗ with
the measured value. Expected values here come from the frameworks' documentation
(../shared/docs/CONVENTIONS.md), not from the code under test."""
import json
import os
import subprocess
import sys

import pytest

from common import conventions as conv
from common.spec import NEW, OLD
from conftest import REPO, load_backend
from reports.conventions import cell

TESTS = os.path.dirname(os.path.abspath(__file__))


def _probe(backend, factory, kwargs=None, name="layer"):
    b = load_backend(backend)
    r = b.experiment(factory, (), kwargs or {}, name=name)
    m = conv.measure(r["observations"])
    return r, m, conv.compare(r["claimed"], m)


def _cli(*argv, env=None, timeout=300):
    return subprocess.run([sys.executable, "compare.py", "probe", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


TORCH_NATIVE = dict(momentum_weighs=NEW, default_momentum=0.1, default_eps=1e-5, running_var="unbiased",
                    stats_update="forward", layout="NCHW", initial_running_var=1.0, running_stats="EMA",
                    gamma="learnable", momentum_dtype="float64")


def _assert_measured(m, expected):
    for field, value in expected.items():
        assert m[field] == (pytest.approx(value, abs=1e-6) if isinstance(value, float) else value), \
            (field, m[field], m["problems"])


@pytest.mark.parametrize("cls, layout", [("BatchNorm2d", "NCHW"), ("BatchNorm1d", "NC"),
                                         ("LazyBatchNorm2d", "NCHW")])
def test_torch_native_layers_measure_as_documented(cls, layout):
    torch = load_backend("torch") and __import__("torch")
    r, m, check = _probe("torch", getattr(torch.nn, cls), name=f"torch.nn.{cls}")
    _assert_measured(m, dict(TORCH_NATIVE, layout=layout))
    assert m["decay"] == pytest.approx(0.9, abs=1e-12) and r["family"] == "torch-native"
    assert all(c["agrees"] is not False for c in check.values())
    agreement = conv.agreement(r["observations"], m)
    assert all(a["pass"] for a in agreement.values()), agreement


def test_torch_momentum_none_is_a_cumulative_average():
    torch = load_backend("torch") and __import__("torch")
    r, m, check = _probe("torch", torch.nn.BatchNorm2d, {"momentum": None})
    assert m["running_stats"] == "cumulative average" and check["running_stats"]["agrees"] is True
    assert m["decays"] == pytest.approx([0.0, 1 / 2, 2 / 3, 3 / 4], abs=1e-12)
    assert m["default_momentum"] is None and m["momentum_weighs"] == NEW  # from the explicit runs
    assert all(a["pass"] for a in conv.agreement(r["observations"], m).values())


def test_torch_without_running_stats_is_none_and_eval_uses_the_batch():
    torch = load_backend("torch") and __import__("torch")
    r, m, check = _probe("torch", torch.nn.BatchNorm2d, {"track_running_stats": False})
    assert (m["running_stats"], m["eval"]) == ("none", "batch statistics")
    assert check["running_stats"]["agrees"] is True
    assert all(c["agrees"] is not False for c in check.values())
    assert "skipped" in conv.agreement(r["observations"], m)["running_mean"]


def test_flax_batchnorm_with_arguments_measures_as_documented():
    load_backend("jax")
    import flax.linen as nn

    r, m, check = _probe("jax", nn.BatchNorm, {"momentum": 0.9, "epsilon": 1e-3, "use_fast_variance": False})
    _assert_measured(m, dict(momentum_weighs=OLD, default_momentum=0.9, default_eps=1e-3, running_var="biased",
                             stats_update="returned by apply", layout="NHWC", initial_running_var=1.0,
                             running_stats="EMA", gamma="learnable", momentum_dtype="float64"))
    assert all(c["agrees"] is True for c in check.values()), check
    assert all(a["pass"] for a in conv.agreement(r["observations"], m).values())


@pytest.mark.parametrize("kwargs, gamma", [({}, "learnable"), ({"scale": False}, "fixed to 1")])
def test_gluon_batchnorm_measures_as_documented(kwargs, gamma):
    load_backend("mxnet")
    from mxnet.gluon import nn

    r, m, check = _probe("mxnet", nn.BatchNorm, kwargs)
    _assert_measured(m, dict(momentum_weighs=OLD, default_momentum=0.9, default_eps=1e-5, running_var="biased",
                             stats_update="backward", layout="NCHW", initial_running_var=1.0,
                             running_stats="EMA", gamma=gamma, momentum_dtype="float32"))
    assert m["decay"] == float(__import__("numpy").float32(0.9))  # resolved from 0.9 in float64
    assert all(c["agrees"] is True for c in check.values()), check


@pytest.fixture(scope="module")
def lying_torch():
    load_backend("torch")
    import lying_torch

    return lying_torch


@pytest.mark.parametrize("field", conv.spec.CONVENTION_FIELDS)
def test_a_torch_layer_lying_about_a_field_gets_a_cross_with_the_measured_value(field, lying_torch):
    cls, value = lying_torch.LIARS[field]
    r, m, check = _probe("torch", cls, name=cls.__name__)
    assert check[field]["agrees"] is False, (check[field], m["problems"])
    assert check[field]["measured"] == (pytest.approx(value, abs=1e-9) if isinstance(value, float) else value)
    shown = cell(check[field])
    assert "✗ (measured " in shown and str(value if not isinstance(value, float) else "") in shown
    assert not [f for f, c in check.items() if f != field and c["agrees"] is False], check


def test_a_layer_with_a_rule_less_decay_is_not_an_ema(lying_torch):
    r, m, check = _probe("torch", lying_torch.Erratic)
    assert check["running_stats"]["agrees"] is False
    assert m["running_stats"] == "not an EMA: decays per step [0.9, 0.5, 0.9, 0.5]"


def test_a_factory_is_probed_like_a_class(lying_torch):
    r, m, check = _probe("torch", lying_torch.hand_written, name="hand_written")
    assert r["family"] == "torch-native" and m["running_stats"] == "EMA"
    assert "no momentum argument" in " ".join(m["problems"]) and m["momentum_weighs"] is None


@pytest.mark.parametrize("backend, module, name, field, value", [
    ("jax", "lying_flax", "KeepsLess", "default_momentum", 0.9),
    ("jax", "lying_flax", "UnbiasedRunningVar", "running_var", "unbiased"),
    ("mxnet", "lying_gluon", "LargerEps", "default_eps", 1e-3),
    ("mxnet", "lying_gluon", "FixedGamma", "gamma", "fixed to 1"),
])
def test_lying_flax_modules_and_gluon_blocks(backend, module, name, field, value):
    load_backend(backend)
    _, m, check = _probe(backend, getattr(__import__(module), name), name=name)
    assert check[field]["agrees"] is False and check[field]["measured"] == pytest.approx(value)
    assert [f for f, c in check.items() if c["agrees"] is False] == [field]


# -- the command line ------------------------------------------------------------------------------
def _task(spec):
    """What `compare.py probe SPEC` runs in the child, run here (same task function)."""
    from reports.conventions import task_layer

    return task_layer(load_backend(conv.parse_layer(spec)["backend"]), {"layer": spec, "seed": 0})


@pytest.mark.parametrize("spec, shown, running", [
    ("torch:torch.nn.BatchNorm2d(momentum=None)", "cumulative average ✓", "a cumulative average"),
    ("torch:torch.nn.BatchNorm2d(track_running_stats=False)", "none ✓", "none: the layer keeps no"),
    ("mxnet:mxnet.gluon.nn.BatchNorm(scale=False)", "fixed to 1 ✓", "an EMA with canonical decay 0.8999999762"),
])
def test_probe_prints_one_conventions_row_and_what_its_statistics_are(spec, shown, running):
    from reports import probe

    text = probe.markdown(probe.analyse(spec, _task(spec), {}))
    rows = [line for line in text.splitlines() if line.startswith("| ") and "momentum_weighs" not in line]
    assert shown in rows[0] and f"Running statistics: {running}" in text, text


BAD_IN_CHILD = {
    "no such attribute": ("torch:torch.nn.NoSuchNorm", "has no attribute 'NoSuchNorm'"),
    "a function that needs arguments": ("torch:torch.nn.functional.batch_norm", "needs arguments it was not given"),
    "builds no module": ("torch:builtins.dict", "not a torch.nn.Module"),
    "needs arguments": ("torch:torch.nn.Linear", "needs arguments it was not given: in_features, out_features"),
    "a bad argument value": ("torch:torch.nn.BatchNorm2d(num_features='three')", "num_features must be an int"),
    "unimportable module": ("torch:lying_torch_missing.Layer", "no importable module"),
}


@pytest.mark.parametrize("case", BAD_IN_CHILD)
def test_what_cannot_be_probed_comes_back_as_one_line_of_bad_input(case):
    spec, message = BAD_IN_CHILD[case]
    result = _task(spec)
    assert set(result) == {"bad_input"} and message in result["bad_input"], result
    assert "\n" not in result["bad_input"]


def test_cli_probe_of_the_native_torch_layer_as_json():
    load_backend("torch")
    proc = _cli("torch:torch.nn.BatchNorm2d", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    _assert_measured(r["measured"], TORCH_NATIVE)
    assert all(c["agrees"] is True for c in r["check"].values())
    assert all(a["pass"] for a in r["agreement"].values())
    assert {t["convention"]: t["momentum"] for t in r["translation"]}["mxnet-native"] == pytest.approx(0.9)


def test_cli_shows_a_lying_layer_s_cross_with_the_measured_value():
    load_backend("torch")
    proc = _cli("torch:lying_torch:KeepsMore", env={"PYTHONPATH": TESTS})
    assert proc.returncode == 0, proc.stderr
    row = [line for line in proc.stdout.splitlines() if line.startswith("| lying_torch:KeepsMore(")][0]
    assert "0.1 ✗ (measured 0.2)" in row and row.count("✗") == 1, proc.stdout


def test_cli_expect_exits_1_naming_only_the_differing_fields():
    load_backend("jax")
    bad = _cli("flax:flax.linen.BatchNorm(momentum=0.9, use_fast_variance=False)",
               "--expect", "decay=0.99,running_var=unbiased,gamma=learnable,stats_update=returned by apply")
    assert bad.returncode == 1, bad.stderr
    last = bad.stderr.strip().splitlines()[-1]
    assert "decay=0.99 (measured 0.9)" in last and "running_var=unbiased (measured biased)" in last
    assert "gamma" not in last and "stats_update" not in last and "Traceback" not in bad.stderr
    assert "### --expect not met" in bad.stdout


def test_expect_that_holds_is_not_reported():
    from reports import probe

    spec = "torch:torch.nn.BatchNorm2d"
    report = probe.analyse(spec, _task(spec), conv.parse_expect("decay=0.9,momentum=0.1,running_var=unbiased"))
    assert report["unmet"] == {}


BAD = {
    "no framework prefix": (["torch.nn.BatchNorm2d"], "expected FRAMEWORK"),
    "unknown framework": (["tf:tf.keras.layers.BatchNormalization"], "unknown framework"),
    "not a literal": (["torch:torch.nn.BatchNorm2d(momentum=float('nan'))"], "Python literals"),
    "unknown expect field": (["torch:torch.nn.BatchNorm2d", "--expect", "colour=red"], "unknown field"),
    "negative seed": (["torch:torch.nn.BatchNorm2d", "--seed", "-1"], "--seed"),
    "missing interpreter": (["torch:torch.nn.BatchNorm2d", "--python", "/no/such/python"], "does not exist"),
    "no layer": ([], "the following arguments are required"),
    "zero timeout": (["torch:torch.nn.BatchNorm2d", "--timeout", "0"], "--timeout"),
    # these two start the framework's process, which refuses them
    "unimportable (in the child)": (["torch:no_such_package.layers.BN"], "no importable module"),
    "not batch norm (in the child)": (["torch:torch.nn.Linear(in_features=3, out_features=3)"],
                                      "not a batch-norm layer"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_with_one_line(case):
    argv, message = BAD[case]
    proc = _cli(*argv)
    lines = [line for line in proc.stderr.strip().splitlines() if "probing" not in line]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and message in lines[0] and proc.stdout == "", proc.stderr


def test_an_unavailable_framework_exits_1_with_the_reason(tmp_path):
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise OSError('libtorch_cpu.so: cannot open shared object')\n")
    proc = _cli("torch:torch.nn.BatchNorm2d", env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "unavailable" in proc.stderr and "libtorch_cpu.so" in proc.stderr


@pytest.mark.parametrize("body, message", [
    ("exec sleep 60", "no result within 2 s; the child process was killed"),
    ("echo 'Segmentation fault' >&2; exit 139", "child exited with code 139"),
])
def test_a_hanging_or_crashing_framework_process_exits_1_in_one_line(tmp_path, body, message):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\n" + body + "\n")
    fake.chmod(0o755)
    proc = _cli("torch:torch.nn.BatchNorm2d", "--python", str(fake), "--timeout", "2", timeout=30)
    lines = [line for line in proc.stderr.strip().splitlines() if "probing" not in line]
    assert proc.returncode == 1 and len(lines) == 1 and message in lines[0], proc.stderr


def test_help_of_compare_names_the_subcommand_and_probe_help_lists_the_exit_codes():
    top = subprocess.run([sys.executable, "compare.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert top.returncode == 0 and "probe" in top.stdout
    proc = _cli("--help")
    assert proc.returncode == 0 and "--expect" in proc.stdout and "exit status" in proc.stdout
