"""Measure what a batch-norm layer does, by experiment, independently of what it claims.

One experiment serves the conventions report (the suite's own impls) and `compare.py probe` (any
layer). It runs in the backend's child process: `experiment(factory, ...)` builds fresh layers
(`call_arguments`, `builder`), reads the claims (`common.spec.claims` of the layer's family and
the arguments it runs with, by `inspect`) and `observe(build, ...)` drives the layers through an
adapter (see ADAPTER below; each backend's `probe.py` has one), recording what they do. The rest
is pure NumPy, run anywhere:

- `measure(observations)` turns the record into the convention fields of `common.spec`
  (`CONVENTION_FIELDS`), each solved from the numbers: the decay from the running mean over
  several steps (constant: an EMA; 1 − 1/k: a cumulative average; statistics that never move
  while eval normalises with batch statistics: none; anything else is "not an EMA" with the
  measured decays), what `momentum` weighs from two builds with explicit momenta, eps and gamma
  from the output, the variance estimator, when the statistics move, the channel axis;
- `compare(claimed, measured)`: field by field, True / False / None (nothing to compare);
- `agreement(observations, measured)`: the layer against `common.reference.bn_step` under the
  conventions it was measured to have;
- `parse_layer` / `parse_expect` / `unmet`: the probe's command-line values, parsed safely.

ADAPTER: `build(momentum=UNSET)` returns a fresh layer in float64 and training mode (`momentum` in
the layer's own meaning, set only when given) wrapped in an object with
    prepare(x)            whatever must run before the state exists (init, lazy shapes); must
                          not update statistics
    stats() -> {"running_mean": (C,) or None, "running_var": (C,) or None}
    set_affine(gamma, beta) -> {"gamma": bool, "beta": bool}: which of the two it could set
    train_step(x, dy) -> {"y", "dx", "dgamma" or None, "dbeta" or None, "after_forward": stats,
                          "after_backward": stats, and for functional APIs "returned": the
                          statistics the call returned (the adapter then keeps them)}
    eval(x) -> y
with x, dy and y in the layer's own layout (channel axis 1 or last).
"""
from __future__ import annotations

import ast
import inspect
import math

import numpy as np

from common import spec
from common.reference import TOLERANCE, bn_step, error, reduce_axes
from common.spec import NEW, OLD

UNSET = object()
STEPS = 4  # training steps of the default-built layer
MOMENTA = (0.3, 0.8)  # explicit momenta: d follows m (OLD) or 1 - m (NEW); neither exact in float32
MOMENTUM_STEPS = 2
CHANNELS = 3
MAX_CHANNELS = 64
SHAPES = {4: (8, None, 3, 4), 2: (16, None)}  # None: the channel count
LAYOUTS = {(4, 1): "NCHW", (4, -1): "NHWC", (2, 1): "NC"}
CHANNEL_ARGUMENTS = ("num_features", "in_channels", "channels", "num_channels", "features")
# Identification tolerances. The experiment runs in float64 on data whose means are O(1) and
# whose batch variances are 0.01-0.6, so solved quantities are exact to ~1e-14; a float32-applied
# momentum moves a decay by ~1e-8; a wrong hypothesis misses by > 1e-3.
DECAY_TOL = 1e-9
MOMENTUM_TOL = 1e-6  # what momentum weighs, and the default momentum vs its claim
DTYPE_TOL = 1e-12  # the applied momentum vs m and float32(m)
EPS_RTOL = 1e-6
VAR_RTOL = 1e-7  # the running-variance statistic vs the biased / unbiased batch variance
OUTPUT_RTOL = 1e-8  # an output against a hypothesis, relative to max(1, |y|)
LOW_PRECISION = 1e-4  # a shift moving the output this little: batch norm in float32 or lower


class ProbeInputError(ValueError):
    """The layer asked for cannot be probed: it does not import or build, is not a layer of the
    framework, or is not a batch-norm layer. One line, for exit status 2."""


# -- the experiment's inputs --------------------------------------------------------------------
def _standardised(rng, shape):
    z = rng.normal(size=shape)
    axes = reduce_axes(len(shape))
    z = z - z.mean(axis=axes, keepdims=True)
    return z / z.std(axis=axes, keepdims=True)


def _bcast(v, ndim):
    return np.asarray(v).reshape((1, -1) + (1,) * (ndim - 2))


