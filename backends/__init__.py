"""Backend registry: one subpackage per framework, imported only when asked for.

Rules (after einops' `_backends.py`): importing this package imports no framework; a backend whose
framework is missing or broken is reported *unavailable, with the reason and the install hint*,
and never breaks the others.

The contract every backend (`backends.<name>`, numpy in, numpy out) implements. The modules have
the same names in every backend: `bn.py` (from-scratch `batch_norm`, the `BatchNorm` layer,
`bn_step`, `conventions`), `lenet.py` (LeNet-BN, `lenet_train`, `lenet_eval`, `lenet_layers`),
`checkpoint.py` (`save_checkpoint`, `load_checkpoint`), `train.py` (training loop on the common
loader, device selection). Layouts and names of each framework are `common.convert`'s.

IMPLS: tuple of impl names; "scratch" and "native" in every backend (torch adds
    "scratch-analytic").

bn_step(x, gamma, beta, running_mean, running_var, dy, *, training, eps=1e-5, decay=0.9,
        unbiased=False, impl="scratch") -> dict
    The signature and return dict of `common.reference.bn_step` (y, dx, dgamma, dbeta,
    running_mean, running_var), computed by `impl` in the input's dtype (float32 or float64).
    `decay` is canonical (`common.spec`) and translated to the impl's own `momentum`. A setting
    the impl cannot express raises `UnsupportedSetting` (a ValueError) instead of computing
    something else; bad shapes raise ValueError (`common.reference.validate_inputs`).

conventions() -> {impl: {field: value for field in common.spec.CONVENTION_FIELDS}}
    For "native", defaults read from the installed framework, not hard-coded.

lenet_train(params, batches, *, lr, impl, eps=1e-5, decay=0.9, unbiased=None, dtype="float64",
            device="cpu") -> {"losses": [float per step], "params": canonical dict}
    Plain SGD on cross-entropy from the canonical parameter dict (`common.lenet`) over
    `batches`, an iterable of (x N×1×28×28 float, y int) NumPy pairs. `unbiased=None` keeps the
    impl's own running-variance convention.

lenet_eval(params, x, *, impl, dtype="float64", device="cpu", eps=1e-5, fix_gamma=False)
        -> logits (N×10 NumPy array)
    Inference mode: running statistics, with the checkpoint's eps. `fix_gamma=True` computes as
    MXNet's fix_gamma=True does (every gamma taken as 1): MXNet's native layer with its own
    option, every other impl with gamma replaced by ones.

lenet_layers(params, x, *, impl, dtype="float64", device="cpu", eps=1e-5, fix_gamma=False,
             inputs=None) -> {layer: activation}
    `lenet_eval`'s forward, every layer's output (`common.lenet.LAYERS`: conv1, bn1, sigmoid1,
    pool1, ..., flatten, fc1, ..., fc3) in canonical layouts (NCHW; flatten in C×H×W order).
    `inputs={layer: array}` (same layouts) feeds that layer the given input instead of the
    previous layer's output (isolated mode, see `common.divergence`).

save_checkpoint(params, path, *, impl, bn_config) -> None
load_checkpoint(path) -> (params, bn_config)
read_checkpoint(path) -> {"params", "bn_config", "impl", "layout", "sidecar"}
    (in checkpoint.py) LeNet-BN in the framework's own format: PyTorch state_dict (torch.save),
    Flax variables (flax.serialization msgpack), Gluon parameters (save_parameters); params
    keep their dtype. `bn_config` is canonical {eps, decay, unbiased[, num_batches_tracked]}
    (`common.convert.check_bn_config`), kept as the framework's own settings in a JSON sidecar
    (`common.checkpoint`); a setting the impl cannot run raises UnsupportedSetting. Loading
    tells the impl from the file's names where they differ (and the sidecar), takes the
    textbook nn.Sequential layouts too, and without a sidecar uses the layer's defaults. Writes
    are atomic; a truncated, foreign or mismatched file is a one-line ValueError naming the
    problem (the key, for a mismatch).

fit(data, *, impl, epochs, batch_size=256, lr=1.0, seed=0, device="auto", dtype="float32",
    eps=1e-5, decay=0.9, params=None, progress=None) -> dict
    (in train.py) Trains LeNet-BN on `data` (a `common.data.Dataset`: NCHW float train/test
    arrays) with minibatches from `common.data.batch_indices(n, batch_size, seed=seed,
    epoch=e)`, so every backend sees the same batches in the same order. `device`: "auto" (the
    GPU where this backend can use one), "cpu" or "gpu" (raises DeviceUnavailable, with a clear
    reason, if it cannot). `progress(str)` gets a line per epoch. Returns {"device": description
    of the device actually used, "history": [{"epoch", "loss", "train_acc", "test_acc",
    "examples_per_s", "seconds"}], "final_loss", "train_acc", "test_acc", "examples_per_s",
    "wall_s"}; examples_per_s counts training steps only.

probe(impl, x, *, momentum=None, eps=None) -> dict
    Evidence for conventions(): a fresh layer of `impl` built with its OWN defaults (momentum and
    eps overridden only when given, in the impl's own meaning) runs one training step on `x`
    (N×C×H×W float64 NumPy; converted to the impl's layout inside) with upstream gradient ones.
    Returns {"momentum": used, "eps": used, "initial": stats, "after_forward": stats,
    "after_backward": stats, "y": output in NCHW}, stats = {"running_mean", "running_var"}.
    `common.conventions.infer` turns this into the convention fields, so the conventions table
    is an experiment, not a claim.

speed_timer(*, impl, device="auto", batch_size=256, dtype="float32", steps=50) -> timer
    (in train.py) Training-step throughput of LeNet-BN on the fastest path this backend has for
    `impl` on `device` (data resident on the device, compiled/fused steps where the framework
    offers them), on synthetic Fashion-MNIST-shaped data. Creating the timer builds, compiles and
    warms up; `timer.info` is {"compile_s": those seconds, "device": description, "path": what
    is timed (e.g. "CUDA graph", "jit + lax.scan", "eager"), ...}; `timer.run()` times `steps`
    steps with proper synchronisation and returns {"examples_per_s": ..., ...}. compare.py
    creates every impl's timer and then takes the runs round-robin, so that a slow spell of a
    shared machine hits every impl alike and the scratch/native ratio is measured fairly. The
    fast path must give the same losses as the plain `lenet_train` path (tested).

speed(*, impl, device="auto", batch_size=256, dtype="float32", steps=50, repeats=5) -> dict
    (in train.py) One impl alone: `time_alone(speed_timer(...), repeats)`.

exact_numerics() -> None
    Turn off TF32 and reduced-precision matmuls in this process (for agreement/trajectory runs on
    a GPU). A no-op where the framework has none.

versions() -> {package: version} of the framework packages this backend uses.
"""
from __future__ import annotations

