"""The sources' own way of training LeNet-BN in MXNet, kept as the speed report's baseline: the
d2l `BatchNorm` Block around `textbook_batch_norm` (or Gluon's `nn.BatchNorm`) in an imperative
`nn.Sequential`, and d2l's `train_ch6` loop: a host→device copy of every batch, a recorded
forward, backward, `trainer.step`, and the loss read back for the epoch's metrics."""
from __future__ import annotations

import time

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon, init
from mxnet.gluon import nn

from backends import positive_int, synthetic_batches
from common import lenet as canon

from .bn import SOURCE_EPS, SOURCE_MOMENTUM, textbook_batch_norm
from .device import context

SOURCE_BATCHES = 16  # distinct synthetic batches a timer cycles through (host memory)


class SourceBatchNorm(nn.Block):
    """d2l's `BatchNorm(num_features, num_dims)`: gamma/beta Parameters and NDArray moving
    statistics (zeros, as the source) in the broadcast shape, updated in every training forward."""

    def __init__(self, num_features, num_dims, **kwargs):
        super().__init__(**kwargs)
        shape = (1, num_features) if num_dims == 2 else (1, num_features, 1, 1)
        self.gamma = self.params.get("gamma", shape=shape, init=init.One())
        self.beta = self.params.get("beta", shape=shape, init=init.Zero())
        self.moving_mean = mx.nd.zeros(shape)
        self.moving_var = mx.nd.zeros(shape)

    def forward(self, X):
        if self.moving_mean.context != X.context or self.moving_mean.dtype != X.dtype:
            self.moving_mean = self.moving_mean.as_in_context(X.context).astype(X.dtype)
            self.moving_var = self.moving_var.as_in_context(X.context).astype(X.dtype)
        Y, self.moving_mean, self.moving_var = textbook_batch_norm(
            X, self.gamma.data(), self.beta.data(), self.moving_mean, self.moving_var,
            eps=SOURCE_EPS, momentum=SOURCE_MOMENTUM)
        return Y


def source_lenet(impl: str) -> nn.Sequential:
    """The textbook's LeNet-BN as people write it in Gluon, with the scratch or native BN."""
    def bn(c, dims):
        return SourceBatchNorm(c, dims) if impl == "scratch" else nn.BatchNorm()

    net = nn.Sequential()
    net.add(nn.Conv2D(6, kernel_size=5), bn(6, 4), nn.Activation("sigmoid"),
            nn.MaxPool2D(pool_size=2, strides=2),
            nn.Conv2D(16, kernel_size=5), bn(16, 4), nn.Activation("sigmoid"),
            nn.MaxPool2D(pool_size=2, strides=2),
            nn.Dense(120), bn(120, 2), nn.Activation("sigmoid"),
            nn.Dense(84), bn(84, 2), nn.Activation("sigmoid"),
            nn.Dense(10))
    return net


class SourceTimer:
    """The contract's `source_timer` for MXNet (see backends/contract.py)."""

    def __init__(self, *, impl, device="auto", batch_size=256, dtype="float32", steps=50):
        if impl not in ("scratch", "native"):
            raise ValueError(f"source_timer impl must be 'scratch' or 'native', got {impl!r}")
        self.batch_size, self.steps = positive_int("batch_size", batch_size), positive_int("steps", steps)
        self.ctx, desc = context(device)
        mx.random.seed(0)
        self.net = source_lenet(impl)
        self.net.initialize(init.Xavier(), ctx=self.ctx)
        self.net.cast(dtype)
        self.loss = gluon.loss.SoftmaxCrossEntropyLoss()
        self.trainer = None
        rng = np.random.default_rng(0)
        count = synthetic_batches(self.batch_size, SOURCE_BATCHES)
        self.batches = [(mx.nd.array(rng.random((self.batch_size, 1, 28, 28)), dtype=dtype),
                         mx.nd.array(rng.integers(0, 10, self.batch_size), dtype=dtype))
                        for _ in range(count)]
        self.i, self.loss_sum = 0, 0.0
        t0 = time.perf_counter()
        self._steps(2)  # initialises the deferred shapes and the trainer
        self.info = {"compile_s": time.perf_counter() - t0, "device": desc,
                     "path": "source style: imperative step, host→device copy and loss read-back per batch"}

    def _steps(self, n):
        for _ in range(n):
            X, y = self.batches[self.i % len(self.batches)]
            self.i += 1
            X, y = X.as_in_context(self.ctx), y.as_in_context(self.ctx)
            with autograd.record():
                loss = self.loss(self.net(X), y)
            loss.backward()
            if self.trainer is None:
                self.trainer = gluon.Trainer(self.net.collect_params(), "sgd",
                                             {"learning_rate": canon.DEFAULT_LR})
            self.trainer.step(self.batch_size)
            self.loss_sum += float(loss.sum().asscalar())  # d2l's metric.add: a sync per batch
        mx.nd.waitall()

    def run(self) -> dict:
        t0 = time.perf_counter()
        self._steps(self.steps)
        return {"examples_per_s": self.steps * self.batch_size / (time.perf_counter() - t0)}


source_timer = SourceTimer
