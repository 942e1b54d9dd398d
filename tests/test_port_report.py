"""The port report's pure functions, with no child process and no framework: the verdict on a
correct port (a target that lies or returns NaN fails it), mistakes flagged where they are not
found at their layer, round trips judged on the files' bytes, the fine-tuning drift and the
convention chain that attributes it. Expected values are written out here (or computed with
NumPy directly), not taken from the code under test."""
import math
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from common import checkpoint, data, divergence, lenet
from conftest import REPO
from reports import port, render

NAN = float("nan")
F32_09 = float(np.float32(0.9))  # 0.8999999761581421: MXNet's native layer applies momentum in float32
TORCH = {"momentum_weighs": "new batch statistic", "running_var": "unbiased"}
MXNET = {"momentum_weighs": "old running value", "running_var": "biased", "momentum_dtype": "float32"}
FLAX = {"momentum_weighs": "old running value", "running_var": "biased"}


def _acts(seed=0, n=4):
    rng = np.random.default_rng(seed)
    return {layer: rng.normal(size=(n,) + shape) for layer, shape in lenet.LAYER_SHAPES.items()}


def _evaluation(logits, logits64=None, target_acts=None, source_acts=None, tol=1e-4):
    """What the examine task returns for one file: the layers compared for real."""
    source_acts = source_acts or _acts()
    target_acts = target_acts or source_acts
    layers = {m: divergence.compare(source_acts, target_acts, tol=tol) for m in ("cascaded", "isolated")}
    return {"logits": logits, "logits64": logits if logits64 is None else logits64,
            "test_acc": 0.5, "layers": layers}


def _source(n=200, seed=1):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 10)).astype(np.float32)
    return {"logits": logits, "logits64": logits.astype(np.float64), "test_acc": 0.5}


PORT = {"applies": True, "changes": [], "fix_gamma": False}


def test_a_correct_port_that_agrees_passes():
    src = _source()
    row = port.port_row("torch", "jax", "correct", "float32", src,
                        _evaluation(src["logits"] + np.float32(2e-6), src["logits64"] + 1e-13), PORT)
    assert row["pass"] and row["problems"] == []
    assert row["max_abs_logit_diff"] == pytest.approx(2e-6, rel=0.2)
    assert row["argmax_agreement"] == 1.0 and row["first_divergent_layer"] is None


