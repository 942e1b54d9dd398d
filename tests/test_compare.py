"""compare.py end to end on the sample data (quick mode), and its one failure policy: crashing
and missing backends, bad input refused up front, results merged and never lost."""
import gzip
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

import compare
import reports
from reports import child, session
from common import spec
from common.spec import OLD
from conftest import REPO, REQUIRED, load_backend


def _compare(*argv, env=None, timeout=1800):
    return subprocess.run([sys.executable, "compare.py", *map(str, argv)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def _script(tmp_path, name, body):
    """An executable shell script standing in for a backend's Python interpreter."""
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, sample_dir):
    out = tmp_path_factory.mktemp("results")
    # a guard against a hang, not a speed limit: on 2 cores shared with other test runs (load
    # 5-7) every report took 18 min (sync 2 of them, speed 10); unloaded it is a few minutes
    proc = _compare("--quick", "--data", sample_dir, "--out", out, timeout=1800)
    return proc, out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_quick_run_writes_every_report_and_passes(quick_run):
    proc, out, res = quick_run
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(res["reports"]) == set(reports.ORDER) and all(n in res for n in reports.ORDER)
    assert res["interrupted"] is False and res["failures"] == []
    assert all(res["reports"][n]["status"] == "pass" for n in reports.ORDER)
    assert sum(line.startswith("## ") for line in (out / "results.md").read_text().splitlines()) == len(reports.ORDER)
    live = [n for n, b in res["backends"].items() if b["available"]]
    assert REQUIRED <= set(live), res["backends"]
    for b in live:
        assert res["backends"][b]["versions"], b

    rows = [r for r in res["agreement"]["rows"] if "dtype" in r]
    assert {(r["backend"], r["dtype"]) for r in rows} == {(b, d) for b in live for d in ("float64", "float32")}
    assert all(r["pass"] for r in rows), [r for r in rows if not r["pass"]]
    worst64 = max(e["abs"] for r in rows if r["dtype"] == "float64" for e in r["errors"].values())
    assert worst64 <= 1e-10
    assert all(p["pass"] for p in res["agreement"]["pairwise"])
    if "torch" in live:  # native PyTorch's unbiased running variance is labelled, not passed off
        assert any(c["backend"] == "torch" and c["impl"] == "native" and c["running_stats_gap"] > 1e-3
                   for c in res["agreement"]["conventions"])
    if "jax" in live:  # Flax's default fast variance is measured and labelled, far above noise
        assert any("fast variance" in c["convention"] and c["running_stats_gap"] > 1e-7
                   for c in res["agreement"]["conventions"] if c["backend"] == "jax")

    conv_rows = [r for r in res["conventions"]["rows"] if "check" in r]
    assert conv_rows and all(c["agrees"] for r in conv_rows for c in r["check"].values())
    for r in conv_rows:
        if "/" in r["row"]:  # the idiom everywhere on the CPU: float32 statistics, dtype out
            assert {dt: (p["stats_dtype"], p["running_dtype"], p["output_dtype"])
                    for dt, p in r["precision"].items()} == {
                dt: ("float32 or wider", "float32", dt) for dt in ("float16", "bfloat16")}, r["row"]
    translation = res["conventions"]["translation"]
    assert translation["mxnet_source_0.9_as_torch_source"] == pytest.approx(0.1)
    assert all(r["matches_closed_form"] for r in translation["runs"].values())

    traj = res["trajectory"]["dtypes"]["float64"]
    assert traj["runs"] and all(r["pass"] for r in traj["runs"].values()), traj["runs"]
    assert len(traj["runs"]) == sum(len(res["backends"][b]["impls"]) for b in live)

    train = res["train"]["runs"]
    assert all("error" not in r for r in train.values()), train
    assert all(r["test_acc"] > 0.4 and r["device"] for r in train.values())  # chance is 0.1
    assert (out / "training.png").stat().st_size > 10_000
    speed = res["speed"]
    sources = ("source-scratch", "source-native")
    assert set(speed["runs"]) == {f"{b}/{i}" for b in live for i in (*res["backends"][b]["impls"], *sources)}
    for row in speed["rows"]:  # every fast path is compared with the source loop measured beside it
        if "source-" not in row["run"]:
            assert row["x_source_native"] > 0 and row["step_time_vs_native"] > 0, row
    for key, r in speed["runs"].items():
        assert "error" not in r, (key, r)
        assert len(r["runs"]) == speed["config"]["repeats"] and r["interleaved"], key
        assert min(r["runs"]) <= r["examples_per_s"] <= max(r["runs"]) and min(r["runs"]) > 0
    if sys.platform.startswith("linux"):  # the backend processes kept freed memory for reuse
        assert all(res["backends"][b]["allocator"].startswith("glibc malloc tuned") for b in live)
    _check_precision(res["precision"], out, live)
    _check_port(res["port"], out, live)
    _check_sync(res["sync"], live, out)


def _check_sync(sync, live, out):
    """The quick sync report: every backend's engine on 1, 2, 4 workers; our engines equal the
    full-batch reference on equal and unequal shards; the natives measured as they are; sync
    training follows full-batch SGD, local training drifts."""
    assert sync["config"]["world_sizes"] == [1, 2, 4]
    for b in live:
        engine = sync["engines"][b]
        assert not engine["failure"] and engine["world_size"] == 4 and len(engine["devices"]) == 4, engine
    splits = {(1, (64,)), (2, (32, 32)), (2, (48, 16)), (4, (16,) * 4), (4, (40, 16, 8, 0))}
    ours = [r for r in sync["steps"] if r["impl"] != "native"]
    assert {(r["backend"], r["world_size"], tuple(r["sizes"]), r["dtype"]) for r in ours} == {
        (b, w, sizes, d) for b in live for w, sizes in splits for d in ("float64", "float32")}
    assert all(r["status"] == "pass" for r in ours), [r for r in ours if r["status"] != "pass"]
    assert max(r["worst"] for r in ours if r["dtype"] == "float64") <= 1e-12
    native = {(r["backend"], r["dtype"], tuple(r["sizes"])): r for r in sync["steps"] if r["impl"] == "native"}
    if "torch" in live and "gloo" in sync["engines"]["torch"]["engine"]:  # CPU: torch's own refusal
        torch_rows = [r for k, r in native.items() if k[0] == "torch"]
        assert torch_rows and all(r["status"] == "unavailable" and "expected input tensor to be on GPU"
                                  in r["message"] for r in torch_rows)
    if "jax" in live:  # Flax: exact on equal shards, the unweighted convention on unequal ones
        assert native[("jax", "float64", (16,) * 4)]["status"] == "pass"
        r = native[("jax", "float64", (48, 16))]
        assert r["status"] == "convention" and r["worst"] > 1e-3 and r["model_worst"] <= 1e-12, r
        assert native[("jax", "float64", (40, 16, 8, 0))]["worst"] == "nan"  # measured, not hidden
    if "mxnet" in live:
        assert native[("mxnet", "float64", (48, 16))]["status"] == "unsupported"
        assert native[("mxnet", "float32", (16,) * 4)]["status"] == "pass"
        assert native[("mxnet", "float32", (48, 16))]["status"] == "convention"
    runs = sync["training"]
    assert {(r["backend"], r["world_size"], r["sync"], r["kind"]) for r in runs} == {
        (b, w, sync_, kind) for b in live for w, sync_, kind in
        ((1, True, "equal"), (2, True, "equal"), (2, True, "unequal"), (2, False, "equal"),
         (4, True, "equal"), (4, True, "unequal"), (4, False, "equal"))}
    assert all(r["pass"] for r in runs), [r for r in runs if not r["pass"]]
    assert max(max(r["max_loss_drift"], r["param_error"]) for r in runs if r["sync"]) <= 1e-10
    assert min(r["max_loss_drift"] for r in runs if not r["sync"]) > 1e-4  # local BN drifts
    timing = {(t["backend"], t["world_size"]): t for t in sync["timing"]}
    assert all(timing[(b, w)]["sync_ms"] > 0 for b in live for w in (1, 2, 4))
    assert (out / "sync_drift.png").stat().st_size > 10_000


# Where each porting mistake must first show (tests/test_port.py checks the same per layer on
# synthetic parameters); None: no effect at inference.
MISTAKE_LAYER = {"no-flatten-permutation": "fc1", "kernel-reshaped": "conv1", "eps-default": "bn1",
                 "fix-gamma": "bn1", "momentum-copied": None}


def _check_port(port, out, live):
    pairs = {(a, b) for a in live for b in live if a != b}
    rows = port["rows"]
    correct = {(r["from"], r["to"]): r for r in rows if r["kind"] == "correct"}
    assert set(correct) == pairs
    for r in correct.values():  # the targets, measured on the trained models
        assert r["pass"] and r["argmax_agreement"] >= 0.999, r
        assert r["max_abs_logit_diff"] <= 1e-4 and r["max_abs_logit_diff_float64"] <= 1e-10, r
        assert r["first_divergent_layer"] is None and r["first_divergent_layer_isolated"] is None
        assert r["test_acc_to"] == r["test_acc_from"] > 0.1
        assert (out / r["checkpoint"]).stat().st_size > 100_000  # kept for users, with a sidecar
        assert (out / (r["checkpoint"] + ".bn.json")).exists()
    mistakes = [r for r in rows if r["kind"] != "correct" and r["applies"]]
    if len(live) == 3:  # each mistake happens between some two of the three frameworks
        assert {r["kind"] for r in mistakes} == set(MISTAKE_LAYER)
    for r in mistakes:
        want = MISTAKE_LAYER[r["kind"]]
        assert (r["first_divergent_layer"], r["first_divergent_layer_isolated"]) == (want, want), r
        if want:  # it costs something on the trained model
            assert r["max_abs_logit_diff"] > 1e-3 and "flag" not in r
    layout = [r for r in mistakes if r["kind"] in ("no-flatten-permutation", "kernel-reshaped")]
    assert all(r["max_abs_logit_diff"] > 0.1 for r in layout)
    assert {(t["from"], t["via"]) for t in port["round_trips"]} == pairs
    assert all(t["pass"] and t["weights_identical"] and t["sidecar_identical"] for t in port["round_trips"])
    tuned = {(r["from"], r["to"], r["kind"]): r for r in port["fine_tune"]}
    assert {k[:2] for k in tuned if k[2] == "correct"} == pairs
    for (a, b, kind), r in tuned.items():
        assert "error" not in r, r
        # in float64 the conventions measured one at a time explain the frameworks' drift
        assert r["unexplained_float64"]["logits"] <= 1e-9 and r["source_native_vs_chain"]["logits"] <= 1e-9
        causes = {s["cause"].split(":")[0] for s in r["steps"]}
        assert ("variance estimator" in causes) == ("torch" in (a, b)), (a, b, causes)
        assert ("momentum meaning" in causes) == (kind == "momentum-copied")
        if kind == "momentum-copied":  # a real cost: running means and logits far apart
            assert r["float64"]["running_mean"] > 0.05 and r["float64"]["logits"] > 0.1
    if pairs:
        assert (out / port["plot"]).stat().st_size > 10_000


def _check_precision(prec, out, live):
    assert set(prec["dtypes"]) == {"float16", "bfloat16"}
    assert {k.split("/")[0] for k in prec["support"]} == set(live)
    idiom = [r for r in prec["bn"] if r["accumulate"] == "float32"]
    assert idiom and all(r["pass"] for r in idiom if "errors" in r), [r for r in idiom if not r.get("pass")]
    lost = [r for r in prec["bn"] if r["accumulate"] == "input" and r["case"] == "large mean" and "errors" in r]
    assert lost and not any(r["pass"] for r in lost)  # statistics in the input dtype lose there
    probes = {(r["backend"], r["impl"], r["dtype"], r["accumulate"]): r for r in prec["probes"]}
    for b in live:
        for dt in prec["dtypes"]:
            p = probes[(b, "native", dt, "float32")]
            assert (p["stats_dtype"], p["running_dtype"], p["output_dtype"]) == ("float32 or wider", "float32", dt)
    for key, runs in prec["trajectory"].items():  # native impls in --quick
        assert key.endswith("/native") and "float32" in runs, runs
    if "torch" in live:
        assert prec["trajectory"]["torch/native"]["float16"]["precision"]["loss_scale"] == 1024.0
        assert all(r["final_loss"] < 2.3 for r in prec["train"]["torch/native"].values())  # chance: ln 10
    if "mxnet" in live:  # no float16 GEMM on the CPU: refused with the reason, not failed
        assert "gemm" in prec["support"]["mxnet/native"]["fit float16"]
    assert (out / "precision_training.png").stat().st_size > 10_000


def test_help_lists_every_report_the_exit_codes_and_what_quick_changes():
    proc = _compare("--help")
    assert proc.returncode == 0
    for name in reports.ORDER:
        assert name in proc.stdout
        quick = getattr(reports.load(name), "QUICK", None)
        if quick:
            assert " ".join(quick.split()) in " ".join(proc.stdout.split())
    assert "--allow-missing" in proc.stdout and "130" in proc.stdout


# -- the failure policy, for every report ---------------------------------------------------
@pytest.mark.parametrize("report", reports.ORDER)
def test_a_crashing_backend_interpreter_fails_every_report_unless_allowed(report, tmp_path, sample_dir):
    crash = _script(tmp_path, "python", "echo 'Segmentation fault' >&2; exit 1")
    argv = [report, "--backends", "jax", "--python", f"jax={crash}", "--quick", "--data", sample_dir]
    proc = _compare(*argv, "--out", tmp_path / "strict")
    assert proc.returncode == 1, proc.stderr[-2000:]
    res = json.loads((tmp_path / "strict" / "results.json").read_text())
    assert any("jax" in f and "unavailable" in f for f in res["reports"][report]["failures"])

    proc = _compare(*argv, "--allow-missing", "jax", "--out", tmp_path / "allowed")
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "allowed" / "results.json").read_text())
    assert res["reports"][report]["allowed_missing"] == ["jax"]
    md = (tmp_path / "allowed" / "results.md").read_text()
    assert "jax" in md and "exited with code 1" in md and "allowed by --allow-missing" in md
    assert "Traceback" not in proc.stderr


