"""Dtypes and mixed precision for the MXNet backend: MXNet's own bfloat16 dtype, NumPy <-> NDArray
conversion for every `common.dtypes` dtype, what this MXNet build can run in float16/bfloat16,
and `MixedPrecision`, how LeNet-BN trains in a dtype.

MXNet's idiom for float16 is `block.cast('float16')` with batch norm kept in float32 (Gluon's
`BatchNorm.cast` keeps its parameters and moving statistics float32; its operator refuses
float16 ones) and `multi_precision=True` in the optimizer (float32 master weights). What MXNet
1.9.1 lacks was measured on this build:
- float16 on the CPU: `Convolution` fails with "FP16 gemm on cpu not implemented!",
  `FullyConnected` with "float16 fully connected layer is currently only supported by CuDNN
  version", `dot` refuses float16 outside the GPU. Pooling, activations, softmax cross-entropy,
  reductions, broadcast arithmetic and `BatchNorm` (float32 parameters) run.
- bfloat16 (MXNet's `[('bfloat16', '<u2')]` dtype, MKLDNN CPU builds): convolutions, fully
  connected layers, activations, pooling and `BatchNorm` (float32 parameters) run forward and
  backward; `dot` does not, and no optimizer update has a bfloat16 kernel (`sgd_update` and
  `mp_sgd_update` fail with "Unknown type enum 12"): bfloat16 in MXNet 1.9 is
  `mx.contrib.amp`'s conversion of trained models for inference.
"""
from __future__ import annotations

import mxnet as mx
import numpy as np

from backends import UnsupportedSetting
from common import dtypes

BF16 = np.dtype([("bfloat16", np.uint16)])  # how MXNet 1.x spells bfloat16

NO_FLOAT16_CPU = ("MXNet {version}'s CPU operators have no float16 matrix product: Convolution "
                  "fails with 'FP16 gemm on cpu not implemented!', FullyConnected with 'float16 "
                  "fully connected layer is currently only supported by CuDNN version' (float16 "
                  "is a GPU format in MXNet 1.x)")
NO_BFLOAT16_TRAINING = ("MXNet {version} has no bfloat16 optimizer update (sgd_update and "
                        "mp_sgd_update fail with 'Unknown type enum 12') and Gluon's "
                        "multi_precision keeps float32 master weights for float16 only: "
                        "bfloat16 in MXNet 1.x is mx.contrib.amp's inference conversion on "
                        "MKLDNN CPUs")


def mx_dtype(dtype):
    """The MXNet dtype of a `common.dtypes` name or NumPy/ml_dtypes dtype, or of an MXNet dtype
    (BF16 included): "float64", "float32", "float16" or BF16."""
    if isinstance(dtype, np.dtype) and dtype == BF16:
        return BF16
    name = dtypes.float_dtype(dtype).name
    return BF16 if name == "bfloat16" else name


def dtype_name(mx_dt) -> str:
    """The `common.dtypes` name of an MXNet dtype."""
    return "bfloat16" if np.dtype(mx_dt) == BF16 else np.dtype(mx_dt).name


def array(a, dtype, ctx=None) -> mx.nd.NDArray:
    """A NumPy array (any `common.dtypes` dtype) as an NDArray of `dtype` (see `mx_dtype`) on
    `ctx`; bfloat16 goes through float32, which holds it exactly."""
    a = np.asarray(a)
    if a.dtype == dtypes.BFLOAT16:
        a = a.astype(np.float32)
    target = mx_dtype(dtype)
    if target is BF16:
        return mx.nd.array(a, dtype="float32", ctx=ctx).astype(BF16)
    return mx.nd.array(a, dtype=target, ctx=ctx)


def numpy(nd: mx.nd.NDArray) -> np.ndarray:
    """An NDArray as a NumPy array of the same dtype (bfloat16 as ml_dtypes.bfloat16)."""
    if np.dtype(nd.dtype) == BF16:
        return nd.astype("float32").asnumpy().astype(dtypes.BFLOAT16)
    return nd.asnumpy().copy()