def plan(seed: int = 0, channels: int = CHANNELS) -> dict:
    """The experiment's inputs (NCHW / N×C float64), the same in every process for a seed.

    Training batch k has per-channel means (c + 1) + k and standard deviations
    0.1 (c + 1)(1 + k/2), so the means rise past any running mean (the decay is solvable at
    every step) and the variances differ per channel (eps and gamma are told apart); gamma and
    beta are set to values other than 1 and 0."""
    if not (isinstance(channels, int) and 2 <= channels <= MAX_CHANNELS):
        raise ProbeInputError(f"the probe needs 2 to {MAX_CHANNELS} channels, got {channels!r}")
    rng = np.random.default_rng(seed)
    c = np.arange(channels)
    out = {"seed": seed, "channels": channels, "train": {}, "dy": {}, "eval": {}, "layout": {}}
    for ndim, shape in SHAPES.items():
        shape = tuple(channels if s is None else s for s in shape)
        out["train"][ndim] = [_bcast((c + 1.0) + k, ndim) + _bcast(0.1 * (c + 1) * (1 + 0.5 * k), ndim)
                              * _standardised(rng, shape) for k in range(STEPS)]
        out["dy"][ndim] = [rng.normal(size=shape) for _ in range(STEPS)]
        out["eval"][ndim] = (_bcast(-0.5 * (c + 1), ndim)
                             + _bcast(0.3 * (1 + c % 3), ndim) * rng.normal(size=shape))
    out["layout"] = {4: rng.normal(size=(6, channels, channels, channels)),
                     2: rng.normal(size=(16, channels))}
    out["shift"] = np.array([2.0, -1.0, 3.0, 0.5])[c % 4] + 0.25 * (c // 4)
    out["gamma"] = np.array([1.5, 0.5, 2.0, 0.75])[c % 4]
    out["beta"] = np.array([0.25, -0.5, 1.0, -1.5])[c % 4]
    return out


def _to_layer(a, axis):
    return np.moveaxis(a, 1, -1) if axis == -1 and a.ndim > 2 else a


def _from_layer(a, axis):
    a = np.asarray(a, np.float64)
    return np.moveaxis(a, -1, 1) if axis == -1 and a.ndim > 2 else a


def _shifted(x, shift, axis):
    shape = [1] * x.ndim
    shape[axis] = -1
    return x + shift.reshape(shape)


# -- the experiment (child side) ------------------------------------------------------------------
def find_layout(build, p) -> dict:
    """Which rank the layer takes and along which axis it normalises. In training, batch norm's
    output does not change when a constant per channel is added to the input, and does change
    when the constants run along another axis: a fresh layer sees a batch, the batch shifted along
    axis 1 and the batch shifted along the last axis (4-D first, then 2-D)."""
    tried = []
    for ndim in (4, 2):
        x = p["layout"][ndim]
        axes = (1, -1) if ndim == 4 else (1,)
        try:
            ys = {}
            for axis in (None, *axes):
                layer = build()
                xi = x if axis is None else _shifted(x, p["shift"], axis)
                layer.prepare(xi)
                ys[axis] = np.asarray(layer.train_step(xi, np.ones_like(xi))["y"], np.float64)
        except ProbeInputError:
            raise
        except Exception as e:  # a layer that cannot take this rank
            tried.append(f"{ndim}-D input {x.shape}: {type(e).__name__}: {_short(e)}")
            continue
        if ys[None].shape != x.shape:
            tried.append(f"{ndim}-D input {x.shape}: output shape {ys[None].shape}")
            continue
        scale = max(1.0, float(np.max(np.abs(ys[None]))))
        moved = {a: float(np.max(np.abs(ys[a] - ys[None]))) / scale for a in axes}
        invariant = [a for a in axes if moved[a] <= OUTPUT_RTOL]
        if len(invariant) == 1:
            return {"ndim": ndim, "channel_axis": invariant[0], "tried": tried}
        if not invariant and OUTPUT_RTOL < min(moved.values()) <= LOW_PRECISION:
            raise ProbeInputError(
                f"the layer does not compute in float64: its training output moves by "
                f"{min(moved.values()):.1e} (relative) when a constant per channel is added, where "
                "float64 batch norm moves by ~1e-15; the probe measures layers in float64")
        tried.append(f"{ndim}-D input {x.shape}: " + (
            "the output ignores per-index shifts along every axis" if invariant else
            "the output moves when a constant per channel is added"
            + (" along axis 1 or along the last axis" if ndim == 4 else "")))
    raise ProbeInputError("not a batch-norm layer: its training output is not normalised per "
                          "channel (" + "; ".join(tried) + ")")


def _short(e, n=160):
    text = " ".join(str(e).split())
    return text if len(text) <= n else text[:n - 3] + "..."


def _stats(d):
    return {k: None if d.get(k) is None else np.asarray(d[k], np.float64).copy()
            for k in ("running_mean", "running_var")}


def _step(layer, x, dy, axis) -> dict:
    r = layer.train_step(_to_layer(x, axis), _to_layer(dy, axis))
    out = {k: None if r.get(k) is None else _from_layer(r[k], axis) for k in ("y", "dx")}
    out.update({k: None if r.get(k) is None else np.asarray(r[k], np.float64).copy()
                for k in ("dgamma", "dbeta")})
    out.update({k: _stats(r[k]) for k in ("after_forward", "after_backward", "returned") if k in r})
    return out


def observe(build, *, seed: int = 0, channels: int = CHANNELS, momentum: bool = True) -> dict:
    """The experiment on layers from `build` (see ADAPTER): the layout, then a default-built
    layer through STEPS training steps and one inference, then (if `momentum`: the constructor
    takes one) a layer per explicit momentum in MOMENTA through MOMENTUM_STEPS steps. Returns
    the record `measure` reads (arrays NCHW / N×C)."""
    p = plan(seed, channels)
    layout = find_layout(build, p)
    ndim, axis = layout["ndim"], layout["channel_axis"]
    xs, dys = p["train"][ndim], p["dy"][ndim]
    layer = build()
    layer.prepare(_to_layer(xs[0], axis))
    initial = _stats(layer.stats())
    affine_set = layer.set_affine(p["gamma"].copy(), p["beta"].copy())
    steps = [_step(layer, x, dy, axis) for x, dy in zip(xs, dys)]
    eval_y = _from_layer(layer.eval(_to_layer(p["eval"][ndim], axis)), axis)
    runs = []
    if momentum:
        for m in MOMENTA:
            layer = build(momentum=m)
            layer.prepare(_to_layer(xs[0], axis))
            run = {"momentum": m, "initial": _stats(layer.stats()), "steps": []}
            for x, dy in zip(xs[:MOMENTUM_STEPS], dys):
                run["steps"].append(_step(layer, x, dy, axis))
            runs.append(run)
    return {"seed": seed, "channels": channels, "layout": layout, "initial": initial,
            "affine_set": dict(affine_set), "steps": steps, "eval_y": eval_y,
            "momentum_runs": runs, "momentum_settable": bool(momentum)}


# -- building arbitrary layers (child side, framework-free) ------------------------------------------
def describe_call(name: str, args=(), kwargs=None) -> str:
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in (kwargs or {}).items()]
    return f"{name}({', '.join(parts)})"


