"""The sources' own way of training LeNet-BN in JAX/Flax, kept as the speed report's baseline: the
d2l `BatchNorm` module around `textbook_batch_norm` (or `flax.linen.BatchNorm`) in an
`nn.Sequential`-style LeNet, and d2l's training step: a host→device copy of every batch, a
jitted loss under `jax.value_and_grad`, an eager `TrainState.apply_gradients`, and the loss read
back for the epoch's metrics."""
from __future__ import annotations

import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from backends import positive_int, synthetic_batches
from common import lenet as canon

from .bn import SCRATCH_EPS, SCRATCH_MOMENTUM, check_dtype, textbook_batch_norm, x64_mode
from .device import select_device

SOURCE_BATCHES = 16  # distinct synthetic batches a timer cycles through (host memory)


class SourceBatchNorm(nn.Module):
    """d2l's JAX `BatchNorm(num_features, num_dims)`, moving statistics in `batch_stats`."""

    num_features: int
    num_dims: int
    deterministic: bool = False

    @nn.compact
    def __call__(self, X):
        shape = (1, self.num_features) if self.num_dims == 2 else (1, 1, 1, self.num_features)
        gamma = self.param("gamma", nn.initializers.ones, shape, X.dtype)
        beta = self.param("beta", nn.initializers.zeros, shape, X.dtype)
        mean = self.variable("batch_stats", "moving_mean", jnp.zeros, shape, X.dtype)
        var = self.variable("batch_stats", "moving_var", jnp.ones, shape, X.dtype)
        Y, mean.value, var.value = textbook_batch_norm(X, self.deterministic, gamma, beta,
                                                       mean.value, var.value, SCRATCH_EPS,
                                                       SCRATCH_MOMENTUM)
        return Y


class SourceLeNet(nn.Module):
    """The textbook's LeNet-BN (NHWC) with the scratch or native BN, written as d2l writes it."""

    impl: str = "scratch"

    @nn.compact
    def __call__(self, X):
        def bn(c, dims):
            if self.impl == "scratch":
                return SourceBatchNorm(c, dims)
            return nn.BatchNorm(use_running_average=False)

        X = nn.max_pool(nn.sigmoid(bn(6, 4)(nn.Conv(6, (5, 5), padding="VALID")(X))), (2, 2), (2, 2))
        X = nn.max_pool(nn.sigmoid(bn(16, 4)(nn.Conv(16, (5, 5), padding="VALID")(X))), (2, 2), (2, 2))
        X = X.reshape((X.shape[0], -1))
        X = nn.sigmoid(bn(120, 2)(nn.Dense(120)(X)))
        X = nn.sigmoid(bn(84, 2)(nn.Dense(84)(X)))
        return nn.Dense(10)(X)


class TrainState(train_state.TrainState):
    batch_stats: dict


@functools.partial(jax.jit, static_argnums=0)
def _loss(model, params, batch_stats, X, y):
    """d2l's jitted loss: mean cross-entropy and the updated batch statistics."""
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, X,
                                  mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates


class SourceTimer:
    """The contract's `source_timer` for JAX (see backends/contract.py)."""

    def __init__(self, *, impl, device="auto", batch_size=256, dtype="float32", steps=50):
        if impl not in ("scratch", "native"):
            raise ValueError(f"source_timer impl must be 'scratch' or 'native', got {impl!r}")
        self.batch_size, self.steps = positive_int("batch_size", batch_size), positive_int("steps", steps)
        self.dt = check_dtype(dtype)
        self.dev, desc = select_device(device)
        self.model = SourceLeNet(impl)
        rng = np.random.default_rng(0)
        count = synthetic_batches(self.batch_size, SOURCE_BATCHES)
        self.batches = [(rng.random((self.batch_size, 28, 28, 1)).astype(self.dt),
                         rng.integers(0, 10, self.batch_size).astype(np.int32)) for _ in range(count)]
        with x64_mode(self.dt), jax.default_device(self.dev):
            variables = self.model.init(jax.random.PRNGKey(0), jnp.asarray(self.batches[0][0]))
            self.state = TrainState.create(apply_fn=self.model.apply, params=variables["params"],
                                           batch_stats=variables["batch_stats"],
                                           tx=optax.sgd(canon.DEFAULT_LR))
        self.i, self.loss_sum = 0, 0.0
        t0 = time.perf_counter()
        self._steps(2)
        self.info = {"compile_s": time.perf_counter() - t0, "device": desc,
                     "path": "source style: jitted loss + eager update, host→device copy and "
                             "loss read-back per batch"}

    def _steps(self, n):
        grad = jax.value_and_grad(_loss, argnums=1, has_aux=True)
        with x64_mode(self.dt):
            for _ in range(n):
                X, y = self.batches[self.i % len(self.batches)]
                self.i += 1
                X, y = jax.device_put(X, self.dev), jax.device_put(y, self.dev)
                (loss, updates), grads = grad(self.model, self.state.params, self.state.batch_stats, X, y)
                self.state = self.state.apply_gradients(grads=grads)
                self.state = self.state.replace(batch_stats=updates["batch_stats"])
                self.loss_sum += float(loss) * self.batch_size  # d2l's metric: a sync per batch
            jax.block_until_ready(self.state)

    def run(self) -> dict:
        t0 = time.perf_counter()
        self._steps(self.steps)
        return {"examples_per_s": self.steps * self.batch_size / (time.perf_counter() - t0)}


source_timer = SourceTimer
