"""Float64 NumPy reference for one batch-norm step: forward, analytic backward, running statistics.

Every backend implementation is checked against `bn_step`. Layout is NCHW (channel axis 1) for
4-D input and N×C for 2-D input; statistics are per channel.
"""
from __future__ import annotations

import numpy as np

from common import dtypes
from common.spec import check_decay

RESULT_KEYS = ("y", "dx", "dgamma", "dbeta", "running_mean", "running_var")
FULL_PRECISION = ("float32", "float64")


def float_dtype(dtype_like) -> np.dtype:
    """float32 or float64 (`common.dtypes.float_dtype` limited to them): what the reference, the
    trajectories, the sync merge and `common.testing` hold to their float tolerances; float16
    and bfloat16 go through `common.precision`."""
    return dtypes.float_dtype(dtype_like, FULL_PRECISION)


def reduce_axes(ndim: int) -> tuple[int, ...]:
    """Axes a per-channel statistic reduces over for NCHW / N×C input."""
    return (0,) if ndim == 2 else (0, 2, 3)


def _bcast(v: np.ndarray, ndim: int) -> np.ndarray:
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def validate_inputs(x, gamma, beta, running_mean, running_var, dy, *, training, eps, decay):
    """Clear `ValueError`s for what a batch-norm step cannot take; shared by every backend."""
    x = np.asarray(x)
    if x.ndim not in (2, 4):
        raise ValueError(
            f"x must be 2-D (N, C) or 4-D (N, C, H, W); got {x.ndim}-D input of shape {x.shape}"
        )
    channels = x.shape[1]
    for name, v in (("gamma", gamma), ("beta", beta), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if np.shape(v) != (channels,):
            raise ValueError(f"{name} must have shape ({channels},) to match x's {channels} "
                             f"channels; got {np.shape(v)}")
    if np.shape(dy) != x.shape:
        raise ValueError(f"dy must have x's shape {x.shape}; got {np.shape(dy)}")
    per_channel = x.size // max(channels, 1)
    if training and per_channel < 2:
        raise ValueError(
            f"training needs more than 1 value per channel to compute a batch variance; "
            f"x of shape {x.shape} has {per_channel}"
        )
    for name, v in (("x", x), ("gamma", gamma), ("beta", beta), ("running_mean", running_mean),
                    ("running_var", running_var), ("dy", dy)):
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    if not (np.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    check_decay(decay)
    if not training and np.any(np.asarray(running_var) + eps <= 0):
        raise ValueError("running_var + eps must be positive in inference mode")


def bn_step(x, gamma, beta, running_mean, running_var, dy, *, training, eps=1e-5, decay=0.9,
            unbiased=False) -> dict:
    """One batch-norm step in float64: returns y, dx, dgamma, dbeta and the running statistics.

    Training normalises with the batch mean and biased (÷m) variance and returns
    `decay * running + (1 - decay) * batch_stat`, the variance statistic ÷(m-1) if `unbiased`.
    Inference normalises with the running statistics and returns them unchanged.
    """
    validate_inputs(x, gamma, beta, running_mean, running_var, dy,
                    training=training, eps=eps, decay=decay)
    x, gamma, beta, rm, rv, dy = (np.asarray(a, dtype=np.float64)
                                  for a in (x, gamma, beta, running_mean, running_var, dy))
    axes = reduce_axes(x.ndim)
    m = x.size // x.shape[1]
    sum_dy = dy.sum(axis=axes)
    if training:
        mean = x.mean(axis=axes)
        centered = x - _bcast(mean, x.ndim)
        var = (centered**2).mean(axis=axes)  # two-pass, biased
        inv_std = 1.0 / np.sqrt(var + eps)
        xhat = centered * _bcast(inv_std, x.ndim)
        sum_dy_xhat = (dy * xhat).sum(axis=axes)
        # d/dx of gamma * xhat: the batch mean and variance depend on x too.
        dx = _bcast(gamma * inv_std / m, x.ndim) * (
            m * dy - _bcast(sum_dy, x.ndim) - xhat * _bcast(sum_dy_xhat, x.ndim)
        )
        var_stat = var * m / (m - 1) if unbiased else var
        new_rm = decay * rm + (1.0 - decay) * mean
        new_rv = decay * rv + (1.0 - decay) * var_stat
    else:
        inv_std = 1.0 / np.sqrt(rv + eps)
        xhat = (x - _bcast(rm, x.ndim)) * _bcast(inv_std, x.ndim)
        sum_dy_xhat = (dy * xhat).sum(axis=axes)
        dx = dy * _bcast(gamma * inv_std, x.ndim)
        new_rm, new_rv = rm.copy(), rv.copy()
    y = _bcast(gamma, x.ndim) * xhat + _bcast(beta, x.ndim)
    return dict(y=y, dx=dx, dgamma=sum_dy_xhat, dbeta=sum_dy, running_mean=new_rm,
                running_var=new_rv)


def random_case(shape, *, seed=0, dtype=np.float64, mean=0.0, scale=1.0) -> dict:
    """Seeded inputs for one bn_step (x, gamma, beta, running stats, dy) of a given x shape."""
    rng = np.random.default_rng(seed)
    c = shape[1]
    case = dict(
        x=rng.normal(mean, scale, size=shape),
        gamma=rng.uniform(0.5, 1.5, size=c),
        beta=rng.normal(0.0, 0.5, size=c),
        running_mean=rng.normal(0.0, 0.5, size=c),
        running_var=rng.uniform(0.5, 2.0, size=c),
        dy=rng.normal(0.0, 1.0, size=shape),
    )
    return {k: v.astype(dtype) for k, v in case.items()}


# Documented agreement tolerances: float64 implementations differ from the reference only in
# summation order (~1e-14 relative on these sizes); float32 carries ~1.2e-7 relative rounding per
# operation, accumulated over sums of up to a few thousand terms.
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


def error(got, ref) -> tuple[float, float]:
    """(max abs error, max abs error / max(1, max |ref|)) of `got` against `ref`."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return float("inf"), float("inf")
    abs_err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    return abs_err, abs_err / max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)


def within_tolerance(got, ref, dtype, scale=1.0) -> bool:
    """float64: max abs error ≤ 1e-10; float32: ≤ 1e-5 relative to max(1, max |ref|); both
    times `scale` for ill-conditioned inputs (see LARGE_MEAN_SCALE)."""
    abs_err, rel_err = error(got, ref)
    measure = abs_err if np.dtype(dtype) == np.float64 else rel_err
    return measure <= TOLERANCE[np.dtype(dtype).name] * scale