def _signature(factory):
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError):
        return None


def call_arguments(factory, args=(), kwargs=None, *, name="the layer"):
    """(args, kwargs, channels) to build `factory` with: the channel count added where the
    constructor takes one (CHANNEL_ARGUMENTS) that was not given; ProbeInputError naming the
    arguments it needs and was not given."""
    kwargs = dict(kwargs or {})
    if not callable(factory):
        raise ProbeInputError(f"{name} is a {type(factory).__name__}, not a layer class or factory")
    sig = _signature(factory)
    channels = CHANNELS
    if sig is None:
        return tuple(args), kwargs, channels
    try:
        bound = sig.bind_partial(*args, **kwargs)
    except TypeError as e:
        raise ProbeInputError(f"{describe_call(name, args, kwargs)}: {e}") from None
    for arg in CHANNEL_ARGUMENTS:
        if arg in sig.parameters:
            if arg in bound.arguments:
                channels = bound.arguments[arg]
                if isinstance(channels, bool) or not isinstance(channels, int):
                    raise ProbeInputError(f"{name}: {arg} must be an int, got {channels!r}")
            else:
                kwargs[arg] = channels
            break
    given = set(bound.arguments) | set(kwargs)
    missing = [n for n, prm in sig.parameters.items()
               if prm.default is prm.empty and n not in given
               and prm.kind not in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD)]
    if missing:
        raise ProbeInputError(f"{name} needs arguments it was not given: {', '.join(missing)} "
                              f"(e.g. '{name}({missing[0]}=...)')")
    return tuple(args), kwargs, channels


def signature_arguments(factory, args=(), kwargs=None) -> dict:
    """The arguments `factory(*args, **kwargs)` runs with: what was given, else the signature's
    defaults (read with `inspect`, never from a built layer)."""
    sig = _signature(factory)
    if sig is None:
        return dict(kwargs or {})
    try:
        bound = sig.bind_partial(*args, **(kwargs or {}))
    except TypeError:
        return dict(kwargs or {})
    bound.apply_defaults()
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {k: v for k, v in bound.arguments.items() if sig.parameters[k].kind not in variadic}


