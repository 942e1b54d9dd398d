"""Conversion of LeNet-BN between the canonical parameters (`common.lenet`) and each framework's
own layout, names and batch-norm settings: the one place that knows them (NumPy only).

Weights:
- PyTorch `state_dict` and MXNet Gluon parameter files are flat {key: array} with the canonical
  layouts (conv O×I×kH×kW, dense out×in, flatten in C×H×W order). Keys are LeNetBN's attribute
  names (`conv1.weight`, `bn1.running_var`) or, for the textbook `nn.Sequential`, the block
  index (`0.weight`, `1.running_mean`). Native PyTorch BN names gamma/beta `weight`/`bias` and
  adds `num_batches_tracked`; Gluon calls them `gamma`/`beta` in both impls.
- Flax variables are {"params": {layer: ...}, "batch_stats": {layer: ...}}: conv kernels H×W×I×O,
  dense kernels in×out, BN `scale`/`bias`/`mean`/`var` (native) or `gamma`/`beta`/`moving_mean`/
  `moving_var` (scratch). An NHWC tensor flattens in H×W×C order, so fc1's 256 inputs are
  permuted (`FC1_HWC_FROM_CHW`).
- Running statistics are copied as they are: they are what inference uses everywhere.

Settings: a canonical `bn_config` {eps, decay, unbiased} (plus, optionally, PyTorch's
`num_batches_tracked`, carried so that a round trip through another framework gives it back)
becomes each framework's own layer settings through `common.spec` (what `momentum` weighs, the
eps keyword, MXNet's `fix_gamma`), and back.

Porting mistakes (`port(..., mistake=...)`) are a correct conversion with one step done the way a
careless converter does it.
"""
from __future__ import annotations

import math

import numpy as np

from common import lenet as canon
from common import spec

FRAMEWORKS = ("torch", "jax", "mxnet")
FAMILIES = ("native", "scratch")  # what a file's names can tell apart

# Block index of each parameterised layer in the textbook nn.Sequential: PyTorch's (with
# nn.Flatten before the first Linear), and the d2l Gluon one (Dense flattens by itself).
_WITH_FLATTEN = {"conv1": 0, "bn1": 1, "conv2": 4, "bn2": 5, "fc1": 9, "bn3": 10, "fc2": 12,
                 "bn4": 13, "fc3": 15}
_GLUON_D2L = {"conv1": 0, "bn1": 1, "conv2": 4, "bn2": 5, "fc1": 8, "bn3": 9, "fc2": 11,
              "bn4": 12, "fc3": 14}
_LENET = {layer: layer for layer in _WITH_FLATTEN}
LAYOUTS = {
    "torch": {"lenet": _LENET, "sequential": _WITH_FLATTEN},
    "mxnet": {"lenet": _LENET, "sequential": _GLUON_D2L, "sequential-flatten": _WITH_FLATTEN},
    "jax": {"lenet": _LENET},
}

# BN field names where they differ from the canonical ones, per framework and impl family.
BN_NAMES = {
    "torch": {"native": {"gamma": "weight", "beta": "bias"}, "scratch": {}},
    "mxnet": {"native": {}, "scratch": {}},
    "jax": {"native": {"gamma": "scale", "beta": "bias", "running_mean": "mean",
                       "running_var": "var"},
            "scratch": {"running_mean": "moving_mean", "running_var": "moving_var"}},
}
PARAM_FIELDS = ("gamma", "beta")  # trained; Flax keeps them in "params"
STAT_FIELDS = canon.RUNNING_FIELDS  # Flax keeps them in "batch_stats"

# fc1's inputs in H×W×C order as indices into the canonical C×H×W order: a_hwc = a_chw[:, perm]
# for activations and for fc1's weight columns alike.
FC1_INPUT_CHW = canon.LAYER_SHAPES["pool2"]
FC1_HWC_FROM_CHW = np.arange(256).reshape(FC1_INPUT_CHW).transpose(1, 2, 0).reshape(-1)
FC1_CHW_FROM_HWC = np.argsort(FC1_HWC_FROM_CHW)

