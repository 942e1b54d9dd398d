"""Backend registry: one subpackage per framework, imported only when asked for, and the helpers
the backends share.

Rules (after einops' `_backends.py`): importing this package imports no framework; a backend whose
framework is missing or broken is reported *unavailable, with the reason and the install hint*,
and never breaks the others.

Every backend (`backends.<name>`, NumPy in, NumPy out) has the same modules: `bn.py` (the
textbook formulation of its source, the from-scratch kernels, the `BatchNorm` layer, `make_layer`,
`bn_step`, `conventions`), `probe.py` (the conventions experiment's adapter), `lenet.py` (LeNet-BN, `lenet_train`, `lenet_eval`),
`device.py` (device selection) and `train.py` (`fit`, `speed_timer`, `speed`). What a backend
exports, with every signature and its meaning, is written once, as code, in `backends/contract.py`
(`contract.check(module)` lists where a module departs from it).
"""
from __future__ import annotations

import importlib
import statistics

from common.spec import BNSpec  # framework-free
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


def check_layer_config(num_features, num_dims, eps, decay) -> int:
    """Every backend's `make_layer` arguments checked alike: `num_features` (returned as an int)
    >= 1, `num_dims` 2 or 4, `eps` and `decay` through `common.spec.BNSpec`; else ValueError."""
    num_features = positive_int("num_features", num_features)
    if num_dims not in (2, 4):
        raise ValueError(f"num_dims must be 2 or 4, got {num_dims!r}")
    BNSpec(eps=eps, decay=decay)
    return num_features


SYNTHETIC_IMAGES = 60_000  # the Fashion-MNIST training set's size


def synthetic_batches(batch_size: int, wanted: int) -> int:
    """How many distinct synthetic batches a speed timer holds: `wanted`, but no more images in
    all than the Fashion-MNIST training set (one batch at least), so a large batch size cannot
    make a timer allocate gigabytes."""
    return max(1, min(wanted, SYNTHETIC_IMAGES // batch_size))


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


def epoch_line(row: dict, epochs: int, device: str) -> str:
    """One progress line per training epoch, the same for every backend's `fit` (compare.py
    prefixes the backend/impl)."""
    return (f"epoch {row['epoch']}/{epochs}: loss {row['loss']:.4f}, train acc {row['train_acc']:.3f}, "
            f"test acc {row['test_acc']:.3f}, {row['examples_per_s']:,.0f} examples/s on {device}")


def time_alone(timer, repeats) -> dict:
    """Every backend's `speed()`: `repeats` runs of one impl's timer, back to back."""
    repeats = positive_int("repeats", repeats)
    return speed_result(timer.info, [timer.run() for _ in range(repeats)])
