"""Dtypes and mixed precision for the PyTorch backend: the torch dtype of each `common.dtypes`
name, NumPy <-> torch conversion that keeps bfloat16 (which NumPy lacks natively), and
`MixedPrecision`, how LeNet-BN trains in a dtype.

PyTorch's idiom for float16/bfloat16 training is `torch.autocast`: the model keeps float32
parameters, and inside the autocast region convolutions and matrix products run in the low dtype
while batch norm takes the low-precision input with its float32 weight, bias and running
statistics (`precision_probe` in bn.py measures what it computes them in).
"""
from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch

from backends import UnsupportedSetting
from common import dtypes

TORCH = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
         "bfloat16": torch.bfloat16}
NAMES = {v: k for k, v in TORCH.items()}


def torch_dtype(dtype) -> torch.dtype:
    """torch dtype for a `common.dtypes` name (or the NumPy/ml_dtypes/torch equivalent)."""
    if isinstance(dtype, torch.dtype) and dtype in NAMES:
        return dtype
    return TORCH[dtypes.float_dtype(dtype).name]


def tensor(a, dtype, device="cpu") -> torch.Tensor:
    """A NumPy array (any `common.dtypes` dtype) as a torch tensor of `dtype` on `device`.
    bfloat16 goes through float32, which holds it exactly."""
    a = np.asarray(a)
    if a.dtype == dtypes.BFLOAT16:
        a = a.astype(np.float32)
    return torch.as_tensor(a).to(device=device, dtype=torch_dtype(dtype))


def numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor as a NumPy array of the same dtype (bfloat16 as ml_dtypes.bfloat16), copied."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(dtypes.BFLOAT16)
    return t.numpy().copy()


def check_autocast(device_type: str, dtype: torch.dtype) -> None:
    """UnsupportedSetting, with torch's reason, if autocast cannot run `dtype` on this device
    (older CPU builds warn and disable autocast for float16 instead of failing)."""
    if device_type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UnsupportedSetting(f"torch {torch.__version__}: this GPU has no bfloat16 support "
                                 "(torch.cuda.is_bf16_supported() is False)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autocast(device_type, dtype=dtype):
            ok = (torch.is_autocast_enabled(device_type)
                  and torch.get_autocast_dtype(device_type) == dtype)
    if not ok:
        said = "; ".join(str(w.message) for w in caught) or "autocast stayed disabled"
        raise UnsupportedSetting(f"torch {torch.__version__} autocast on {device_type} cannot run "
                                 f"{NAMES[dtype]}: {said}")


def autocast(device_type: str, dtype: torch.dtype):
    """The autocast region of a low-precision step (weight-cast cache off, so that the region can
    be captured in a CUDA graph); a null context for float32/float64."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device_type, dtype=dtype, cache_enabled=False)
    return contextlib.nullcontext()


class MixedPrecision:
    """How LeNet-BN trains in `dtype` on `device`.

    float32/float64: parameters, data and arithmetic in that dtype, no loss scaling (as before).
    float16/bfloat16: float32 parameters (the master weights the optimizer updates), float32
    data, the forward pass under `torch.autocast(dtype)`, the loss computed from float32 logits,
    and static loss scaling (`common.dtypes.loss_scale`: float16 ×1024 by default): the loss is
    scaled before backward, the float32 gradients unscaled, and a step whose gradients are not
    finite is skipped (zero update, counted in `skipped`), all on the device, so no step waits
    on the host and the step can be captured in a CUDA graph."""

    def __init__(self, dtype, device: torch.device, loss_scale=None):
        self.name = dtypes.float_dtype(dtype).name
        self.low = self.name in dtypes.LOW
        self.compute = torch_dtype(self.name)
        self.param_dtype = torch.float32 if self.low else self.compute
        self.device = device
        self.loss_scale = dtypes.loss_scale(self.name, loss_scale)
        if self.low:
            check_autocast(device.type, self.compute)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)

    def autocast(self):
        return autocast(self.device.type, self.compute)

    def backward(self, loss, params) -> None:
        """loss.backward(), with loss scaling and the overflow check when scaling is on."""
        if self.loss_scale == 1.0:
            loss.backward()
            return
        (loss * self.loss_scale).backward()
        grads = [p.grad for p in params if p.grad is not None]
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
        keep = finite.to(grads[0].dtype) / self.loss_scale
        for g in grads:
            g.nan_to_num_(0.0, 0.0, 0.0).mul_(keep)  # all zero when any is not finite: no update
        self.skipped += (~finite).to(torch.int64)

    def summary(self) -> dict:
        """{} in float32/float64; else {"precision": what ran: compute and parameter dtypes, the
        idiom, the loss scale and how many steps it skipped}."""
        if not self.low:
            return {}
        return {"precision": {"compute": self.name, "params": "float32",
                              "idiom": f"torch.autocast({self.device.type!r}, {self.name})",
                              "loss_scale": self.loss_scale, "skipped_steps": int(self.skipped)}}