# The layer settings each framework's checkpoint sidecar stores, under the framework's own names.
EPS_NAME = {"torch": "eps", "jax": "epsilon", "mxnet": "epsilon"}
# The running-variance estimator a native layer always uses (scratch impls take either).
NATIVE_UNBIASED = {"torch": True, "jax": False, "mxnet": False}
# The eps a careless converter leaves in place: the layer default of PyTorch and Flax, and for
# MXNet the raw operator's (`mx.sym.BatchNorm`, what MMdnn emits; Gluon's layer uses 1e-5).
# tests/test_port.py checks these against the installed frameworks.
DEFAULT_EPS = {"torch": 1e-5, "jax": 1e-5, "mxnet": 1e-3}

MISTAKES = {
    "momentum-copied": "the literal momentum value carried over, its meaning not translated",
    "eps-default": "the target's default eps instead of the source's",
    "no-flatten-permutation": "fc1's inputs not permuted between NCHW and NHWC flattening",
    "kernel-reshaped": "conv kernels OIHW<->HWIO by reshape instead of transpose",
    "fix-gamma": "MXNet's symbolic default fix_gamma=True: gamma ignored",
}


def check_framework(framework: str) -> None:
    if framework not in FRAMEWORKS:
        raise ValueError(f"unknown framework {framework!r}; choose from {', '.join(FRAMEWORKS)}")


def family(impl: str) -> str:
    """"native" or "scratch": what a checkpoint's names can tell (scratch-analytic saves as
    scratch)."""
    return "native" if impl == "native" else "scratch"


def _one_line(problems, limit=4) -> str:
    extra = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + extra


def float_dtype(params) -> np.dtype:
    """The one float dtype (float32 or float64) that `params`' arrays share."""
    dtypes = {np.asarray(v).dtype for v in params.values()}
    if len(dtypes) != 1 or not dtypes <= {np.dtype(np.float32), np.dtype(np.float64)}:
        raise ValueError(f"LeNet-BN parameters must all be float32 or all float64, got "
                         f"{sorted(str(d) for d in dtypes)}")
    return dtypes.pop()


def _canonical(params) -> dict[str, np.ndarray]:
    canon.validate_params(params)
    return canon.cast({k: params[k] for k in canon.param_shapes()}, float_dtype(params))


def fixed_gamma(params) -> dict[str, np.ndarray]:
    """`params` as a layer with fix_gamma=True computes with them: every gamma 1."""
    return {k: np.ones_like(v) if k.endswith(".gamma") else v for k, v in params.items()}


# -- flat files: PyTorch state_dict, Gluon parameters ---------------------------------------

def flat_keys(framework: str, impl: str, layout: str = "lenet") -> dict[str, str]:
    """Canonical name -> key in `framework`'s flat file (torch, mxnet) for `impl`'s names."""
    prefix = LAYOUTS[framework][layout]
    names = BN_NAMES[framework][family(impl)]
    out = {}
    for name in canon.param_shapes():
        layer, field = name.rsplit(".", 1)
        out[name] = f"{prefix[layer]}.{names.get(field, field)}"
    return out


def _nbt_keys(framework, fam, layout):
    if framework != "torch" or fam != "native":
        return []
    return [f"{LAYOUTS[framework][layout][layer]}.num_batches_tracked" for layer in canon.BN_LAYERS]


def _match_flat(framework, keys, what):
    """(layout, family) whose keys `keys` are; else ValueError naming the closest's differences."""
    best = None
    for layout in LAYOUTS[framework]:
        for fam in FAMILIES:
            expected = set(flat_keys(framework, fam, layout).values())
            optional = set(_nbt_keys(framework, fam, layout))  # absent in pre-0.4.1 PyTorch files
            missing = sorted(expected - keys, key=_natural)
            unexpected = sorted(keys - expected - optional, key=_natural)
            score = len(keys & (expected | optional)) - len(unexpected)
            if not missing and not unexpected:
                return layout, fam
            if best is None or score > best[0]:
                best = (score, layout, fam, missing, unexpected)
    _, layout, fam, missing, unexpected = best
    problems = ([f"missing key {k!r}" for k in missing]
                + [f"unexpected key {k!r}" for k in unexpected])
    raise ValueError(f"{what} is not a LeNet-BN checkpoint (closest: {layout} layout, {fam} "
                     f"BN names): {_one_line(problems)}")


def _natural(key: str):
    return [int(p) if p.isdigit() else p for p in key.split(".")]