def test_allow_missing_comes_from_the_environment_too(tmp_path):
    crash = _script(tmp_path, "python", "exit 1")
    argv = ["conventions", "--backends", "jax", "--python", f"jax={crash}", "--out", tmp_path / "o"]
    assert _compare(*argv, env={"BN_COMPARE_ALLOW_MISSING": "jax"}).returncode == 0
    assert _compare(*argv, env={"BN_COMPARE_ALLOW_MISSING": ""}).returncode == 1


def test_a_child_that_crashes_mid_report_is_a_failure_even_when_missing_is_allowed(tmp_path):
    """The backend loads (its info task runs) but its process dies in the report's task."""
    flaky = _script(tmp_path, "python", f'case "$3" in info) exec {sys.executable} "$@";; *) kill -9 $$;; esac')
    proc = _compare("conventions", "--backends", "torch", "--python", f"torch={flaky}",
                    "--allow-missing", "torch", "--out", tmp_path)
    res = json.loads((tmp_path / "results.json").read_text())
    assert proc.returncode == 1
    assert any("child process failed" in f for f in res["reports"]["conventions"]["failures"])


# -- bad input, refused up front ------------------------------------------------------------
def _corrupt(tmp_path, sample_dir, how):
    d = tmp_path / f"data-{how}"
    d.mkdir()
    for f in sample_dir.glob("*.gz"):
        shutil.copy(f, d / f.name)
    images = d / "train-images-idx3-ubyte.gz"
    if how == "truncated":
        images.write_bytes(images.read_bytes()[:5000])
    elif how == "magic":
        raw = bytearray(gzip.decompress(images.read_bytes()))
        raw[2:4] = b"\x09\x09"
        images.write_bytes(gzip.compress(bytes(raw)))
    elif how == "labels-as-images":
        shutil.copy(d / "train-labels-idx1-ubyte.gz", images)
    return d


