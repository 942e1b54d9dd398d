"""Test your own batch norm against the float64 reference, in your own test suite.

    from common.testing import assert_matches_reference, bn_cases

    def my_step(x, gamma, beta, running_mean, running_var, dy, *, training, eps, decay, unbiased):
        ...  # one forward + backward of your layer; NumPy in, NumPy out
        return {"y": ..., "dx": ..., "dgamma": ..., "dbeta": ..., "running_mean": ..., "running_var": ...}

    def test_my_bn():
        assert_matches_reference(my_step, conventions={"unbiased": True})

`step_fn` has the signature of `common.reference.bn_step`; `conventions` names the canonical
settings it claims (`common.spec.BNSpec`: `decay` is the weight KEPT on the old running value,
`unbiased` feeds the ÷(m−1) variance to running_var, `eps`), and the helper calls it with them
and checks every quantity of every case, in training and in inference, against the reference.
`bn_cases()` is a hypothesis strategy of the same cases (2-D/4-D shapes, batches down to two,
constant channels, large mean offsets, eps near the variance, float32/float64); hypothesis is
imported only when it is used.

Tolerances: float64, 1e-10 absolute; float32, 1e-5 relative to max(1, max |reference|), as in
`common.reference.within_tolerance`. Both are multiplied by the case's conditioning
max(1, max over channels of |mean| / sqrt(var + eps)): centring values of size |mean| whose
spread is sqrt(var + eps) loses that many digits in any implementation (the reference's own
float64 included), so a large-mean case is held only to what its dtype can tell.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from common.reference import (RESULT_KEYS, bn_step, error, float_dtype, random_case, reduce_axes,
                              within_tolerance)
from common.spec import BNSpec

MODES = (("training", True), ("inference", False))
MAX_FAILURES_SHOWN = 12


def case(name: str, inputs: dict, *, eps: float | None = None) -> dict:
    """One case: `inputs` are bn_step's arrays (x, gamma, beta, running_mean, running_var, dy) of
    one dtype; `eps` (optional) overrides the conventions' eps for this case."""
    missing = {"x", "gamma", "beta", "running_mean", "running_var", "dy"} - set(inputs)
    if missing:
        raise ValueError(f"case {name!r}: inputs lack {', '.join(sorted(missing))}")
    float_dtype(inputs["x"])
    return {"name": name, "inputs": dict(inputs), "eps": eps}


def standard_cases(dtypes=("float64",)) -> list[dict]:
    """The standard cases in each dtype: 2-D and 4-D, batches of two, a large mean offset, a
    constant channel, a variance at the scale of eps."""
    out = []
    for dtype in dtypes:
        dt = float_dtype(dtype)
        specs = [("2-D", (32, 5), {}), ("4-D", (8, 3, 5, 5), {}), ("2-D batch of two", (2, 4), {}),
                 ("4-D batch of two", (2, 3, 2, 2), {}), ("large mean", (16, 3, 4, 4), {"mean": 100.0}),
                 ("variance near eps", (16, 4), {"scale": 3e-3})]
        for i, (name, shape, kw) in enumerate(specs):
            out.append(case(f"{name} {dt.name}", random_case(shape, seed=100 + i, dtype=dt, **kw)))
        inputs = random_case((8, 3, 2, 2), seed=99, dtype=dt)
        inputs["x"][:, 1] = 0.75  # exact in float32; 32 values a channel
        out.append(case(f"constant channel {dt.name}", inputs))
    return out


def _settings(conventions) -> BNSpec:
    if conventions is None:
        return BNSpec()
    if isinstance(conventions, BNSpec):
        return conventions
    unknown = set(conventions) - {f.name for f in dataclasses.fields(BNSpec)}
    if unknown:
        raise ValueError(f"conventions: unknown setting {', '.join(sorted(unknown))}; use eps, decay, "
                         "unbiased (common.spec.BNSpec)")
    return BNSpec(**conventions)


def conditioning(inputs: dict, eps: float) -> float:
    """max(1, max over channels of |mean| / sqrt(var + eps)) of the case's x (see the module
    docstring)."""
    x = np.asarray(inputs["x"], np.float64)
    axes = reduce_axes(x.ndim)
    return float(max(1.0, np.max(np.abs(x.mean(axis=axes)) / np.sqrt(x.var(axis=axes) + eps))))


