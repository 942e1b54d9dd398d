"""Synchronized batch norm on `torch.distributed`: the from-scratch count-weighted layer, the
native `nn.SyncBatchNorm` adapter, `sync_bn_step` and data-parallel `sync_lenet_train`, run by a
`SyncGroup` of worker processes (gloo on CPU over loopback, nccl when there is a CUDA GPU per
worker).

From scratch: each worker all-gathers its per-channel (count, mean, M2) and merges them with
Chan's formula (`common.sync.merge_moments`), so unequal and empty shards give exactly the
full-batch statistics; backward all-reduces Σdy and Σdy·x̂ once and uses the global count;
running statistics use the global count (÷N, or ÷(N−1) if unbiased). gamma/beta gradients are
left LOCAL, as for any parameter under data parallelism: the caller all-reduces them (returning
the totals here too would count them twice, the nnabla PR 1120 bug).

`python -m backends.torch.sync` runs one checked step under `torchrun`, on one machine or many
(see `main`).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from backends import DeviceUnavailable, UnsupportedSetting
from backends.pool import EngineGroup, WorkerPool, check_world_size, group_for
from common import lenet as canon
from common import spec
from common.reference import float_dtype, random_case
from common.sync import (SHARDED_KEYS, TOLERANCE, errors, merge_moments, reference_step, split,
                         training_job, validate_shards)

from .bn import BatchNorm, _channel_sum, _layout, gamma_beta, make_layer
from .lenet import build_lenet, get_params, torch_dtype

SYNC_IMPLS = ("scratch", "native")
HOST = "127.0.0.1"
BN_NAMES = tuple(canon.BN_LAYERS)
NATIVE_BIASED = ("torch nn.SyncBatchNorm always updates running_var with the unbiased (÷(N-1)) "
                 "variance of the global batch; use unbiased=True (or impl='scratch')")


def _sums(t, dims):
    """Per-channel sums; `_channel_sum`'s fast CPU path cannot view an empty batch."""
    return _channel_sum(t, dims) if t.numel() else t.sum(dim=dims)


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm over the union of the workers' shards in `group` (None: this
    shard alone). forward(x, gamma, beta, eps, group) -> (y, mean, biased var, count), the last
    three identical on every worker and not differentiable."""

    @staticmethod
    def forward(ctx, x, gamma, beta, eps, group):
        dims, shape = _layout(x.dim())
        c = x.shape[1]
        n = x.numel() // c
        mean = _sums(x, dims) / max(n, 1)
        xc = x - mean.view(shape)
        moments = [(float(n), mean, _sums(xc * xc, dims))]
        if group is not None:
            mine = torch.cat([x.new_tensor([float(n)]), moments[0][1], moments[0][2]])
            every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
            dist.all_gather(every, mine, group=group)
            moments = [(float(t[0]), t[1:c + 1], t[c + 1:]) for t in every]
        count, mean, m2 = merge_moments(moments)
        var = m2 / max(count, 1.0)
        inv_std = torch.rsqrt(var + eps)
        xc = x - mean.view(shape)
        scale = gamma * inv_std
        y = xc * scale.view(shape) + beta.view(shape)
        ctx.save_for_backward(xc, inv_std, scale)
        ctx.count, ctx.group = count, group
        count_t = x.new_tensor(count)
        ctx.mark_non_differentiable(mean, var, count_t)
        return y, mean, var, count_t

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dmean, _dvar, _dcount):
        xc, inv_std, scale = ctx.saved_tensors
        dims, shape = _layout(xc.dim())
        c = xc.shape[1]
        dbeta = _sums(dy, dims)
        dgamma = _sums(dy * xc, dims) * inv_std  # local Σdy·x̂
        totals = torch.cat([dbeta, dgamma])
        if ctx.group is not None:
            dist.all_reduce(totals, group=ctx.group)
        n = max(ctx.count, 1.0)
        # dx = scale * (dy - Σdy/N - x̂ Σdy·x̂/N), all sums global
        k = (-scale * inv_std * totals[c:] / n).view(shape)
        b = (-scale * totals[:c] / n).view(shape)
        dx = dy * scale.view(shape) + xc * k + b
        return dx, dgamma, dbeta, None, None


class SyncBatchNorm(BatchNorm):
    """The from-scratch `BatchNorm` (same parameters, buffers and momentum meaning) whose
    training statistics are those of the whole batch across `group` (a process group; None:
    local statistics, for data-parallel training with per-worker batch norm). A worker whose
    statistics cover no value (count 0) leaves its running statistics alone."""

    def __init__(self, *args, group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group

    @classmethod
    def from_layer(cls, layer: BatchNorm, group) -> "SyncBatchNorm":
        """A SyncBatchNorm sharing `layer`'s parameters and buffers (same config)."""
        new = cls(layer.num_features, layer.num_dims, eps=layer.eps, momentum=layer.momentum,
                  unbiased=layer.unbiased, group=group, device="meta")
        new.gamma, new.beta = layer.gamma, layer.beta
        new.running_mean, new.running_var = layer.running_mean, layer.running_var
        return new

    def forward(self, X):
        if X.dim() != self.num_dims:
            raise ValueError(f"SyncBatchNorm(num_dims={self.num_dims}) got {X.dim()}-D input")
        if not self.training:
            return super().forward(X)
        Y, mean, var, count = SyncBatchNormFunction.apply(X, self.gamma, self.beta, self.eps,
                                                          self.group)
        n = float(count)
        if n > 0:
            with torch.no_grad():
                stat = var * (n / (n - 1)) if self.unbiased else var
                self.running_mean.lerp_(mean, 1.0 - self.momentum)
                self.running_var.lerp_(stat, 1.0 - self.momentum)
        return Y


