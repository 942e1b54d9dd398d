"""LeNet-BN training on the common data (`fit`), training-step throughput (`speed`), numerics
switches and framework versions (device selection is in `device.py`)."""
from __future__ import annotations

import os
import time

import numpy as np

import mxnet as mx
from mxnet import autograd, gluon

from backends import epoch_line, positive_int, time_alone
from common import data as common_data
from common import lenet as canonical

from .device import context
from .lenet import build, load_params
from .precision import MixedPrecision, array

EVAL_BATCH = 1024
PATH = "hybridized Gluon graph (CachedOp, static_alloc + static_shape), gluon.Trainer SGD"


def versions() -> dict[str, str]:
    return {"mxnet": mx.__version__, "numpy": np.__version__}


def exact_numerics() -> None:
    """No TF32 / tensor-op math in cuDNN and cuBLAS (read when CUDA starts, so call this before
    the first GPU operation). Nothing to turn off on a CPU build."""
    os.environ["NVIDIA_TF32_OVERRIDE"] = "0"
    os.environ["MXNET_CUDA_ALLOW_TENSOR_CORE"] = "0"


def _setup(impl, *, device, dtype, lr, eps, decay, params, seed, loss_scale=None):
    """(ctx, description, net, step, mp): a hybridized LeNet-BN on the device, one SGD step and
    the mixed-precision policy (`precision.MixedPrecision`: float16 casts the network, batch norm
    stays float32, the Trainer keeps float32 master weights, the loss is scaled)."""
    ctx, described = context(device)
    mp = MixedPrecision(dtype, ctx, loss_scale)
    net = build(impl, eps=eps, decay=decay)
    load_params(net, canonical.init_params(seed) if params is None else params, mp.dtype, ctx)
    net.hybridize(static_alloc=True, static_shape=True)
    trainable = [p for p in net.collect_params().values() if p.grad_req != "null"]
    options = {"learning_rate": lr, **({"multi_precision": True} if mp.low else {})}
    trainer = [gluon.Trainer(net.collect_params(), "sgd", options)]
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()

    def step(x, y, size):
        with autograd.record():
            logits = net(x)
            loss = loss_fn(mp.logits(logits), y)
            scaled = mp.scaled(loss)
        scaled.backward()
        if mp.finite(trainable):
            trainer[0].step(size * mp.loss_scale)  # mean over the batch, as lenet_train's mean loss
        return logits, loss

    def reset():
        """With multi_precision, a fresh Trainer: its float32 master weights are taken from the
        parameters as they are now."""
        if mp.low:
            trainer[0] = gluon.Trainer(net.collect_params(), "sgd", options)

    step.reset = reset
    return ctx, described, net, step, mp


def _warm_up(net, step, x, y):
    """One untimed step (traces the graph, allocates, sets up the trainer) whose parameter
    changes are undone; returns its seconds."""
    saved = {k: p.data().copy() for k, p in net.collect_params().items()}
    mx.nd.waitall()
    t0 = time.perf_counter()
    step(x, y, x.shape[0])
    mx.nd.waitall()
    seconds = time.perf_counter() - t0
    for k, p in net.collect_params().items():
        p.set_data(saved[k])
    step.reset()  # multi_precision master weights must not keep the undone update
    mx.nd.waitall()
    return seconds


def _accuracy_count(logits, y):
    return (logits.argmax(axis=1) == y).sum()


def _evaluate(net, x, y):
    correct = mx.nd.zeros((1,), ctx=x.context, dtype=y.dtype)
    for i in range(0, x.shape[0], EVAL_BATCH):
        logits = net(x[i:i + EVAL_BATCH]).astype(y.dtype)
        correct += _accuracy_count(logits, y[i:i + EVAL_BATCH])
    return float(correct.asscalar()) / x.shape[0]


