"""`compare.py convert` end to end: every ordered pair of frameworks through the command line and
back to the original file bit for bit, the textbook nn.Sequential state_dict, --force, and every
bad input refused in one line with exit status 2 (no traceback, nothing written), a framework
that cannot load with exit status 1 and its reason."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from common import checkpoint, convert
from conftest import REPO, load_backend
from test_convert import same, trained_like

SLOW_START = 5  # seconds: bad input must be refused in seconds (the issue), a framework start included


def _convert(*argv, env=None):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "compare.py", "convert", *map(str, argv)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    return proc, time.perf_counter() - t0


def _refused(proc, seconds, *words):
    """Exit status 2, one line on stderr naming `words`, no traceback, in seconds."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert seconds < SLOW_START, f"took {seconds:.1f} s"
    return lines[0]


@pytest.fixture(scope="module")
def torch_file(tmp_path_factory):
    tb = load_backend("torch")
    d = tmp_path_factory.mktemp("ckpt")
    cfg = {"eps": 1e-3, "decay": 0.8, "unbiased": True, "num_batches_tracked": 12}
    tb.save_checkpoint(trained_like(seed=3, dtype=np.float32), d / "model.pt", impl="native",
                       bn_config=cfg)
    return d / "model.pt", cfg


def test_every_ordered_pair_converts_and_the_circuit_gives_the_file_back(torch_file, tmp_path):
    """torch→jax→mxnet→torch→mxnet→jax→torch walks all six ordered pairs; every file holds the
    same parameters and eps, and the last is the first, bytes and sidecar."""
    for name in ("torch", "mxnet", "jax"):
        load_backend(name)
    src, cfg = torch_file
    want = trained_like(seed=3, dtype=np.float32)
    circuit = ["torch", "jax", "mxnet", "torch", "mxnet", "jax", "torch"]
    ext = {"torch": ".pt", "mxnet": ".params", "jax": ".msgpack"}
    path = src
    for i, (a, b) in enumerate(zip(circuit, circuit[1:])):
        out = tmp_path / f"{i}-{b}{ext[b]}"
        proc, _ = _convert("--from", a, "--to", b, path, out)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"wrote {out} and {out.name}.bn.json: {a} native")
        assert checkpoint.sidecar_path(out).exists()
        params, got = load_backend(b).load_checkpoint(out)
        assert same(params, want), (a, b)
        assert got["eps"] == cfg["eps"] and got["decay"] == pytest.approx(cfg["decay"], abs=1e-15)
        assert got["unbiased"] == (b == "torch")  # each native layer's own estimator
        assert ("note: running variance" in proc.stderr) == ("torch" in (a, b))
        path = out
    assert path.read_bytes() == src.read_bytes()
    assert checkpoint.sidecar_path(path).read_bytes() == checkpoint.sidecar_path(src).read_bytes()


def test_the_textbook_sequential_state_dict_converts(tmp_path):
    """A plain `torch.save(nn.Sequential(...).state_dict())`, no sidecar: converted to MXNet
    with PyTorch's layer defaults, and the MXNet file computes the Sequential's logits."""
    load_backend("torch")
    mb = load_backend("mxnet")
    import torch
    from torch import nn

    torch.manual_seed(1)
    seq = nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.BatchNorm2d(6), nn.Sigmoid(), nn.MaxPool2d(2, 2),
        nn.Conv2d(6, 16, 5), nn.BatchNorm2d(16), nn.Sigmoid(), nn.MaxPool2d(2, 2), nn.Flatten(),
        nn.Linear(256, 120), nn.BatchNorm1d(120), nn.Sigmoid(), nn.Linear(120, 84),
        nn.BatchNorm1d(84), nn.Sigmoid(), nn.Linear(84, 10)).double()
    x = torch.rand(16, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        seq.train()(x)  # running statistics away from their initial values
        want = seq.eval()(x).numpy()
    torch.save(seq.state_dict(), tmp_path / "seq.pt")
    proc, _ = _convert("--from", "torch", "--to", "mxnet", tmp_path / "seq.pt", tmp_path / "seq.params")
    assert proc.returncode == 0, proc.stderr
    assert "sequential layout, no sidecar: the layer defaults" in proc.stdout
    params, cfg = mb.load_checkpoint(tmp_path / "seq.params")
    assert cfg == {"eps": 1e-5, "decay": 0.9, "unbiased": False, "num_batches_tracked": 1}
    got = mb.lenet_eval(params, x.numpy(), impl="native", eps=cfg["eps"])
    assert np.max(np.abs(got - want)) <= 1e-12


def test_same_framework_rewrites_in_its_own_names(tmp_path):
    """--from torch --to torch: a textbook state_dict becomes LeNetBN's, with a sidecar."""
    tb = load_backend("torch")
    import torch

    state = convert.to_flat("torch", trained_like(seed=4), "native", layout="sequential")
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "seq.pt")
    proc, _ = _convert("--from", "torch", "--to", "torch", tmp_path / "seq.pt", tmp_path / "lenet.pt")
    assert proc.returncode == 0, proc.stderr
    r = tb.read_checkpoint(tmp_path / "lenet.pt")
    assert r["layout"] == "lenet" and r["sidecar"] and same(r["params"], trained_like(seed=4))