def takes_momentum(factory) -> bool:
    sig = _signature(factory)
    return sig is not None and "momentum" in sig.parameters


def builder(factory, args, kwargs, *, wrap, layer_type, framework: str, name: str, channels: int):
    """`build(momentum=UNSET)` for `observe`: factory(*args, **kwargs) (momentum overridden when
    given), checked to be a `layer_type`, wrapped as `wrap(layer, channels)`. Failing to build is
    bad input."""
    def build(momentum=UNSET):
        kw = dict(kwargs) if momentum is UNSET else {**kwargs, "momentum": momentum}
        try:
            layer = factory(*args, **kw)
        except Exception as e:
            raise ProbeInputError(f"{describe_call(name, args, kw)} failed: {type(e).__name__}: "
                                  f"{_short(e)}") from None
        if not isinstance(layer, layer_type):
            raise ProbeInputError(f"{describe_call(name, args, kw)} built a "
                                  f"{type(layer).__module__}.{type(layer).__qualname__}, not a {framework}")
        return wrap(layer, channels)
    return build


def experiment(factory, args=(), kwargs=None, *, name: str, seed: int = 0, wrap, layer_type,
               framework: str, families) -> dict:
    """The experiment on layers built by `factory(*args, **kwargs)` (the channel count added
    where the constructor takes one), wrapped by a backend's adapter class `wrap`:
    {"family", "built", "claimed", "observations"}. `families` is ((class, DOCUMENTED key), ...),
    most specific first; the claims are that family's documented facts and the arguments the
    layer runs with (common.spec.claims). ProbeInputError for what cannot be probed."""
    args, kwargs, channels = call_arguments(factory, args, kwargs, name=name)
    build = builder(factory, args, kwargs, wrap=wrap, layer_type=layer_type, framework=framework,
                    name=name, channels=channels)
    layer = build().layer
    family = next((key for cls, key in families if isinstance(layer, cls)), None)
    obs = observe(build, seed=seed, channels=channels, momentum=takes_momentum(factory))
    return {"family": family, "built": describe_call(name, args, kwargs),
            "claimed": spec.claims(family, signature_arguments(factory, args, kwargs)),
            "observations": obs}


# -- analysis (pure) ----------------------------------------------------------------------------
def _changed(a, b) -> bool:
    return any(a[k] is not None and b[k] is not None and not np.allclose(a[k], b[k], rtol=0, atol=1e-12)
               for k in ("running_mean", "running_var"))


def _state(step):
    return step["returned"] if "returned" in step else step["after_backward"]


def _has_stats(s) -> bool:
    return s["running_mean"] is not None and s["running_var"] is not None


def step_decays(states, xs) -> list:
    """Per training step, the decay d solving running_mean = d * previous + (1 - d) * batch mean:
    one number when every channel gives the same d, else the per-channel list."""
    out = []
    for k, x in enumerate(xs[:len(states) - 1]):
        mean = x.mean(axis=reduce_axes(x.ndim))
        prev, cur = states[k]["running_mean"], states[k + 1]["running_mean"]
        den = prev - mean
        ok = np.abs(den) > 1e-6
        d = (cur[ok] - mean[ok]) / den[ok]
        out.append(float(np.mean(d)) if d.size and np.ptp(d) <= DECAY_TOL else [float(v) for v in d])
    return out


def _fmt_list(values):
    return "[" + ", ".join(f"{v:.6g}" if isinstance(v, float) else _fmt_list(v) for v in values) + "]"


def classify_decays(decays) -> tuple[str, float | None]:
    """("EMA", d) for a constant decay; ("cumulative average", None) for d_k = 1 − 1/k; else
    ("not an EMA: measured ...", None)."""
    if decays and all(isinstance(d, float) for d in decays):
        if np.ptp(decays) <= DECAY_TOL:
            return "EMA", float(np.mean(decays))
        if all(abs(d - k / (k + 1)) <= DECAY_TOL for k, d in enumerate(decays)):
            return "cumulative average", None
    per_channel = not all(isinstance(d, float) for d in decays)
    return (f"not an EMA: decays per step {_fmt_list(decays)}"
            + (" (a list: the decay differs per channel)" if per_channel else "")), None


