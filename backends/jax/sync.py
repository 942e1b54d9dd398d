"""Synchronized batch norm in JAX: `jax.shard_map` over one mesh axis of W devices, with
`lax.all_gather` / `lax.psum`; the from-scratch count-weighted layer, Flax's
`BatchNorm(axis_name=...)`, `sync_bn_step` and data-parallel `sync_lenet_train`.

Unequal shards are padded to the longest and carry a mask: each device computes the masked
per-channel (count, mean, M2), all-gathers them and merges them with Chan's formula
(`common.sync.merge_moments`), so padding, unequal and empty shards give the full-batch
statistics. The backward is written out (`jax.custom_vjp`): one psum of Σdy and Σdy·x̂ and the
global count. Flax's layer, given the same mask, averages per-device masked moments
UNWEIGHTED (`lax.pmean`): exact for equal shards only (google/flax#2417), NaN for an empty one.

Devices: a CPU has one JAX device unless XLA_FLAGS holds
--xla_force_host_platform_device_count=N before JAX initialises, which a process that has
already used JAX cannot change. So the multi-device work runs where the devices are: in this
process if it already sees W devices (several GPUs, or the flag set at start), otherwise in one
child process started with the flag (`SyncGroup`), reused across calls. Setting the flag in
`backends/jax/__init__.py` instead would not work whenever anything imported JAX first (pytest,
a notebook), and would change every JAX user's device list.
"""
from __future__ import annotations

import contextlib
import functools
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from backends import UnsupportedSetting
from backends.pool import EngineGroup, WorkerPool, check_world_size, group_for
from common import spec
from common.reference import float_dtype
from common.sync import at_least_one, merge_moments, training_job, validate_shards

from .bn import (CONVENTION, BatchNorm, _to_first, _to_last, batch_norm, layer_step, own_layer,
                 to_variables, x64_mode)
from common import convert

from .lenet import LeNetBN, nchw_to_nhwc, variables_of

SYNC_IMPLS = ("scratch", "native")
AXIS = "workers"


def _stats_local(x, w):
    axes = tuple(range(x.ndim - 1))
    n = w.sum(axes)
    mean = (w * x).sum(axes) / at_least_one(n)
    return n, mean, (w * jnp.square(x - mean)).sum(axes)