def test_existing_out_needs_force(torch_file, tmp_path):
    load_backend("jax")
    src, _ = torch_file
    out = tmp_path / "m.msgpack"
    out.write_bytes(b"keep me")
    proc, seconds = _convert("--from", "torch", "--to", "jax", src, out)
    _refused(proc, seconds, "exists", "--force")
    assert out.read_bytes() == b"keep me" and not checkpoint.sidecar_path(out).exists()
    proc, _ = _convert("--from", "torch", "--to", "jax", src, out, "--force")
    assert proc.returncode == 0, proc.stderr
    assert same(load_backend("jax").load_checkpoint(out)[0], trained_like(seed=3, dtype=np.float32))
    out2 = tmp_path / "n.msgpack"
    checkpoint.sidecar_path(out2).write_text("{}")  # a sidecar alone is also something to keep
    _refused(*_convert("--from", "torch", "--to", "jax", src, out2), "n.msgpack.bn.json", "exists")


def _bad_files(tmp_path, torch_file):
    """name -> (IN, --from): bad checkpoints for the framework that reads them."""
    import torch

    load_backend("torch")
    src, _ = torch_file
    good = src.read_bytes()
    files = {}
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    files["truncated"] = (tmp_path / "truncated.pt", "torch")
    (tmp_path / "text.msgpack").write_text("conv1.weight = 1\n")
    files["foreign"] = (tmp_path / "text.msgpack", "jax")
    files["another framework's file"] = (src, "jax")
    state = {k: torch.from_numpy(v) for k, v in
             convert.to_flat("torch", trained_like(), "native").items()}
    shape = dict(state, **{"fc1.weight": torch.zeros(120, 255, dtype=torch.float64)})
    torch.save(shape, tmp_path / "shape.pt")
    files["mismatched shape"] = (tmp_path / "shape.pt", "torch")
    extra = dict(state, **{"bn5.gamma": torch.ones(3, dtype=torch.float64)})
    torch.save(extra, tmp_path / "extra.pt")
    files["unexpected key"] = (tmp_path / "extra.pt", "torch")
    missing = {k: v for k, v in state.items() if k != "bn2.running_var"}
    torch.save(missing, tmp_path / "missing.pt")
    files["missing key"] = (tmp_path / "missing.pt", "torch")
    jb = load_backend("jax")  # a sidecar asking Flax's layer for the unbiased running variance
    jb.save_checkpoint(trained_like(), tmp_path / "unbiased.msgpack", impl="native",
                       bn_config={"eps": 1e-5, "decay": 0.9, "unbiased": False})
    side = checkpoint.sidecar_path(tmp_path / "unbiased.msgpack")
    side.write_text(side.read_text().replace('"unbiased": false', '"unbiased": true'))
    files["settings the layer cannot run"] = (tmp_path / "unbiased.msgpack", "jax")
    return files


BAD_FILES = {"truncated": "not a PyTorch checkpoint", "foreign": "not a Flax msgpack checkpoint",
             "another framework's file": "not a Flax msgpack checkpoint",
             "mismatched shape": "'fc1.weight' has shape (120, 255), expected (120, 256)",
             "unexpected key": "unexpected key 'bn5.gamma'",
             "missing key": "missing key 'bn2.running_var'",
             "settings the layer cannot run": "cannot be expressed"}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_checkpoints_are_refused_in_one_line_naming_the_problem(case, torch_file, tmp_path):
    path, framework = _bad_files(tmp_path, torch_file)[case]
    out = tmp_path / "out.params"
    proc, seconds = _convert("--from", framework, "--to", "mxnet", path, out)
    line = _refused(proc, seconds, BAD_FILES[case])
    assert str(path) in line
    assert not out.exists() and not checkpoint.sidecar_path(out).exists()


def test_bad_command_lines_are_refused_before_any_framework_starts(torch_file, tmp_path):
    src, _ = torch_file
    (tmp_path / "empty.pt").write_bytes(b"")
    cases = {
        "unknown framework": (["--from", "tensorflow", "--to", "jax", src, tmp_path / "o"], "invalid choice"),
        "no --to": (["--from", "torch", src, tmp_path / "o"], "--to"),
        "IN missing": (["--from", "torch", "--to", "jax", tmp_path / "nope.pt", tmp_path / "o"], "no such file"),
        "IN a directory": (["--from", "torch", "--to", "jax", tmp_path, tmp_path / "o"], "is a directory"),
        "IN empty": (["--from", "torch", "--to", "jax", tmp_path / "empty.pt", tmp_path / "o"], "empty"),
        "OUT a directory": (["--from", "torch", "--to", "jax", src, tmp_path], "is a directory"),
        "OUT's directory missing": (["--from", "torch", "--to", "jax", src, tmp_path / "no" / "o"],
                                    "does not exist"),
        "bad --python": (["--from", "torch", "--to", "jax", src, tmp_path / "o", "--python", "jax"],
                         "NAME=INTERPRETER"),
    }
    for case, (argv, words) in cases.items():
        proc, seconds = _convert(*argv)
        _refused(proc, seconds, words)
        assert seconds < 2, (case, seconds)  # no framework was started
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.pt"]


def test_an_unavailable_framework_is_exit_1_with_the_reason(torch_file, tmp_path):
    """The target's interpreter finds a broken `jax` first: the backend is unavailable."""
    src, _ = torch_file
    broken = tmp_path / "broken"
    (broken / "jax").mkdir(parents=True)
    (broken / "jax" / "__init__.py").write_text("raise ImportError('no jaxlib for this CPU')\n")
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={broken}:$PYTHONPATH exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    out = tmp_path / "m.msgpack"
    proc, _ = _convert("--from", "torch", "--to", "jax", src, out, "--python", f"jax={python}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "backend 'jax' is unavailable" in proc.stderr and "no jaxlib for this CPU" in proc.stderr
    assert not out.exists()
