"""Device selection for the PyTorch backend, shared by `lenet.py` and `train.py` (kept apart from
both so that neither imports the other)."""
from __future__ import annotations

import torch

from backends import DeviceUnavailable


def _no_cuda_reason() -> str:
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return (f"this PyTorch build ({torch.__version__}) is CPU-only (torch.version.cuda is "
                "None); install a CUDA build of torch to train on a GPU")
    return (f"torch.cuda.is_available() is False (PyTorch {torch.__version__}, CUDA "
            f"{torch.version.cuda}): no GPU or driver is visible (check nvidia-smi and "
            "CUDA_VISIBLE_DEVICES)")


def resolve_device(device="auto") -> tuple[torch.device, str]:
    """(torch.device, description) for "auto" (CUDA if usable, else CPU), "cpu", "gpu"/"cuda" or
    "cuda:N". A GPU request that cannot be met raises DeviceUnavailable saying why."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise ValueError(f"device must be a string such as 'auto', 'cpu' or 'gpu', got {device!r}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu"), "cpu"
    if device in ("auto", "gpu", "cuda") or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"device={device!r} needs a CUDA GPU, but {_no_cuda_reason()}. "
                                    "Use device='cpu' or 'auto'.")
        if device.startswith("cuda:"):
            dev = torch.device(device)
            if dev.index >= torch.cuda.device_count():
                raise DeviceUnavailable(f"device={device!r}: only {torch.cuda.device_count()} "
                                        "CUDA device(s) visible")
        else:
            dev = torch.device("cuda", torch.cuda.current_device())
        return dev, f"{dev} ({torch.cuda.get_device_name(dev)})"
    raise ValueError(f"device must be 'auto', 'cpu', 'gpu' or 'cuda[:N]', got {device!r}")