def test_a_lying_target_fails_the_correct_row():
    """Logits off by 1e-3 (ten times the float32 target): the row fails, saying why."""
    src = _source()
    lying = src["logits"].copy()
    lying[7] += 1e-3
    row = port.port_row("torch", "jax", "correct", "float32", src, _evaluation(lying), PORT)
    assert not row["pass"] and row["max_abs_logit_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert any("logits differ by" in p for p in row["problems"])


def test_a_correct_port_fails_on_argmax_float64_logits_or_a_divergent_layer():
    src = _source(n=1000)
    flipped = src["logits"].copy()
    flipped[:2] = flipped[:2, ::-1]  # two of 1000 predictions change: agreement 0.998 < 0.999
    row = port.port_row("a", "b", "correct", "float32", src, _evaluation(flipped, src["logits64"]), PORT)
    assert row["argmax_agreement"] == pytest.approx(0.998)
    assert any("argmax agreement" in p for p in row["problems"])
    row = port.port_row("a", "b", "correct", "float32", src,
                        _evaluation(src["logits"], src["logits64"] + 1e-9), PORT)
    assert not row["pass"] and any("float64 logits" in p for p in row["problems"])
    acts = _acts()
    moved = dict(acts, bn2=acts["bn2"] + 1e-3)
    row = port.port_row("a", "b", "correct", "float32", src,
                        _evaluation(src["logits"], target_acts=moved, source_acts=acts), PORT)
    assert not row["pass"] and row["first_divergent_layer"] == "bn2"
    assert "activations diverge at bn2 (cascaded)" in row["problems"]


@pytest.mark.parametrize("where", ["logits", "logits64", "activations"])
def test_nan_anywhere_fails_the_correct_row(where):
    src = _source()
    logits, logits64, acts = src["logits"].copy(), src["logits64"].copy(), _acts()
    target_acts = dict(acts)
    if where == "logits":
        logits[3, 4] = NAN
    elif where == "logits64":
        logits64[0, 0] = NAN
    else:
        target_acts["fc3"] = acts["fc3"].copy()
        target_acts["fc3"][0, 0] = NAN
    row = port.port_row("a", "b", "correct", "float32", src,
                        _evaluation(logits, logits64, target_acts, acts), PORT)
    assert not row["pass"], row["problems"]
    if where == "logits":
        assert math.isnan(row["max_abs_logit_diff"]) and math.isnan(row["argmax_agreement"])


def test_an_evaluation_that_crashed_fails_the_correct_row_and_is_kept_for_a_mistake():
    row = port.port_row("a", "b", "correct", "float32", _source(), {"error": "boom"}, PORT)
    assert row["pass"] is False and row["error"] == "boom"
    row = port.port_row("a", "b", "eps-default", "float32", _source(), {"error": "boom"}, PORT)
    assert "pass" not in row and row["error"] == "boom"


def test_a_mistake_found_elsewhere_than_its_layer_is_flagged():
    src, acts = _source(), _acts()
    at_fc1 = dict(acts, **{k: acts[k] + 1 for k in lenet.LAYERS[lenet.LAYERS.index("fc1"):]})
    row = port.port_row("torch", "jax", "no-flatten-permutation", "float32", src,
                        _evaluation(src["logits"] + 1, target_acts=at_fc1, source_acts=acts), PORT)
    assert row["first_divergent_layer"] == "fc1" and "flag" not in row and "pass" not in row
    row = port.port_row("torch", "jax", "kernel-reshaped", "float32", src,
                        _evaluation(src["logits"] + 1, target_acts=at_fc1, source_acts=acts), PORT)
    assert row["flag"] == "expected at conv1, found fc1 (cascaded) / fc1 (isolated)"
    row = port.port_row("torch", "jax", "eps-default", "float32", src, _evaluation(src["logits"]), PORT)
    assert row["flag"] == "expected at bn1, found none (cascaded) / none (isolated)"
    row = port.port_row("torch", "jax", "eps-default", "float32", src, _evaluation(src["logits"]),
                        dict(PORT, applies=False))
    assert row["expected_layer"] is None and "flag" not in row and "max_abs_logit_diff" not in row


def _checkpoint(path, data_bytes=b"weights", sidecar=b'{"x": 1}'):
    path.write_bytes(data_bytes)
    checkpoint.sidecar_path(path).write_bytes(sidecar)
    return path


def test_round_trip_is_judged_on_both_files_bytes(tmp_path):
    a = _checkpoint(tmp_path / "a.pt")
    assert port.round_trip(a, _checkpoint(tmp_path / "b.pt"))["pass"]
    r = port.round_trip(a, _checkpoint(tmp_path / "c.pt", b"weightz"))
    assert not r["pass"] and not r["weights_identical"] and r["sidecar_identical"]
    r = port.round_trip(a, _checkpoint(tmp_path / "d.pt", sidecar=b'{"x": 2}'))
    assert not r["pass"] and r["weights_identical"] and not r["sidecar_identical"]
    r = port.round_trip(a, tmp_path / "missing.pt")
    assert not r["pass"] and "missing.pt" in r["error"]


def _run(params, logits):
    return {"params": params, "logits": logits}


def test_drift_measures_each_quantity_and_keeps_nan():
    p = lenet.init_params(0)
    q = {k: v.copy() for k, v in p.items()}
    q["bn2.running_mean"][3] += 0.25
    q["bn3.running_var"][0] *= 1.5  # init running_var is 1: relative change 0.5
    q["fc2.weight"][1, 1] -= 0.125
    logits = np.zeros((4, 10))
    moved = logits.copy()
    moved[1, 2] = 0.75  # the argmax of example 1 changes: 3 of 4 agree
    d = port.drift(_run(p, logits), _run(q, moved))
    assert d == {"running_mean": 0.25, "running_var_rel": 0.5, "weights": 0.125, "logits": 0.75,
                 "argmax_agreement": 0.75}
    q["bn1.running_var"][0] = NAN
    assert math.isnan(port.drift(_run(p, logits), _run(q, logits))["running_var_rel"])
    moved[0, 0] = NAN
    d = port.drift(_run(p, logits), _run(p, moved))
    assert math.isnan(d["logits"]) and math.isnan(d["argmax_agreement"])


def test_convention_chain_changes_one_setting_at_a_time():
    chain = port.convention_chain({"decay": 0.9, "unbiased": True}, {"decay": 0.9, "unbiased": False},
                                  TORCH, MXNET)
    assert [(d, u) for _, d, u in chain] == [(0.9, True), (0.9, False), (F32_09, False)]
    assert [port.cause_of(label) for label, _, _ in chain[1:]] == ["variance estimator",
                                                                  "float32 momentum"]
    # MXNet's 0.9 copied into PyTorch (weighing the new batch) means decay 0.1 there
    chain = port.convention_chain({"decay": 0.9, "unbiased": False}, {"decay": 0.1, "unbiased": True},
                                  MXNET, TORCH)
    assert [(d, u) for _, d, u in chain] == [(F32_09, False), (0.9, False), (0.9, True), (0.1, True)]
    assert [port.cause_of(label) for label, _, _ in chain[1:]] == [
        "float32 momentum", "variance estimator", "momentum meaning"]
    same = port.convention_chain({"decay": 0.9, "unbiased": False}, {"decay": 0.9, "unbiased": False},
                                 FLAX, FLAX)
    assert same == [("source, as its layer runs", 0.9, False)]


def _tuned(seed, shift=0.0):
    rng = np.random.default_rng(seed)
    p = lenet.init_params(0)
    return {"params": p, "logits": rng.normal(size=(6, 10)) + shift, "losses": [1.0, 0.9],
            "test_acc": 0.5}


def test_fine_tune_row_splits_the_drift_by_cause():
    chain = [("source", 0.9, True), ("variance estimator: unbiased -> biased", 0.9, False)]
    base = _tuned(0)
    other = _tuned(0, shift=0.5)  # what the variance estimator alone changes
    runs = {(0.9, True): base, (0.9, False): other}
    src = {"float64": base, "float32": _tuned(0, shift=0.01)}
    tgt = {"float64": dict(other, logits=other["logits"] + 1e-13), "float32": _tuned(0, shift=0.52)}
    row = port.fine_tune_row("torch", "jax", "correct", chain, runs, src, tgt)
    assert [s["cause"] for s in row["steps"]] == ["variance estimator: unbiased -> biased"]
    assert row["steps"][0]["logits"] == pytest.approx(0.5)
    assert row["conventions"]["logits"] == pytest.approx(0.5)
    assert row["unexplained_float64"]["logits"] == pytest.approx(1e-13, rel=0.05)
    assert row["float32"]["logits"] == pytest.approx(0.51)
    assert row["float64"]["test_acc_from"] == 0.5
    missing = port.fine_tune_row("torch", "jax", "correct", chain, {(0.9, True): base}, src, tgt)
    assert missing["error"] == "not run"
    crashed = port.fine_tune_row("torch", "jax", "correct", chain, runs, src,
                                 {"float32": {"error": "boom"}, "float64": {"error": "boom"}})
    assert "boom" in crashed["error"]


def test_fine_tuning_that_is_not_finite_is_a_problem():
    good = _tuned(0)
    assert port.fine_tune_problems("x", {"float32": good}) == []
    assert port.fine_tune_problems("x", {"float32": dict(good, losses=[1.0, NAN])})
    bad_logits = dict(good, logits=np.full((6, 10), np.inf))
    assert port.fine_tune_problems("x", {"float64": bad_logits}) == [
        "x float64: fine-tuning loss or logits not finite"]
    assert port.fine_tune_problems("x", {"float32": {"error": "boom"}, "float64": {"error": "boom"}}) == [
        "x float32: boom"]


def test_plan_is_fits_batches_then_the_next_full_batches():
    train_idx, tune = port.plan(1000, 256, seed=3, epochs=2, steps=5)
    assert len(train_idx) == 8 and [len(i) for i in train_idx[:4]] == [256, 256, 256, 232]
    want = data.batch_indices(1000, 256, seed=3, epoch=0)
    assert all(np.array_equal(a, b) for a, b in zip(train_idx, want))
    # epoch 2 has three full batches, epoch 3 gives the other two
    want = (data.batch_indices(1000, 256, seed=3, epoch=2, drop_last=True)
            + data.batch_indices(1000, 256, seed=3, epoch=3, drop_last=True))[:5]
    assert len(tune) == 5 and all(np.array_equal(a, b) for a, b in zip(tune, want))


def test_only_the_reports_own_checkpoints_are_cleared(tmp_path):
    names = ["torch.pt", "torch.pt.bn.json", "jax-to-mxnet.params", "mxnet-to-jax.msgpack.bn.json"]
    keep = ["notes.txt", "torch-finetuned.pt", "my.msgpack"]
    for n in names + keep:
        (tmp_path / n).write_text("x")
    port._clear(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def _fake_session(tmp_path):
    args = types.SimpleNamespace(no_plots=True, out=str(tmp_path))
    return types.SimpleNamespace(out=tmp_path, args=args, train_size=100,
                                 live=lambda: ["torch", "jax"], missing_rows=lambda width: [],
                                 plot_path=lambda n: tmp_path / n)


def test_a_failing_correct_port_fails_the_report_section(tmp_path):
    """Sources torch and jax, each correct port evaluated; jax's evaluation of torch's port
    lies by 1e-3."""
    src = {k: dict(_source(seed=i), acts=_acts(), losses=[2.0, 1.0], path="",
                   checkpoint={"bn_config": {"eps": 1e-5, "decay": 0.9, "unbiased": False}},
                   finetune={}) for i, k in enumerate(("torch", "jax"))}
    ports = {(s, t, k): dict(PORT, bn_config={}, applies=k == "correct")
             for s, t in (("torch", "jax"), ("jax", "torch")) for k in port.KINDS}
    lying = src["torch"]["logits"] + np.float32(1e-3)
    examined = {"jax": {"evaluate": {("torch", "jax", "correct"): _evaluation(
                    lying, src["torch"]["logits64"])}},
                "torch": {"evaluate": {("jax", "torch", "correct"): _evaluation(
                    src["jax"]["logits"], src["jax"]["logits64"])}}}
    cfg = {"dtype": "float32", "limit_test": None, "epochs": 1, "batch_size": 8, "lr": 1.0,
           "device": "cpu", "steps": 2}
    chain = [("source", 0.9, True), ("variance estimator: unbiased -> biased", 0.9, False)]
    base, other = _tuned(0), _tuned(0, shift=0.5)
    tuned = [port.fine_tune_row("torch", "jax", "correct", chain,
                                {(0.9, True): base, (0.9, False): other},
                                {"float32": base, "float64": base}, {"float32": other, "float64": other})]
    section = port._section(_fake_session(tmp_path), cfg, src, ports, examined,
                            [{"from": "torch", "via": "jax", "pass": True}], (tuned, []), "mxnet")
    assert len(section.failures) == 1, section.failures
    assert section.failures[0].startswith("torch->jax correct: logits differ")
    rows = {(r["from"], r["to"]): r for r in section.payload["rows"] if r["kind"] == "correct"}
    assert not rows["torch", "jax"]["pass"] and rows["jax", "torch"]["pass"]
    assert f"{render.FAIL} logits differ" in section.markdown and render.PASS in section.markdown
    md = section.markdown
    assert "mxnet's from-scratch layer also runs" in md and "| torch→jax correct | convention: " \
        "variance estimator: unbiased -> biased | 0 | 0 | 0 | 0.5 | 1.0000 |  |" in md
    assert "- **variance estimator** (measured alone, float64, one framework)" in md


def test_a_source_whose_training_diverged_fails_the_section(tmp_path):
    src = {"torch": dict(_source(), acts=_acts(), losses=[2.0, NAN], path="", finetune={},
                         checkpoint={"bn_config": {"eps": 1e-5, "decay": 0.9, "unbiased": True}}),
           "jax": {"error": "RuntimeError: out of memory"}}
    cfg = {"dtype": "float32", "limit_test": None, "epochs": 1, "batch_size": 8, "lr": 1.0,
           "device": "cpu", "steps": 2}
    section = port._section(_fake_session(tmp_path), cfg, src, {}, {}, [], ([], []), None)
    assert section.failures == ["torch: training loss not finite (nan)",
                                "jax: training or saving failed: RuntimeError: out of memory"]


def test_port_refuses_an_out_whose_port_entry_is_a_file(tmp_path, sample_dir):
    (tmp_path / "port").write_text("not a directory")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "compare.py", "port", "--quick", "--data", str(sample_dir),
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - t0 < 5
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "is not a directory" in proc.stderr and "loading" not in proc.stderr