def check_sync_impl(impl):
    if impl not in SYNC_IMPLS:
        raise ValueError(f"unknown torch sync impl {impl!r}; choose from {', '.join(SYNC_IMPLS)}")


def make_sync_layer(impl, num_features, num_dims, *, eps, decay, unbiased, group, device=None,
                    dtype=None) -> nn.Module:
    """A training-ready sync layer of `impl` for canonical `decay` over `group`."""
    check_sync_impl(impl)
    if impl == "native":
        if unbiased is False:
            raise UnsupportedSetting(NATIVE_BIASED)
        momentum = spec.momentum_from_decay(decay, "torch-native")
        return nn.SyncBatchNorm(num_features, eps=eps, momentum=momentum, process_group=group,
                                device=device, dtype=dtype)
    layer = make_layer("scratch", num_features, num_dims, eps=eps, decay=decay,
                       unbiased=bool(unbiased), device=device, dtype=dtype)
    return SyncBatchNorm.from_layer(layer, group)


# --- inside a worker process -------------------------------------------------------------------

class Worker:
    """One rank's state: its device, the process group and subgroups of the first k ranks."""

    def __init__(self, rank, size, backend, device):
        self.rank, self.size, self.backend, self.device = rank, size, backend, device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        self.description = f"{device} ({name})"
        self._groups = {size: dist.group.WORLD}

    def group(self, k):
        """The process group of ranks 0..k-1; every rank must call this with the same k."""
        if k not in self._groups:
            self._groups[k] = dist.new_group(list(range(k)))
        return self._groups[k]

    def close(self):
        if dist.is_initialized():
            dist.destroy_process_group()


def _init_worker(rank, size, host, port, backend, timeout_s):
    torch.set_num_threads(1)  # W workers share the machine's cores
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, size + 1, False, timeout=timeout)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    return Worker(rank, size, backend, device)


def _info_job(w):
    return w.description


