"""Synchronized batch norm in MXNet 1.9.1 on CPU: one process, W contexts `mx.cpu(0..W-1)`, the
`kvstore('local')` all-reduce between them (MXNet's single-machine data-parallel engine). The
from-scratch count-weighted layer, the contrib `SyncBatchNorm` adapter, `sync_bn_step` and
data-parallel `sync_lenet_train`.

From scratch (`SyncBatchNormFunction`, one autograd node over all contexts): every context puts
its per-channel (count, mean, M2) in its own row of a zero W×3×C array; a kvstore all-reduce
(sum) of those arrays is an exact all-gather; each context merges the rows with Chan's formula
(`common.sync.merge_moments`). Backward: one all-reduce of Σdy and Σdy·x̂, the global count.

What this build cannot do, measured (MXNet 1.9.1 pip, CPU):
- A zero-size NDArray: in MXNet's legacy shape semantics a 0 dimension means "unknown", so
  `nd.zeros((0, 3))` fails shape inference. A worker with an empty shard therefore holds no
  data: it only adds its zero rows to the all-reduces.
- contrib `SyncBatchNorm` in float64: the operator's shared buffers are float32; a float64 run
  fails its type check or aborts the process with heap corruption ("malloc_consolidate():
  unaligned fastbin chunk detected"), so it is refused before it runs. In float32 it runs over
  CPU contexts, averaging per-device moments unweighted.
- `kvstore('dist_sync')` (compiled in: DIST_KVSTORE) needs a ps-lite scheduler and server
  processes; it is not used here.

Everything runs in a child process (`SyncGroup`), so a hang of the contrib layer's barrier
(apache/mxnet#12216) or a crash ends in a WorkerError after a timeout, not in a hung caller.
"""
from __future__ import annotations

import os
import time

import numpy as np

import mxnet as mx
from mxnet import autograd, gluon

from backends import UnsupportedSetting
from backends.pool import EngineGroup, WorkerPool, check_world_size, group_for
from common import spec
from common.reference import float_dtype, reduce_axes
from common.sync import at_least_one, merge_moments, training_job, validate_shards

from .bn import batch_norm
from .lenet import LeNet, build, load_params, to_canonical

SYNC_IMPLS = ("scratch", "native")


def _bcast(v, ndim):
    return v.reshape((1, -1) + (1,) * (ndim - 2))


class Contexts:
    """The engine of one process: W CPU contexts and a local kvstore over them.

    Each all-reduce waits for its result, as a blocking collective does: MXNet 1.9.1's CPU
    engine deadlocked (measured: a data-parallel LeNet step hung every time) when operations
    reading a pushpull's outputs were queued before the pushpull had finished. The process
    also hung in MXNet's exit handler after such runs, so `close` ends it with os._exit."""

    def __init__(self, world_size):
        self.ctxs = [mx.cpu(i) for i in range(world_size)]
        self.kv = mx.kv.create("local")
        self._keys = set()

    def allreduce(self, name, arrays):
        """Sum `arrays` (one per context, same shape and dtype) in place through the kvstore.
        A key serves one shape, dtype and number of contexts (reusing a key with another
        number of contexts crashed the process: measured, a segmentation fault)."""
        key = f"{name}:{arrays[0].shape}:{arrays[0].dtype.__name__}:{len(arrays)}"
        if key not in self._keys:
            self.kv.init(key, mx.nd.zeros(arrays[0].shape, dtype=arrays[0].dtype))
            self._keys.add(key)
        self.kv.pushpull(key, arrays, out=arrays)
        for a in arrays:  # see the class docstring
            a.wait_to_read()
        return arrays

    def close(self):
        """The worker process's last act (backends.pool calls it): finish the queued work and
        end the process without MXNet's exit handler (see the class docstring)."""
        mx.nd.waitall()
        os._exit(0)


