"""The conventions experiment (`common.conventions.observe`) on Gluon layers: the suite's own
impls (`observe`) or any `gluon.Block` class or factory (`experiment`)."""
from __future__ import annotations

import numpy as np

import mxnet as mx
from mxnet import autograd, gluon
from mxnet.gluon import nn

from common import conventions as conv

from . import bn

TARGETS = bn.LAYERS
FAMILIES = ((bn.BatchNorm, "mxnet-source"), (nn.BatchNorm, "mxnet-native"))
# Gluon parameter names carry the block's prefix ("batchnorm0_gamma"): matched by suffix.
NAMES = {"gamma": ("gamma", "weight", "scale"), "beta": ("beta", "bias", "shift"),
         "running_mean": ("running_mean", "moving_mean"), "running_var": ("running_var", "moving_var")}


class Adapter:
    """A Gluon block in float64 for `common.conventions.observe`; training mode is
    `autograd.record()`, inference a plain call."""

    def __init__(self, layer: gluon.Block, channels: int):
        self.layer, self.channels = layer, channels

    def prepare(self, x):
        self.layer.initialize()
        self.layer.cast("float64")
        self.layer(mx.nd.array(x, dtype="float64")).wait_to_read()  # deferred shapes; inference

    def _param(self, role):
        hits = [p for name, p in self.layer.collect_params().items()
                if name.endswith(NAMES[role]) and tuple(p.shape) == (self.channels,)]
        return hits[0] if len(hits) == 1 else None

    def stats(self):
        out = {}
        for role in ("running_mean", "running_var"):
            p = self._param(role)
            out[role] = None if p is None else p.data().asnumpy().astype(np.float64)
        return out

    def set_affine(self, gamma, beta):
        found = {}
        for role, value in (("gamma", gamma), ("beta", beta)):
            p = self._param(role)
            found[role] = p is not None
            if p is not None:
                p.set_data(mx.nd.array(value, dtype="float64"))
        return found

    def _grad(self, role):
        p = self._param(role)
        return None if p is None or p.grad_req == "null" else p.grad().asnumpy()

    def train_step(self, x, dy):
        X = mx.nd.array(x, dtype="float64")
        X.attach_grad()
        with autograd.record():
            y = self.layer(X)
            y.wait_to_read()
            after_forward = self.stats()
        y.backward(mx.nd.array(dy, dtype="float64"))
        mx.nd.waitall()
        return {"y": y.asnumpy(), "dx": X.grad.asnumpy(), "dgamma": self._grad("gamma"),
                "dbeta": self._grad("beta"), "after_forward": after_forward,
                "after_backward": self.stats()}

    def eval(self, x):
        return self.layer(mx.nd.array(x, dtype="float64")).asnumpy()


def experiment(factory, args=(), kwargs=None, *, name: str, seed: int = 0) -> dict:
    """As backends/torch/probe.py: the experiment on layers built by `factory`."""
    return conv.experiment(factory, args, kwargs, name=name, seed=seed, wrap=Adapter,
                           layer_type=gluon.Block, framework="mxnet.gluon.Block", families=FAMILIES)


def observe(impl: str, *, seed: int = 0) -> dict:
    """The experiment on a fresh layer of the suite's `impl`, built with its own defaults."""
    if impl not in TARGETS:
        raise ValueError(f"unknown impl {impl!r}; choose from {', '.join(bn.IMPLS)}")
    factory, kwargs = TARGETS[impl]
    return experiment(factory, (), kwargs, name=f"mxnet/{impl}", seed=seed)