def _check_array(key, a, shape, what):
    a = np.asarray(a)
    if a.dtype not in (np.float32, np.float64):
        raise ValueError(f"{what}: {key!r} has dtype {a.dtype}, expected float32 or float64")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{what}: {key!r} has shape {tuple(a.shape)}, expected {tuple(shape)}")
    return a  # non-finite values are read as they are (a diverged run's state is still its state)


def to_flat(framework: str, params, impl: str, *, layout: str = "lenet",
            num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
    """Canonical params -> `framework`'s flat file contents (torch state_dict or Gluon
    parameters) in `params`' dtype, in the order the framework's model lists them. Native
    PyTorch BN also gets `num_batches_tracked` (int64 scalars)."""
    p = _canonical(params)
    keys = flat_keys(framework, impl, layout)
    out = {}
    for name in canon.param_shapes():
        out[keys[name]] = p[name]
        if name.endswith(".running_var") and framework == "torch" and family(impl) == "native":
            prefix = keys[name].rsplit(".", 1)[0]
            out[f"{prefix}.num_batches_tracked"] = np.array(int(num_batches_tracked), np.int64)
    return out


def flat_format(framework: str, arrays, what: str = None) -> dict:
    """{"layout", "family" (None where both impls use the same names, as in Gluon),
    "num_batches_tracked"} of a flat file's contents, or ValueError."""
    what = what or f"{framework} file"
    if not isinstance(arrays, dict) or not all(isinstance(k, str) for k in arrays):
        raise ValueError(f"{what} is not a dict of named arrays")
    layout, fam = _match_flat(framework, set(arrays), what)
    counts = {k: np.asarray(arrays[k]) for k in _nbt_keys(framework, fam, layout) if k in arrays}
    for k, v in counts.items():
        if v.shape != () or v.dtype.kind not in "iu" or int(v) < 0:
            raise ValueError(f"{what}: {k!r} must be a non-negative integer scalar, got "
                             f"{v.dtype} {v.shape}")
    values = {int(v) for v in counts.values()}
    if len(values) > 1:
        raise ValueError(f"{what}: num_batches_tracked differs between layers "
                         f"({sorted(values)}); one count per model is supported")
    names_tell = BN_NAMES[framework]["native"] != BN_NAMES[framework]["scratch"]
    return {"layout": layout, "family": fam if names_tell else None,
            "num_batches_tracked": values.pop() if values else None}


def from_flat(framework: str, arrays, what: str = None) -> dict[str, np.ndarray]:
    """A flat file's contents (either layout, either impl's names) -> canonical params."""
    what = what or f"{framework} file"
    fmt = flat_format(framework, arrays, what)
    keys = flat_keys(framework, fmt["family"], fmt["layout"])
    shapes = canon.param_shapes()
    params = {name: _check_array(keys[name], arrays[keys[name]], shapes[name], what)
              for name in shapes}
    return _one_dtype(params, what)


def _one_dtype(params, what):
    try:
        float_dtype(params)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    return {k: np.array(v, order="C") for k, v in params.items()}  # copies: writable, owned


# -- Flax variables ---------------------------------------------------------------------------

def _conv_to_hwio(w, careless):
    # the careless way keeps the memory order and only relabels the axes
    return w.reshape(w.shape[2], w.shape[3], w.shape[1], w.shape[0]) if careless else \
        w.transpose(2, 3, 1, 0)


def _conv_to_oihw(k, careless):
    return k.reshape(k.shape[3], k.shape[2], k.shape[0], k.shape[1]) if careless else \
        k.transpose(3, 2, 0, 1)


def to_flax(params, impl: str, *, fc1_permutation: bool = True, conv_reshape: bool = False) -> dict:
    """Canonical params -> Flax variables {"params", "batch_stats"} (NumPy, `params`' dtype) of
    `impl`'s LeNet-BN. `fc1_permutation=False` / `conv_reshape=True` are the careless
    converter's way (see `port`)."""
    p = _canonical(params)
    names = BN_NAMES["jax"][family(impl)]
    out = {"params": {}, "batch_stats": {}}
    for layer in canon.CONV_LAYERS:
        out["params"][layer] = {"kernel": _conv_to_hwio(p[f"{layer}.weight"], conv_reshape),
                                "bias": p[f"{layer}.bias"]}
    for layer in canon.FC_LAYERS:
        w = p[f"{layer}.weight"]
        if layer == "fc1" and fc1_permutation:
            w = w[:, FC1_HWC_FROM_CHW]
        out["params"][layer] = {"kernel": w.T, "bias": p[f"{layer}.bias"]}
    for layer in canon.BN_LAYERS:
        out["params"][layer] = {names.get(f, f): p[f"{layer}.{f}"] for f in PARAM_FIELDS}
        out["batch_stats"][layer] = {names.get(f, f): p[f"{layer}.{f}"] for f in STAT_FIELDS}
    return _tree_map(np.ascontiguousarray, out)


def _tree_map(fn, tree):
    return {k: _tree_map(fn, v) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


def _leaf_paths(tree, prefix=()):
    if not isinstance(tree, dict):
        return ["/".join(prefix)]
    return [p for k, v in tree.items() for p in _leaf_paths(v, prefix + (str(k),))]


def flax_family(variables, what: str = "Flax variables") -> str:
    """"native" or "scratch", from the BN variable names; ValueError naming what is wrong."""
    if not isinstance(variables, dict) or set(variables) != {"params", "batch_stats"}:
        got = sorted(variables) if isinstance(variables, dict) else type(variables).__name__
        raise ValueError(f"{what} must be {{'params', 'batch_stats'}}, got {got}")
    for fam in FAMILIES:
        names = BN_NAMES["jax"][fam]
        if all(isinstance(variables["params"].get(layer), dict)
               and set(variables["params"][layer]) == {names.get(f, f) for f in PARAM_FIELDS}
               for layer in canon.BN_LAYERS):
            return fam
    return "native"  # the check in from_flax names what is missing


def _leaf(variables, path, shape, what):
    node = variables
    for i, part in enumerate(path):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"{what}: missing {'/'.join(path[:i + 1])}")
        node = node[part]
    return _check_array("/".join(path), node, shape, what)


def _flax_paths(fam):
    """Canonical name -> path in the Flax variables, for the `fam` names."""
    names = BN_NAMES["jax"][fam]
    paths = {}
    for name in canon.param_shapes():
        layer, field = name.rsplit(".", 1)
        if layer in canon.BN_LAYERS:
            coll = "batch_stats" if field in STAT_FIELDS else "params"
            paths[name] = (coll, layer, names.get(field, field))
        else:
            paths[name] = ("params", layer, "kernel" if field == "weight" else "bias")
    return paths


def from_flax(variables, *, fc1_permutation: bool = True, conv_reshape: bool = False,
              what: str = "Flax variables") -> dict[str, np.ndarray]:
    """Flax variables (either impl's names, NumPy or JAX arrays) -> canonical params. Every
    missing, unexpected or mis-shaped variable is a ValueError naming its path."""
    fam = flax_family(variables, what)
    paths = _flax_paths(fam)
    expected = {"/".join(p) for p in paths.values()}
    unexpected = sorted(set(_leaf_paths(variables)) - expected)
    if unexpected:
        raise ValueError(f"{what}: unexpected {_one_line(unexpected)}")
    shapes = canon.param_shapes()
    out = {}
    for name, path in paths.items():
        shape = shapes[name]
        if path[-1] == "kernel":
            shape = (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else shape[::-1]
        a = _leaf(variables, path, shape, what)
        if path[-1] == "kernel":
            a = _conv_to_oihw(a, conv_reshape) if a.ndim == 4 else a.T
            if name == "fc1.weight" and fc1_permutation:
                a = a[:, FC1_CHW_FROM_HWC]
        out[name] = a
    return _one_dtype(out, what)


def nhwc_activation(layer: str, a, *, is_input: bool) -> np.ndarray:
    """A canonical activation (NCHW, or C×H×W-ordered features) as the NHWC framework has it:
    4-D moved channels-last; the flatten output / fc1 input permuted to H×W×C order."""
    a = np.asarray(a)
    if a.ndim == 4:
        return np.moveaxis(a, 1, -1)
    if (layer == "fc1" and is_input) or (layer == "flatten" and not is_input):
        return a[:, FC1_HWC_FROM_CHW]
    return a


def nchw_activation(layer: str, a, *, is_input: bool = False) -> np.ndarray:
    """Inverse of `nhwc_activation`."""
    a = np.asarray(a)
    if a.ndim == 4:
        return np.moveaxis(a, -1, 1)
    if (layer == "fc1" and is_input) or (layer == "flatten" and not is_input):
        return a[:, FC1_CHW_FROM_HWC]
    return a


# -- settings ---------------------------------------------------------------------------------

def check_bn_config(bn_config) -> dict:
    """The canonical {eps, decay, unbiased[, num_batches_tracked]} validated and normalised."""
    if not isinstance(bn_config, dict):
        raise ValueError(f"bn_config must be a dict {{eps, decay, unbiased}}, got "
                         f"{type(bn_config).__name__}")
    required, optional = {"eps", "decay", "unbiased"}, {"num_batches_tracked"}
    missing, unknown = required - set(bn_config), set(bn_config) - required - optional
    if missing or unknown:
        raise ValueError(f"bn_config needs eps, decay, unbiased (and optionally "
                         f"num_batches_tracked); missing {sorted(missing)}, unknown "
                         f"{sorted(unknown)}")
    for k in ("eps", "decay"):
        if isinstance(bn_config[k], bool) or not isinstance(bn_config[k], (int, float)):
            raise ValueError(f"bn_config {k} must be a number, got {bn_config[k]!r}")
    if not isinstance(bn_config["unbiased"], (bool, np.bool_)):
        raise ValueError(f"bn_config unbiased must be True or False, got {bn_config['unbiased']!r}")
    s = spec.BNSpec(eps=float(bn_config["eps"]), decay=float(bn_config["decay"]),
                    unbiased=bool(bn_config["unbiased"]))
    out = {"eps": s.eps, "decay": s.decay, "unbiased": s.unbiased}
    if "num_batches_tracked" in bn_config:
        n = bn_config["num_batches_tracked"]
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"bn_config num_batches_tracked must be an int >= 0, got {n!r}")
        out["num_batches_tracked"] = int(n)
    return out


def unsupported(framework: str, impl: str, bn_config) -> str | None:
    """Why `impl` of `framework` cannot run `bn_config` (its fixed variance estimator), or None."""
    fixed = NATIVE_UNBIASED[framework] if impl == "native" else None
    if fixed is not None and bool(bn_config["unbiased"]) != fixed:
        want = "unbiased (÷(n-1))" if bn_config["unbiased"] else "biased (÷n)"
        have = "unbiased" if fixed else "biased"
        return (f"{framework} native BatchNorm always keeps the {have} running variance; "
                f"a {want} one (unbiased={bool(bn_config['unbiased'])}) cannot be expressed")
    return None


def framework_settings(framework: str, impl: str, bn_config) -> dict:
    """Canonical bn_config -> `framework`'s layer settings for `impl`: momentum in the impl's own
    meaning, eps under the framework's keyword, the variance estimator, and for MXNet
    fix_gamma=False (gamma used). UnsupportedSetting if the impl cannot express it."""
    check_framework(framework)
    cfg = check_bn_config(bn_config)
    reason = unsupported(framework, impl, cfg)
    if reason:
        raise spec.UnsupportedSetting(reason)
    convention = spec.impl_convention(framework, impl)
    out = {"momentum": spec.momentum_from_decay(cfg["decay"], convention),
           EPS_NAME[framework]: cfg["eps"], "unbiased": cfg["unbiased"]}
    if framework == "mxnet":
        out["fix_gamma"] = False
    return out


def config_from_settings(framework: str, impl: str, settings) -> dict:
    """`framework`'s layer settings for `impl` -> canonical bn_config (inverse of
    `framework_settings`; MXNet's fix_gamma acts on the parameters: see `fixed_gamma`)."""
    check_framework(framework)
    keys = {"momentum", EPS_NAME[framework], "unbiased"}
    keys |= {"fix_gamma"} if framework == "mxnet" else set()
    if not isinstance(settings, dict) or set(settings) != keys:
        got = sorted(settings) if isinstance(settings, dict) else type(settings).__name__
        raise ValueError(f"{framework} settings must have {sorted(keys)}, got {got}")
    if framework == "mxnet" and not isinstance(settings["fix_gamma"], bool):
        raise ValueError(f"fix_gamma must be true or false, got {settings['fix_gamma']!r}")
    m = settings["momentum"]
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
        raise ValueError(f"{framework} momentum must be a number, got {m!r}")
    decay = spec.decay_from_momentum(m, spec.impl_convention(framework, impl))
    cfg = check_bn_config({"eps": settings[EPS_NAME[framework]], "decay": decay,
                           "unbiased": settings["unbiased"]})
    reason = unsupported(framework, impl, cfg)
    if reason:
        raise spec.UnsupportedSetting(reason)
    return cfg


def default_settings(framework: str, conventions_row: dict) -> dict:
    """The settings of a layer built with its defaults, from the backend's `conventions()` row
    (for a file with no sidecar)."""
    out = {"momentum": float(conventions_row["default_momentum"]),
           EPS_NAME[framework]: float(conventions_row["default_eps"]),
           "unbiased": conventions_row["running_var"] == "unbiased"}
    if framework == "mxnet":
        out["fix_gamma"] = False
    return out


def target_config(bn_config, framework: str, impl: str) -> tuple[dict, list[str]]:
    """The bn_config `impl` of `framework` will run for a checkpoint trained with `bn_config`,
    and what could not be carried over (a native layer's fixed variance estimator)."""
    cfg = check_bn_config(bn_config)
    if unsupported(framework, impl, cfg) is None:
        return cfg, []
    fixed = NATIVE_UNBIASED[framework]
    change = (f"running variance {'biased' if fixed else 'unbiased'} -> "
              f"{'unbiased' if fixed else 'biased'}: {framework} native BatchNorm has no other")
    return dict(cfg, unbiased=fixed), [change]


# -- porting, correct and careless ------------------------------------------------------------

def port(params, bn_config, *, source: str, target: str, source_impl: str = "native",
         target_impl: str = "native", mistake: str | None = None) -> dict:
    """What `target` runs when `source`'s checkpoint (canonical `params`, `bn_config`) is
    converted correctly (`mistake=None`) or with one of MISTAKES. Returns {"params",
    "bn_config", "fix_gamma" (evaluate the target with gamma ignored), "applies" (False when the
    mistake cannot occur between these frameworks, e.g. no layout differs), "changes" (what was
    not or wrongly carried over)}; params and bn_config are canonical, to be saved with the
    target's `save_checkpoint` and run with `fix_gamma`."""
    for f in (source, target):
        check_framework(f)
    if source == target:
        raise ValueError(f"source and target are both {source!r}: nothing to port")
    if mistake is not None and mistake not in MISTAKES:
        raise ValueError(f"unknown mistake {mistake!r}; choose from {', '.join(MISTAKES)}")
    p = _canonical(params)
    cfg, changes = target_config(bn_config, target, target_impl)
    out = {"params": p, "bn_config": cfg, "fix_gamma": False, "applies": mistake is None,
           "changes": changes}
    if mistake is None:
        return out
    if mistake == "momentum-copied":
        src_conv = spec.impl_convention(source, source_impl)
        literal = spec.momentum_from_decay(cfg["decay"], src_conv)
        decay = spec.decay_from_momentum(literal, spec.impl_convention(target, target_impl))
        out["applies"] = decay != cfg["decay"]
        out["bn_config"] = dict(cfg, decay=decay)
    elif mistake == "eps-default":
        out["applies"] = DEFAULT_EPS[target] != cfg["eps"]
        out["bn_config"] = dict(cfg, eps=DEFAULT_EPS[target])
    elif mistake in ("no-flatten-permutation", "kernel-reshaped"):
        careless = (dict(fc1_permutation=False) if mistake == "no-flatten-permutation"
                    else dict(conv_reshape=True))
        out["applies"] = (source == "jax") != (target == "jax")
        if target == "jax":  # written carelessly, read back as the target reads its own file
            out["params"] = from_flax(to_flax(p, target_impl, **careless))
        elif source == "jax":  # the source's file read carelessly
            out["params"] = from_flax(to_flax(p, source_impl), **careless)
    elif mistake == "fix-gamma":
        out["applies"] = "mxnet" in (source, target)
        if target == "mxnet":
            out["fix_gamma"] = True  # the target layer ignores the gamma it is given
        elif source == "mxnet":
            out["params"] = fixed_gamma(p)  # `scale = not fix_gamma`: gamma never exported
    if out["applies"]:
        out["changes"] = changes + [f"{mistake}: {MISTAKES[mistake]}"]
    return out