import importlib
import statistics

from common.spec import UnsupportedSetting  # noqa: F401  (part of the backend contract)

_NAMES = ("torch", "mxnet", "jax")

INSTALL_HINTS = {
    "torch": "pip install torch==2.13.0  (CPU; for CUDA see the README)",
    "mxnet": "pip install mxnet==1.9.1 'numpy<2'  (MXNet 1.9.1 needs numpy<2)",
    "jax": "pip install jax jaxlib flax optax  (for CUDA: pip install 'jax[cuda12]' flax optax)",
}


class BackendUnavailable(ImportError):
    """A backend's framework is not installed or fails to import."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason
        super().__init__(f"backend {name!r} is unavailable: {reason}. Install: {INSTALL_HINTS[name]}")


class DeviceUnavailable(RuntimeError):
    """The requested device (e.g. a GPU) cannot be used by this backend; the message says why."""


def names() -> list[str]:
    return list(_NAMES)


def load(name: str):
    """Import and return backend `name`, or raise BackendUnavailable saying why."""
    if name not in _NAMES:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(_NAMES)}")
    try:
        return importlib.import_module(f"backends.{name}")
    except BackendUnavailable:
        raise
    except Exception as e:  # a broken install can raise anything at import time
        raise BackendUnavailable(name, f"{type(e).__name__}: {e}") from e


def available(which=None) -> dict[str, str | None]:
    """name -> None if the backend loads, else the reason it does not (imports the frameworks)."""
    status = {}
    for name in which or _NAMES:
        try:
            load(name)
            status[name] = None
        except BackendUnavailable as e:
            status[name] = str(e)
    return status


def positive_int(name: str, v) -> int:
    """`v` as an int if it is an integer >= 1 (not a bool), else ValueError naming `name`."""
    if isinstance(v, bool) or not hasattr(v, "__index__") or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return int(v)


def speed_result(info: dict, runs: list[dict]) -> dict:
    """A speed record from a timer's `info` and its `run()` results: each measured key's median
    (e.g. "examples_per_s") with the list of runs beside it ("runs"; "eager_runs" for
    "eager_examples_per_s")."""
    if not runs:
        raise ValueError("speed_result needs at least one run")
    out = dict(info)
    for key in runs[0]:
        values = [float(r[key]) for r in runs]
        out[key] = statistics.median(values)
        out[key.replace("examples_per_s", "runs")] = values
    return out


def time_alone(timer, repeats) -> dict:
    """Every backend's `speed()`: `repeats` runs of one impl's timer, back to back."""
    repeats = positive_int("repeats", repeats)
    return speed_result(timer.info, [timer.run() for _ in range(repeats)])
