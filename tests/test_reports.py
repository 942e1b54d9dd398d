"""The reports' pure functions: every verdict is NaN-safe, and a result that lies or crashes
turns into a failure, with no child process and no framework."""
import math

import numpy as np
import pytest

import reports
from common import lenet
from common.reference import RESULT_KEYS, bn_step
from reports import agreement, render, train, trajectory

NAN = float("nan")


def test_worst_and_within_never_let_a_nan_pass():
    assert math.isnan(reports.worst([1e-3, NAN, 5.0]))
    assert math.isnan(reports.worst([NAN], 0.0)) and math.isnan(reports.worst([1.0], NAN))
    assert reports.worst([1e-3, 2e-3]) == 2e-3 and reports.worst([]) == 0.0
    assert not reports.within(NAN, 1e-10) and not reports.within(float("inf"), 1e-10)
    assert reports.within(1e-12, 1e-10) and not reports.within(1e-9, 1e-10)


def _agreement_results(corrupt=None):
    """Every float64 case answered by the reference itself; `corrupt(case, out)` lies."""
    cases = agreement.cases(0, ["float64"])
    refs = [agreement.reference(c) for c in cases]
    per_case = []
    for c in cases:
        out = {k: np.array(v) for k, v in agreement.reference(c).items()}
        if corrupt:
            corrupt(c, out)
        per_case.append({"out": out})
    return cases, refs, per_case


def test_agreement_passes_the_reference_and_fails_a_nan_in_any_quantity():
    cases, refs, per_case = _agreement_results()
    rows, _, _ = agreement.check_impl("fake", "scratch", per_case, cases, refs, {}, ["float64"])
    assert rows[0]["pass"], rows
    for q in RESULT_KEYS:
        def corrupt(case, out, q=q):
            out[q] = out[q].copy()
            out[q].flat[0] = NAN
        cases, refs, per_case = _agreement_results(corrupt)
        rows, _, _ = agreement.check_impl("fake", "scratch", per_case, cases, refs, {}, ["float64"])
        assert not rows[0]["pass"] and not rows[0]["errors"][q]["pass"], q
        assert math.isnan(rows[0]["errors"][q]["abs"])  # shown as nan, not hidden behind a number
        assert "nan" in render.cell(rows[0]["errors"][q]["abs"], False)


def test_agreement_with_nothing_compared_is_not_a_pass():
    cases, refs, _ = _agreement_results()
    skipped = [{"skipped": "not offered"} for _ in cases]
    rows, _, _ = agreement.check_impl("fake", "scratch", skipped, cases, refs, {}, ["float64"])
    assert not rows[0]["pass"] and rows[0]["failures"] == ["no case was compared"]


def test_pairwise_fails_on_nan():
    out = {"y": np.ones(3), "dx": np.ones(3), "dgamma": np.ones(1), "dbeta": np.ones(1),
           "running_mean": np.ones(1), "running_var": np.ones(1)}
    bad = dict(out, y=np.array([1.0, NAN, 1.0]))
    rows = agreement.pairwise({("a", "x", "float64"): {0: (out, False, 1.0)},
                               ("b", "x", "float64"): {0: (bad, False, 1.0)}}, ["float64"])
    assert len(rows) == 1 and not rows[0]["pass"] and math.isnan(rows[0]["max_diff"])


@pytest.mark.parametrize("field", ["final_loss", "train_acc", "test_acc"])
def test_training_with_a_non_finite_result_is_a_failure(field):
    good = {"final_loss": 0.5, "train_acc": 0.8, "test_acc": 0.8}
    assert train.problems("x/scratch", good) == []
    assert train.problems("x/scratch", dict(good, **{field: NAN}))
    assert train.problems("x/scratch", {"error": "boom"}) == ["x/scratch: boom"]


def test_a_refused_setting_is_listed_not_failed_but_a_crash_fails():
    refused = {"error": "UnsupportedSetting: no float16 GEMM on the CPU", "kind": "UnsupportedSetting"}
    assert train.unsupported(refused) and train.problems("x/native", refused) == []
    crashed = {"error": "RuntimeError: boom", "kind": "RuntimeError"}
    assert not train.unsupported(crashed) and train.problems("x/native", crashed)


def test_trajectory_fails_a_run_whose_losses_or_params_are_nan():
    """Runs answered by the reference itself pass; NaN in a loss or a parameter fails."""
    from common import lenet_reference

    params = lenet.init_params(0)
    rng = np.random.default_rng(0)
    batches = [(rng.random((8, 1, 28, 28)), rng.integers(0, 10, 8)) for _ in range(2)]
    good = lenet_reference.train(params, batches, lr=1.0, record=True)
    bad_loss = dict(good, losses=[good["losses"][0], NAN])
    history = [dict(h) for h in good["history"]]
    history[1]["fc3.bias"] = np.full(10, NAN)
    bad_param = dict(good, history=history, params=history[1])
    summary, failures = trajectory.summarise(
        {"a/scratch": good, "b/scratch": bad_loss, "c/scratch": bad_param}, params, batches,
        lr=1.0, dtype="float64", claimed={})
    assert summary["a/scratch"]["pass"] and not summary["b/scratch"]["pass"]
    assert not summary["c/scratch"]["pass"] and len(failures) == 2
    assert "history" not in summary["a/scratch"] and "params" not in summary["a/scratch"]


def test_md_table_escapes_pipes_and_newlines():
    table = render.md_table(["a|b"], [["x|y\nz"]])
    assert "a\\|b" in table and "x\\|y z" in table
