"""Device selection for the JAX backend, shared by `lenet.py` and `train.py`."""
from __future__ import annotations

import jax

from backends import DeviceUnavailable


def select_device(device="auto"):
    """(jax.Device, description) for "auto" (a GPU when JAX sees one), "cpu" or "gpu"."""
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
    if device in ("auto", "gpu"):
        try:
            gpus = jax.devices("gpu")
        except RuntimeError as e:
            gpus, reason = [], str(e).splitlines()[0]
        else:
            reason = "jax.devices('gpu') is empty"
        if gpus:
            d = gpus[0]
            kind = "cuda" if "nvidia" in d.device_kind.lower() else d.platform
            return d, f"{kind}:{d.id} ({d.device_kind})"
        if device == "gpu":
            raise DeviceUnavailable(
                f"JAX sees no GPU (backend {jax.default_backend()!r}; {reason}). Install a CUDA "
                f"build (pip install 'jax[cuda12]') or use device='cpu'.")
    return jax.devices("cpu")[0], "cpu"
