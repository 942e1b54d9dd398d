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

from backends.jax.bn import check_dtype, check_impl, x64_mode
from backends.jax.lenet import build, make_train_step, nchw_to_nhwc, select_device, to_flax
from common import data as cdata
from common import lenet as canon
from common.report import epoch_line

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
def _epoch_fns(impl, eps, decay, lr):
    """(optimizer, then jitted: epoch over full batches via lax.scan, one step by batch number,
    one step on given indices, one test chunk's correct count added to a running total).
    Cached per configuration so a later fit reuses the compiled executables."""
    model = build(impl, eps=eps, decay=decay, unbiased=None)
    tx, step = make_train_step(model, lr)

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


def fit(data, *, impl, epochs, batch_size=256, lr=1.0, seed=0, device="auto", dtype="float32",
        eps=1e-5, decay=0.9, params=None, progress=None, scan=None) -> dict:
    """The contract's fit (see backends/__init__.py). `data` has train_x/train_y/test_x/test_y
    (NCHW floats, int labels). `scan`: run each epoch's full batches as one `lax.scan` call
    (True) or the same jitted step from a Python loop (False); None picks scan on a GPU and the
    loop on the CPU (see the module docstring).
    Uses JAX's default matmul/conv precision for the device (TF32 may apply on GPUs)."""
    check_impl(impl)
    dt = check_dtype(dtype)
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    if (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
            or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    dev, device_name = select_device(device)
    scan = dev.platform != "cpu" if scan is None else bool(scan)
    say = progress or (lambda line: None)
    start = time.perf_counter()
    n = len(data.train_x)
    if n == 0 or len(data.train_y) != n or len(data.test_x) != len(data.test_y):
        raise ValueError("data needs non-empty train_x/train_y and matching test_x/test_y lengths")
    params = canon.init_params(seed) if params is None else params
    tx, scan_epoch, loop_step, gather_step, test_correct = _epoch_fns(
        impl, float(eps), float(decay), float(lr))
    n_full, rest = divmod(n, batch_size)

    with x64_mode(dt):
        put = lambda a: jax.device_put(a, dev)
        x_train = put(nchw_to_nhwc(np.asarray(data.train_x, dt)))
        y_train = put(np.asarray(data.train_y, np.int32))
        x_test, y_test = map(put, _chunks(nchw_to_nhwc(np.asarray(data.test_x, dt)),
                                          np.asarray(data.test_y, np.int32),
                                          min(EVAL_CHUNK, max(1, len(data.test_x)))))
        variables = put(to_flax(params, impl, dt))
        carry = ((variables["params"], variables["batch_stats"], tx.init(variables["params"])),
                 put(np.zeros((), dt)), put(np.zeros((), np.int32)))
        idx_full = put(np.zeros((n_full, batch_size), np.int32))
        idx_rest = put(np.zeros(rest, np.int32))

        t0 = time.perf_counter()
        full_fn = None
        if n_full and scan:
            full_fn = scan_epoch.lower(carry, x_train, y_train, idx_full).compile()
        elif n_full:
            full_fn = loop_step.lower(carry, x_train, y_train, idx_full, 0).compile()
        rest_fn = gather_step.lower(carry, x_train, y_train, idx_rest).compile() if rest else None
        zero = put(np.zeros((), np.int32))
        eval_fn = test_correct.lower(
            zero, {"params": carry[0][0], "batch_stats": carry[0][1]}, x_test, y_test, 0).compile()
        compile_s = time.perf_counter() - t0

        history, train_s = [], 0.0
        for epoch in range(epochs):
            order = np.concatenate(cdata.batch_indices(n, batch_size, seed=seed, epoch=epoch))
            order = order.astype(np.int32)
            idx_full = put(order[:n_full * batch_size].reshape(n_full, batch_size))
            idx_rest = put(order[n_full * batch_size:])
            jax.block_until_ready((idx_full, idx_rest))
            carry = (carry[0], put(np.zeros((), dt)), put(np.zeros((), np.int32)))
            t0 = time.perf_counter()
            if n_full and scan:
                carry = full_fn(carry, x_train, y_train, idx_full)
            elif n_full:
                for i in range(n_full):
                    carry = full_fn(carry, x_train, y_train, idx_full, i)
            if rest:
                carry = rest_fn(carry, x_train, y_train, idx_rest)
            jax.block_until_ready(carry)
            seconds = time.perf_counter() - t0
            train_s += seconds
            state, loss_sum, correct = carry
            n_test_ok = zero
            for i in range(x_test.shape[0]):
                n_test_ok = eval_fn(n_test_ok, {"params": state[0], "batch_stats": state[1]},
                                    x_test, y_test, i)
            loss_sum, correct, n_test_ok = jax.device_get((loss_sum, correct, n_test_ok))
            row = {"epoch": epoch + 1, "loss": float(loss_sum) / n, "train_acc": int(correct) / n,
                   "test_acc": int(n_test_ok) / max(1, len(data.test_x)),
                   "examples_per_s": n / seconds, "seconds": seconds}
            history.append(row)
            say(epoch_line(row, epochs, device_name))

    last = history[-1] if history else {"loss": float("nan"), "train_acc": float("nan"),
                                        "test_acc": float("nan")}
    return {"device": device_name, "history": history, "final_loss": last["loss"],
            "train_acc": last["train_acc"], "test_acc": last["test_acc"],
            "examples_per_s": n * epochs / train_s if train_s else float("nan"),
            "wall_s": time.perf_counter() - start, "compile_s": compile_s,
            "path": "lax.scan epoch" if scan else "jit step loop", "dtype": dt.name}


def speed(*, impl, device="auto", batch_size=256, dtype="float32", steps=50, repeats=5) -> dict:
    """The contract's speed: `fit`'s own training path (scan per epoch on a GPU, jitted step loop
    on the CPU) on seeded synthetic images; an epoch of `steps` batches is one timed run, the first
    epoch is the warm-up."""
    rng = np.random.default_rng(0)
    n = batch_size * steps
    x = rng.uniform(0.0, 1.0, size=(n, 1, 28, 28)).astype(dtype)
    y = rng.integers(0, 10, size=n)
    ds = cdata.Dataset(x, y, x[:batch_size], y[:batch_size], "synthetic")
    r = fit(ds, impl=impl, epochs=repeats + 1, batch_size=batch_size, device=device, dtype=dtype)
    runs = [h["examples_per_s"] for h in r["history"][1:]]
    return {"examples_per_s": float(np.median(runs)), "runs": runs, "compile_s": r["compile_s"],
            "warmup_s": r["history"][0]["seconds"], "device": r["device"], "path": r["path"]}


def exact_numerics() -> None:
    """Full float32 precision for matmuls and convolutions (no TF32) in this process."""
    jax.config.update("jax_default_matmul_precision", "highest")