def check(step_fn, c: dict, settings: BNSpec, training: bool) -> list[str]:
    """The failures (one line each: case, mode, quantity, error) of one case in one mode."""
    inputs = c["inputs"]
    dtype = float_dtype(inputs["x"])
    eps = settings.eps if c.get("eps") is None else c["eps"]
    where = f"case {c['name']!r} ({'training' if training else 'inference'}, eps={eps:g}, " \
            f"decay={settings.decay:g}, unbiased={settings.unbiased})"
    ref = bn_step(**inputs, training=training, eps=eps, decay=settings.decay, unbiased=settings.unbiased)
    try:
        got = step_fn(*(np.array(inputs[k], copy=True) for k in ("x", "gamma", "beta", "running_mean",
                                                                   "running_var", "dy")),
                      training=training, eps=eps, decay=settings.decay, unbiased=settings.unbiased)
    except Exception as e:
        return [f"{where}: step_fn raised {type(e).__name__}: {e}"]
    if not isinstance(got, dict) or set(RESULT_KEYS) - set(got):
        return [f"{where}: step_fn must return a dict with {', '.join(RESULT_KEYS)}; got "
                f"{sorted(got) if isinstance(got, dict) else type(got).__name__}"]
    scale = conditioning(inputs, eps)
    failures = []
    for q in RESULT_KEYS:
        value = np.asarray(got[q])
        if value.shape != ref[q].shape:
            failures.append(f"{where}: {q} has shape {value.shape}, expected {ref[q].shape}")
        elif value.dtype != dtype:
            failures.append(f"{where}: {q} has dtype {value.dtype}, expected {dtype} (the input's)")
        elif not within_tolerance(value, ref[q], dtype, scale):
            abs_err, rel_err = error(value, ref[q])
            measure, kind = (abs_err, "abs") if dtype == np.float64 else (rel_err, "relative")
            tol = (1e-10 if dtype == np.float64 else 1e-5) * scale
            failures.append(f"{where}: {q} differs from the reference: max {kind} error "
                            f"{measure:.3g} > tolerance {tol:.3g}")
    return failures


def assert_matches_reference(step_fn, *, conventions=None, dtypes=("float64",), cases=None) -> None:
    """Assert that `step_fn` (bn_step's signature) matches `common.reference.bn_step` on every
    case in training and in inference, under `conventions` (a dict of eps/decay/unbiased or a
    `BNSpec`; default: the canonical eps 1e-5, decay 0.9, biased). `cases`: a list of case dicts
    (`standard_cases`, `bn_cases()` draws, `case(...)`); default: `standard_cases(dtypes)`.
    Raises AssertionError naming each failing case, quantity and error."""
    settings = _settings(conventions)
    cases = standard_cases(dtypes) if cases is None else list(cases)
    if not cases:
        raise ValueError("no case to check")
    failures = [f for c in cases for _, training in MODES for f in check(step_fn, c, settings, training)]
    if failures:
        shown = failures[:MAX_FAILURES_SHOWN]
        more = len(failures) - len(shown)
        raise AssertionError(f"{len(failures)} check(s) differ from the float64 reference:\n  "
                             + "\n  ".join(shown) + (f"\n  ... and {more} more" if more else ""))


def bn_cases(*, dtypes=("float32", "float64"), ndims=(2, 4), max_channels=4, max_batch=6,
             max_spatial=3, vary_eps=True):
    """A hypothesis strategy of cases: shapes (N, C) or (N, C, H, W) with N from 2, channels that
    are sometimes constant, mean offsets up to 1000 standard deviations, spreads from 1e-2 to
    10, eps drawn near the variance scale (when `vary_eps`), in each dtype."""
    from hypothesis import strategies as st

    @st.composite
    def draw_case(draw):
        dtype = float_dtype(draw(st.sampled_from(tuple(dtypes))))
        n = draw(st.integers(2, max_batch))
        c = draw(st.integers(1, max_channels))
        ndim = draw(st.sampled_from(tuple(ndims)))
        spatial = st.integers(1, max_spatial)
        shape = (n, c) if ndim == 2 else (n, c, draw(spatial), draw(spatial))
        spread = 10.0 ** draw(st.floats(-2, 1))
        offset = draw(st.sampled_from((0.0, 3.0, -50.0, 1000.0)))
        offset = float(np.sign(offset) * min(abs(offset), 1000.0 * spread))
        inputs = random_case(shape, seed=draw(st.integers(0, 2**16)), dtype=dtype, mean=offset, scale=spread)
        name = f"{dtype.name} {shape} mean {offset:g} spread {spread:.3g}"
        if draw(st.booleans()):
            inputs["x"][:, draw(st.integers(0, c - 1))] = 0.75
            name += " with a constant channel"
        eps = None
        if vary_eps:
            eps = float(min(1.0, max(1e-8, spread ** 2 * 10.0 ** draw(st.floats(-2, 2)))))
            name += f" eps {eps:.3g}"
        return case(name, inputs, eps=eps)

    return draw_case()