class SyncBatchNormFunction(autograd.Function):
    """Training-mode batch norm over the union of the shards on the first `world` contexts of
    `engine`. Called with (x for each rank in `ranks`, then their gammas, then their betas),
    each on its rank's context; returns one y per rank. The other ranks hold no data but take
    part in the all-reduces. After the call, `stats` = (mean, biased var, count) as NumPy."""

    def __init__(self, engine, world, ranks, eps, name):
        super().__init__()
        self.engine, self.world, self.ranks, self.eps, self.name = (
            engine, world, list(ranks), eps, name)

    def _slots(self, shape, dtype):
        return [mx.nd.zeros(shape, ctx=c, dtype=dtype) for c in self.engine.ctxs[:self.world]]

    def forward(self, *args):
        k = len(self.ranks)
        xs, gammas, betas = args[:k], args[k:2 * k], args[2 * k:]
        ndim, c, dtype = xs[0].ndim, xs[0].shape[1], xs[0].dtype
        axes = reduce_axes(ndim)
        world = self.world
        slots = self._slots((world, 3, c), dtype)
        for rank, x in zip(self.ranks, xs):
            mean = mx.nd.mean(x, axis=axes)
            m2 = mx.nd.sum(mx.nd.square(x - _bcast(mean, ndim)), axis=axes)
            count = mx.nd.full((c,), x.size // c, ctx=x.context, dtype=dtype)
            slots[rank][rank] = mx.nd.stack(count, mean, m2)
        self.engine.allreduce(f"{self.name}/moments", slots)
        ys, self.saved = [], []
        for rank, x, gamma, beta in zip(self.ranks, xs, gammas, betas):
            every = slots[rank]
            n, mean, m2 = merge_moments([(every[i][0], every[i][1], every[i][2])
                                         for i in range(world)])
            var = m2 / at_least_one(n)
            inv_std = mx.nd.rsqrt(var + self.eps)
            xhat = (x - _bcast(mean, ndim)) * _bcast(inv_std, ndim)
            ys.append(xhat * _bcast(gamma, ndim) + _bcast(beta, ndim))
            self.saved.append((xhat, inv_std, gamma, n))
        self.stats = (mean.asnumpy(), var.asnumpy(), float(n.asnumpy()[0]))
        return tuple(ys) if len(ys) > 1 else ys[0]

    def backward(self, *dys):
        ndim, c = dys[0].ndim, dys[0].shape[1]
        axes = reduce_axes(ndim)
        slots = self._slots((2, c), dys[0].dtype)
        local = []
        for rank, dy, (xhat, _, _, _) in zip(self.ranks, dys, self.saved):
            dbeta, dgamma = mx.nd.sum(dy, axis=axes), mx.nd.sum(dy * xhat, axis=axes)
            slots[rank][:] = mx.nd.stack(dbeta, dgamma)
            local.append((dgamma, dbeta))
        self.engine.allreduce(f"{self.name}/grads", slots)
        dxs = []
        for rank, dy, (xhat, inv_std, gamma, n) in zip(self.ranks, dys, self.saved):
            total = slots[rank]
            scale = _bcast(gamma * inv_std / n, ndim)
            dxs.append(scale * (dy * _bcast(n, ndim) - _bcast(total[0], ndim)
                                - xhat * _bcast(total[1], ndim)))
        return tuple(dxs) + tuple(g for g, _ in local) + tuple(b for _, b in local)


def check_sync_impl(impl):
    if impl not in SYNC_IMPLS:
        raise ValueError(f"unknown mxnet sync impl {impl!r}; choose from {', '.join(SYNC_IMPLS)}")


# --- inside the worker process -------------------------------------------------------------------

def _init_child(rank, size, world_size):
    return Contexts(world_size)


def _info_job(engine):
    return [str(c) for c in engine.ctxs]


def _nd(engine, a, rank, dtype, grad=False):
    arr = mx.nd.array(a, ctx=engine.ctxs[rank], dtype=dtype)
    if grad:
        arr.attach_grad()
    return arr


def _native_layer(engine, ranks, opts, c, dtype):
    """contrib SyncBatchNorm over the data ranks' contexts (float32 only, see the module doc);
    its momentum weighs the old value, as Gluon's BatchNorm."""
    layer = gluon.contrib.nn.SyncBatchNorm(in_channels=c, num_devices=len(ranks),
                                           momentum=opts["decay"], epsilon=opts["eps"])
    layer.initialize(ctx=[engine.ctxs[r] for r in ranks])
    layer.cast(dtype)
    for name in ("gamma", "beta", "running_mean", "running_var"):
        getattr(layer, name).set_data(mx.nd.array(opts[name], dtype=dtype))
    return layer


def step_job(engine, xs, dys, opts):
    """A sync step on the first len(xs) contexts (NumPy in and out)."""
    dtype = xs[0].dtype
    world = len(xs)
    ranks = [r for r, x in enumerate(xs) if len(x)]
    X = [_nd(engine, xs[r], r, dtype, grad=True) for r in ranks]
    c = xs[0].shape[1]
    gammas = [_nd(engine, opts["gamma"], r, dtype, grad=True) for r in ranks]
    betas = [_nd(engine, opts["beta"], r, dtype, grad=True) for r in ranks]
    rm, rv = opts["running_mean"], opts["running_var"]
    layer = _native_layer(engine, ranks, opts, c, dtype) if opts["impl"] == "native" else None
    with autograd.record(train_mode=opts["training"]):
        if layer is not None:
            ys = [layer(x) for x in X]
        elif opts["training"]:
            fn = SyncBatchNormFunction(engine, world, ranks, opts["eps"], "bn_step")
            ys = fn(*X, *gammas, *betas)
            ys = list(ys) if isinstance(ys, (list, tuple)) else [ys]
        else:
            ys = [batch_norm(x, g, b, _nd(engine, rm, r, dtype), _nd(engine, rv, r, dtype),
                             opts["eps"], 0.0, training=False)[0]
                  for r, x, g, b in zip(ranks, X, gammas, betas)]
    autograd.backward(ys, [_nd(engine, dys[r], r, dtype) for r in ranks],
                      train_mode=opts["training"])
    if layer is not None:
        grads = [(layer.gamma.grad(engine.ctxs[r]), layer.beta.grad(engine.ctxs[r]))
                 for r in ranks]
        mean, var = (getattr(layer, f).data(engine.ctxs[ranks[0]]).asnumpy()
                     for f in ("running_mean", "running_var"))
    else:
        grads = [(g.grad, b.grad) for g, b in zip(gammas, betas)]
        mean, var = rm, rv
        if opts["training"]:
            batch_mean, batch_var, n = fn.stats
            stat = batch_var * n / (n - 1) if opts["unbiased"] else batch_var
            mean = spec.running_update(rm, batch_mean, opts["decay"])
            var = spec.running_update(rv, stat, opts["decay"])
    slots = [mx.nd.zeros((2, c), ctx=engine.ctxs[r], dtype=dtype) for r in range(world)]
    for r, (g, b) in zip(ranks, grads):
        slots[r][:] = mx.nd.stack(g, b)
    total = engine.allreduce("bn_step/dgamma_dbeta", slots)[0].asnumpy()
    y, dx = iter(ys), iter(X)
    empty = np.zeros((0, c) + xs[0].shape[2:], dtype)
    return {"y": [next(y).asnumpy() if len(x) else empty for x in xs],
            "dx": [next(dx).grad.asnumpy() if len(x) else empty for x in xs],
            "dgamma": total[0], "dbeta": total[1],
            "running_mean": np.asarray(mean, dtype), "running_var": np.asarray(var, dtype)}


def _sync_bn(engine, world, bn, zs, unbiased):
    """One from-scratch BatchNorm layer of LeNet applied to {rank: activations} across the
    first `world` contexts; writes the new running statistics into every context's replica."""
    ranks = sorted(zs)
    fn = SyncBatchNormFunction(engine, world, ranks, bn.eps, bn.name)
    ys = fn(*[zs[r] for r in ranks], *[bn.gamma.data(engine.ctxs[r]) for r in ranks],
            *[bn.beta.data(engine.ctxs[r]) for r in ranks])
    ys = ys if isinstance(ys, (list, tuple)) else [ys]
    mean, var, n = fn.stats
    stat = var * n / (n - 1) if unbiased else var
    m = bn.momentum  # the MXNet source's: weighs the NEW batch statistic
    with autograd.pause():
        for param, batch in ((bn.running_mean, mean), (bn.running_var, stat)):
            new = (1.0 - m) * param.data(engine.ctxs[0]).asnumpy() + m * batch
            param.set_data(mx.nd.array(new, dtype=param.dtype))
    return dict(zip(ranks, ys))


def _local_bn(engine, world, bn, zs, unbiased):
    """Each context normalises with its own shard's statistics (its own running statistics)."""
    out = {}
    for r, z in zs.items():
        c = engine.ctxs[r]
        rm, rv = bn.running_mean.data(c), bn.running_var.data(c)
        y, new_mean, new_var = batch_norm(z, bn.gamma.data(c), bn.beta.data(c), rm, rv, bn.eps,
                                          bn.momentum, training=True, unbiased=unbiased)
        with autograd.pause():
            rm[:], rv[:] = new_mean, new_var
        out[r] = y
    return out


def train_job(engine, world_size, params, per_step, opts):
    """Data-parallel LeNet-BN on the first `world_size` contexts: LeNet's stages walked shard by
    shard, batch norm across contexts (or per context), loss Σ cross-entropy / batch size,
    gradients all-reduced through the kvstore, plain SGD on every replica."""
    dtype = opts["dtype"]
    ctxs = engine.ctxs[:world_size]
    net = build("scratch", eps=opts["eps"], decay=opts["decay"], unbiased=opts["unbiased"])
    load_params(net, params, dtype, ctxs)
    trainable = [p for p in net.collect_params().values() if p.grad_req != "null"]
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    norm = _sync_bn if opts["sync"] else _local_bn
    losses = []
    mx.nd.waitall()
    start = time.perf_counter()
    for shards in per_step:
        total = sum(len(x) for x, _ in shards)
        data = {r: (_nd(engine, x, r, dtype), _nd(engine, y, r, dtype))
                for r, (x, y) in enumerate(shards) if len(x)}
        with autograd.record():
            hs = {r: x for r, (x, _) in data.items()}
            for layer, bn, pool in net.stages():
                zs = norm(engine, world_size, bn, {r: layer(h) for r, h in hs.items()},
                          opts["unbiased"])
                hs = {r: LeNet.activate(mx.nd, z, pool) for r, z in zs.items()}
            parts = [loss_fn(net.fc3(hs[r]), data[r][1]).sum() / total for r in sorted(data)]
        autograd.backward(parts)
        for i, p in enumerate(trainable):
            grads = [p.grad(c) for c in ctxs]
            for r in range(world_size):
                if r not in data:
                    grads[r][:] = 0
            engine.allreduce(f"grad{i}", grads)
            for c, g in zip(ctxs, grads):
                p.data(c)[:] -= opts["lr"] * g
        losses.append(sum(float(v.asscalar()) for v in parts))
    mx.nd.waitall()
    seconds = time.perf_counter() - start
    return {"losses": losses, "params": to_canonical(net), "seconds": seconds}


# --- in the calling process --------------------------------------------------------------------

class SyncGroup(EngineGroup):
    """One child process holding `world_size` CPU contexts and a local kvstore, reused across
    calls; serves any world size up to `world_size`. A job that takes longer than `timeout` s,
    raises or crashes kills the child (WorkerError)."""

    def __init__(self, world_size, *, timeout=600.0):
        world_size = check_world_size(world_size)
        pool = WorkerPool(1, "backends.mxnet.sync:_init_child", (world_size,), timeout=timeout,
                          name="mxnet worker")
        super().__init__(world_size, pool, "mxnet kvstore('local') over CPU contexts",
                         pool.run(_info_job, [()])[0])


def sync_bn_step(xs, gamma, beta, running_mean, running_var, dys, *, training, eps=1e-5,
                 decay=0.9, unbiased=False, impl="scratch", group=None) -> dict:
    """One synchronized step on len(xs) CPU contexts (contract in backends/__init__.py)."""
    check_sync_impl(impl)
    _, _, sizes = validate_shards(xs, gamma, beta, running_mean, running_var, dys,
                                  training=training, eps=eps, decay=decay)
    dt = float_dtype(np.asarray(xs[0]))
    if impl == "native":
        if dt == np.float64:
            raise UnsupportedSetting(
                "MXNet 1.9.1's contrib SyncBatchNorm keeps float32 buffers: float64 fails its "
                "type check or aborts the process with heap corruption (measured on CPU)")
        if unbiased and training:
            raise UnsupportedSetting("MXNet's contrib SyncBatchNorm updates running_var with the "
                                     "biased (÷N) variance; unbiased=True cannot be expressed")
        if 0 in sizes:
            raise UnsupportedSetting(
                "MXNet 1.9.1 cannot hold an empty shard (a 0 dimension means 'unknown' in its "
                "legacy shapes), and contrib SyncBatchNorm has no way to count a device that "
                "holds no data")
    opts = dict(training=training, eps=float(eps), decay=float(decay),
                unbiased=bool(unbiased and training), impl=impl,
                **{k: np.asarray(v, dt) for k, v in dict(
                    gamma=gamma, beta=beta, running_mean=running_mean,
                    running_var=running_var).items()})
    with group_for(group, len(sizes), SyncGroup) as g:
        return g.run(step_job, [([np.asarray(x, dt) for x in xs],
                                 [np.asarray(d, dt) for d in dys], opts)])[0]


def sync_lenet_train(params, batches, *, world_size, shard_sizes=None, sync=True, lr, eps=1e-5,
                     decay=0.9, unbiased=None, dtype="float64", group=None) -> dict:
    """Data-parallel LeNet-BN (from-scratch batch norm) on `world_size` CPU contexts: every
    batch split by `shard_sizes` (default: as equal as possible), gradients summed through the
    kvstore so that the update is full-batch SGD on the mean loss. `sync=False`: each context
    normalises with its own shard's statistics (running statistics are then context 0's).
    Returns {"losses", "params", "seconds"} (seconds: the training loop, communication
    included)."""
    params, per_step, opts = training_job(
        params, batches, world_size=world_size, shard_sizes=shard_sizes, sync=sync, lr=lr,
        eps=eps, decay=decay, unbiased=unbiased, dtype=dtype)
    with group_for(group, world_size, SyncGroup) as g:
        return g.run(train_job, [(world_size, params, per_step, opts)])[0]
