"""compare.py end to end on the sample data (quick mode), its error handling, and a deliberately
broken convention that the agreement report must catch."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import compare
from backends import worker
from common import runner, spec
from common.spec import OLD
from conftest import REPO, REQUIRED, load_backend


def _compare(*argv, env=None, timeout=900):
    return subprocess.run([sys.executable, "compare.py", *map(str, argv)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, sample_dir):
    out = tmp_path_factory.mktemp("results")
    proc = _compare("--quick", "--data", sample_dir, "--out", out)
    return proc, out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_quick_run_writes_every_report_and_passes(quick_run):
    proc, out, res = quick_run
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(res["reports"]) == {"agreement", "conventions", "trajectory", "train", "speed"}
    assert sum(line.startswith("## ") for line in (out / "results.md").read_text().splitlines()) == 5
    live = [n for n, b in res["backends"].items() if b["available"]]
    assert REQUIRED <= set(live), res["backends"]
    for b in live:
        assert res["backends"][b]["versions"], b

    rows = [r for r in res["reports"]["agreement"]["rows"] if "dtype" in r]
    assert {(r["backend"], r["dtype"]) for r in rows} == {(b, d) for b in live for d in ("float64", "float32")}
    assert all(r["pass"] for r in rows), [r for r in rows if not r["pass"]]
    worst64 = max(e["abs"] for r in rows if r["dtype"] == "float64" for e in r["errors"].values())
    assert worst64 <= 1e-10
    assert all(p["pass"] for p in res["reports"]["agreement"]["pairwise"])
    if "torch" in live:  # native PyTorch's unbiased running variance is labelled, not passed off
        assert any(c["backend"] == "torch" and c["impl"] == "native" and c["running_stats_gap"] > 1e-3
                   for c in res["reports"]["agreement"]["conventions"])

    if "jax" in live:  # Flax's default fast variance is measured and labelled, far above noise
        assert any("fast variance" in c["convention"] and c["running_stats_gap"] > 1e-7
                   for c in res["reports"]["agreement"]["conventions"] if c["backend"] == "jax")

    conv_rows = [r for r in res["reports"]["conventions"]["rows"] if "check" in r]
    assert conv_rows and all(c["agrees"] for r in conv_rows for c in r["check"].values())
    translation = res["reports"]["conventions"]["translation"]
    assert translation["mxnet_source_0.9_as_torch_source"] == pytest.approx(0.1)
    assert all(r["matches_closed_form"] for r in translation["runs"].values())

    traj = res["reports"]["trajectory"]["dtypes"]["float64"]
    assert traj["runs"] and all(r["pass"] for r in traj["runs"].values()), traj["runs"]
    assert len(traj["runs"]) == sum(len(res["backends"][b]["impls"]) for b in live)

    train = res["reports"]["train"]["runs"]
    assert all("error" not in r for r in train.values()), train
    assert all(r["test_acc"] > 0.4 and r["device"] for r in train.values())  # chance is 0.1
    assert (out / "training.png").stat().st_size > 10_000
    speed = res["reports"]["speed"]
    assert set(speed["runs"]) == {f"{b}/{i}" for b in live for i in res["backends"][b]["impls"]}
    for key, r in speed["runs"].items():
        assert "error" not in r, (key, r)
        assert len(r["runs"]) == speed["config"]["repeats"] and r["interleaved"], key
        assert min(r["runs"]) <= r["examples_per_s"] <= max(r["runs"]) and min(r["runs"]) > 0
    if sys.platform.startswith("linux"):  # the backend processes kept freed memory for reuse
        assert all(res["backends"][b]["allocator"].startswith("glibc malloc tuned") for b in live)


def test_help_lists_every_report():
    proc = _compare("--help")
    assert proc.returncode == 0
    for name in runner.ORDER:
        assert name in proc.stdout


@pytest.mark.parametrize("argv, message", [
    (["--backends", "tensorflow"], "unknown"),
    (["--python", "mxnet=/no/such/python"], "does not exist"),
    (["--python", "mxnet"], "NAME=INTERPRETER"),
    (["--epochs", "0", "train"], "at least 1"),
    (["--data", "/no/such/dir", "train"], "not a directory"),
    (["nonsense"], "invalid choice"),
])
def test_bad_command_lines_give_one_clear_error(argv, message, tmp_path):
    proc = _compare(*argv, "--out", tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_corrupt_data_is_a_clear_error_naming_the_file(tmp_path, sample_dir):
    for f in sample_dir.glob("*.gz"):
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    proc = _compare("trajectory", "--quick", "--backends", "torch", "--data", tmp_path, "--out", tmp_path / "out")
    assert "Traceback" not in proc.stderr
    assert "train-labels-idx1-ubyte.gz" in proc.stdout + proc.stderr
    assert (tmp_path / "out" / "results.json").exists()  # the report says why; nothing is lost


def test_a_backend_that_crashes_becomes_a_row_and_the_others_are_written(tmp_path):
    proc = _compare("conventions", "--backends", "torch,jax", "--python", "jax=/bin/false", "--out", tmp_path)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["backends"]["jax"]["available"] is False
    assert "exited with code 1" in res["backends"]["jax"]["reason"]
    assert "jax" in (tmp_path / "results.md").read_text()
    if res["backends"]["torch"]["available"]:
        assert any(r["row"].startswith("torch/") and "check" in r for r in res["reports"]["conventions"]["rows"])
    assert "Traceback" not in proc.stderr


def _in_process(ctx, name, task, args):
    """Context.call without a child process, so a test can alter the backend's environment."""
    b = load_backend(name)
    return {"result": worker.TASKS[task](b, {"backend": name, **args})}


