"""Mixed precision for the JAX backend: how LeNet-BN trains in a dtype.

Flax's idiom for float16/bfloat16 is the modules' `dtype` (what they compute and return in) with
`param_dtype` float32 (the parameters, and the gradients and optimizer update, stay float32);
`flax.linen.BatchNorm` then computes its statistics in at least float32
(`jnp.promote_types(dtype, float32)`) and keeps its running statistics in float32. Flax and optax
have no loss scaler, so float16 uses a static one (`common.dtypes.loss_scale`) around
`optax.apply_if_finite`, which skips an update whose gradients are not finite and counts it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import dtypes


class MixedPrecision:
    """The dtypes and loss scale of a LeNet-BN run in `dtype`: float32/float64 compute and keep
    everything in that dtype, as before (`compute` None: the modules follow their inputs);
    float16/bfloat16 compute in that dtype with float32 parameters and float32 data (the first
    convolution casts it)."""

    def __init__(self, dtype, loss_scale=None):
        self.dt = dtypes.float_dtype(dtype)
        self.name = self.dt.name
        self.low = self.name in dtypes.LOW
        self.compute = self.name if self.low else None
        self.param_dtype = np.dtype(np.float32) if self.low else self.dt
        self.loss_scale = dtypes.loss_scale(self.name, loss_scale)

    def key(self) -> tuple:
        """What the compiled step depends on (a cache key)."""
        return self.compute, self.loss_scale

    def summary(self, opt_state) -> dict:
        """{} in float32/float64; else {"precision": compute and parameter dtypes, the idiom,
        the loss scale and the updates `optax.apply_if_finite` skipped}."""
        if not self.low:
            return {}
        skipped = getattr(opt_state, "total_notfinite", 0)
        return {"precision": {"compute": self.name, "params": "float32",
                              "idiom": f"Flax dtype={self.name}, param_dtype=float32",
                              "loss_scale": self.loss_scale,
                              "skipped_steps": int(jax.device_get(skipped))}}


def optimizer(lr: float, loss_scale: float):
    """Plain SGD; with loss scaling on, wrapped in `optax.apply_if_finite` (no update, and a
    count, when the unscaled gradients are not finite)."""
    tx = optax.sgd(lr)
    return tx if loss_scale == 1.0 else optax.apply_if_finite(tx, max_consecutive_errors=2**30)


def float_logits(logits):
    """Logits for the loss: at least float32."""
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
