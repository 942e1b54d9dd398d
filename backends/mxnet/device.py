"""Device selection for the MXNet backend, shared by `lenet.py` and `train.py` (kept apart from
both so that neither imports the other)."""
from __future__ import annotations

import mxnet as mx

from backends import DeviceUnavailable

CUDA_BUILDS = ("this MXNet build has no CUDA support (MXNet ships GPU builds as separate wheels "
               "named after the CUDA version): pip uninstall mxnet && pip install "
               "mxnet-cu112==1.9.1  (1.9.1 builds exist for CUDA 10.1 to 11.7: mxnet-cu101 ... "
               "mxnet-cu117; they also need numpy<2)")


def _num_gpus() -> int:
    try:
        return mx.context.num_gpus()
    except mx.base.MXNetError:  # some builds raise instead of reporting 0 without a driver
        return 0


def context(device="auto"):
    """(mx.Context, description) for device "auto", "cpu" or "gpu"."""
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
    if device == "cpu":
        return mx.cpu(), "cpu"
    if not mx.runtime.Features().is_enabled("CUDA"):
        if device == "gpu":
            raise DeviceUnavailable(f"MXNet cannot use a GPU: {CUDA_BUILDS}")
        return mx.cpu(), "cpu"
    if _num_gpus() == 0:
        if device == "gpu":
            raise DeviceUnavailable("MXNet was built with CUDA but sees no GPU (driver missing "
                                    "or CUDA_VISIBLE_DEVICES empty)")
        return mx.cpu(), "cpu"
    return mx.gpu(0), "gpu(0)"