BAD = {
    "negative seed": (["--seed", "-1"], "--seed"),
    "nan lr": (["--lr", "nan"], "--lr"),
    "infinite lr": (["--lr", "inf"], "--lr"),
    "zero lr": (["--lr", "0"], "--lr"),
    "duplicate backends": (["--backends", "torch,jax,torch"], "more than once"),
    "unknown backend": (["--backends", "tensorflow"], "unknown"),
    "unknown allowed backend": (["--allow-missing", "theano"], "unknown"),
    "oversized batch": (["train", "--batch-size", "100000"], "larger than the training set"),
    "oversized batch, trajectory": (["trajectory", "--batch-size", "5000"], "larger than the training set"),
    "oversized synthetic batch": (["speed", "--batch-size", "100000"], "larger than 60000"),
    "zero epochs": (["--epochs", "0", "train"], "at least 1"),
    "missing interpreter": (["--python", "mxnet=/no/such/python"], "does not exist"),
    "bad --python": (["--python", "mxnet"], "NAME=INTERPRETER"),
    "missing data dir": (["--data", "/no/such/dir", "train"], "not a directory"),
    "unknown report": (["nonsense"], "invalid choice"),
    "sync: world larger than the batch": (["sync", "--world-sizes", "1,16", "--batch-size", "8"],
                                          "world size 16 is larger than batch 0 (8 rows)"),
    "sync: every shard empty": (["sync", "--shards", "0+0"], "every shard is empty"),
    "sync: world sizes": (["sync", "--world-sizes", "1,x"], "--world-sizes 1,x"),
    "sync: shards for no world size": (["sync", "--shards", "40+16+8+0", "--world-sizes", "1,2"],
                                       "is for 4 workers"),
    "sync: timeout": (["sync", "--sync-timeout", "-1"], "--sync-timeout"),
    "unknown dtype": (["--dtype", "float8"], "invalid choice"),
    "float16 agreement": (["agreement", "--dtype", "float16"], "precision report"),
    "bfloat16 trajectory": (["trajectory", "--dtype", "bfloat16"], "precision report"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_refused_in_one_line_before_any_backend_starts(case, tmp_path, sample_dir):
    argv, message = BAD[case]
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": "run"}')
    if "--data" not in argv:
        argv = [*argv, "--data", sample_dir]
    t0 = time.perf_counter()
    proc = _compare(*argv, "--out", out)
    assert time.perf_counter() - t0 < 5, "bad input must be refused in seconds"
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) <= 2 and message in lines[-1] and "Traceback" not in proc.stderr, proc.stderr
    assert "loading" not in proc.stderr  # no backend was started
    assert (out / "results.json").read_text() == '{"earlier": "run"}' and len(list(out.iterdir())) == 1


@pytest.mark.parametrize("how", ["truncated", "magic", "labels-as-images"])
def test_corrupt_or_wrong_data_is_refused_up_front_naming_the_file(how, tmp_path, sample_dir):
    data_dir = _corrupt(tmp_path, sample_dir, how)
    t0 = time.perf_counter()
    proc = _compare("--quick", "--data", data_dir, "--out", tmp_path / "out")
    assert time.perf_counter() - t0 < 5
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "train-images-idx3-ubyte.gz" in proc.stderr
    assert not (tmp_path / "out" / "results.json").exists()


def _tagged(tag: str) -> list[int]:
    """Live processes whose environment holds `tag`."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if tag.encode() in f.read():
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("fault, match", [
    ("crash", r"rank 1 died \(exit code 3\) during _fault_job"),
    ("hang", r"rank 0 failed in _fault_job: .*[Tt]imed out.*rank\(s\) \[1\] had not answered")])
def test_a_sync_worker_that_crashes_or_hangs_ends_its_backend_in_one_row(fault, match, tmp_path, sample_dir):
    """BN_COMPARE_SYNC_FAULT makes rank 1 of torch's 2-process gloo engine die or hang while
    rank 0 waits in an all-reduce (5 s collective timeout): the report ends in seconds with a
    row naming the rank, exit status 1, and no process of the run is left."""
    load_backend("torch")
    tag = f"bn-compare-test-{os.getpid()}-{fault}-{time.time_ns()}"
    t0 = time.perf_counter()
    proc = _compare("sync", "--backends", "torch", "--quick", "--world-sizes", "1,2", "--sync-timeout", "5",
                    "--no-plots", "--data", sample_dir, "--out", tmp_path,
                    env={"BN_COMPARE_SYNC_FAULT": fault, "BN_COMPARE_TEST_TAG": tag}, timeout=300)
    assert time.perf_counter() - t0 < 120
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    failure = res["sync"]["engines"]["torch"]["failure"]
    assert re.search(match, failure) and "killed all 2 workers" in failure and "\n" not in failure, failure
    assert res["sync"]["steps"] == [] and res["sync"]["training"] == []
    assert any("sync engine failed" in f for f in res["reports"]["sync"]["failures"])
    assert "ran 0/6 step cases, 0/4 training runs" in (tmp_path / "results.md").read_text()
    assert _tagged(tag) == [], "processes of the run are still there"


def test_no_data_offline_is_one_attempt_and_one_line(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "FASHION_MNIST_DIR": "",
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    t0 = time.perf_counter()
    proc = _compare("train", "--out", tmp_path / "out", env=env)
    assert time.perf_counter() - t0 < 5
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.count("every mirror failed") == 1 and "--data DIR" in proc.stderr


def test_an_unwritable_out_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = _compare("conventions", "--out", blocker / "results")
    assert proc.returncode == 2 and "--out" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# -- results are never lost or mislabelled ----------------------------------------------------
def _missing_jax(tmp_path, report, out, *extra):
    crash = _script(tmp_path, "python", "exit 1")
    return _compare(report, "--backends", "jax", "--python", f"jax={crash}", "--allow-missing", "jax",
                    "--out", out, *extra)


def test_one_report_merges_into_earlier_results_and_files_get_normal_modes(tmp_path):
    out = tmp_path / "out"
    assert _missing_jax(tmp_path, "agreement", out).returncode == 0
    first = json.loads((out / "results.json").read_text())
    assert _missing_jax(tmp_path, "conventions", out).returncode == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["reports"]) == {"agreement", "conventions"}
    assert res["reports"]["agreement"] == first["reports"]["agreement"]
    md = (out / "results.md").read_text()
    assert "## Agreement" in md and "## Conventions" in md and "From an earlier run" in md
    umask = os.umask(0)
    os.umask(umask)
    for f in ("results.json", "results.md"):
        assert stat.S_IMODE((out / f).stat().st_mode) == 0o666 & ~umask


def test_an_unmergeable_earlier_file_is_moved_aside_not_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{ not json")
    assert _missing_jax(tmp_path, "conventions", out).returncode == 0
    kept = list(out.glob("results.*.unmerged.json"))
    assert len(kept) == 1 and kept[0].read_text() == "{ not json"
    assert kept[0].name in (out / "results.md").read_text()


def test_plots_a_rerun_no_longer_makes_are_removed_and_strays_are_named(tmp_path):
    s = store_for(tmp_path)
    (tmp_path / "training.png").write_bytes(b"png")
    s.save_section("train", reports.Section({}, "## Training", [], ["training.png"]), _meta(s))
    (tmp_path / "unrelated.png").write_bytes(b"png")
    s.save_section("train", reports.Section({}, "## Training", [], []), _meta(s))
    assert not (tmp_path / "training.png").exists()
    assert "unrelated.png" in (tmp_path / "results.md").read_text()


def store_for(out):
    from reports import store

    return store.Store(out, {"command": ["python", "compare.py"], "started": store.now(), "id": "test",
                             "host": {}})


def _meta(s):
    return {"command": s.run["command"], "started": s.run["started"], "run": s.run["id"]}


def test_an_interrupted_run_is_marked_and_keeps_what_finished(tmp_path):
    """SIGTERM while the second report waits on a hanging backend: exit 130, results.json says
    interrupted with the first report in it, and the hanging child is killed."""
    out = tmp_path / "out"
    assert _missing_jax(tmp_path, "agreement", out).returncode == 0
    marker = tmp_path / "child.pid"
    hang = _script(tmp_path, "hang", f"echo $$ > {marker}; exec sleep 60")
    proc = subprocess.Popen([sys.executable, "compare.py", "conventions", "--backends", "jax",
                             "--python", f"jax={hang}", "--out", str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(100):
        if marker.exists() and marker.read_text().strip():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    res = json.loads((out / "results.json").read_text())
    assert res["interrupted"] is True and res["run"]["interrupted"] is True
    assert "agreement" in res["reports"] and "conventions" not in res["reports"]
    assert "interrupted" in err and "results.json" in err
    pid = int(marker.read_text())
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# -- reports catch what they exist to catch -----------------------------------------------------
def _in_process(name, task, args, **kw):
    """child.call without a child process, so a test can alter the backend's environment."""
    b = load_backend(name)
    return {"result": child.find_task(task)(b, {"backend": name, **args})}


def _session(tmp_path, *argv):
    args = compare.build_parser().parse_args([*argv, "--out", str(tmp_path)])
    return session.Session(args, [args.report])


def test_agreement_catches_a_backend_told_the_wrong_momentum_meaning(monkeypatch, tmp_path):
    """Tell the torch backend that native PyTorch's momentum weighs the OLD value (a classic port
    bug): its running statistics are then wrong and the agreement check must say so."""
    load_backend("torch")
    monkeypatch.setattr(child, "call", _in_process)
    monkeypatch.setitem(spec.MOMENTUM_WEIGHS, "torch-native", OLD)
    s = _session(tmp_path, "agreement", "--backends", "torch")
    section = reports.load("agreement").run(s)
    verdict = {(r["impl"], r["dtype"]): r for r in section.payload["rows"] if "dtype" in r}
    assert not verdict[("native", "float64")]["pass"]
    assert not verdict[("native", "float64")]["errors"]["running_mean"]["pass"]
    assert verdict[("native", "float64")]["errors"]["y"]["pass"]  # outputs are unaffected
    assert verdict[("scratch", "float64")]["pass"]
    assert any("torch/native" in f for f in section.failures)


def test_gpu_request_on_a_machine_without_one_says_so_per_backend(tmp_path, sample_dir):
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True)
    if probe.stdout.strip() == "True":
        pytest.skip("a CUDA GPU is usable here")
    proc = _compare("train", "--device", "gpu", "--quick", "--epochs", "1", "--backends", "torch",
                    "--data", sample_dir, "--out", tmp_path)
    runs = json.loads((tmp_path / "results.json").read_text())["train"]["runs"]
    assert runs and all("DeviceUnavailable" in r["error"] and "CPU-only" in r["error"] for r in runs.values())
    assert proc.returncode == 1 and "Traceback" not in proc.stderr