def check_layer_dtype(dtype, ctx) -> None:
    """UnsupportedSetting where this build cannot run a batch-norm layer in `dtype` on `ctx`:
    bfloat16 needs MKLDNN (CPU); MXNet 1.x has no bfloat16 GPU operators."""
    name = dtypes.float_dtype(dtype).name
    if name != "bfloat16":
        return
    if ctx.device_type == "gpu":
        raise UnsupportedSetting(f"MXNet {mx.__version__} has no bfloat16 GPU operators "
                                 "(its bfloat16 is MKLDNN's, on the CPU)")
    if not mx.runtime.Features().is_enabled("MKLDNN"):
        raise UnsupportedSetting(f"this MXNet {mx.__version__} build has no MKLDNN, which its "
                                 "bfloat16 operators need")


def check_training_dtype(dtype, ctx) -> None:
    """UnsupportedSetting where LeNet-BN cannot train in `dtype` on `ctx` (see the module
    docstring for what was measured)."""
    name = dtypes.float_dtype(dtype).name
    if name == "float16" and ctx.device_type == "cpu":
        raise UnsupportedSetting(NO_FLOAT16_CPU.format(version=mx.__version__))
    if name == "bfloat16":
        raise UnsupportedSetting(NO_BFLOAT16_TRAINING.format(version=mx.__version__))


class MixedPrecision:
    """How LeNet-BN trains in `dtype` on `ctx`. float32/float64: everything in that dtype, as
    before. float16 (GPU): the network cast to float16 with batch norm in float32, float32 master
    weights (`multi_precision`; `master` below for the hand-written update of `lenet_train`),
    the loss computed from float32 logits, and static loss scaling (`common.dtypes.loss_scale`):
    the loss is scaled before backward, the gradients unscaled in float32, and a step whose
    gradients are not finite is skipped and counted."""

    def __init__(self, dtype, ctx, loss_scale=None):
        self.name = dtypes.float_dtype(dtype).name
        self.low = self.name in dtypes.LOW
        check_training_dtype(self.name, ctx)
        self.dtype = mx_dtype(self.name)  # the network's (batch norm stays float32)
        self.float_dtype = "float32" if self.low else self.dtype  # loss, labels, sums
        self.loss_scale = dtypes.loss_scale(self.name, loss_scale)
        self.skipped = 0

    def logits(self, logits):
        return logits.astype("float32") if self.low else logits

    def scaled(self, loss):
        return loss * self.loss_scale if self.loss_scale != 1.0 else loss

    def finite(self, params) -> bool:
        """Whether every gradient of `params` is finite (a host sync; counts a skipped step)."""
        if self.loss_scale == 1.0:
            return True
        ok = all(bool(mx.nd.contrib.isfinite(p.grad()).min().asscalar()) for p in params)
        self.skipped += not ok
        return ok

    def master_weights(self, params) -> dict:
        """float32 copies of the low-precision parameters (what `multi_precision` keeps)."""
        return {p.name: p.data().astype("float32") for p in params
                if np.dtype(p.dtype) != np.float32 and self.low}

    def sgd(self, params, lr, master) -> None:
        """w -= lr * grad for every parameter (unscaled; on float32 master copies where the
        parameter is float16), skipped when a gradient is not finite."""
        if not self.finite(params):
            return
        for p in params:
            if p.name in master:
                w = master[p.name]
                w[:] -= (lr / self.loss_scale) * p.grad().astype("float32")
                p.data()[:] = w.astype(p.dtype)
            else:
                p.data()[:] -= (lr / self.loss_scale) * p.grad()

    def summary(self) -> dict:
        if not self.low:
            return {}
        return {"precision": {"compute": self.name, "params": "float32",
                              "idiom": "block.cast('float16'), batch norm in float32, "
                                       "multi_precision", "loss_scale": self.loss_scale,
                              "skipped_steps": self.skipped}}
