"""The one canonical description of a batch-norm configuration, and the translations to and from
every framework's and every source's own `momentum` parameter.

Canonical: `running = decay * running + (1 - decay) * batch_stat`. `decay` is the weight KEPT on
the old running value (the MXNet Gluon / Flax / Keras / ONNX meaning of `momentum`). PyTorch's
`nn.BatchNorm*d` and the MXNet from-scratch source weigh the NEW batch statistic instead.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

OLD = "old running value"
NEW = "new batch statistic"

# What `momentum` weighs in each convention. Sources are the seeds' from-scratch notebooks;
# natives are the frameworks' layers (see ../shared/docs/CONVENTIONS.md for where each comes from).
MOMENTUM_WEIGHS = {
    "torch-native": NEW,  # nn.BatchNorm*d: running = (1 - m) * running + m * batch
    "torch-source": OLD,  # d2l PyTorch source: moving = m * moving + (1 - m) * batch
    "mxnet-source": NEW,  # d2l MXNet source: moving = (1 - m) * moving + m * batch
    "mxnet-native": OLD,  # gluon.nn.BatchNorm
    "jax-source": OLD,  # d2l JAX source, same meaning as the PyTorch source
    "flax-native": OLD,  # flax.linen.BatchNorm
    "keras": OLD,
    "onnx": OLD,
}

# The momentum convention (a key of MOMENTUM_WEIGHS) of each backend's impls.
IMPL_CONVENTIONS = {
    "torch": {"scratch": "torch-source", "scratch-analytic": "torch-source",
              "native": "torch-native"},
    "mxnet": {"scratch": "mxnet-source", "native": "mxnet-native"},
    "jax": {"scratch": "jax-source", "native": "flax-native"},
}

# Fields every backend's conventions() reports for each impl (claims), and the experiment in
# common/conventions.py measures, so the table has one shape. Their values:
#   momentum_weighs     OLD or NEW (what the layer's `momentum` argument weighs)
#   default_momentum    the momentum the layer is built with (its own meaning)
#   default_eps         the eps it is built with
#   running_var         "biased" or "unbiased": the batch variance fed to the running variance
#   stats_update        "forward", "backward", "returned by apply" (functional APIs: the new
#                       statistics come back from the call; the caller's variables are untouched)
#                       or "never"
#   layout              "NCHW" (channel axis 1) or "NHWC" (channel axis last)
#   initial_running_var the running variance before any step
#   running_stats       "EMA" (constant decay), "cumulative average" or "none" (eval uses batch
#                       statistics)
#   gamma               "learnable", "fixed to 1" (a set gamma is ignored) or "absent"
#   momentum_dtype      the precision the momentum is applied in: "float64" or "float32"
CONVENTION_FIELDS = (
    "momentum_weighs", "default_momentum", "default_eps", "running_var", "stats_update",
    "layout", "initial_running_var", "running_stats", "gamma", "momentum_dtype",
)

# What each family of layers is documented to do: the claims the experiment checks. A
# constructor's own signature defaults (read with `inspect`) and the arguments a layer was built
# with override these (ARGUMENTS, MEANINGS below); nothing here is read back from a layer.
DOCUMENTED = {
    "torch-native": dict(
        momentum_weighs=NEW, running_var="unbiased", stats_update="forward", layout="NCHW",
        initial_running_var=1.0, running_stats="EMA", gamma="learnable", momentum_dtype="float64",
        source="torch/nn/modules/batchnorm.py (_NormBase.reset_running_stats fills running_var "
               "with ones; _BatchNorm.forward: momentum=None is a cumulative average, "
               "track_running_stats=False keeps no statistics); aten/src/ATen/native/"
               "Normalization.cpp (running = (1-m)*running + m*batch, unbiased batch variance, in "
               "the forward pass)"),
    "torch-source": dict(
        formula="moving = m*moving + (1-m)*batch", momentum_weighs=OLD, default_momentum=0.9,
        default_eps=1e-5, running_var="biased", stats_update="forward", layout="NCHW",
        initial_running_var=1.0, running_stats="EMA", gamma="learnable", momentum_dtype="float64",
        mode="torch.is_grad_enabled()",
        source="the seeds' d2l PyTorch notebook (../shared/docs/CONVENTIONS.md)"),
    "mxnet-source": dict(
        formula="moving = (1-m)*moving + m*batch", momentum_weighs=NEW, default_momentum=0.9,
        default_eps=1e-5, running_var="biased", stats_update="forward", layout="NCHW",
        initial_running_var=0.0, running_stats="EMA", gamma="learnable", momentum_dtype="float64",
        mode="autograd.is_training()",
        source="the seeds' d2l MXNet notebook: moving_var = zeros (../shared/docs/CONVENTIONS.md)"),
    "mxnet-native": dict(
        momentum_weighs=OLD, running_var="biased", stats_update="backward", layout="NCHW",
        initial_running_var=1.0, running_stats="EMA", gamma="learnable", momentum_dtype="float32",
        source="mxnet 1.9.1 python/mxnet/gluon/nn/basic_layers.py (BatchNorm); "
               "src/operator/nn/batch_norm.cc (BatchNormBackwardImpl updates the running averages "
               "on CPU with the biased variance; momentum is a float operator parameter); "
               "apache/mxnet issues 14357, 18751"),
    "jax-source": dict(
        formula="moving = m*moving + (1-m)*batch", momentum_weighs=OLD, default_momentum=0.9,
        default_eps=1e-5, running_var="biased", stats_update="returned by apply", layout="NHWC",
        initial_running_var=1.0, running_stats="EMA", gamma="learnable", momentum_dtype="float64",
        source="d2l JAX tab (chapter_convolutional-modern/batch-norm.md): channels last, "
               "state in the batch_stats collection"),
    "flax-native": dict(
        momentum_weighs=OLD, running_var="biased", stats_update="returned by apply",
        initial_running_var=1.0, running_stats="EMA", gamma="learnable", momentum_dtype="float64",
        source="flax/linen/normalization.py (BatchNorm: ra = momentum*ra + (1-momentum)*batch in "
               "the batch_stats collection, var initialised with ones; _compute_stats: biased)"),
}
# The two seed sources, as they are written (a row each in the conventions table).
SOURCES = {name: DOCUMENTED[name] for name in ("torch-source", "mxnet-source")}

# Constructor arguments whose value IS a field's claim, per family ("*": any layer).
ARGUMENTS = {
    "*": {"momentum": "default_momentum", "eps": "default_eps", "epsilon": "default_eps"},
    "mxnet-source": {"initial_running_var": "initial_running_var"},
}
# Documented meanings of particular argument values: (family, argument) -> {value: claims}; the
# key ... covers every other value (None: the value says nothing about these fields).
_NCHW, _NHWC = {"layout": "NCHW"}, {"layout": "NHWC"}
MEANINGS = {
    ("torch-native", "momentum"): {None: {"running_stats": "cumulative average"}},
    ("torch-native", "track_running_stats"): {False: {
        "running_stats": "none", "stats_update": None, "running_var": None,
        "initial_running_var": None, "default_momentum": None}},
    ("torch-native", "affine"): {False: {"gamma": "absent"}},
    ("mxnet-native", "axis"): {1: _NCHW, -1: _NHWC, 3: _NHWC, ...: {"layout": None}},
    ("mxnet-native", "running_variance_initializer"): {
        "ones": {"initial_running_var": 1.0}, "zeros": {"initial_running_var": 0.0},
        ...: {"initial_running_var": None}},
    ("mxnet-native", "scale"): {False: {"gamma": "fixed to 1"}},  # fix_gamma=True in the operator
    ("flax-native", "axis"): {-1: _NHWC, 3: _NHWC, 1: _NCHW, ...: {"layout": None}},
    ("flax-native", "use_scale"): {False: {"gamma": "absent"}},
}


def claims(family: str | None, arguments: dict) -> dict:
    """The claimed convention fields of a layer of `family` (a DOCUMENTED key, or None for an
    unknown layer) built with `arguments` (its constructor's signature defaults, overridden by
    what it was given): the documented facts, then what the arguments state. A field nobody
    claims is None."""
    out = {f: None for f in CONVENTION_FIELDS}
    out.update({f: v for f, v in DOCUMENTED.get(family, {}).items() if f in CONVENTION_FIELDS})
    stated = {**ARGUMENTS["*"], **ARGUMENTS.get(family, {})}
    for arg, value in arguments.items():
        if arg in stated:
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            out[stated[arg]] = float(value) if number else value
        meanings = MEANINGS.get((family, arg))
        if meanings is None:
            continue
        try:
            effect = meanings[value] if value in meanings else meanings.get(...)
        except TypeError:  # an unhashable value (e.g. an initializer object)
            effect = meanings.get(...)
        out.update(effect or {})
    return out


class UnsupportedSetting(ValueError):
    """A configuration an implementation cannot express (e.g. biased running variance in
    PyTorch's native layer). Re-exported as `backends.UnsupportedSetting`."""


def impl_convention(framework: str, impl: str) -> str:
    """The momentum convention of `framework`'s `impl` (a key of MOMENTUM_WEIGHS)."""
    try:
        return IMPL_CONVENTIONS[framework][impl]
    except KeyError:
        known = ", ".join(f"{f}/{i}" for f, impls in IMPL_CONVENTIONS.items() for i in impls)
        raise ValueError(f"unknown framework/impl {framework}/{impl}; known: {known}") from None


@dataclasses.dataclass(frozen=True)
class BNSpec:
    """A batch-norm configuration in canonical terms."""

    eps: float = 1e-5
    decay: float = 0.9
    unbiased: bool = False  # update running_var with the ÷(N-1) batch variance

    def __post_init__(self):
        check_decay(self.decay)
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a positive finite number, got {self.eps!r}")

    def momentum(self, convention: str) -> float:
        return momentum_from_decay(self.decay, convention)


def check_decay(decay: float) -> None:
    if not (0.0 <= decay <= 1.0):
        raise ValueError(f"decay must be in [0, 1], got {decay!r}")


def _weighs(convention: str) -> str:
    try:
        return MOMENTUM_WEIGHS[convention]
    except KeyError:
        raise ValueError(
            f"unknown momentum convention {convention!r}; known: {', '.join(MOMENTUM_WEIGHS)}"
        ) from None


def momentum_from_decay(decay: float, convention: str) -> float:
    """The `momentum` value that `convention` needs to behave like canonical `decay`."""
    check_decay(decay)
    return decay if _weighs(convention) == OLD else 1.0 - decay


def decay_from_momentum(momentum: float, convention: str) -> float:
    """The canonical decay that `convention`'s `momentum` value means."""
    check_decay(momentum)
    return momentum if _weighs(convention) == OLD else 1.0 - momentum


def translate_momentum(momentum: float, source: str, target: str) -> float:
    """`momentum` written for `source` rewritten for `target` (e.g. mxnet-source 0.9 -> torch-source 0.1)."""
    return momentum_from_decay(decay_from_momentum(momentum, source), target)


def effective_decay(decay: float, claimed: dict) -> float:
    """The decay an impl really applies, given its claimed conventions: its momentum rounded to
    `claimed["momentum_dtype"]` (float32 for MXNet's native layer) in its own meaning."""
    if claimed.get("momentum_dtype", "float64") != "float32":
        return decay
    old = claimed["momentum_weighs"] == OLD
    m = float(np.float32(decay if old else 1.0 - decay))
    return m if old else 1.0 - m


def running_update(running, batch_stat, decay: float):
    """Canonical exponential moving average (works on floats and arrays)."""
    return decay * running + (1.0 - decay) * batch_stat
