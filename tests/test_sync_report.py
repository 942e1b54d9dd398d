"""The sync report's pure parts, with no child process and no framework: the unweighted
convention model (checked by finite differences and by an independent formula), NaN-safe
verdicts, results that lie or crash, the settings' one-line errors, and the child task on a
fake engine that fails mid-way."""
import math
import types

import numpy as np
import pytest

import backends
from backends.pool import WorkerError
from common import lenet, lenet_reference
from common import sync as cs
from common.reference import random_case
from reports import sync as rs

NAN = float("nan")


def _case(shape=(12, 3, 2, 2), sizes=(8, 4), dtype="float64", seed=0, **extra):
    c = random_case(shape, seed=seed, dtype=np.dtype(dtype), mean=3.0, scale=2.0)
    return {"world_size": len(sizes), "kind": "unequal", "sizes": list(sizes), "dtype": dtype,
            "shape": "4-D" if len(shape) == 4 else "2-D", **c, **extra}


def _inputs(case):
    return dict(xs=cs.split(case["x"], case["sizes"]), dys=cs.split(case["dy"], case["sizes"]),
                **{k: case[k] for k in ("gamma", "beta", "running_mean", "running_var")})


def _copy(out):
    return {k: [np.array(a) for a in v] if k in cs.SHARDED_KEYS else np.array(v)
            for k, v in out.items()}


# -- the unweighted convention model --------------------------------------------------------------
def test_unweighted_model_equals_the_full_batch_reference_on_equal_shards():
    inputs = _inputs(_case(sizes=(4, 4, 4)))
    errs = cs.errors(cs.unweighted_reference_step(**inputs),
                     cs.reference_step(**inputs, training=True))
    assert max(errs.values()) <= 1e-14, errs


def test_unweighted_model_statistics_are_the_average_of_per_worker_moments():
    """Independently: mean = average of the shards' means, var = average of the shards'
    E[(x − mean)²], each shard counting 1/W; and it is not the full-batch statistics."""
    case = _case(shape=(10, 3), sizes=(7, 3))
    xs = cs.split(case["x"], case["sizes"])
    mean = np.mean([x.mean(axis=0) for x in xs], axis=0)
    var = np.mean([((x - mean) ** 2).mean(axis=0) for x in xs], axis=0)
    out = cs.unweighted_reference_step(**_inputs(case), eps=1e-5, decay=0.9)
    np.testing.assert_allclose(out["running_mean"], 0.9 * case["running_mean"] + 0.1 * mean,
                               rtol=0, atol=1e-14)
    np.testing.assert_allclose(out["running_var"], 0.9 * case["running_var"] + 0.1 * var,
                               rtol=0, atol=1e-14)
    y = case["gamma"] * (case["x"] - mean) / np.sqrt(var + 1e-5) + case["beta"]
    np.testing.assert_allclose(np.concatenate(out["y"]), y, rtol=0, atol=1e-13)
    full = cs.reference_step(**_inputs(case), training=True)
    assert max(cs.errors(out, full)[k] for k in ("y", "running_mean")) > 1e-3


