"""The sources' own way of training LeNet-BN in PyTorch, kept as the speed report's baseline: the
d2l `BatchNorm` module around `textbook_batch_norm` (or `nn.BatchNorm*d`) in an `nn.Sequential`,
and d2l's `train_ch6` loop: a host→device copy of every batch, an eager step, and the loss read
back for the epoch's metrics."""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from backends import positive_int, synthetic_batches
from common import lenet as canon

from .bn import textbook_batch_norm
from .device import resolve_device
from .lenet import torch_dtype

SOURCE_BATCHES = 16  # distinct synthetic batches a timer cycles through (host memory)


class SourceBatchNorm(nn.Module):
    """d2l's `BatchNorm(num_features, num_dims)`: parameters gamma/beta and plain-tensor moving
    statistics in the broadcast shape, updated by `textbook_batch_norm` in every forward."""

    def __init__(self, num_features, num_dims):
        super().__init__()
        shape = (1, num_features) if num_dims == 2 else (1, num_features, 1, 1)
        self.gamma = nn.Parameter(torch.ones(shape))
        self.beta = nn.Parameter(torch.zeros(shape))
        self.moving_mean = torch.zeros(shape)
        self.moving_var = torch.ones(shape)

    def forward(self, X):
        if self.moving_mean.device != X.device:
            self.moving_mean = self.moving_mean.to(X.device)
            self.moving_var = self.moving_var.to(X.device)
        Y, self.moving_mean, self.moving_var = textbook_batch_norm(
            X, self.gamma, self.beta, self.moving_mean, self.moving_var, eps=1e-5, momentum=0.9)
        return Y


def source_lenet(impl: str) -> nn.Sequential:
    """The textbook's LeNet-BN as people write it: `nn.Sequential` with the scratch or native BN."""
    def bn(c, dims):
        if impl == "scratch":
            return SourceBatchNorm(c, dims)
        return nn.BatchNorm2d(c) if dims == 4 else nn.BatchNorm1d(c)

    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5), bn(6, 4), nn.Sigmoid(), nn.MaxPool2d(2, 2),
        nn.Conv2d(6, 16, kernel_size=5), bn(16, 4), nn.Sigmoid(), nn.MaxPool2d(2, 2), nn.Flatten(),
        nn.Linear(256, 120), bn(120, 2), nn.Sigmoid(), nn.Linear(120, 84), bn(84, 2), nn.Sigmoid(),
        nn.Linear(84, 10))


class SourceTimer:
    """The contract's `source_timer`: d2l's loop (copy the batch to the device, forward, loss,
    backward, SGD step) on seeded synthetic batches held on the host."""

    def __init__(self, *, impl, device="auto", batch_size=256, dtype="float32", steps=50):
        if impl not in ("scratch", "native"):
            raise ValueError(f"source_timer impl must be 'scratch' or 'native', got {impl!r}")
        self.batch_size, self.steps = positive_int("batch_size", batch_size), positive_int("steps", steps)
        self.dev, desc = resolve_device(device)
        tdt = torch_dtype(dtype)
        with torch.random.fork_rng(devices=[]):  # seeded, leaving the global RNG as it was
            torch.manual_seed(0)
            self.net = source_lenet(impl).to(self.dev, tdt)
            for m in self.net.modules():  # the sources' init (d2l: xavier_uniform_ on Linear/Conv2d)
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    nn.init.xavier_uniform_(m.weight)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=canon.DEFAULT_LR)
        self.loss = nn.CrossEntropyLoss()
        rng = np.random.default_rng(0)
        count = synthetic_batches(self.batch_size, SOURCE_BATCHES)
        self.batches = [(torch.as_tensor(rng.random((self.batch_size, 1, 28, 28)), dtype=tdt),
                         torch.as_tensor(rng.integers(0, 10, self.batch_size)))
                        for _ in range(count)]
        self.i, self.loss_sum = 0, 0.0
        t0 = time.perf_counter()
        self._steps(2)
        self.info = {"compile_s": time.perf_counter() - t0, "device": desc,
                     "path": "source style: eager step, host→device copy and loss read-back per batch"}

    def _steps(self, n):
        self.net.train()
        for _ in range(n):
            X, y = self.batches[self.i % len(self.batches)]
            self.i += 1
            X, y = X.to(self.dev), y.to(self.dev)
            loss = self.loss(self.net(X), y)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            self.loss_sum += loss.item() * len(y)  # d2l's metric.add: one host sync per batch
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def run(self) -> dict:
        t0 = time.perf_counter()
        self._steps(self.steps)
        return {"examples_per_s": self.steps * self.batch_size / (time.perf_counter() - t0)}


source_timer = SourceTimer
