"""LeNet-BN in Flax (NHWC inside), conversion between the canonical PyTorch-layout parameters
and Flax variables, and the contract's `lenet_train` / `lenet_eval`.

Layout conversion: conv weights O×I×kH×kW → Flax HWIO kernels, linear weights out×in → in×out
kernels. The canonical fc1 weight reads its 256 inputs in PyTorch's C×H×W flatten order; an NHWC
tensor flattens as H×W×C, so fc1's columns are permuted once at conversion instead of
transposing activations on every step.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from backends import UnsupportedSetting
from backends.jax.bn import (PARAM_FIELDS, STAT_FIELDS, VARIABLE_NAMES, check_impl, make_layer,
                             x64_mode)
from backends.jax.device import select_device
from backends.jax.precision import MixedPrecision, float_logits, optimizer
from common import lenet as canon

FC1_INPUT_CHW = (16, 4, 4)  # conv2 → pool output, channels × height × width


class LeNetBN(nn.Module):
    """conv(6,5)→BN→sigmoid→maxpool2→conv(16,5)→BN→sigmoid→maxpool2→flatten→fc(120)→BN→sigmoid
    →fc(84)→BN→sigmoid→fc(10), channels-last, with `impl`'s batch norm."""

    impl: str = "scratch"
    decay: float = 0.9  # canonical (common.spec): the weight kept on the old running value
    eps: float = 1e-5
    unbiased: bool = False
    precision: object = None  # matmul/conv precision (None: JAX's default for the device)
    dtype: object = None  # what every layer computes in (None: its inputs'; jax/precision.py)

    @nn.compact
    def __call__(self, x, train: bool):
        def bn(name, features, dims):
            return make_layer(self.impl, features, dims, eps=self.eps, decay=self.decay,
                              unbiased=self.unbiased, use_running_average=not train, name=name,
                              dtype=self.dtype)

        conv = functools.partial(nn.Conv, kernel_size=(5, 5), padding="VALID",
                                 precision=self.precision, dtype=self.dtype)
        dense = functools.partial(nn.Dense, precision=self.precision, dtype=self.dtype)
        pool = functools.partial(nn.max_pool, window_shape=(2, 2), strides=(2, 2))
        x = pool(nn.sigmoid(bn("bn1", 6, 4)(conv(6, name="conv1")(x))))
        x = pool(nn.sigmoid(bn("bn2", 16, 4)(conv(16, name="conv2")(x))))
        x = x.reshape((x.shape[0], -1))  # H×W×C order; fc1's kernel rows are permuted to match
        x = nn.sigmoid(bn("bn3", 120, 2)(dense(120, name="fc1")(x)))
        x = nn.sigmoid(bn("bn4", 84, 2)(dense(84, name="fc2")(x)))
        return dense(10, name="fc3")(x)


def _fc1_chw_to_hwc(w):
    """Canonical fc1 weight (120 × C·H·W) → columns in H·W·C order."""
    c, h, wd = FC1_INPUT_CHW
    return w.reshape(w.shape[0], c, h, wd).transpose(0, 2, 3, 1).reshape(w.shape[0], -1)


def _fc1_hwc_to_chw(w):
    c, h, wd = FC1_INPUT_CHW
    return w.reshape(w.shape[0], h, wd, c).transpose(0, 3, 1, 2).reshape(w.shape[0], -1)


def to_flax(params, impl, dtype=np.float64) -> dict:
    """Canonical dict (PyTorch layout) → Flax variables {'params', 'batch_stats'} (NumPy)."""
    canon.validate_params(params)
    check_impl(impl)
    p = canon.cast(params, dtype)
    names = VARIABLE_NAMES[impl]
    out = {"params": {}, "batch_stats": {}}
    for layer in canon.CONV_LAYERS:
        out["params"][layer] = {"kernel": p[f"{layer}.weight"].transpose(2, 3, 1, 0),
                                "bias": p[f"{layer}.bias"]}
    for layer in canon.FC_LAYERS:
        w = p[f"{layer}.weight"]
        w = _fc1_chw_to_hwc(w) if layer == "fc1" else w
        out["params"][layer] = {"kernel": w.T, "bias": p[f"{layer}.bias"]}
    for layer in canon.BN_LAYERS:
        out["params"][layer] = {names[f]: p[f"{layer}.{f}"] for f in PARAM_FIELDS}
        out["batch_stats"][layer] = {names[f]: p[f"{layer}.{f}"] for f in STAT_FIELDS}
    return jax.tree_util.tree_map(np.ascontiguousarray, out)


def from_flax(variables, impl) -> dict:
    """Flax variables → canonical dict of NumPy arrays (inverse of `to_flax`)."""
    v = jax.tree_util.tree_map(np.asarray, variables)
    names = VARIABLE_NAMES[impl]
    out = {}
    for layer in canon.CONV_LAYERS:
        out[f"{layer}.weight"] = v["params"][layer]["kernel"].transpose(3, 2, 0, 1)
        out[f"{layer}.bias"] = v["params"][layer]["bias"]
    for layer in canon.FC_LAYERS:
        w = v["params"][layer]["kernel"].T
        out[f"{layer}.weight"] = _fc1_hwc_to_chw(w) if layer == "fc1" else w
        out[f"{layer}.bias"] = v["params"][layer]["bias"]
    for layer in canon.BN_LAYERS:
        for f in PARAM_FIELDS:
            out[f"{layer}.{f}"] = v["params"][layer][names[f]]
        for f in STAT_FIELDS:
            out[f"{layer}.{f}"] = v["batch_stats"][layer][names[f]]
    return {k: np.ascontiguousarray(out[k]) for k in canon.param_shapes()}