def step_job(w, k, x, dy, gamma, beta, running_mean, running_var, opts):
    """One rank's part of a sync step over ranks 0..k-1 (NumPy in and out): y and dx of its
    shard, the all-reduced dgamma and dbeta, and the running statistics."""
    pg = w.group(k)
    if w.rank >= k:
        return None
    tdt = torch_dtype(x.dtype)

    def t(a):
        return torch.as_tensor(np.asarray(a), dtype=tdt).to(w.device)

    X = t(x).requires_grad_(True)
    layer = make_sync_layer(opts["impl"], X.shape[1], X.dim(), eps=opts["eps"],
                            decay=opts["decay"], unbiased=opts["unbiased"], group=pg,
                            device=w.device, dtype=tdt)
    g, b = gamma_beta(layer)
    with torch.no_grad():
        g.copy_(t(gamma))
        b.copy_(t(beta))
        layer.running_mean.copy_(t(running_mean))
        layer.running_var.copy_(t(running_var))
    layer.train(opts["training"])
    try:
        y = layer(X)
    except ValueError as e:  # nn.SyncBatchNorm refuses CPU tensors when a group is initialised
        if opts["impl"] == "native" and w.device.type == "cpu":
            return {"unavailable": f"{type(e).__name__}: {e}"}
        raise
    y.backward(t(dy))
    grads = torch.cat([g.grad, b.grad])
    dist.all_reduce(grads, group=pg)
    c = X.shape[1]
    out = dict(y=y, dx=X.grad, dgamma=grads[:c], dbeta=grads[c:],
               running_mean=layer.running_mean, running_var=layer.running_var)
    return {key: v.detach().cpu().numpy().copy() for key, v in out.items()}


def train_job(w, k, params, shards, totals, opts):
    """One rank's data-parallel LeNet-BN training over ranks 0..k-1: its shard of every batch,
    loss = Σ cross-entropy / global batch size, all gradients (and the loss) summed over the
    ranks, then plain SGD, the same update on every rank. Returns (losses, params of rank 0,
    seconds between the barriers around the loop, communication included)."""
    pg = w.group(k)
    if w.rank >= k:
        return None
    tdt = torch_dtype(opts["dtype"])
    model = build_lenet("scratch", eps=opts["eps"], decay=opts["decay"],
                        unbiased=opts["unbiased"], device=w.device, dtype=tdt, params=params)
    for name in BN_NAMES:
        setattr(model, name, SyncBatchNorm.from_layer(getattr(model, name),
                                                      pg if opts["sync"] else None))
    model.train()
    trainable = list(model.parameters())
    batches = [(torch.as_tensor(x, dtype=tdt).to(w.device),
                torch.as_tensor(y, dtype=torch.int64).to(w.device)) for x, y in shards]
    losses = []
    dist.barrier(group=pg)
    start = time.perf_counter()
    for (x, y), total in zip(batches, totals):
        loss = F.cross_entropy(model(x), y, reduction="sum") / total
        for p in trainable:
            p.grad = None
        loss.backward()
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in trainable] + [loss.detach().reshape(1)])
        dist.all_reduce(flat, group=pg)
        with torch.no_grad():
            offset = 0
            for p in trainable:
                p.sub_(flat[offset:offset + p.numel()].view_as(p), alpha=opts["lr"])
                offset += p.numel()
        losses.append(flat[-1])
    dist.barrier(group=pg)
    seconds = time.perf_counter() - start
    losses = torch.stack(losses).tolist() if losses else []
    return losses, (get_params(model) if w.rank == 0 else None), seconds


# --- in the calling process --------------------------------------------------------------------