def fit(data, *, impl, epochs, batch_size=canonical.DEFAULT_BATCH_SIZE, lr=canonical.DEFAULT_LR,
        seed=0, device="auto", dtype="float32", eps=1e-5, decay=0.9, params=None,
        progress=None, loss_scale=None) -> dict:
    """Train LeNet-BN with `impl`'s batch norm on `data` (a `common.data.Dataset`): hybridized,
    gluon.Trainer SGD on mean cross-entropy, batches from `common.data.batch_indices`, data
    resident on the device.

    examples_per_s times the training steps only, after one warm-up step whose effect is
    undone; loss and accuracy accumulate on the device and are read once per epoch.
    """
    start = time.perf_counter()
    ctx, described, net, step, mp = _setup(impl, device=device, dtype=dtype, lr=lr, eps=eps,
                                           decay=decay, params=params, seed=seed,
                                           loss_scale=loss_scale)
    acc = mp.float_dtype  # labels, loss and count sums (float16 cannot count past 2048)

    train_x, train_y = array(data.train_x, mp.dtype, ctx), array(data.train_y, acc, ctx)
    test_x, test_y = array(data.test_x, mp.dtype, ctx), array(data.test_y, acc, ctx)
    n = train_x.shape[0]
    first = mx.nd.arange(min(batch_size, n), ctx=ctx)
    _warm_up(net, step, train_x[first], train_y[first])

    history, train_seconds = [], 0.0
    for epoch in range(epochs):
        batches = [(mx.nd.array(i, ctx=ctx, dtype="int64"), len(i))
                   for i in common_data.batch_indices(n, batch_size, seed=seed, epoch=epoch)]
        loss_sum = mx.nd.zeros((1,), ctx=ctx, dtype=acc)
        correct = mx.nd.zeros((1,), ctx=ctx, dtype=acc)
        mx.nd.waitall()
        t0 = time.perf_counter()
        for idx, size in batches:
            x, y = mx.nd.take(train_x, idx), mx.nd.take(train_y, idx)
            logits, loss = step(x, y, size)
            loss_sum += loss.sum()
            correct += _accuracy_count(mp.logits(logits), y)
        mx.nd.waitall()
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        row = {"epoch": epoch + 1, "loss": float(loss_sum.asscalar()) / n,
               "train_acc": float(correct.asscalar()) / n,
               "test_acc": _evaluate(net, test_x, test_y),
               "examples_per_s": n / seconds, "seconds": seconds}
        history.append(row)
        if progress is not None:
            progress(epoch_line(row, epochs, described))
    last = history[-1] if history else dict.fromkeys(("loss", "train_acc", "test_acc"),
                                                     float("nan"))
    return {"device": described, "history": history, "final_loss": last["loss"],
            "train_acc": last["train_acc"], "test_acc": last["test_acc"],
            "examples_per_s": n * len(history) / train_seconds if train_seconds else 0.0,
            "wall_s": time.perf_counter() - start, **mp.summary()}


class SpeedTimer:
    """The contract's speed timer (backends/contract.py): `fit`'s step on a seeded synthetic
    Fashion-MNIST-shaped batch resident on the device, warmed up on creation."""

    def __init__(self, *, impl, device="auto", batch_size=canonical.DEFAULT_BATCH_SIZE,
                 dtype="float32", steps=50):
        batch_size, steps = positive_int("batch_size", batch_size), positive_int("steps", steps)
        ctx, described, net, self.step, mp = _setup(impl, device=device, dtype=dtype,
                                                    lr=canonical.DEFAULT_LR, eps=1e-5, decay=0.9,
                                                    params=None, seed=0)
        rng = np.random.default_rng(0)
        self.x = array(rng.random((batch_size, 1, 28, 28)), mp.dtype, ctx)
        self.y = array(rng.integers(0, 10, batch_size), mp.float_dtype, ctx)
        self.batch_size, self.steps = batch_size, steps
        self.info = {"compile_s": _warm_up(net, self.step, self.x, self.y), "device": described,
                     "path": PATH, **mp.summary()}

    def run(self) -> dict:
        mx.nd.waitall()
        t0 = time.perf_counter()
        for _ in range(self.steps):
            self.step(self.x, self.y, self.batch_size)
        mx.nd.waitall()
        return {"examples_per_s": self.steps * self.batch_size / (time.perf_counter() - t0)}


speed_timer = SpeedTimer


def speed(*, impl, device="auto", batch_size=canonical.DEFAULT_BATCH_SIZE, dtype="float32",
          steps=50, repeats=5) -> dict:
    """Training-step throughput (contract in backends/contract.py): `repeats` runs of a
    `SpeedTimer`."""
    return time_alone(SpeedTimer(impl=impl, device=device, batch_size=batch_size, dtype=dtype,
                                 steps=steps), repeats)