def _forward(x, w, gamma, beta, eps, axis_name):
    n, mean, m2 = _stats_local(x, w)
    if axis_name is not None:
        every = lax.all_gather(jnp.stack([n, mean, m2]), axis_name)  # (W, 3, C)
        n, mean, m2 = merge_moments([tuple(every[i]) for i in range(every.shape[0])])
    var = m2 / at_least_one(n)
    inv_std = lax.rsqrt(var + eps)
    xhat = (x - mean) * inv_std
    return (gamma * xhat + beta, mean, var, n), (xhat, inv_std, gamma, w, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def sync_batch_norm(x, w, gamma, beta, eps, axis_name):
    """Training-mode batch norm of channels-last `x` over every device on `axis_name` (None:
    this device alone), counting only the values where the weights `w` (0/1, x's shape) are 1.
    Returns (y, mean, biased var, count), the last three per channel and the same on every
    device."""
    return _forward(x, w, gamma, beta, eps, axis_name)[0]


def _fwd(x, w, gamma, beta, eps, axis_name):
    return _forward(x, w, gamma, beta, eps, axis_name)


def _bwd(eps, axis_name, res, cotangents):
    xhat, inv_std, gamma, w, n = res
    dy = cotangents[0] * w
    axes = tuple(range(dy.ndim - 1))
    dbeta, dgamma = dy.sum(axes), (dy * xhat).sum(axes)  # local: the caller sums them
    totals = jnp.stack([dbeta, dgamma])
    if axis_name is not None:
        totals = lax.psum(totals, axis_name)
    n = at_least_one(n)
    dx = w * (gamma * inv_std / n) * (n * dy - totals[0] - xhat * totals[1])
    return dx, jnp.zeros_like(w), dgamma, dbeta


sync_batch_norm.defvjp(_fwd, _bwd)


class SyncBatchNorm(BatchNorm):
    """The from-scratch `BatchNorm` (same fields and variables: params gamma/beta, batch_stats
    moving_mean/moving_var; momentum weighs the OLD value) with statistics over every device
    on `axis_name` (None: this device's) and an optional `mask` of the values that count. A
    training step whose statistics cover no value leaves the running statistics alone."""

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        use_running_average, gamma, beta, moving_mean, moving_var = self.state(
            x, use_running_average)
        if use_running_average:
            return batch_norm(x, gamma, beta, moving_mean.value, moving_var.value, self.epsilon,
                              self.momentum, training=False)[0]
        w = jnp.ones_like(x) if mask is None else jnp.broadcast_to(mask, x.shape).astype(x.dtype)
        y, mean, var, n = sync_batch_norm(x, w, gamma, beta, self.epsilon, self.axis_name)
        if not self.is_initializing():
            stat = var * (n / jnp.maximum(n - 1, 1)) if self.unbiased else var
            keep = n == 0
            m = self.momentum
            moving_mean.value = jnp.where(keep, moving_mean.value,
                                          m * moving_mean.value + (1 - m) * mean)
            moving_var.value = jnp.where(keep, moving_var.value,
                                         m * moving_var.value + (1 - m) * stat)
        return y


def check_sync_impl(impl):
    if impl not in SYNC_IMPLS:
        raise ValueError(f"unknown jax sync impl {impl!r}; choose from {', '.join(SYNC_IMPLS)}")


def make_sync_layer(impl, *, decay, eps, unbiased, axis_name=AXIS):
    """The sync layer of `impl` for canonical `decay`; native is flax.linen.BatchNorm with
    `axis_name` and the two-pass variance of this backend's adapter."""
    check_sync_impl(impl)
    if impl == "native":
        return own_layer("native", momentum=spec.momentum_from_decay(decay, CONVENTION[impl]),
                         eps=eps, unbiased=bool(unbiased), fast_variance=False, axis_name=axis_name)
    momentum = spec.momentum_from_decay(decay, CONVENTION[impl])
    return SyncBatchNorm(axis_name=axis_name, momentum=momentum, epsilon=eps,
                         unbiased=bool(unbiased))


def _pad(shards, rows, dtype):
    """Shards stacked as (W, rows, ...) with zero padding, and the (W, rows) 0/1 mask."""
    out = np.zeros((len(shards), rows) + shards[0].shape[1:], dtype)
    mask = np.zeros((len(shards), rows), dtype)
    for i, s in enumerate(shards):
        out[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return out, mask


@functools.lru_cache(maxsize=64)
def _compiled_step(devices, impl, training, eps, decay, unbiased, masked):
    layer = make_sync_layer(impl, decay=decay, eps=eps, unbiased=unbiased)

    def device_step(x, w, dy, gamma, beta, rm, rv):
        x, w, dy = x[0], w[0], dy[0]
        variables = to_variables(impl, gamma, beta, rm, rv)
        kwargs = {"mask": w.reshape((-1,) + (1,) * (x.ndim - 1)) > 0} if masked else {}
        y, dx, dgamma, dbeta, stats = layer_step(layer, impl, x, variables, dy,
                                                 training=training, **kwargs)
        dgamma, dbeta = lax.psum((dgamma, dbeta), AXIS)
        return y[None], dx[None], dgamma, dbeta, stats["running_mean"], stats["running_var"]

    mesh = Mesh(np.array(devices), (AXIS,))
    sharded = P(AXIS)
    return jax.jit(jax.shard_map(device_step, mesh=mesh, in_specs=(sharded,) * 3 + (P(),) * 4,
                                 out_specs=(sharded, sharded) + (P(),) * 4, check_vma=False))


def step_on_devices(devices, xs, gamma, beta, running_mean, running_var, dys, *, training, eps,
                    decay, unbiased, impl) -> dict:
    """`sync_bn_step` on these JAX devices (one per shard), in this process."""
    dt = float_dtype(np.asarray(xs[0]))
    sizes = [len(x) for x in xs]
    rows = max(sizes)
    x, w = _pad([_to_last(np.asarray(a, dt)) for a in xs], rows, dt)
    dy, _ = _pad([_to_last(np.asarray(a, dt)) for a in dys], rows, dt)
    fn = _compiled_step(tuple(devices), impl, bool(training), float(eps), float(decay),
                        bool(unbiased), min(sizes) != rows)
    with x64_mode(dt):
        out = fn(x, w, dy, *(np.asarray(a, dt) for a in (gamma, beta, running_mean, running_var)))
        y, dx, dgamma, dbeta, rm, rv = (np.asarray(a) for a in out)
    return {"y": [_to_first(y[i, :n]).astype(dt) for i, n in enumerate(sizes)],
            "dx": [_to_first(dx[i, :n]).astype(dt) for i, n in enumerate(sizes)],
            "dgamma": dgamma.astype(dt), "dbeta": dbeta.astype(dt),
            "running_mean": rm.astype(dt), "running_var": rv.astype(dt)}


# --- data-parallel LeNet-BN ----------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _compiled_train_step(devices, sync, eps, decay, unbiased, lr):
    model = LeNetBN(impl="scratch", decay=decay,
                    eps=eps, unbiased=unbiased, precision="highest",
                    bn_module=functools.partial(SyncBatchNorm, axis_name=AXIS if sync else None))

    def device_step(params, stats, x, y, w):
        stats = jax.tree_util.tree_map(lambda a: a[0], stats)
        x, y, w = x[0], y[0], w[0]
        total = lax.psum(w.sum(), AXIS)

        def loss_fn(p):
            logits, updated = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                          mask=w, mutable=["batch_stats"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            return (ce * w).sum() / total, updated["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grads, loss = lax.psum((grads, loss), AXIS)
        params = jax.tree_util.tree_map(lambda a, g: a - lr * g, params, grads)
        return params, jax.tree_util.tree_map(lambda a: a[None], stats), loss

    mesh = Mesh(np.array(devices), (AXIS,))
    sharded = P(AXIS)
    step = jax.jit(jax.shard_map(device_step, mesh=mesh,
                                 in_specs=(P(), sharded, sharded, sharded, sharded),
                                 out_specs=(P(), sharded, P()), check_vma=False))
    return step, NamedSharding(mesh, P()), NamedSharding(mesh, sharded)


def train_on_devices(devices, params, per_step, *, sync, lr, eps, decay, unbiased, dtype):
    """`sync_lenet_train` on these devices, in this process; `per_step` is, per batch, the list
    of (x NCHW, y) shards, one per device."""
    dt = float_dtype(dtype)
    step, replicated, sharded = _compiled_train_step(tuple(devices), bool(sync), float(eps),
                                                     float(decay), bool(unbiased), float(lr))
    variables = variables_of(params, "scratch", dt)
    w_count = len(devices)
    stacked = jax.tree_util.tree_map(lambda a: np.stack([a] * w_count), variables["batch_stats"])
    inputs = []
    for shards in per_step:
        rows = max(len(x) for x, _ in shards)
        x, w = _pad([nchw_to_nhwc(np.asarray(x, dt)) for x, _ in shards], rows, dt)
        y, _ = _pad([np.asarray(y, np.int32) for _, y in shards], rows, np.int32)
        inputs.append((x, y, w))
    with x64_mode(dt):
        # placed as the step's outputs are, so that its first call compiles the only variant
        state = (jax.device_put(variables["params"], replicated),
                 jax.device_put(stacked, sharded))
        shapes = {}
        for x, y, w in inputs:  # compile every shape outside the timed loop
            shapes.setdefault(x.shape, (x, y, w))
        for args in shapes.values():
            jax.block_until_ready(step(*state, *args))
        losses = []
        start = time.perf_counter()
        for x, y, w in inputs:
            p, s, loss = step(*state, x, y, w)
            state = (p, s)
            losses.append(loss)
        losses = [float(v) for v in jax.device_get(losses)]
        seconds = time.perf_counter() - start
        rank0 = jax.tree_util.tree_map(lambda a: np.asarray(a)[0], state[1])
        out = convert.from_flax(jax.device_get({"params": state[0], "batch_stats": rank0}))
    return {"losses": losses, "params": {k: v.astype(dt) for k, v in out.items()},
            "seconds": seconds}


# --- where the devices are ---------------------------------------------------------------------

def devices_for(world_size):
    """`world_size` devices of this process: the default backend's if it has enough, else the
    CPU's; None if neither has."""
    for devices in (jax.devices(), jax.devices("cpu")):
        if len(devices) >= world_size:
            return devices[:world_size]
    return None


class _Devices:
    """A job's state: the devices it may use."""

    def __init__(self, devices):
        self.devices = devices


def _init_child(rank, size, world_size):
    devices = devices_for(world_size)
    if devices is None:
        raise RuntimeError(f"the child sees {len(jax.devices('cpu'))} CPU device(s), not "
                           f"{world_size}: was XLA_FLAGS overridden?")
    return _Devices(devices)


def _info_job(child):
    return [str(d) for d in child.devices]


def _step_job(child, xs, gamma, beta, running_mean, running_var, dys, opts):
    return step_on_devices(child.devices[:len(xs)], xs, gamma, beta, running_mean, running_var,
                           dys, **opts)


def _train_job(child, world_size, params, per_step, opts):
    return train_on_devices(child.devices[:world_size], params, per_step, **opts)


class SyncGroup(EngineGroup):
    """One child process whose JAX sees `world_size` devices (on a CPU: virtual devices from
    --xla_force_host_platform_device_count), reused across calls; serves any world size up to
    `world_size`. A job that takes longer than `timeout` s, raises or crashes kills the child
    (WorkerError)."""

    def __init__(self, world_size, *, timeout=600.0):
        world_size = check_world_size(world_size)
        flags = os.environ.get("XLA_FLAGS", "")
        env = {"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={world_size}".strip(),
               # the parent may hold a GPU already: take memory as needed, not 75% up front
               "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
        pool = WorkerPool(1, "backends.jax.sync:_init_child", (world_size,), env=env,
                          timeout=timeout, name="jax worker")
        super().__init__(world_size, pool, "jax.shard_map (lax.all_gather/psum)",
                         pool.run(_info_job, [()])[0])


@contextlib.contextmanager
def _runner(group, world_size):
    """fn(job, *args) running `job` on `world_size` devices: in this process if it has them and
    no `group` is given, else on `group` or a SyncGroup started for the call."""
    here = devices_for(world_size) if group is None else None
    if here is not None:
        yield lambda job, *args: job(_Devices(here), *args)
        return
    with group_for(group, world_size, SyncGroup) as g:
        yield lambda job, *args: g.run(job, [args])[0]


def sync_bn_step(xs, gamma, beta, running_mean, running_var, dys, *, training, eps=1e-5,
                 decay=0.9, unbiased=False, impl="scratch", group=None) -> dict:
    """One synchronized step on len(xs) devices (contract in backends/__init__.py)."""
    check_sync_impl(impl)
    _, _, sizes = validate_shards(xs, gamma, beta, running_mean, running_var, dys,
                                  training=training, eps=eps, decay=decay)
    if impl == "native" and unbiased and training:
        raise UnsupportedSetting("flax.linen.BatchNorm keeps a biased (÷m) running variance and "
                                 "has no option for the unbiased ÷(m-1) estimator")
    dt = float_dtype(np.asarray(xs[0]))
    xs, dys = [np.asarray(x, dt) for x in xs], [np.asarray(d, dt) for d in dys]
    opts = dict(training=training, eps=eps, decay=decay, unbiased=bool(unbiased and training),
                impl=impl)
    with _runner(group, len(sizes)) as run:
        return run(_step_job, xs, gamma, beta, running_mean, running_var, dys, opts)


def sync_lenet_train(params, batches, *, world_size, shard_sizes=None, sync=True, lr, eps=1e-5,
                     decay=0.9, unbiased=None, dtype="float64", group=None) -> dict:
    """Data-parallel LeNet-BN (from-scratch batch norm) on `world_size` devices: every batch
    split by `shard_sizes` (default: as equal as possible) and padded, gradients psum'd so that
    the update is full-batch SGD on the mean loss. `sync=True`: batch norm over the whole batch;
    False: each device normalises with its own shard's statistics (running statistics are then
    device 0's). Returns {"losses", "params", "seconds"} (seconds: the jitted steps after
    compilation, communication included)."""
    params, per_step, opts = training_job(
        params, batches, world_size=world_size, shard_sizes=shard_sizes, sync=sync, lr=lr,
        eps=eps, decay=decay, unbiased=unbiased, dtype=dtype)
    with _runner(group, world_size) as run:
        return run(_train_job, world_size, params, per_step, opts)
