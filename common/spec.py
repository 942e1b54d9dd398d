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

# The two seed sources, as they are written (a row each in the conventions table).
SOURCES = {
    "torch-source": dict(
        formula="moving = m*moving + (1-m)*batch", momentum_weighs=OLD, default_momentum=0.9,
        default_eps=1e-5, running_var="biased", stats_update="forward", layout="NCHW",
        initial_running_var=1.0, mode="torch.is_grad_enabled()",
    ),
    "mxnet-source": dict(
        formula="moving = (1-m)*moving + m*batch", momentum_weighs=NEW, default_momentum=0.9,
        default_eps=1e-5, running_var="biased", stats_update="forward", layout="NCHW",
        initial_running_var=0.0, mode="autograd.is_training()",
    ),
}

# Fields every backend's conventions() reports for each impl, so the table has one shape.
CONVENTION_FIELDS = (
    "momentum_weighs", "default_momentum", "default_eps", "running_var", "stats_update",
    "layout", "initial_running_var",
)
# Optional field: the precision the layer applies its momentum in ("float64" when absent). MXNet's
# native operator takes momentum as a float32, which float64 running statistics can see.


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