def _affine(x, y, p, affine_set, step):
    """eps, and whether the set gamma/beta are used, from one training output: y must be
    g·(x − mean)/sqrt(var + eps) + b per channel with ONE eps; only the true (g, b) hypothesis
    gives the same eps for channels whose variances and gammas differ."""
    axes = reduce_axes(x.ndim)
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    xc = x - _bcast(mean, x.ndim)
    ones, zeros = np.ones_like(p["gamma"]), np.zeros_like(p["beta"])
    gammas = {"set": p["gamma"], "one": ones} if affine_set.get("gamma") else {"one": ones}
    betas = {"set": p["beta"], "zero": zeros} if affine_set.get("beta") else {"zero": zeros}
    tried = {}
    for (gk, g), (bk, b) in ((gi, bi) for gi in gammas.items() for bi in betas.items()):
        r = y - _bcast(b, x.ndim)
        alpha = (r * xc).sum(axis=axes) / (xc * xc).sum(axis=axes)
        resid = float(np.max(np.abs(r - _bcast(alpha, x.ndim) * xc)))
        with np.errstate(divide="ignore", invalid="ignore"):
            eps_c = (g / alpha) ** 2 - var
        tried[(gk, bk)] = eps_c
        scale = max(1.0, float(np.max(np.abs(y))))
        if (resid <= OUTPUT_RTOL * scale and np.all(np.isfinite(eps_c))
                and np.ptp(eps_c) <= 1e-10 + EPS_RTOL * float(np.max(np.abs(eps_c)))
                and float(np.min(eps_c)) >= -1e-12):
            gamma = _role(gk == "set", affine_set.get("gamma"), step.get("dgamma"), "fixed to 1")
            beta = _role(bk == "set", affine_set.get("beta"), step.get("dbeta"), "fixed to 0")
            return {"eps": max(float(np.mean(eps_c)), 0.0), "g": g, "b": b, "gamma": gamma,
                    "beta": beta}, None
    shown = "; ".join(f"gamma {gk}, beta {bk}: {_fmt_list([float(v) for v in e])}"
                      for (gk, bk), e in tried.items())
    return None, ("the training output is not gamma·(x − mean)/sqrt(var + eps) + beta with one eps "
                  f"and the biased batch variance (per-channel eps under each hypothesis: {shown})")


def _role(used, found, grad, ignored):
    """What the output says of gamma (or beta): its set value is used (with or without a
    gradient), it exists but the output ignores it, or the layer has none."""
    if used:
        return "learnable" if grad is not None else "used, no gradient"
    return ignored if found else "absent"


def _normalise(x, mean, var, eps, g, b):
    nd = x.ndim
    return _bcast(g, nd) * (x - _bcast(mean, nd)) / np.sqrt(_bcast(var, nd) + eps) + _bcast(b, nd)


def _close(a, b) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return False
    scale = max(1.0, float(np.max(np.abs(b), initial=0.0)))
    return bool(np.max(np.abs(a - b), initial=0.0) <= OUTPUT_RTOL * scale)


def _applied_dtype(applied: float, m: float):
    if abs(applied - m) <= DTYPE_TOL:
        return "float64"
    if abs(applied - float(np.float32(m))) <= DTYPE_TOL:
        return "float32"
    return None


def _momentum_meaning(runs, xs, problems):
    """(momentum_weighs, momentum_dtype, per-run decays) from the explicit-momentum runs."""
    solved = []
    for run in runs:
        states = [run["initial"]] + [_state(s) for s in run["steps"]]
        if not all(_has_stats(s) for s in states):
            problems.append("no running statistics in the explicit-momentum runs: what momentum weighs "
                            "cannot be measured")
            return None, None, []
        kind, d = classify_decays(step_decays(states, xs))
        if kind != "EMA":
            problems.append(f"momentum={run['momentum']}: {kind}")
            return None, None, []
        solved.append((run["momentum"], d))
    if all(abs(d - m) <= MOMENTUM_TOL for m, d in solved):
        weighs = OLD
    elif all(abs(d - (1 - m)) <= MOMENTUM_TOL for m, d in solved):
        weighs = NEW
    else:
        problems.append("the decay follows neither momentum nor 1 − momentum: "
                        + ", ".join(f"momentum {m} → decay {d:.9g}" for m, d in solved))
        return None, None, solved
    applied = [(m, d if weighs == OLD else 1.0 - d) for m, d in solved]
    dtypes = {_applied_dtype(a, m) for m, a in applied}
    dtype = dtypes.pop() if len(dtypes) == 1 else None
    if dtype is None:
        problems.append("the applied momentum is neither m nor float32(m): "
                        + ", ".join(f"{m} → {a:.12g}" for m, a in applied))
    return weighs, dtype, solved