def test_training_that_diverges_to_nan_fails(tmp_path, sample_dir):
    load_backend("torch")
    proc = _compare("train", "--lr", "1e30", "--quick", "--epochs", "1", "--backends", "torch",
                    "--data", sample_dir, "--out", tmp_path, "--no-plots")
    res = json.loads((tmp_path / "results.json").read_text())
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert any("not finite" in f for f in res["reports"]["train"]["failures"])


def test_python_option_runs_a_backend_under_the_named_interpreter(tmp_path):
    proc = _compare("conventions", "--backends", "torch", "--python", f"torch={sys.executable}",
                    "--out", tmp_path)
    res = json.loads((tmp_path / "results.json").read_text())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert res["backends"]["torch"]["python"] == sys.executable
    assert any(r["row"] == "torch/native" and all(c["agrees"] for c in r["check"].values())
               for r in res["conventions"]["rows"])


# -- speed plumbing ---------------------------------------------------------------------------
class _FakeTimer:
    """A speed timer that records when it runs; `fail_on` makes that run raise."""

    def __init__(self, impl, log, fail_on=None):
        self.impl, self.log, self.fail_on, self.n = impl, log, fail_on, 0
        self.info = {"compile_s": 0.5, "device": "cpu", "path": "fake"}

    def run(self):
        self.n += 1
        self.log.append((self.impl, self.n))
        if self.n == self.fail_on:
            raise RuntimeError("lost the device")
        return {"examples_per_s": 100.0 * self.n}


