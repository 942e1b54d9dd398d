"""Mixed precision against the float64 reference: the tolerances a float16/bfloat16 batch-norm
step is held to, derived from the dtype's epsilon, and the measurement of the precision a layer
computes its statistics in (the conventions a precision report shows). Dtype handling itself is
`common.dtypes`.
"""
from __future__ import annotations

import math

import numpy as np

from common.dtypes import cast, eps
from common.reference import reduce_axes

# -- tolerances --------------------------------------------------------------------------------
QUANTITY_ROUNDINGS = 2
"""Half-epsilon roundings in the input dtype that a correct mixed-precision step may spend on a
quantity: the final rounding of y or dx to the input dtype, plus up to three roundings in the
low dtype of terms no larger than the result (the idioms differ: autocast may scale and shift in
half, Flax centres in float32 and casts once), 4 × eps/2 = 2 eps. dgamma, dbeta and the running
statistics are float32 in a mixed-precision impl; a layer that keeps them in the input dtype
rounds them once, which the same allowance covers."""


def centring_amplification(x) -> float:
    """max over channels of |mean| / std of `x` (float64): how much centring magnifies an error
    in the mean. 1 for unit data; 1000 for mean 1000, std 1."""
    x = np.asarray(x, np.float64)
    axes = reduce_axes(x.ndim)
    mean, std = x.mean(axis=axes), x.std(axis=axes)
    return float(np.max(np.abs(mean) / np.maximum(std, np.finfo(np.float64).tiny)))


def tolerance(dtype, x, stats="float32") -> float:
    """The error (relative to max(1, max |reference|), `common.reference.error`) a batch-norm step
    on `x` in `dtype` (float16/bfloat16) may show against the float64 reference when its
    statistics are computed in `stats` precision:

        tol = 2 eps(dtype) + log2(m) eps(stats) A,    A = max_c |mean_c| / std_c

    The first term is QUANTITY_ROUNDINGS. The second is the statistics' own error: a mean of m
    values summed in `stats` precision is off by up to log2(m) roundings of eps(stats)/2 × |mean|
    (pairwise summation), and centring divides that by the std, so y, dx and the normalised
    values carry it times A; twice the half-epsilon bound covers the variance computed from the
    same centred values. On unit data the second term is ~1e-6 for float32 statistics; at
    `large_mean` (float16: 512.25, std 1, m = 1024) it is 6e-4, still far below what statistics
    in the input dtype cost there (the mean rounded to the dtype is off by 0.25, a quarter of the
    std)."""
    x = np.asarray(x)
    m = x.size // x.shape[1]
    return 2 * eps(dtype) + math.log2(max(m, 2)) * eps(stats) * centring_amplification(x)


# -- how precisely a layer computes its statistics --------------------------------------------
PROBE_SHAPE = (4, 3, 4, 4)  # m = 64 values per channel: a float16 sum of them stays finite


def large_mean(dtype) -> float:
    """0.5 / eps + 0.25: halfway between two neighbouring numbers of `dtype` in the binade where
    their spacing is 0.5 (float16 512.25, bfloat16 64.25). An input of this mean and std 1 keeps
    its spread in the dtype, and its mean rounded to the dtype is off by about a quarter of the
    std, which centring turns into an error of ~0.25 in the normalised values."""
    return 0.5 / eps(dtype) + 0.25


def probe_input(dtype, seed: int = 0) -> np.ndarray:
    """A large-mean NCHW input in `dtype` (`large_mean`, std 1): the precision of a layer's
    statistics shows in its output."""
    rng = np.random.default_rng(seed)
    return cast(rng.normal(large_mean(dtype), 1.0, size=PROBE_SHAPE), dtype)


def emulated_output(x, stats, out_dtype, eps_=1e-5) -> np.ndarray:
    """y = (x - mean) / sqrt(var + eps) (gamma 1, beta 0) with the mean, the centred values and
    the variance rounded to `stats` and y to `out_dtype`: what a layer computing its statistics
    in `stats` returns at best (each value correctly rounded once)."""
    x64 = np.asarray(x, np.float64)
    axes = reduce_axes(x64.ndim)
    keep = (1, -1) + (1,) * (x64.ndim - 2)
    r = lambda a: cast(a, stats).astype(np.float64)  # noqa: E731
    mean = r(x64.mean(axis=axes)).reshape(keep)
    centred = r(x64 - mean)
    var = r((centred**2).mean(axis=axes)).reshape(keep)
    return cast(centred / np.sqrt(var + eps_), out_dtype)


def output_error(y, x, eps_=1e-5) -> float:
    """max |y - y_ref| of a training-mode output with gamma 1, beta 0, against float64."""
    want = emulated_output(x, "float64", "float64", eps_)
    return float(np.max(np.abs(np.asarray(y, np.float64) - want)))


def stats_precision(x, y, eps_=1e-5) -> dict:
    """Which precision a layer computed its statistics in, from its output `y` on `x` =
    `probe_input(dtype)` (gamma 1, beta 0): the measured error against float64 and the error each
    candidate precision (the input dtype, float32) gives at best; the verdict is the candidate
    whose error is nearest on a log scale. Candidates whose best errors are alike (within 2x)
    count as one, reported as the narrowest "or wider": on `probe_input` float32 and float64
    statistics always are (its mean, a sum of multiples of 0.5 over 64, is exact in float32)."""
    x = np.asarray(x)
    in_name = x.dtype.name
    out_name = np.asarray(y).dtype.name
    candidates = [in_name] + [c for c in ("float32", "float64") if c not in (in_name,)]
    errs = {c: output_error(emulated_output(x, c, out_name, eps_), x, eps_) for c in candidates}
    measured = output_error(y, x, eps_)
    floor = np.finfo(np.float64).tiny
    distance = {c: abs(math.log10(max(measured, floor)) - math.log10(max(e, floor)))
                for c, e in errs.items()}
    # Candidates the output cannot tell apart (same emulated error within 2x) count as one:
    # the narrowest of them is reported with "or wider".
    best = min(distance, key=distance.get)
    alike = [c for c in candidates if abs(math.log10(max(errs[c], floor))
                                          - math.log10(max(errs[best], floor))) < math.log10(2)]
    label = alike[0] + (" or wider" if len(alike) > 1 else "")
    if not math.isfinite(measured):
        label = "not finite"
    return {"stats_dtype": label, "stats_error": measured, "candidate_errors": errs}


def probe_case(dtype) -> dict:
    """The inputs of a `precision_probe` step: `probe_input(dtype)`, gamma 1, beta 0, running
    mean 0 and variance 1, upstream gradient ones (all in `dtype`, for bn_step's arguments)."""
    x = probe_input(dtype)
    c = x.shape[1]
    return {"x": x, "gamma": cast(np.ones(c), dtype), "beta": cast(np.zeros(c), dtype),
            "running_mean": cast(np.zeros(c), dtype), "running_var": cast(np.ones(c), dtype),
            "dy": cast(np.ones(x.shape), dtype)}


def probe_result(case: dict, y, *, output_dtype, grad_dtype, param_dtype, running_dtype,
                 device) -> dict:
    """A backend's `precision_probe` answer: the dtypes it read from the framework's arrays
    (names as `common.dtypes`), the device, and `stats_precision` of its output `y`."""
    return {"output_dtype": str(output_dtype), "grad_dtype": str(grad_dtype),
            "param_dtype": str(param_dtype), "running_dtype": str(running_dtype),
            "device": device, **stats_precision(case["x"], y)}