def nchw_to_nhwc(x):
    return np.moveaxis(np.asarray(x), 1, -1)


def build(impl, *, eps, decay, unbiased, precision=None, dtype=None) -> LeNetBN:
    """The LeNet-BN module for `impl` with canonical `decay`; `unbiased=None` is the impl's own
    (biased for both); `dtype`: what it computes in (None: its inputs')."""
    check_impl(impl)
    if unbiased and impl == "native":
        raise UnsupportedSetting(
            "flax.linen.BatchNorm keeps a biased running variance; unbiased=True is not "
            "expressible")
    return LeNetBN(impl=impl, decay=decay, eps=eps, unbiased=bool(unbiased), precision=precision,
                   dtype=dtype)


def make_train_step(model: LeNetBN, lr: float, loss_scale: float = 1.0):
    """A pure SGD step ((params, batch_stats, opt_state), x, y) → (state, loss, n_correct), to be
    wrapped in jax.jit or lax.scan. Running statistics come from the training-mode forward. The
    loss is computed from at least float32 logits; with `loss_scale` != 1 the gradient of the
    scaled loss is unscaled before the update, which `jax/precision.optimizer` skips when it is
    not finite."""
    tx = optimizer(lr, loss_scale)

    def loss_fn(params, batch_stats, x, y):
        logits, updated = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                      train=True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(float_logits(logits), y).mean()
        scaled = loss if loss_scale == 1.0 else loss * loss_scale
        return scaled, (loss, updated["batch_stats"], logits)

    def step(state, x, y):
        params, batch_stats, opt_state = state
        (_, (loss, batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, x, y)
        if loss_scale != 1.0:
            grads = jax.tree_util.tree_map(lambda g: g / loss_scale, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        correct = jnp.sum(jnp.argmax(logits, axis=-1) == y, dtype=jnp.int32)
        return (params, batch_stats, opt_state), loss, correct

    return tx, step


@functools.lru_cache(maxsize=32)
def _jitted_step(impl, eps, decay, unbiased, lr, compute=None, loss_scale=1.0):
    model = build(impl, eps=eps, decay=decay, unbiased=unbiased, precision="highest",
                  dtype=compute)
    tx, step = make_train_step(model, lr, loss_scale)
    return tx, jax.jit(step)


@functools.lru_cache(maxsize=8)
def _jitted_logits(impl, eps, compute=None):
    model = build(impl, eps=eps, decay=0.9, unbiased=False, precision="highest", dtype=compute)
    return jax.jit(functools.partial(model.apply, train=False))


def lenet_train(params, batches, *, lr, impl, eps=1e-5, decay=0.9, unbiased=None,
                dtype="float64", device="cpu", loss_scale=None) -> dict:
    """The contract's lenet_train: plain SGD from canonical `params` over NCHW `batches`, one
    jitted step per batch; losses are read back once, after the last step. float16/bfloat16:
    `jax/precision.py` (Flax dtype, float32 parameters, static loss scaling)."""
    check_impl(impl)
    mp = MixedPrecision(dtype, loss_scale)
    dt = mp.param_dtype
    dev, _ = select_device(device)
    tx, step = _jitted_step(impl, float(eps), float(decay), bool(unbiased), float(lr), *mp.key())
    variables = to_flax(params, impl, dt)
    with x64_mode(dt):
        variables = jax.device_put(variables, dev)
        state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
        losses = []
        for x, y in batches:
            xb = jax.device_put(nchw_to_nhwc(np.asarray(x, dtype=dt)), dev)
            yb = jax.device_put(np.asarray(y, dtype=np.int32), dev)
            state, loss, _ = step(state, xb, yb)
            losses.append(loss)
        losses = [float(v) for v in jax.device_get(losses)]
        out = from_flax({"params": state[0], "batch_stats": state[1]}, impl)
    return {"losses": losses, "params": {k: v.astype(dt) for k, v in out.items()},
            **mp.summary(state[2])}


def lenet_eval(params, x, *, impl, dtype="float64", device="cpu", eps=1e-5):
    """The contract's lenet_eval: logits (N×10, `dtype`) in inference mode (running statistics)."""
    check_impl(impl)
    mp = MixedPrecision(dtype)
    dt = mp.param_dtype
    dev, _ = select_device(device)
    variables = to_flax(params, impl, dt)
    with x64_mode(dt):
        logits = _jitted_logits(impl, float(eps), mp.compute)(
            jax.device_put(variables, dev),
            jax.device_put(nchw_to_nhwc(np.asarray(x, dtype=dt)), dev))
        return np.asarray(logits, dtype=mp.dt)
