"""The conventions experiment (`common.conventions.observe`) on Flax linen modules: the suite's
own impls (`observe`) or any `flax.linen.Module` class or factory (`experiment`).

Flax is functional: `apply(..., mutable=[...])` returns the new statistics and leaves the
variables it was given alone. The adapter records both (the caller's variables after the forward
and the backward pass, and what `apply` returned) and then keeps the returned ones, as a
training loop does; the experiment measures which of them moved."""
from __future__ import annotations

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common import conventions as conv

from . import bn

TARGETS = bn.LAYERS
FAMILIES = ((bn.BatchNorm, "jax-source"), (nn.BatchNorm, "flax-native"))
NAMES = {"gamma": ("scale", "gamma", "weight"), "beta": ("bias", "beta", "shift"),
         "running_mean": ("mean", "moving_mean", "running_mean", "ra_mean"),
         "running_var": ("var", "moving_var", "running_var", "ra_var")}
MODE_ARGUMENTS = ("use_running_average", "train", "training", "is_training", "deterministic")


def _leaves(tree, prefix=()):
    if isinstance(tree, dict) or hasattr(tree, "items"):
        for k, v in tree.items():
            yield from _leaves(v, prefix + (k,))
    else:
        yield prefix, tree


def _replace(tree, path, value):
    if not path:
        return value
    return {**tree, path[0]: _replace(tree[path[0]], path[1:], value)}


class Adapter:
    """A Flax module with its variables in float64, for `common.conventions.observe`."""

    def __init__(self, module: nn.Module, channels: int):
        self.layer, self.channels = module, channels
        self.variables = None
        self._mode = self._mode_switch(module)

    @staticmethod
    def _mode_switch(module):
        """How to ask for training vs inference: a constructor field already set (clone it),
        else a call argument (use_running_average, or train/training/...: the inverse)."""
        fields = {k: getattr(module, k) for k in MODE_ARGUMENTS if hasattr(module, k)}
        for k, v in fields.items():
            if v is not None:
                return lambda train, k=k: ({}, module.clone(**{k: (not train) if k in (
                    "use_running_average", "deterministic") else train}))
        params = inspect.signature(module.__call__).parameters
        for k in MODE_ARGUMENTS:
            if k in params:
                return lambda train, k=k: ({k: (not train) if k in ("use_running_average", "deterministic")
                                            else train}, module)
        raise conv.ProbeInputError(
            f"{type(module).__name__}: cannot tell how to switch it between training and inference "
            f"(no {', '.join(MODE_ARGUMENTS)} field or __call__ argument)")

    def _apply(self, variables, x, train, mutable):
        kw, module = self._mode(train)
        return module.apply(variables, x, mutable=mutable, **kw)

    def prepare(self, x):
        kw, module = self._mode(True)
        variables = module.init(jax.random.PRNGKey(0), jnp.asarray(x), **kw)
        self.variables = jax.tree_util.tree_map(
            lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a,
            dict(variables))
        self.mutable = [k for k in self.variables if k != "params"]

    def _path(self, role):
        collections = ("params",) if role in ("gamma", "beta") else tuple(self.mutable)
        hits = [path for c in collections for path, leaf in _leaves(self.variables.get(c, {}), (c,))
                if str(path[-1]) in NAMES[role] and tuple(np.shape(leaf)) == (self.channels,)]
        return hits[0] if len(hits) == 1 else None

    def _read(self, variables, role):
        path = self._path(role)
        if path is None:
            return None
        leaf = variables
        for k in path:
            leaf = leaf[k]
        return np.asarray(leaf, np.float64)

    def stats(self, variables=None):
        v = self.variables if variables is None else variables
        return {role: self._read(v, role) for role in ("running_mean", "running_var")}

    def set_affine(self, gamma, beta):
        found = {}
        for role, value in (("gamma", gamma), ("beta", beta)):
            path = self._path(role)
            found[role] = path is not None
            if path is not None:
                self.variables = _replace(self.variables, path, jnp.asarray(value, jnp.float64))
        return found

    def train_step(self, x, dy):
        caller = self.variables
        params = caller.get("params", {})

        def forward(x, params):
            v = {**caller, "params": params}
            if not self.mutable:
                return self._apply(v, x, True, False), {}
            return self._apply(v, x, True, self.mutable)

        y, vjp, returned = jax.vjp(forward, jnp.asarray(x), params, has_aux=True)
        after_forward = self.stats(caller)
        dx, dparams = vjp(jnp.asarray(dy))
        after_backward = self.stats(caller)
        new = {**caller, **dict(returned)}
        grads = {"params": dparams}
        out = {"y": np.asarray(y), "dx": np.asarray(dx), "after_forward": after_forward,
               "after_backward": after_backward, "returned": self.stats(new)}
        for role, key in (("gamma", "dgamma"), ("beta", "dbeta")):
            out[key] = self._read(grads, role) if self._path(role) else None
        self.variables = new
        return out

    def eval(self, x):
        y = self._apply(self.variables, jnp.asarray(x), False, False)
        return np.asarray(y)


def experiment(factory, args=(), kwargs=None, *, name: str, seed: int = 0) -> dict:
    """As backends/torch/probe.py: the experiment on modules built by `factory`, with 64-bit
    JAX types switched on for its duration."""
    with bn.x64_mode(np.float64):
        return conv.experiment(factory, args, kwargs, name=name, seed=seed, wrap=Adapter,
                               layer_type=nn.Module, framework="flax.linen.Module", families=FAMILIES)


def observe(impl: str, *, seed: int = 0) -> dict:
    """The experiment on a fresh module of the suite's `impl`, built with its own defaults (the
    native one keeps Flax's default use_fast_variance)."""
    bn.check_impl(impl)
    factory, kwargs = TARGETS[impl]
    return experiment(factory, (), kwargs, name=f"jax/{impl}", seed=seed)