def default_backend(world_size) -> str:
    """nccl when there is a CUDA GPU for every worker, else gloo (CPU)."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        return "nccl" if dist.is_nccl_available() else "gloo"
    return "gloo"


def _loopback_env() -> dict:
    env = {"OMP_NUM_THREADS": "1"}
    names = {name for _, name in socket.if_nameindex()} if hasattr(socket, "if_nameindex") else ()
    if "GLOO_SOCKET_IFNAME" not in os.environ and "lo" in names:
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo on loopback, whatever the hostname resolves to
    return env


class SyncGroup(EngineGroup):
    """`world_size` worker processes in one `torch.distributed` process group, started once and
    reused: `backend` "gloo" (CPU, loopback) or "nccl" (one CUDA GPU per rank; None picks). The
    rendezvous is a TCPStore held by this process on a free port. Collectives time out after
    `timeout` s; a job that has not finished after `job_timeout` s, a worker that raises or dies
    kills every worker (WorkerError). A group of W serves any world size k <= W (ranks 0..k-1).
    """

    def __init__(self, world_size, *, backend=None, timeout=60.0, job_timeout=600.0):
        world_size = check_world_size(world_size)
        backend = backend or default_backend(world_size)
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        if backend == "nccl" and torch.cuda.device_count() < world_size:
            raise DeviceUnavailable(f"nccl needs a CUDA GPU per worker: {world_size} workers, "
                                    f"{torch.cuda.device_count()} GPU(s) visible")
        self.backend = backend
        self._store = dist.TCPStore(HOST, 0, world_size + 1, True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=timeout))
        pool = WorkerPool(world_size, "backends.torch.sync:_init_worker",
                          (HOST, self._store.port, backend, float(timeout)),
                          env=_loopback_env(), timeout=job_timeout, name=f"torch {backend} worker")
        super().__init__(world_size, pool, f"torch.distributed {backend}",
                         pool.run(_info_job, [()] * world_size))


def sync_bn_step(xs, gamma, beta, running_mean, running_var, dys, *, training, eps=1e-5,
                 decay=0.9, unbiased=False, impl="scratch", group=None) -> dict:
    """One synchronized step on len(xs) workers (contract in backends/__init__.py): run on
    `group` (a SyncGroup, at least that large) or on a SyncGroup started for this call."""
    check_sync_impl(impl)
    _, _, sizes = validate_shards(xs, gamma, beta, running_mean, running_var, dys,
                                  training=training, eps=eps, decay=decay,
                                  world_size=None if group is None else group.world_size)
    if impl == "native" and training and not unbiased:
        raise UnsupportedSetting(NATIVE_BIASED)
    dt = float_dtype(np.asarray(xs[0]))
    k = len(sizes)
    common = [np.asarray(a, dt) for a in (gamma, beta, running_mean, running_var)]
    opts = dict(training=training, eps=eps, decay=decay, unbiased=unbiased if training else None,
                impl=impl)
    with group_for(group, k, SyncGroup) as g:
        args = [(k, np.asarray(xs[r], dt), np.asarray(dys[r], dt)) if r < k else
                (k, None, None) for r in range(g.world_size)]
        outs = g.run(step_job, [a + (*common, opts) for a in args])[:k]
    refused = [o["unavailable"] for o in outs if "unavailable" in o]
    if refused:
        raise DeviceUnavailable(
            f"torch.nn.SyncBatchNorm does not run on CPU tensors ({refused[0]}); it needs CUDA "
            "GPUs and the nccl backend (CPU/gloo support, pytorch PR #78081, was closed "
            "unmerged)")
    result = {key: [o[key] for o in outs] for key in SHARDED_KEYS}
    result.update({key: outs[0][key] for key in outs[0] if key not in SHARDED_KEYS})
    return result


def sync_lenet_train(params, batches, *, world_size, shard_sizes=None, sync=True, lr, eps=1e-5,
                     decay=0.9, unbiased=None, dtype="float64", group=None) -> dict:
    """Data-parallel LeNet-BN (from-scratch batch norm) on `world_size` workers: every batch is
    split by `shard_sizes` (default: as equal as possible), gradients are summed across the
    workers so that the update is full-batch SGD on the mean loss. `sync=True`: batch norm over
    the whole batch; False: each worker normalises with its own shard's statistics (running
    statistics are then rank 0's). Returns {"losses", "params", "seconds"} (seconds: the
    training loop on the workers, communication included)."""
    params, per_step, opts = training_job(
        params, batches, world_size=world_size, shard_sizes=shard_sizes, sync=sync, lr=lr,
        eps=eps, decay=decay, unbiased=unbiased, dtype=dtype)
    totals = [sum(len(x) for x, _ in shards) for shards in per_step]
    per_rank = [[shards[r] for shards in per_step] for r in range(world_size)]
    with group_for(group, world_size, SyncGroup) as g:
        args = [(world_size, params, per_rank[r] if r < world_size else None, totals, opts)
                for r in range(g.world_size)]
        losses, trained, seconds = g.run(train_job, args)[0]
    return {"losses": losses, "params": trained, "seconds": seconds}


# --- under torchrun ----------------------------------------------------------------------------

def main(argv=None) -> int:
    """One synchronized step under `torchrun` (one machine or several: the rendezvous comes from
    torchrun's environment): every rank builds the same seeded batch, takes its shard, runs
    `step_job` on the WORLD group; rank 0 checks the assembled result against the float64
    reference and prints one JSON line. Exit 0 when every error is within tolerance, 1 if not,
    2 on bad arguments."""
    parser = argparse.ArgumentParser(prog="python -m backends.torch.sync", description=main.__doc__)
    parser.add_argument("--sizes", default=None,
                        help="rows per rank, e.g. 40,16,8,0 (default: 16 per rank)")
    parser.add_argument("--shape", default="6,5,5", help="C or C,H,W (default 6,5,5)")
    parser.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    parser.add_argument("--impl", default="scratch", choices=SYNC_IMPLS)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        parser.error("run me under torchrun, e.g. torchrun --nproc-per-node 2 -m backends.torch.sync")
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        rest = tuple(int(v) for v in args.shape.split(","))
        sizes = ([int(v) for v in args.sizes.split(",")] if args.sizes else [16] * size)
        if len(rest) not in (1, 3) or len(sizes) != size:
            raise ValueError(f"--shape needs 1 or 3 numbers and --sizes {size} (one per rank)")
        case = random_case((sum(sizes),) + rest, seed=0, dtype=np.dtype(args.dtype))
        xs, dys = split(case["x"], sizes), split(case["dy"], sizes)
        validate_shards(xs, case["gamma"], case["beta"], case["running_mean"],
                        case["running_var"], dys, training=True, eps=1e-5, decay=0.9)
    except ValueError as e:
        parser.error(str(e))
    local = int(os.environ.get("LOCAL_RANK", rank))
    backend = ("nccl" if dist.is_nccl_available() and torch.cuda.device_count() > local
               else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout))
    w = Worker(rank, size, backend,
               torch.device("cuda", local) if backend == "nccl" else torch.device("cpu"))
    opts = dict(training=True, eps=1e-5, decay=0.9, unbiased=args.impl == "native",
                impl=args.impl)
    out = step_job(w, size, xs[rank], dys[rank], case["gamma"], case["beta"],
                   case["running_mean"], case["running_var"], opts)
    every = [None] * size
    dist.all_gather_object(every, out)
    dist.destroy_process_group()
    if rank != 0:
        return 0
    if any("unavailable" in o for o in every):
        print(json.dumps({"unavailable": every[0]["unavailable"]}))
        return 1
    result = {key: [o[key] for o in every] for key in SHARDED_KEYS}
    result.update({key: every[0][key] for key in every[0] if key not in SHARDED_KEYS})
    ref = reference_step(xs, case["gamma"], case["beta"], case["running_mean"],
                         case["running_var"], dys, training=True, unbiased=opts["unbiased"])
    errs = errors(result, ref)
    tol = TOLERANCE[args.dtype]
    ok = all(e <= tol for e in errs.values())
    print(json.dumps({"backend": backend, "world_size": size, "sizes": sizes,
                      "dtype": args.dtype, "impl": args.impl, "errors": errs,
                      "tolerance": tol, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
