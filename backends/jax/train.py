"""The contract's `fit` for JAX: LeNet-BN on the common loader's batches, on the GPU when JAX
sees one, and `versions`.

Built for speed (airbench-style): the whole dataset is put on the device once, each epoch's
batch indices (from `common.data.batch_indices`, so every backend sees the same batches) go over
as one small int32 array, and each step gathers its batch on the device. On a GPU the full
batches of an epoch run as ONE compiled call (the SGD step inside `lax.scan`); on the CPU a
Python loop dispatches the jitted step, with no host sync between steps. Loss and accuracy are
summed on the device and read once per epoch. Steps are compiled ahead of time, so compile time
(`compile_s`) is reported apart from the timed training steps. On the CPU, XLA's convolutions
inside a while loop (scan) ran ~2.7× slower than the same step dispatched from Python.
"""
from __future__ import annotations

import functools
import importlib.metadata
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from backends import epoch_line, positive_int, synthetic_batches, time_alone
from backends.jax.bn import check_impl, x64_mode
from backends.jax.device import select_device
from backends.jax.lenet import build, make_train_step, nchw_to_nhwc, variables_of
from backends.jax.precision import MixedPrecision
from common import data as cdata
from common import lenet as canon

EVAL_CHUNK = 1024


def versions() -> dict:
    out = {}
    for pkg in ("jax", "jaxlib", "flax", "optax"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


@functools.lru_cache(maxsize=16)
def _epoch_fns(impl, eps, decay, lr, compute=None, loss_scale=1.0):
    """(optimizer, then jitted: epoch over full batches via lax.scan, one step by batch number,
    one step on given indices, one test chunk's correct count added to a running total).
    Cached per configuration so a later fit reuses the compiled executables. `compute`,
    `loss_scale`: `jax/precision.MixedPrecision.key()`."""
    model = build(impl, eps=eps, decay=decay, unbiased=None, dtype=compute)
    tx, step = make_train_step(model, lr, loss_scale)

    def gather_step(carry, x_all, y_all, idx):
        state, loss_sum, correct = carry
        state, loss, n_ok = step(state, x_all[idx], y_all[idx])
        return state, loss_sum + loss * idx.shape[0], correct + n_ok

    def scan_epoch(carry, x_all, y_all, idx_matrix):
        body = lambda c, idx: (gather_step(c, x_all, y_all, idx), None)
        return lax.scan(body, carry, idx_matrix)[0]

    def loop_step(carry, x_all, y_all, idx_matrix, i):
        idx = lax.dynamic_index_in_dim(idx_matrix, i, keepdims=False)
        return gather_step(carry, x_all, y_all, idx)

    def test_correct(total, variables, x_chunks, y_chunks, i):
        xb, yb = (lax.dynamic_index_in_dim(a, i, keepdims=False) for a in (x_chunks, y_chunks))
        logits = model.apply(variables, xb, train=False)
        return total + jnp.sum(jnp.argmax(logits, axis=-1) == yb, dtype=jnp.int32)

    donate = functools.partial(jax.jit, donate_argnums=0)
    return (tx, donate(scan_epoch), donate(loop_step), donate(gather_step),
            jax.jit(test_correct))


def _chunks(x, y, size):
    """Pad to a multiple of `size` (labels -1 never match) and reshape into (k, size, ...)."""
    n = len(x)
    k = max(1, -(-n // size))
    pad = k * size - n
    x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    y = np.concatenate([y, np.full(pad, -1, y.dtype)])
    return x.reshape((k, size) + x.shape[1:]), y.reshape(k, size)


class _Trainer:
    """One impl's compiled training on device-resident data, shared by `fit` and `SpeedTimer`:
    the data, parameters and optimizer state on the device, and the step functions compiled
    ahead of time (so `compile_s` is apart from the timed steps). `epoch(order)` trains on the
    batches `order` makes and returns the timed seconds; `test_correct()` counts the test set's
    correct predictions."""

    def __init__(self, data, *, impl, batch_size, lr, seed, device, dtype, eps, decay, params,
                 scan, loss_scale=None):
        check_impl(impl)
        self.mp = MixedPrecision(dtype, loss_scale)
        self.dt = self.mp.param_dtype  # parameters and data (float32 for float16/bfloat16)
        self.batch_size = positive_int("batch_size", batch_size)
        self.dev, self.device_name = select_device(device)
        self.scan = self.dev.platform != "cpu" if scan is None else bool(scan)
        self.n = len(data.train_x)
        if self.n == 0 or len(data.train_y) != self.n or len(data.test_x) != len(data.test_y):
            raise ValueError("data needs non-empty train_x/train_y and matching test_x/test_y "
                             "lengths")
        self.n_test = len(data.test_x)
        params = canon.init_params(seed) if params is None else params
        tx, scan_epoch, loop_step, gather_step, test_correct = _epoch_fns(
            impl, float(eps), float(decay), float(lr), *self.mp.key())
        self.n_full, self.rest = divmod(self.n, self.batch_size)
        with x64_mode(self.dt):
            self.x_train = self._put(nchw_to_nhwc(np.asarray(data.train_x, self.dt)))
            self.y_train = self._put(np.asarray(data.train_y, np.int32))
            self.x_test, self.y_test = map(self._put, _chunks(
                nchw_to_nhwc(np.asarray(data.test_x, self.dt)), np.asarray(data.test_y, np.int32),
                min(EVAL_CHUNK, max(1, self.n_test))))
            variables = self._put(variables_of(params, impl, self.dt))
            self.carry = ((variables["params"], variables["batch_stats"],
                           tx.init(variables["params"])),
                          self._put(np.zeros((), self.dt)), self._put(np.zeros((), np.int32)))
            idx_full = self._put(np.zeros((self.n_full, self.batch_size), np.int32))
            idx_rest = self._put(np.zeros(self.rest, np.int32))
            t0 = time.perf_counter()
            args = (self.carry, self.x_train, self.y_train)
            self.full_fn = None
            if self.n_full and self.scan:
                self.full_fn = scan_epoch.lower(*args, idx_full).compile()
            elif self.n_full:
                self.full_fn = loop_step.lower(*args, idx_full, 0).compile()
            self.rest_fn = gather_step.lower(*args, idx_rest).compile() if self.rest else None
            self.zero = self._put(np.zeros((), np.int32))
            self.eval_fn = test_correct.lower(self.zero, self._variables(), self.x_test,
                                              self.y_test, 0).compile()
            self.compile_s = time.perf_counter() - t0

    def _put(self, a):
        return jax.device_put(a, self.dev)

    def _variables(self):
        state = self.carry[0]
        return {"params": state[0], "batch_stats": state[1]}

    def epoch(self, order) -> float:
        """Train on the batches of `order` (one epoch's example indices, full batches first);
        the loss and correct-count sums restart at zero. Returns the timed seconds."""
        with x64_mode(self.dt):
            order = np.asarray(order, np.int32)
            split = self.n_full * self.batch_size
            idx_full = self._put(order[:split].reshape(self.n_full, self.batch_size))
            idx_rest = self._put(order[split:])
            jax.block_until_ready((idx_full, idx_rest))
            carry = (self.carry[0], self._put(np.zeros((), self.dt)),
                     self._put(np.zeros((), np.int32)))
            t0 = time.perf_counter()
            if self.n_full and self.scan:
                carry = self.full_fn(carry, self.x_train, self.y_train, idx_full)
            elif self.n_full:
                for i in range(self.n_full):
                    carry = self.full_fn(carry, self.x_train, self.y_train, idx_full, i)
            if self.rest:
                carry = self.rest_fn(carry, self.x_train, self.y_train, idx_rest)
            jax.block_until_ready(carry)
            self.carry = carry
            return time.perf_counter() - t0

    def sums(self):
        """(loss summed over the last epoch's examples, its correct count) as Python numbers."""
        loss_sum, correct = jax.device_get(self.carry[1:])
        return float(loss_sum), int(correct)

    def test_correct(self) -> int:
        with x64_mode(self.dt):
            total = self.zero
            for i in range(self.x_test.shape[0]):
                total = self.eval_fn(total, self._variables(), self.x_test, self.y_test, i)
            return int(jax.device_get(total))


def fit(data, *, impl, epochs, batch_size=256, lr=1.0, seed=0, device="auto", dtype="float32",
        eps=1e-5, decay=0.9, params=None, progress=None, loss_scale=None, scan=None) -> dict:
    """The contract's fit (see backends/contract.py). `data` has train_x/train_y/test_x/test_y
    (NCHW floats, int labels). `scan`: run each epoch's full batches as one `lax.scan` call
    (True) or the same jitted step from a Python loop (False); None picks scan on a GPU and the
    loop on the CPU (see the module docstring).
    Uses JAX's default matmul/conv precision for the device (TF32 may apply on GPUs)."""
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    say = progress or (lambda line: None)
    start = time.perf_counter()
    t = _Trainer(data, impl=impl, batch_size=batch_size, lr=lr, seed=seed, device=device,
                 dtype=dtype, eps=eps, decay=decay, params=params, scan=scan,
                 loss_scale=loss_scale)
    n = t.n
    history, train_s = [], 0.0
    for epoch in range(epochs):
        seconds = t.epoch(np.concatenate(cdata.batch_indices(n, t.batch_size, seed=seed,
                                                             epoch=epoch)))
        train_s += seconds
        n_test_ok = t.test_correct()
        loss_sum, correct = t.sums()
        row = {"epoch": epoch + 1, "loss": loss_sum / n, "train_acc": correct / n,
               "test_acc": n_test_ok / max(1, t.n_test), "examples_per_s": n / seconds,
               "seconds": seconds}
        history.append(row)
        say(epoch_line(row, epochs, t.device_name))

    last = history[-1] if history else {"loss": float("nan"), "train_acc": float("nan"),
                                        "test_acc": float("nan")}
    return {"device": t.device_name, "history": history, "final_loss": last["loss"],
            "train_acc": last["train_acc"], "test_acc": last["test_acc"],
            "examples_per_s": n * epochs / train_s if train_s else float("nan"),
            "wall_s": time.perf_counter() - start, "compile_s": t.compile_s,
            "path": "lax.scan epoch" if t.scan else "jit step loop", "dtype": t.mp.name,
            **t.mp.summary(t.carry[0][2])}


class SpeedTimer:
    """The contract's speed timer (backends/contract.py): `fit`'s own training path (scan per
    epoch on a GPU, jitted step loop on the CPU) on seeded synthetic images; one run is an epoch
    of `steps` batches. Creating it compiles and trains one warm-up epoch."""

    def __init__(self, *, impl, device="auto", batch_size=256, dtype="float32", steps=50):
        batch_size, steps = positive_int("batch_size", batch_size), positive_int("steps", steps)
        rng = np.random.default_rng(0)
        n = batch_size * synthetic_batches(batch_size, steps)  # an epoch: up to `steps` steps
        x = rng.uniform(0.0, 1.0, size=(n, 1, 28, 28)).astype(MixedPrecision(dtype).param_dtype)
        y = rng.integers(0, 10, size=n)
        ds = cdata.Dataset(x, y, x[:batch_size], y[:batch_size], "synthetic")
        self.trainer = _Trainer(ds, impl=impl, batch_size=batch_size, lr=canon.DEFAULT_LR,
                                seed=0, device=device, dtype=dtype, eps=1e-5, decay=0.9,
                                params=None, scan=None)
        self.epochs = 0
        warmup_s = self._epoch_seconds()
        t = self.trainer
        self.info = {"compile_s": t.compile_s, "warmup_s": warmup_s, "device": t.device_name,
                     "path": "lax.scan epoch" if t.scan else "jit step loop",
                     **t.mp.summary(t.carry[0][2])}

    def _epoch_seconds(self) -> float:
        order = np.concatenate(cdata.batch_indices(self.trainer.n, self.trainer.batch_size,
                                                   seed=0, epoch=self.epochs))
        self.epochs += 1
        return self.trainer.epoch(order)

    def run(self) -> dict:
        return {"examples_per_s": self.trainer.n / self._epoch_seconds()}


speed_timer = SpeedTimer


def speed(*, impl, device="auto", batch_size=256, dtype="float32", steps=50, repeats=5) -> dict:
    """The contract's speed: `repeats` runs of a `SpeedTimer`."""
    return time_alone(SpeedTimer(impl=impl, device=device, batch_size=batch_size, dtype=dtype,
                                 steps=steps), repeats)


def exact_numerics() -> None:
    """Full float32 precision for matmuls and convolutions (no TF32) in this process."""
    jax.config.update("jax_default_matmul_precision", "highest")
