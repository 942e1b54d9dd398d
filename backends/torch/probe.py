"""The conventions experiment (`common.conventions.observe`) on PyTorch layers: the suite's own
impls (`observe`) or any `torch.nn.Module` class or factory (`experiment`)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common import conventions as conv

from . import bn

TARGETS = bn.LAYERS
# Families with documented conventions (common.spec.DOCUMENTED), most specific first.
FAMILIES = ((bn.BatchNorm, "torch-source"), (nn.modules.batchnorm._BatchNorm, "torch-native"))
GAMMA_NAMES, BETA_NAMES = ("weight", "gamma", "scale"), ("bias", "beta", "shift")
MEAN_NAMES, VAR_NAMES = ("running_mean", "moving_mean"), ("running_var", "moving_var")


def _find(named: dict, names, channels):
    """The one tensor whose last name component is in `names` and whose shape is (C,)."""
    hits = [t for key, t in named.items()
            if key.rsplit(".", 1)[-1] in names and isinstance(t, torch.Tensor)
            and tuple(t.shape) == (channels,)]
    return hits[0] if len(hits) == 1 else None


def _numpy(t):
    return None if t is None else t.detach().cpu().numpy().astype(np.float64, copy=True)


class Adapter:
    """A torch layer in float64 and training mode, for `common.conventions.observe`."""

    def __init__(self, layer: nn.Module, channels: int):
        self.layer = layer.to(torch.float64).train()
        self.channels = channels

    def prepare(self, x):
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in self.layer.parameters()) or \
                any(isinstance(b, nn.parameter.UninitializedBuffer) for b in self.layer.buffers()):
            # a lazy module: an inference pass creates its parameters and buffers (and updates
            # no statistics)
            self.layer.eval()
            with torch.no_grad():
                self.layer(torch.tensor(x))
            self.layer.to(torch.float64).train()

    def _named(self):
        named = dict(self.layer.named_buffers())
        named.update(self.layer.named_parameters())
        named.update({k: v for k, v in vars(self.layer).items() if isinstance(v, torch.Tensor)})
        return named

    def stats(self):
        named = self._named()
        return {"running_mean": _numpy(_find(named, MEAN_NAMES, self.channels)),
                "running_var": _numpy(_find(named, VAR_NAMES, self.channels))}

    def _affine(self):
        params = dict(self.layer.named_parameters())
        return _find(params, GAMMA_NAMES, self.channels), _find(params, BETA_NAMES, self.channels)

    def set_affine(self, gamma, beta):
        g, b = self._affine()
        with torch.no_grad():
            for t, v in ((g, gamma), (b, beta)):
                if t is not None:
                    t.copy_(torch.as_tensor(v))
        return {"gamma": g is not None, "beta": b is not None}

    def train_step(self, x, dy):
        self.layer.train()
        self.layer.zero_grad(set_to_none=True)
        xt = torch.tensor(x, requires_grad=True)
        with torch.enable_grad():
            y = self.layer(xt)
            after_forward = self.stats()
            y.backward(torch.tensor(dy))
        g, b = self._affine()
        return {"y": _numpy(y), "dx": _numpy(xt.grad),
                "dgamma": _numpy(None if g is None else g.grad),
                "dbeta": _numpy(None if b is None else b.grad),
                "after_forward": after_forward, "after_backward": self.stats()}

    def eval(self, x):
        self.layer.eval()
        try:
            with torch.no_grad():
                return _numpy(self.layer(torch.tensor(x)))
        finally:
            self.layer.train()


def experiment(factory, args=(), kwargs=None, *, name: str, seed: int = 0) -> dict:
    """The experiment (common.conventions.experiment) on layers built by `factory(*args,
    **kwargs)`: {"family", "claimed", "observations", "built"}. Raises
    common.conventions.ProbeInputError for what cannot be probed."""
    return conv.experiment(factory, args, kwargs, name=name, seed=seed, wrap=Adapter,
                           layer_type=nn.Module, framework="torch.nn.Module", families=FAMILIES)


def observe(impl: str, *, seed: int = 0) -> dict:
    """The experiment on a fresh layer of the suite's `impl`, built with its own defaults."""
    bn.check_impl(impl)
    factory, kwargs = TARGETS[impl]
    return experiment(factory, (), kwargs, name=f"torch/{impl}", seed=seed)
