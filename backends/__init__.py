"""Backend registry: one subpackage per framework, imported only when asked for.

Rules (after einops' `_backends.py`): importing this package imports no framework; a backend whose
framework is missing or broken is reported *unavailable, with the reason and the install hint*,
and never breaks the others.

The contract every backend (`backends.<name>`, numpy in, numpy out) implements. The modules have
the same names in every backend: `bn.py` (from-scratch `batch_norm`, the `BatchNorm` layer,
`bn_step`, `conventions`), `lenet.py` (LeNet-BN, `lenet_train`, `lenet_eval`), `train.py`
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
    For "native", defaults read from the installed framework, not hard-coded.

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

Synchronized batch norm (in sync.py; framework-free parts in `common.sync`, worker processes in
`backends.pool`):

SYNC_IMPLS: ("scratch", "native"). "scratch" merges per-worker (count, mean, M2) count-weighted
    (Chan), so unequal and empty shards give the full-batch statistics; "native" is the
    framework's own layer, measured as it is (torch.nn.SyncBatchNorm, flax BatchNorm(axis_name),
    MXNet contrib SyncBatchNorm).

SyncGroup(world_size, *, timeout=...) -> context manager
    The engine's workers, started once and reused: torch, `world_size` processes in one
    torch.distributed group (gloo on CPU over loopback, nccl with a GPU per worker); jax, one
    child process whose JAX sees `world_size` devices (virtual CPU devices via
    --xla_force_host_platform_device_count); mxnet, one child process with `world_size` CPU
    contexts and a kvstore. Serves any world size up to its own. A worker that raises, dies or
    hangs past the timeout kills every worker: `backends.pool.WorkerError`, one line.
    `.info`: {"engine", "world_size", "processes", "devices"}.

sync_bn_step(xs, gamma, beta, running_mean, running_var, dys, *, training, eps=1e-5, decay=0.9,
             unbiased=False, impl="scratch", group=None) -> dict
    One step on len(xs) workers, NumPy in and out: `xs`/`dys` one array per worker (2-D or 4-D,
    row counts may differ, 0 included). Returns y and dx as lists (one per worker), dgamma and
    dbeta all-reduced, and the running statistics; it must equal `common.sync.reference_step`
    (float64 within 1e-12 relative, float32 within 1e-5). `group`: a SyncGroup to run on (None:
    one started for the call). Bad shards raise one-line ValueErrors (`common.sync.
    validate_shards`); a setting or device the impl cannot serve raises UnsupportedSetting /
    DeviceUnavailable with the framework's own reason.

sync_lenet_train(params, batches, *, world_size, shard_sizes=None, sync=True, lr, eps=1e-5,
                 decay=0.9, unbiased=None, dtype="float64", group=None) -> dict
    Data-parallel LeNet-BN (from-scratch batch norm): each batch split by `shard_sizes` (default
    as equal as possible), the loss Σ cross-entropy / batch size, gradients all-reduced, so the
    update is full-batch SGD. sync=True normalises over the whole batch (the float64 trajectory
    equals `lenet_train`'s to 1e-10); sync=False with each worker's own statistics (running
    statistics then rank 0's). Returns {"losses", "params", "seconds"} (seconds: the training
    loop on the workers after compilation, communication included).

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