def test_unweighted_model_gradient_matches_finite_differences():
    case = _case(shape=(5, 2, 2, 1), sizes=(3, 2))
    inputs = _inputs(case)
    out = cs.unweighted_reference_step(**inputs)

    def loss(x, gamma):
        xs = cs.split(x, case["sizes"])
        y = cs.unweighted_reference_step(**dict(inputs, xs=xs, gamma=gamma))["y"]
        return float(np.sum(np.concatenate(y) * case["dy"]))

    h = 1e-6
    for name, arr, got in (("x", case["x"], np.concatenate(out["dx"])),
                           ("gamma", case["gamma"], out["dgamma"])):
        num = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            up, down = arr.copy(), arr.copy()
            up[i] += h
            down[i] -= h
            args = (up, case["gamma"]) if name == "x" else (case["x"], up)
            args_down = (down, case["gamma"]) if name == "x" else (case["x"], down)
            num[i] = (loss(*args) - loss(*args_down)) / (2 * h)
        np.testing.assert_allclose(got, num, rtol=0, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(out["dbeta"], case["dy"].sum(axis=(0, 2, 3)), rtol=1e-14)


def test_unweighted_model_with_an_empty_shard_is_nan_but_dbeta():
    out = cs.unweighted_reference_step(**_inputs(_case(sizes=(8, 4, 0))))
    assert all(np.isnan(np.concatenate(out[k])).all() for k in ("y", "dx"))
    assert all(np.isnan(out[k]).all() for k in ("dgamma", "running_mean", "running_var"))
    assert np.isfinite(out["dbeta"]).all()


def test_model_errors_accept_only_the_predicted_nans():
    model = cs.unweighted_reference_step(**_inputs(_case(sizes=(8, 4, 0))))
    assert max(cs.model_errors(model, model).values()) == 0.0
    finite = _copy(model)
    finite["y"][0][...] = 1.0  # a number where the convention predicts NaN
    assert math.isnan(cs.model_errors(finite, model)["y"])
    ok = cs.unweighted_reference_step(**_inputs(_case(sizes=(8, 4))))
    nan = _copy(ok)
    nan["dx"][1][0, 0, 0, 0] = NAN  # a NaN where it predicts a number
    assert math.isnan(cs.model_errors(nan, ok)["dx"])
    assert cs.model_errors(dict(ok, y=ok["y"][:1]), ok)["y"] == math.inf


# -- verdicts on one step -----------------------------------------------------------------------
def _answer(case, model=False, unbiased=False):
    f = cs.unweighted_reference_step if model else cs.reference_step
    kw = {} if model else {"training": True, "unbiased": unbiased}
    return {"out": _copy(f(**_inputs(case), **kw)), "unbiased": unbiased}


@pytest.mark.parametrize("impl", ["scratch", "native"])
def test_a_result_equal_to_the_reference_passes(impl):
    for dtype in ("float64", "float32"):
        case = _case(dtype=dtype)
        res = _answer(case)
        res["out"] = {k: [a.astype(dtype) for a in v] if k in cs.SHARDED_KEYS else v.astype(dtype)
                      for k, v in res["out"].items()}
        row = rs.check_step(impl, case, res)
        assert row["status"] == "pass" and "failure" not in row, row


@pytest.mark.parametrize("key", ["y", "dx", "dgamma", "dbeta", "running_mean", "running_var"])
def test_a_nan_or_a_small_error_in_any_quantity_fails_ours(key):
    case = _case()
    for bad in (NAN, 1e-9):
        res = _answer(case)
        target = res["out"][key][0] if key in cs.SHARDED_KEYS else res["out"][key]
        target.flat[0] = NAN if bad != bad else target.flat[0] + bad
        row = rs.check_step("scratch", case, res)
        assert row["status"] == "fail" and "failure" in row and key in row["message"], row
        assert not rs.within(row["worst"], row["tolerance"])


def test_ours_in_the_wrong_dtype_fails():
    case = _case()
    res = _answer(case)
    res["out"]["dgamma"] = res["out"]["dgamma"].astype(np.float32)
    row = rs.check_step("scratch", case, res)
    assert row["status"] == "fail" and "float32" in row["failure"]


def test_a_native_on_the_unweighted_convention_is_labelled_not_failed():
    case = _case(sizes=(9, 3))
    row = rs.check_step("native", case, _answer(case, model=True))
    assert row["status"] == "convention" and "failure" not in row, row
    assert row["worst"] > 1e-3 and row["model_worst"] <= 1e-12
    assert "unweighted" in row["convention"]
    # the same numbers from OUR engine are a failure: ours must weigh by count
    assert rs.check_step("scratch", case, _answer(case, model=True))["status"] == "fail"


def test_a_native_with_an_empty_shard_is_nan_as_the_convention_predicts():
    case = _case(sizes=(8, 4, 0))
    row = rs.check_step("native", case, _answer(case, model=True))
    assert row["status"] == "convention" and math.isnan(row["worst"]), row
    assert "0/0" in row["convention"]


def test_a_native_that_matches_neither_fails():
    case = _case(sizes=(9, 3))
    res = _answer(case, model=True)
    res["out"]["running_var"] = res["out"]["running_var"] + 1e-3
    row = rs.check_step("native", case, res)
    assert row["status"] == "fail" and "failure" in row
    nan = _answer(case)
    nan["out"]["dx"][0].flat[0] = NAN
    assert rs.check_step("native", case, nan)["status"] == "fail"
    # run with its own unbiased variance, it is held to the reference alone
    unb = _answer(case, unbiased=True)
    unb["out"]["y"][0] += 1e-6
    assert rs.check_step("native", case, unb)["status"] == "fail"


def test_platform_limits_of_a_native_are_rows_and_of_ours_failures():
    case = _case()
    for status in ("unavailable", "unsupported"):
        row = rs.check_step("native", case, {status: "needs CUDA"})
        assert row["status"] == status and row["message"] == "needs CUDA" and "failure" not in row
        assert "failure" in rs.check_step("scratch", case, {status: "needs CUDA"})
    for impl in ("native", "scratch"):
        assert "failure" in rs.check_step(impl, case, {"error": "RuntimeError: boom"})
        assert "failure" in rs.check_step(impl, case, {})
        lying = _answer(case)
        del lying["out"]["dx"]
        assert rs.check_step(impl, case, lying)["status"] == "fail"


def test_check_steps_names_each_failure():
    case = _case()
    bad = _answer(case)
    bad["out"]["y"][1].flat[0] += 1.0
    rows, failures = rs.check_steps("fake", [case], [{"scratch": bad, "native": {"unavailable": "x"}}])
    assert [r["status"] for r in rows] == ["fail", "unavailable"]
    assert len(failures) == 1 and failures[0].startswith("fake/scratch float64 4-D 8+4: y")


# -- verdicts on training ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def training_ref():
    params = lenet.init_params(0)
    rng = np.random.default_rng(0)
    batches = [(rng.random((8, 1, 28, 28)), rng.integers(0, 10, 8)) for _ in range(2)]
    return lenet_reference.train(params, batches, lr=1.0)


def _run(sync=True, w=2):
    return {"world_size": w, "sync": sync, "kind": "equal", "sizes": [4] * w}


def test_training_equal_to_the_reference_passes_and_a_lie_fails(training_ref):
    good = dict(training_ref, seconds=0.5)
    rows, failures = rs.check_training("fake", [_run()], [good], training_ref)
    assert rows[0]["pass"] and not failures and rows[0]["ms_per_step"] == 250.0
    off = dict(good, losses=[training_ref["losses"][0], training_ref["losses"][1] + 1e-8])
    params = {k: v.copy() for k, v in training_ref["params"].items()}
    params["bn2.running_var"][0] += 1e-8
    nan_params = {k: v.copy() for k, v in training_ref["params"].items()}
    nan_params["fc3.bias"][0] = NAN
    for lie in (off, dict(good, params=params), dict(good, params=nan_params),
                dict(good, losses=[NAN, NAN]), dict(good, losses=good["losses"][:1]),
                {"error": "WorkerError: rank 1 died"}):
        rows, failures = rs.check_training("fake", [_run()], [lie], training_ref)
        assert not rows[0]["pass"] and len(failures) == 1, lie.get("losses")


def test_local_batch_norm_only_has_to_stay_finite(training_ref):
    drifted = dict(training_ref, losses=[v + 0.5 for v in training_ref["losses"]], seconds=1.0)
    rows, failures = rs.check_training("fake", [_run(sync=False)], [drifted], training_ref)
    assert rows[0]["pass"] and rows[0]["max_loss_drift"] == pytest.approx(0.5) and not failures
    rows, _ = rs.check_training("fake", [_run(sync=False)], [dict(drifted, losses=[0.1, NAN])],
                                training_ref)
    assert not rows[0]["pass"]


def test_timing_per_world_size():
    rows = [dict(_run(True, 2), backend="a", ms_per_step=3.0),
            dict(_run(False, 2), backend="a", ms_per_step=2.0),
            dict(_run(True, 2), backend="a", kind="unequal", ms_per_step=9.0)]
    assert rs.timing(rows) == [{"backend": "a", "world_size": 2, "sync_ms": 3.0, "local_ms": 2.0}]


# -- settings: one-line errors for what the engines would refuse ----------------------------------
def _session(quick=True, **args):
    defaults = dict(world_sizes="1,2,4", shards="", sync_timeout=300.0, steps=None,
                    batch_size=256, lr=None)
    return types.SimpleNamespace(args=types.SimpleNamespace(**{**defaults, **args}), quick=quick,
                                 dtypes=["float64", "float32"])


def test_default_settings():
    cfg = rs.settings(_session())
    assert [(s["world_size"], s["sizes"]) for s in cfg["splits"]] == [
        (1, [64]), (2, [32, 32]), (2, [48, 16]), (4, [16] * 4), (4, [40, 16, 8, 0])]
    assert [(r["world_size"], r["sync"], r["sizes"]) for r in cfg["runs"]] == [
        (1, True, [64]), (2, True, [32, 32]), (2, True, [48, 16]), (2, False, [32, 32]),
        (4, True, [16] * 4), (4, True, [40, 16, 8, 0]), (4, False, [16] * 4)]
    assert cfg["batch_size"] == 64 and cfg["steps"] == 5 and cfg["shapes"] == ["4-D"]
    assert rs.unequal_sizes(64, 3) == [48, 16, 0] and rs.unequal_sizes(256, 4) == [160, 64, 32, 0]
    cfg = rs.settings(_session(world_sizes="8,1", quick=False))
    assert cfg["world_sizes"] == [1, 8] and cfg["shapes"] == ["2-D", "4-D"]
    assert ([s["sizes"] for s in cfg["splits"]] ==
            [[64], [8] * 8, [33, 16, 8, 4, 2, 1, 0, 0]])
    cfg = rs.settings(_session(world_sizes="1,4", shards="40+16+8+0"))  # sums to the batch: trains too
    assert [r["sizes"] for r in cfg["runs"] if r["kind"] == "unequal"] == [[40, 16, 8, 0]]


BAD_SETTINGS = {
    "not numbers": (dict(world_sizes="1,two"), "--world-sizes 1,two: expected comma-separated"),
    "zero workers": (dict(world_sizes="0,2"), "1 to 16 workers"),
    "too many": (dict(world_sizes="1,17"), "1 to 16 workers"),
    "duplicate": (dict(world_sizes="2,2"), "2 given more than once"),
    "larger than the training batch": (dict(world_sizes="1,16", quick=False, batch_size=8),
                                       "world size 16 is larger than batch 0 \\(8 rows\\)"),
    "one row each for local BN": (dict(world_sizes="1,16", quick=False, batch_size=16),
                                  "shard of 1 row"),
    "every shard empty": (dict(world_sizes="1,2", shards="0+0"), "every shard is empty"),
    "world larger than the shards' batch": (dict(world_sizes="4", shards="1+1+0+0"),
                                            "world size 4 is larger than the batch \\(2 rows\\)"),
    "shards for another world size": (dict(world_sizes="1,2", shards="40+16+8+0"),
                                      "is for 4 workers, but --world-sizes is 1,2"),
    "malformed shards": (dict(shards="40+x"), "expected rows per worker"),
    "negative shard": (dict(shards="70+-6"), ">= 0"),
    "two splits for one world size": (dict(shards="40+24,32+32"), "two splits for 2 workers"),
    "timeout": (dict(sync_timeout=0.0), "--sync-timeout must be a positive"),
    "nan timeout": (dict(sync_timeout=NAN), "--sync-timeout must be a positive"),
}


@pytest.mark.parametrize("bad", BAD_SETTINGS)
def test_bad_settings_are_one_line_value_errors(bad):
    args, match = BAD_SETTINGS[bad]
    with pytest.raises(ValueError, match=match) as e:
        rs.settings(_session(**args))
    assert "\n" not in str(e.value)


def test_an_unknown_fault_is_refused(monkeypatch):
    monkeypatch.setenv(rs.FAULT_ENV, "explode")
    with pytest.raises(ValueError, match="expected crash or hang"):
        rs.settings(_session())
    monkeypatch.setenv(rs.FAULT_ENV, "hang")
    assert rs.settings(_session())["fault"] == "hang"


# -- the child task on a fake engine ----------------------------------------------------------------
class FakeGroup:
    def __init__(self, world_size, *, timeout):
        self.info = {"engine": "fake", "world_size": world_size, "processes": 2, "devices": ["cpu"]}
        self.timeout, self.jobs, self.closed = timeout, [], False

    def run(self, fn, args):
        self.jobs.append((fn.__name__, args))
        return [None] * len(args)

    def close(self, kill=False):
        self.closed = True


def _fake_backend(step):
    started = []

    def start(world_size, *, timeout):
        started.append(FakeGroup(world_size, timeout=timeout))
        return started[-1]

    def train(params, batches, *, world_size, shard_sizes, sync, lr, eps, decay, unbiased, dtype,
              group):
        return {"losses": [1.0] * len(batches), "params": params, "seconds": 0.1}

    return types.SimpleNamespace(SYNC_IMPLS=("scratch", "native"), SyncGroup=start,
                                 sync_bn_step=step, sync_lenet_train=train, started=started)


def _task_args(cases, fault=None):
    return {"backend": "fake", "world": 2, "timeout": 5.0, "fault": fault, "cases": cases,
            "runs": [_run()], "params": lenet.init_params(0), "xs": [np.zeros((4, 1, 28, 28))],
            "ys": [np.zeros(4, int)], "lr": 1.0}


def test_task_runs_own_conventions_and_keeps_the_first_reason():
    def step(xs, gamma, beta, running_mean, running_var, dys, *, training, eps, decay, unbiased,
             impl, group):
        if impl == "native" and not unbiased:
            raise backends.UnsupportedSetting("only unbiased")
        if impl == "native":
            raise backends.DeviceUnavailable("needs CUDA")
        return {"unbiased": unbiased}

    b = _fake_backend(step)
    out = rs.task_sync(b, _task_args([_case()], fault="crash"))
    assert out["failure"] is None and b.started[0].closed
    assert b.started[0].timeout == rs.JOB_FACTOR * 5.0  # no collective timeout: jobs bound it
    assert b.started[0].jobs == [("_fault_job", [("crash", False), ("crash", True)])]
    assert out["steps"] == [{"scratch": {"out": {"unbiased": False}, "unbiased": False},
                             "native": {"unavailable": "needs CUDA"}}]
    assert out["train"][0]["losses"] == [1.0] and out["engine"]["engine"] == "fake"

    def refuses(*a, impl, unbiased, **kw):
        raise backends.UnsupportedSetting(f"no: unbiased={unbiased}")

    out = rs.task_sync(_fake_backend(refuses), _task_args([_case()]))
    assert out["steps"][0]["native"] == {"unsupported": "no: unbiased=False"}


def test_task_stops_at_an_engine_failure_and_keeps_what_finished():
    calls = []

    def step(*a, impl, **kw):
        calls.append(impl)
        if len(calls) == 3:
            raise WorkerError("fake worker rank 1 died (exit code 3) during step_job; killed all")
        if impl == "native":
            raise RuntimeError("native bug")
        return {}

    b = _fake_backend(step)
    out = rs.task_sync(b, _task_args([_case(), _case(), _case()]))
    assert "rank 1 died" in out["failure"] and b.started[0].closed
    assert out["steps"] == [{"scratch": {"out": {}, "unbiased": False},
                             "native": {"error": "RuntimeError: native bug"}}]
    assert out["train"] == []

    def no_start(world_size, *, timeout):
        raise WorkerError("fake worker rank 0 failed in start: ImportError: x")

    out = rs.task_sync(types.SimpleNamespace(SyncGroup=no_start), _task_args([_case()]))
    assert out["failure"].startswith("the engine did not start: WorkerError") and not out["steps"]


def test_the_fault_job_returns_where_it_is_not_the_target():
    assert rs._fault_job(None, "hang", False) == "hang"
