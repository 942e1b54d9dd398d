"""Backend registry: one subpackage per framework, imported only when asked for.

Rules (after einops' `_backends.py`): importing this package imports no framework; a backend whose
framework is missing or broken is reported *unavailable, with the reason and the install hint*,
and never breaks the others.

The contract every backend (`backends.<name>`, numpy in, numpy out) implements. The modules have
the same names in every backend: `bn.py` (from-scratch `batch_norm`, the `BatchNorm` layer,
`bn_step`, `conventions`), `probe.py` (the conventions experiment's adapter), `lenet.py`
(LeNet-BN, `lenet_train`, `lenet_eval`), `train.py`
(training loop on the common loader, device selection).

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
    Claims: the documented facts of the impl's family (common.spec.DOCUMENTED) and its
    constructor's signature defaults read with `inspect` from the installed framework
    (common.spec.claims); never read back from a built layer.

lenet_train(params, batches, *, lr, impl, eps=1e-5, decay=0.9, unbiased=None, dtype="float64",
            device="cpu") -> {"losses": [float per step], "params": canonical dict}
    Plain SGD on cross-entropy from the canonical parameter dict (`common.lenet`) over
    `batches`, an iterable of (x N×1×28×28 float, y int) NumPy pairs. `unbiased=None` keeps the
    impl's own running-variance convention.

lenet_eval(params, x, *, impl, dtype="float64", device="cpu") -> logits (N×10 NumPy array)
    Inference mode: running statistics.

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

observe(impl, *, seed=0) -> dict
experiment(factory, args=(), kwargs=None, *, name, seed=0) -> dict
    (in probe.py) Evidence for conventions(): `common.conventions.experiment` on fresh layers,
    of `impl` built with its own defaults (observe) or of any layer class or factory of this
    framework (experiment, behind `compare.py probe`), through the backend's adapter
    (`probe.Adapter`, the protocol in common/conventions.py: float64, the framework's own
    training/inference switch, statistics read after forward and after backward). Returns
    {"family", "built", "claimed", "observations"}; `common.conventions.measure(observations)`
    turns the record into the convention fields, so the conventions table is an experiment, not
    a claim. What cannot be probed raises `common.conventions.ProbeInputError` (one line).

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


class UnsupportedSetting(ValueError):
    """A configuration an implementation cannot express (e.g. biased running variance in
    PyTorch's native layer)."""


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