def test_agreement_catches_a_backend_told_the_wrong_momentum_meaning(monkeypatch, tmp_path):
    """Tell the torch backend that native PyTorch's momentum weighs the OLD value (a classic port
    bug): its running statistics are then wrong and the agreement check must say so."""
    load_backend("torch")
    args = compare.build_parser().parse_args(["agreement", "--backends", "torch", "--out", str(tmp_path)])
    ctx = runner.Context(args)
    monkeypatch.setattr(runner.Context, "call", _in_process)
    monkeypatch.setitem(spec.MOMENTUM_WEIGHS, "torch-native", OLD)
    payload = runner.run_agreement(ctx)
    verdict = {(r["impl"], r["dtype"]): r for r in payload["rows"] if "dtype" in r}
    assert not verdict[("native", "float64")]["pass"]
    assert not verdict[("native", "float64")]["errors"]["running_mean"]["pass"]
    assert verdict[("native", "float64")]["errors"]["y"]["pass"]  # outputs are unaffected
    assert verdict[("scratch", "float64")]["pass"]
    assert any("torch/native" in f for f in ctx.failures)


def test_gpu_request_on_a_machine_without_one_says_so_per_backend(tmp_path, sample_dir):
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True)
    if probe.stdout.strip() == "True":
        pytest.skip("a CUDA GPU is usable here")
    proc = _compare("train", "--device", "gpu", "--quick", "--epochs", "1", "--backends", "torch",
                    "--data", sample_dir, "--out", tmp_path)
    runs = json.loads((tmp_path / "results.json").read_text())["reports"]["train"]["runs"]
    assert runs and all("DeviceUnavailable" in r["error"] and "CPU-only" in r["error"] for r in runs.values())
    assert proc.returncode == 1 and "Traceback" not in proc.stderr


def test_python_option_runs_a_backend_under_the_named_interpreter(tmp_path):
    proc = _compare("conventions", "--backends", "torch", "--python", f"torch={sys.executable}",
                    "--out", tmp_path)
    res = json.loads((tmp_path / "results.json").read_text())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert res["backends"]["torch"]["python"] == sys.executable
    assert any(r["row"] == "torch/native" and all(c["agrees"] for c in r["check"].values())
               for r in res["reports"]["conventions"]["rows"])


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
    out = worker.TASKS["speed"](_fake_backend(log, fail="scratch", fail_on=2), args)
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
from backends.worker import tune_allocator
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
    assert "unknown" in worker.tune_allocator("fast")


def test_default_malloc_reaches_the_backend_processes(tmp_path):
    _compare("conventions", "--backends", "torch", "--default-malloc", "--out", tmp_path)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["backends"]["torch"]["allocator"] == "default malloc settings (--default-malloc)"
