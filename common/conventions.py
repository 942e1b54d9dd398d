"""Infer a batch-norm layer's conventions from one observed training step (a backend's `probe`).

The conventions table states, for each impl, what its `momentum` weighs, the running-variance
estimator, when statistics update, the eps it uses and its initial running variance. Here those
claims are measured: a fresh layer runs one step on a known input, and the closed form
`running = d * initial + (1 - d) * stat` is solved for `d` and for `stat`.
"""
from __future__ import annotations

import numpy as np

from common.reference import reduce_axes
from common.spec import NEW, OLD

PROBE_SHAPE = (8, 3, 5, 5)


def probe_input(seed: int = 0) -> np.ndarray:
    """A float64 NCHW input whose channels have distinct means and small variances, so the
    momentum weight, the variance estimator and eps are each identifiable from one step."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 0.1, size=PROBE_SHAPE)
    return x + np.arange(1, PROBE_SHAPE[1] + 1).reshape(1, -1, 1, 1)


def _changed(a: dict, b: dict) -> bool:
    return any(not np.allclose(a[k], b[k], rtol=0, atol=1e-9) for k in ("running_mean", "running_var"))


def infer(result: dict, x: np.ndarray) -> dict:
    """Measured conventions from `probe(impl, x)`'s result; a field that cannot be identified is
    None and `problems` says why."""
    axes = reduce_axes(x.ndim)
    m = x.size // x.shape[1]
    mean = x.mean(axis=axes)
    var = x.var(axis=axes)
    init, fwd, bwd = result["initial"], result["after_forward"], result["after_backward"]
    measured = dict(initial_running_var=float(np.mean(init["running_var"])), problems=[])
    if _changed(init, fwd):
        measured["stats_update"] = "forward"
    elif _changed(init, bwd):
        measured["stats_update"] = "backward"
    else:
        measured["stats_update"] = "never"
        measured["problems"].append("running statistics did not change in a training step")
        return measured
    final = bwd
    # final_mean = d * init_mean + (1 - d) * mean  =>  d = (final - mean) / (init - mean)
    d = (np.asarray(final["running_mean"], np.float64) - mean) / (
        np.asarray(init["running_mean"], np.float64) - mean)
    d = float(np.mean(d))
    measured["decay"] = d
    mom = result["momentum"]
    if np.isclose(d, mom, atol=1e-5) and not np.isclose(mom, 0.5):
        measured["momentum_weighs"] = OLD
    elif np.isclose(d, 1 - mom, atol=1e-5):
        measured["momentum_weighs"] = NEW
    else:
        measured["momentum_weighs"] = None
        measured["problems"].append(f"measured decay {d:.6g} is neither momentum {mom} nor 1 - momentum")
    if np.isclose(d, 1.0):
        measured["running_var"] = None
    else:
        stat = (np.asarray(final["running_var"], np.float64) - d * np.asarray(init["running_var"], np.float64)) / (1 - d)
        if np.allclose(stat, var, rtol=1e-4):
            measured["running_var"] = "biased"
        elif np.allclose(stat, var * m / (m - 1), rtol=1e-4):
            measured["running_var"] = "unbiased"
        else:
            measured["running_var"] = None
            measured["problems"].append("running-variance statistic is neither the biased nor the unbiased batch variance")
    # y = (x - mean) / sqrt(var + eps) with gamma 1, beta 0  =>  eps = ((x - mean) / y)^2 - var
    y = np.asarray(result["y"], np.float64)
    centered = x - mean.reshape(1, -1, 1, 1)
    ok = np.abs(y) > 0.5
    measured["eps"] = float(np.median(((centered[ok] / y[ok]) ** 2) - np.broadcast_to(var.reshape(1, -1, 1, 1), x.shape)[ok]))
    return measured


def check(claimed: dict, measured: dict, probe_result: dict) -> dict:
    """field -> (claimed, measured, agrees) for every field an experiment can check."""
    rows = {}
    for field in ("momentum_weighs", "running_var", "stats_update", "initial_running_var"):
        c, m = claimed.get(field), measured.get(field)
        agrees = (m is not None and np.isclose(c, m)) if isinstance(c, float) else c == m
        rows[field] = (c, m, bool(agrees))
    rows["default_momentum"] = (claimed.get("default_momentum"), probe_result["momentum"],
                                bool(np.isclose(claimed.get("default_momentum"), probe_result["momentum"])))
    eps_c = claimed.get("default_eps")
    rows["default_eps"] = (eps_c, measured.get("eps"),
                           bool(np.isclose(eps_c, measured.get("eps", np.nan), rtol=0.05)))
    return rows
