"""The floating-point formats every backend accepts, in one place: float64, float32 and the two
16-bit formats of mixed-precision training, float16 and bfloat16, with their epsilons and the
statistics-precision switch of the from-scratch layers.

NumPy has float16; bfloat16 comes from `ml_dtypes` (the package JAX uses for it; it is not a
framework), so `np.dtype("bfloat16")` works once this module is imported. Arrays of either travel
between the backends and the reference as NumPy arrays of that dtype; widening them to float32 or
float64 is exact, so the float64 reference sees exactly the values an impl was given.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

DTYPES = ("float64", "float32", "float16", "bfloat16")
LOW = ("float16", "bfloat16")  # the mixed-precision formats
ACCUMULATE = ("float32", "input")
# accumulate="float32" (the default, the correct way): a from-scratch layer computes its mean and
# variance in at least float32 (jnp.promote_types(input, float32), as Flax does) and keeps its
# parameters and running statistics in float32; only the output is cast back to the input dtype.
# accumulate="input": the layer as written naively for the input dtype: parameters, running
# statistics, mean, variance and the centred values all in that dtype.

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def float_dtype(dtype_like, allowed=DTYPES) -> np.dtype:
    """The NumPy dtype of `dtype_like` (a name, a NumPy/ml_dtypes type or dtype, or an array) if
    it is one of `allowed`, else ValueError naming them."""
    try:
        dt = (np.dtype(dtype_like) if isinstance(dtype_like, (str, type, np.dtype))
              else np.asarray(dtype_like).dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in allowed:
        choices = " or ".join(allowed) if len(allowed) == 2 else "one of " + ", ".join(allowed)
        raise ValueError(f"dtype must be {choices}, got "
                         f"{dtype_like if dt is None else dt!r}")
    return dt


def is_low(dtype_like) -> bool:
    """Whether `dtype_like` is float16 or bfloat16."""
    return float_dtype(dtype_like).name in LOW


def eps(dtype_like) -> float:
    """Machine epsilon (the gap between 1 and the next number): float16 2^-10 = 9.8e-4,
    bfloat16 2^-7 = 7.8e-3, float32 2^-23, float64 2^-52."""
    return float(ml_dtypes.finfo(float_dtype(dtype_like)).eps)


def check_accumulate(accumulate) -> str:
    if accumulate not in ACCUMULATE:
        raise ValueError(f"accumulate must be one of {', '.join(map(repr, ACCUMULATE))}, got "
                         f"{accumulate!r}")
    return accumulate


def stats_dtype(input_dtype, accumulate="float32") -> np.dtype:
    """The dtype a from-scratch layer computes its statistics in: the input's for
    accumulate="input", else at least float32 (float64 stays float64)."""
    dt = float_dtype(input_dtype)
    if check_accumulate(accumulate) == "input" or dt == np.float64:
        return dt
    return np.dtype(np.float32)


def cast(a, dtype) -> np.ndarray:
    """`a` rounded to `dtype` (round to nearest even, as every framework casts)."""
    return np.asarray(a).astype(float_dtype(dtype))


# -- loss scaling ------------------------------------------------------------------------------
FLOAT16_LOSS_SCALE = 1024.0
"""The static loss scale of float16 training (2^10). float16's smallest subnormal is 6e-8, while
LeNet-BN's activation gradients go down to 1e-13 (conv1's output, float32, batch 256). Measured
on the first step from `common.lenet.init_params(0)` on 256 sample images (PyTorch autocast,
native batch norm): unscaled float16 flushes 3.9% of conv1's output gradients and 0.6% of
conv2's to exactly zero (float32 and bfloat16: none); ×1024 flushes none, and the largest
gradient (~7e-3) stays far below float16's 65504. bfloat16 has float32's exponent range and
needs no scaling."""


def loss_scale(dtype, requested=None) -> float:
    """The static loss scale training in `dtype` uses: `requested` if given (a positive finite
    number; 1 turns scaling off), else FLOAT16_LOSS_SCALE for float16 and 1 otherwise. The loss is
    multiplied by it before the backward pass and the float32 gradients divided by it; a step
    whose gradients are not finite is skipped (as PyTorch's GradScaler does, but with a fixed
    scale, so that runs stay comparable across frameworks)."""
    if requested is None:
        return FLOAT16_LOSS_SCALE if float_dtype(dtype).name == "float16" else 1.0
    if isinstance(requested, bool) or not isinstance(requested, (int, float, np.integer, np.floating)) \
            or not (np.isfinite(requested) and requested > 0):
        raise ValueError(f"loss_scale must be a positive finite number, got {requested!r}")
    return float(requested)