def measure(obs: dict) -> dict:
    """The convention fields (common.spec.CONVENTION_FIELDS) measured from `observe`'s record,
    plus details ("decay", "decays", "eval", "beta", ...) and "problems"; a field the experiment
    cannot identify is None and a problem says why."""
    p = plan(obs["seed"], obs["channels"])
    ndim, axis = obs["layout"]["ndim"], obs["layout"]["channel_axis"]
    xs = p["train"][ndim]
    problems = []
    m = {f: None for f in spec.CONVENTION_FIELDS}
    m.update(layout=LAYOUTS[(ndim, axis)], problems=problems, decay=None, decays=None, eval=None)
    steps, initial = obs["steps"], obs["initial"]
    # what each output says: eps, gamma, beta
    affine, why = _affine(xs[0], steps[0]["y"], p, obs["affine_set"], steps[0])
    if affine is None:
        problems.append(why)
    else:
        m.update(default_eps=affine["eps"], gamma=affine["gamma"], beta=affine["beta"])
    # the running statistics over the steps
    states = [initial] + [_state(s) for s in steps]
    stats = all(_has_stats(s) for s in states)
    if initial["running_var"] is not None:
        rv0 = initial["running_var"]
        m["initial_running_var"] = float(rv0[0]) if np.ptp(rv0) == 0 else [float(v) for v in rv0]
    first = steps[0]
    if stats:
        forward, backward = (_changed(initial, first[k]) for k in ("after_forward", "after_backward"))
        if "returned" in first and not (forward or backward):  # a functional API
            m["stats_update"] = "returned by apply" if _changed(initial, first["returned"]) else "never"
        else:
            m["stats_update"] = "forward" if forward else "backward" if backward else "never"
    elif any(s["running_mean"] is not None or s["running_var"] is not None for s in states):
        problems.append("only one of running_mean / running_var was found")
    # inference: running statistics or batch statistics?
    xe = p["eval"][ndim]
    axes = reduce_axes(ndim)
    if affine is not None:
        as_batch = _normalise(xe, xe.mean(axis=axes), xe.var(axis=axes), affine["eps"], affine["g"],
                              affine["b"])
        uses = []
        if stats:
            final = states[-1]
            if _close(obs["eval_y"], _normalise(xe, final["running_mean"], final["running_var"],
                                                affine["eps"], affine["g"], affine["b"])):
                uses.append("running statistics")
        if _close(obs["eval_y"], as_batch):
            uses.append("batch statistics")
        m["eval"] = uses[0] if len(uses) == 1 else None
        if not uses:
            problems.append("inference output is normalised neither with the running statistics "
                            "nor with the batch statistics")
    # decays, kind of running statistics, variance estimator
    if stats and m["stats_update"] == "never":
        if m["eval"] == "batch statistics":
            m["running_stats"] = "none"
        else:
            m["decays"] = step_decays(states, xs)
            m["running_stats"], m["decay"] = classify_decays(m["decays"])
    elif stats:
        m["decays"] = step_decays(states, xs)
        m["running_stats"], m["decay"] = classify_decays(m["decays"])
        m["running_var"] = _estimator(states, xs, m["decays"], problems)
    elif m["eval"] == "batch statistics":
        m["running_stats"] = "none"
    else:
        problems.append("no running statistics were found, and inference does not normalise with "
                        "the batch statistics")
    if m["running_stats"] in ("EMA", "cumulative average") and m["eval"] != "running statistics" \
            and affine is not None:
        problems.append("inference does not normalise with the running statistics")
    # what momentum means
    if obs.get("momentum_runs"):
        weighs, dtype, solved = _momentum_meaning(obs["momentum_runs"], xs, problems)
        m.update(momentum_weighs=weighs, momentum_dtype=dtype,
                 momentum_decays=[[mm, d] for mm, d in solved])
    elif not obs.get("momentum_settable", True):
        problems.append("the constructor takes no momentum argument: what momentum weighs is not measured")
    if m["running_stats"] == "EMA" and m["momentum_weighs"] is not None:
        m["default_momentum"] = m["decay"] if m["momentum_weighs"] == OLD else 1.0 - m["decay"]
    return m


def _estimator(states, xs, decays, problems):
    kinds = set()
    ratios = []
    for k, (x, d) in enumerate(zip(xs, decays)):
        if not isinstance(d, float) or abs(1.0 - d) <= 1e-6:
            continue
        var = x.var(axis=reduce_axes(x.ndim))
        n = x.size // x.shape[1]
        stat = (states[k + 1]["running_var"] - d * states[k]["running_var"]) / (1.0 - d)
        ratios.append(float(np.mean(stat / var)))
        if np.allclose(stat, var, rtol=VAR_RTOL, atol=0):
            kinds.add("biased")
        elif np.allclose(stat, var * n / (n - 1), rtol=VAR_RTOL, atol=0):
            kinds.add("unbiased")
        else:
            kinds.add(None)
    if len(kinds) == 1 and None not in kinds:
        return kinds.pop()
    if ratios:
        problems.append("the running-variance statistic is neither the biased nor the unbiased batch "
                        f"variance (statistic / biased variance per step: {_fmt_list(ratios)})")
    return None