def _fake_backend(log, fail=None, fail_on=None):
    def speed_timer(*, impl, device, batch_size, dtype, steps):
        if impl == "broken":
            raise ValueError("cannot compile")
        return _FakeTimer(impl, log, fail_on if impl == fail else None)

    return type("Fake", (), {"IMPLS": ("scratch", "broken", "native"),
                             "speed_timer": staticmethod(speed_timer)})


def test_speed_runs_are_taken_round_robin_and_a_failure_stays_with_its_impl():
    log = []
    args = dict(backend="fake", device="cpu", batch_size=8, dtype="float32", steps=2, repeats=3)
    out = child.find_task("speed.speed")(_fake_backend(log, fail="scratch", fail_on=2), args)
    assert log == [("scratch", 1), ("native", 1), ("scratch", 2), ("native", 2), ("native", 3)]
    assert "cannot compile" in out["broken"]["error"]
    assert "lost the device" in out["scratch"]["error"]
    assert out["native"]["runs"] == [100.0, 200.0, 300.0] and out["native"]["examples_per_s"] == 200.0
    assert out["native"]["compile_s"] == 0.5 and out["native"]["interleaved"]


def _freed_block_stays(mode):
    """Whether, after tune_allocator(mode), an 8 MB array is served from the heap (kept for
    reuse) rather than from its own mmap (glibc's mallinfo2 counts mmapped bytes)."""
    code = f"""
import ctypes, sys
from reports.child import tune_allocator
print(tune_allocator({mode!r}), file=sys.stderr)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
before = libc.mallinfo2().hblkhd
block = ctypes.create_string_buffer(8 << 20)
print(libc.mallinfo2().hblkhd - before)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout) == 0, proc.stderr


def test_the_tuned_allocator_keeps_large_blocks_in_the_heap():
    try:
        import ctypes

        ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        pytest.skip("needs glibc >= 2.33 (mallinfo2) to observe the allocator")
    stays, said = _freed_block_stays("tuned")
    assert stays and said.startswith("glibc malloc tuned"), said
    stays, said = _freed_block_stays("default")
    assert not stays and "default malloc" in said, said
    assert "unknown" in child.tune_allocator("fast")


def test_default_malloc_reaches_the_backend_processes(tmp_path):
    _compare("conventions", "--backends", "torch", "--default-malloc", "--out", tmp_path)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["backends"]["torch"]["allocator"] == "default malloc settings (--default-malloc)"