# -- claims against measurements ------------------------------------------------------------------
def _agrees(field, claimed, measured):
    if claimed is None or measured is None:
        return None
    if field == "layout" and measured == "NC":
        return None  # a 2-D layer: channels-first and channels-last are the same thing
    if field in ("default_momentum", "default_eps", "initial_running_var"):
        if isinstance(measured, list) or isinstance(claimed, (str, bool)):
            return False
        tol = dict(default_momentum=(MOMENTUM_TOL, 0.0), default_eps=(1e-12, EPS_RTOL),
                   initial_running_var=(1e-12, 0.0))[field]
        return bool(abs(float(claimed) - float(measured)) <= tol[0] + tol[1] * abs(float(claimed)))
    return claimed == measured


def compare(claimed: dict, measured: dict) -> dict:
    """field -> {"claimed", "measured", "agrees"}: True/False where both exist, None where the
    field was not claimed or could not be measured (such a cell shows no ✓/✗)."""
    return {f: {"claimed": claimed.get(f), "measured": measured.get(f),
                "agrees": _agrees(f, claimed.get(f), measured.get(f))} for f in spec.CONVENTION_FIELDS}


# -- agreement with the reference under the measured conventions --------------------------------
def agreement(obs: dict, measured: dict) -> dict:
    """The layer's training steps and inference against `common.reference.bn_step` run with the
    measured conventions (eps, per-step decay, estimator, gamma/beta as used), each step from the
    layer's own previous state. quantity -> {"error": max abs error, "pass": error <= 1e-10} or
    {"skipped": why}."""
    p = plan(obs["seed"], obs["channels"])
    ndim = obs["layout"]["ndim"]
    xs, dys, steps = p["train"][ndim], p["dy"][ndim], obs["steps"]
    tol = TOLERANCE["float64"]
    if measured.get("default_eps") is None or measured.get("gamma") is None:
        return {"skipped": "the output's eps and gamma could not be measured"}
    eps = max(measured["default_eps"], 1e-300)
    used = ("learnable", "used, no gradient")
    g = p["gamma"] if measured["gamma"] in used else np.ones_like(p["gamma"])
    b = p["beta"] if measured.get("beta") in used else np.zeros_like(p["beta"])
    states = [obs["initial"]] + [_state(s) for s in steps]
    decays = measured.get("decays") or []
    # running statistics are compared wherever each step has one decay (an EMA, a cumulative
    # average, or a rule-less but per-step uniform decay)
    running = len(decays) == len(steps) and all(isinstance(d, float) for d in decays)
    errors = {q: [] for q in ("y", "dx", "dgamma", "dbeta", "running_mean", "running_var", "eval y")}
    skipped = {}
    c = p["channels"]
    for k, (x, dy, got) in enumerate(zip(xs, dys, steps)):
        prev = states[k] if running else {"running_mean": np.zeros(c), "running_var": np.ones(c)}
        ref = bn_step(x, g, b, prev["running_mean"], prev["running_var"], dy, training=True, eps=eps,
                      decay=min(max(decays[k], 0.0), 1.0) if running else 0.5,
                      unbiased=measured.get("running_var") == "unbiased")
        for q in ("y", "dx"):
            errors[q].append(error(got[q], ref[q])[0] if got[q] is not None else math.nan)
        for q, kind in (("dgamma", "gamma"), ("dbeta", "beta")):
            if got[q] is not None and measured.get(kind) == "learnable":
                errors[q].append(error(got[q], ref[q])[0])
        if running:
            for q in ("running_mean", "running_var"):
                errors[q].append(error(states[k + 1][q], ref[q])[0])
    if measured.get("gamma") != "learnable":
        skipped["dgamma"] = f"gamma is {measured.get('gamma')}"
    if measured.get("beta") != "learnable":
        skipped["dbeta"] = f"beta is {measured.get('beta')}"
    if not running:
        why = f"running statistics: {measured.get('running_stats')}"
        skipped["running_mean"] = skipped["running_var"] = why
    xe = p["eval"][ndim]
    final = states[-1]
    uses_running = measured.get("eval") == "running statistics"
    if uses_running or (measured.get("eval") is None and _has_stats(final)):
        ref = bn_step(xe, g, b, final["running_mean"], final["running_var"], np.zeros_like(xe),
                      training=False, eps=eps)
    else:
        ref = bn_step(xe, g, b, np.zeros(c), np.ones(c), np.zeros_like(xe), training=True, eps=eps)
    errors["eval y"].append(error(obs["eval_y"], ref["y"])[0])
    out = {}
    for q, errs in errors.items():
        if q in skipped or not errs:
            out[q] = {"skipped": skipped.get(q, "not returned by the layer")}
            continue
        worst = math.nan if any(e != e for e in errs) else max(errs)
        out[q] = {"error": worst, "pass": bool(worst <= tol), "steps": len(errs)}
    return out


# -- command-line values ------------------------------------------------------------------------
FRAMEWORKS = {"torch": "torch", "pytorch": "torch", "mxnet": "mxnet", "gluon": "mxnet",
              "flax": "jax", "jax": "jax"}


def parse_layer(text: str) -> dict:
    """'FRAMEWORK:IMPORT.PATH[(ARGS)]' -> {"framework", "backend", "path", "args", "kwargs"};
    ARGS are Python literals (ast.literal_eval, never eval). ValueError in one line."""
    framework, sep, rest = text.partition(":")
    if not sep or not rest:
        raise ValueError(f"{text!r}: expected FRAMEWORK:IMPORT.PATH[(ARGS)], "
                         "e.g. torch:torch.nn.BatchNorm2d")
    if framework not in FRAMEWORKS:
        raise ValueError(f"{text!r}: unknown framework {framework!r}; choose from "
                         f"{', '.join(FRAMEWORKS)}")
    rest = rest.strip()
    path, args, kwargs = rest, [], {}
    if "(" in rest:
        path = rest[:rest.index("(")]
        try:
            call = ast.parse("_" + rest[len(path):], mode="eval").body
        except SyntaxError as e:
            raise ValueError(f"{text!r}: cannot parse the arguments ({e.msg})") from None
        if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
            raise ValueError(f"{text!r}: the arguments must be one (...) after the path")
        try:
            args = [ast.literal_eval(a) for a in call.args]
            for kw in call.keywords:
                if kw.arg is None:
                    raise ValueError("**")
                kwargs[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            raise ValueError(f"{text!r}: arguments must be Python literals (numbers, strings, "
                             "True/False/None, tuples, lists, dicts)") from None
    parts = path.replace(":", ".").split(".")
    if not all(p.isidentifier() for p in parts) or path.count(":") > 1:
        raise ValueError(f"{text!r}: {path!r} is not an import path (package.module.Name or "
                         "package.module:Name)")
    return {"framework": framework, "backend": FRAMEWORKS[framework], "path": path,
            "args": args, "kwargs": kwargs}


EXPECT_ALIASES = {"momentum": "default_momentum", "eps": "default_eps"}
EXPECT_FIELDS = (*spec.CONVENTION_FIELDS, "decay")


def parse_expect(text: str | None) -> dict:
    """'field=value,...' -> {field: value}; numbers become floats, 'old'/'new' the
    momentum_weighs values. ValueError for an unknown field or a malformed item."""
    out = {}
    for item in filter(None, (i.strip() for i in (text or "").split(","))):
        field, sep, value = item.partition("=")
        field = EXPECT_ALIASES.get(field.strip(), field.strip())
        value = value.strip()
        if not sep or not value:
            raise ValueError(f"--expect {item!r}: expected FIELD=VALUE")
        if field not in EXPECT_FIELDS:
            raise ValueError(f"--expect {item!r}: unknown field; choose from {', '.join(EXPECT_FIELDS)} "
                             f"(or {', '.join(EXPECT_ALIASES)})")
        try:
            parsed = float(value)
        except ValueError:
            words = {"old": OLD, "new": NEW} if field == "momentum_weighs" else {}
            parsed = words.get(value.lower(), value)
        else:
            if not math.isfinite(parsed):
                raise ValueError(f"--expect {item!r}: not a finite number")
        out[field] = parsed
    return out


def unmet(expected: dict, measured: dict) -> dict:
    """field -> (expected, measured) for every expectation the measurement does not meet
    (numbers: within 1e-6 relative; None never meets one)."""
    out = {}
    for field, want in expected.items():
        got = measured.get(field)
        if isinstance(want, float):
            ok = (isinstance(got, (int, float)) and not isinstance(got, bool)
                  and abs(got - want) <= 1e-12 + 1e-6 * abs(want))
        else:
            ok = isinstance(got, str) and got.lower() == str(want).lower()
        if not ok:
            out[field] = (want, got)
    return out
