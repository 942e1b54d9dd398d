"""Worker processes for the multi-device runs (`backends.<name>.sync`): started once, reused for
many jobs, bounded by timeouts, and never left behind. Imports no framework.

A `WorkerPool` spawns `size` processes with the 'spawn' start method (a fresh interpreter: no
framework threads, XLA client or OpenMP pool is inherited through fork). Each worker updates its
environment, then imports and runs `init(rank, size, *init_args)`, given as "module:function" so
that nothing is imported before the environment is set (XLA_FLAGS must precede JAX's import),
and serves jobs: `fn(state, *args)`, `state` being what `init` returned. `run` waits for every
rank's answer; when a rank raises, dies, or stays silent past the timeout, the pool kills and
joins EVERY worker and raises `WorkerError`, one line naming the rank and the reason. A worker
whose parent has gone exits on its own.
"""
from __future__ import annotations

import contextlib
import importlib
import itertools
import multiprocessing
import os
import queue
import time
import traceback
import weakref

POLL_S = 0.05
GRACE_S = 1.0  # after a failure, how long to wait for the other ranks' answers


class WorkerError(RuntimeError):
    """A worker raised, died, or did not answer in time; every worker of the pool was killed.
    `details` holds the workers' tracebacks, if any came back."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


def _one_line(e: BaseException) -> str:
    """`Type: message` on one line; for a message that embeds a traceback (MXNet's), its last
    line, which holds the error."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    text = (lines[-1] if lines[0].startswith("Traceback") else lines[0]) if lines else ""
    return f"{type(e).__name__}: {text}".rstrip(": ")


def _resolve(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _serve(rank, size, init, init_args, env, parent, jobs, results):
    """A worker's life: environment, init, then jobs until None (or the parent is gone)."""
    os.environ.update(env)
    try:
        state = _resolve(init)(rank, size, *init_args)
    except BaseException as e:  # noqa: BLE001  (reported to the parent, which decides)
        results.put((None, rank, False, _one_line(e), traceback.format_exc()))
        return
    results.put((None, rank, True, None, ""))
    while True:
        try:
            job = jobs.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:
                return
            continue
        if job is None:
            break
        job_id, fn, args = job
        try:
            results.put((job_id, rank, True, fn(state, *args), ""))
        except BaseException as e:  # noqa: BLE001
            results.put((job_id, rank, False, _one_line(e), traceback.format_exc()))
    close = getattr(state, "close", None)
    if callable(close):
        close()


def _kill(procs):
    started = [p for p in procs if p.pid is not None]
    for p in started:
        if p.is_alive():
            p.kill()
    for p in started:
        p.join(timeout=10)


class WorkerPool:
    """`size` spawned worker processes serving jobs (see the module docstring).

    `env`: variables set in each worker before `init` is imported. `timeout`: seconds a job may
    take (per `run`, overridable); `start_timeout`: seconds for every worker to finish `init`.
    Use as a context manager, or call `close()`.
    """

    def __init__(self, size: int, init: str, init_args=(), *, env=None, timeout=60.0,
                 start_timeout=120.0, name="worker"):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"a pool needs an int >= 1 of workers, got {size!r}")
        if not (timeout > 0 and start_timeout > 0):
            raise ValueError(f"timeouts must be positive, got {timeout!r} and {start_timeout!r}")
        ctx = multiprocessing.get_context("spawn")
        self.size, self.timeout, self.name = size, float(timeout), name
        self._ids = itertools.count()
        self._results = ctx.Queue()
        self._jobs = [ctx.Queue() for _ in range(size)]
        env = {str(k): str(v) for k, v in (env or {}).items()}
        self._procs = [
            ctx.Process(target=_serve, name=f"{name}-{rank}", daemon=True,
                        args=(rank, size, init, tuple(init_args), env, os.getpid(),
                              self._jobs[rank], self._results))
            for rank in range(size)]
        self._finalizer = weakref.finalize(self, _kill, self._procs)
        self.closed = False
        for p in self._procs:
            p.start()
        self.init_results = self._collect(None, start_timeout, "start")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def run(self, fn, per_rank_args, timeout=None) -> list:
        """`fn(state, *per_rank_args[rank])` on every rank; the results in rank order. A
        failure of any rank kills every worker and raises WorkerError (the pool is closed)."""
        if self.closed:
            raise WorkerError(f"{self.name} pool is closed (a worker failed earlier, or close() "
                              "was called)")
        per_rank_args = list(per_rank_args)
        if len(per_rank_args) != self.size:
            raise ValueError(f"run needs arguments for {self.size} ranks, got "
                             f"{len(per_rank_args)}")
        job_id = next(self._ids)
        for rank, args in enumerate(per_rank_args):
            self._jobs[rank].put((job_id, fn, tuple(args)))
        return self._collect(job_id, self.timeout if timeout is None else float(timeout),
                             getattr(fn, "__name__", "job"))

    def _collect(self, job_id, timeout, what):
        """Every rank's answer to job `job_id`. After the first failure, waits up to GRACE_S for
        the other ranks, so that a rank that died is named as the cause rather than the ranks
        whose collectives broke because of it."""
        answers, failed, deadline, grace = {}, {}, time.monotonic() + timeout, None
        while len(answers) + len(failed) < self.size:
            now = time.monotonic()
            dead = {r: p.exitcode for r, p in enumerate(self._procs)
                    if r not in answers and r not in failed and p.exitcode is not None}
            if dead or (grace is not None and now > grace):
                self._fail(what, answers, failed, dead)
            if now > deadline:
                silent = [r for r in range(self.size) if r not in answers]
                self._fail(what, answers, failed, {}, f"rank(s) {silent} gave no answer to "
                           f"{what} within {timeout:g} s")
            try:
                got_id, rank, ok, value, details = self._results.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if got_id != job_id:
                continue  # a late answer to an earlier job
            if ok:
                answers[rank] = value
            else:
                failed[rank] = (value, details)
                grace = grace or time.monotonic() + GRACE_S
        if failed:
            self._fail(what, answers, failed, {})
        return [answers[r] for r in range(self.size)]

    def _fail(self, what, answers, failed, dead, reason=None):
        """Kill every worker and raise one line: the silence, else a dead rank, else the first
        failure; the other failed or silent ranks after it."""
        self.close(kill=True)
        if reason is None:
            if dead:
                r, code = next(iter(sorted(dead.items())))
                reason = f"rank {r} died (exit code {code}) during {what}"
            else:
                r = min(failed)
                reason = f"rank {r} failed in {what}: {failed[r][0]}"
            others = sorted((set(failed) | set(dead)) - {r})
            waiting = [q for q in range(self.size) if q not in answers and q not in others
                       and q != r]
            if others:
                reason += f"; rank(s) {others} failed too"
            if waiting:
                reason += f"; rank(s) {waiting} had not answered"
        details = "\n".join(d for _, d in failed.values() if d)
        raise WorkerError(f"{self.name} {reason}; killed all {self.size} workers", details)

    def close(self, kill=False):
        """Stop every worker (ask, then kill what is left after 10 s; at once if `kill`) and
        join them all."""
        if self.closed:
            return
        self.closed = True
        if not kill:
            for q in self._jobs:
                q.put(None)
            for p in self._procs:
                p.join(timeout=10)
        _kill(self._procs)
        for q in self._jobs + [self._results]:
            q.cancel_join_thread()
            q.close()
        self._finalizer.detach()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close(kill=exc[0] is not None)


def check_world_size(world_size) -> int:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    return world_size


class EngineGroup:
    """What every backend's `SyncGroup` shares: a started `WorkerPool` (`pool`) serving an engine
    of `world_size` workers, described by `info` ({"engine", "world_size", "processes",
    "devices"}); `run` hands a job to every worker process; a context manager that kills the
    workers when its block raises."""

    def __init__(self, world_size, pool, engine, devices):
        self.world_size, self.pool, self.devices = world_size, pool, devices
        self.info = {"engine": engine, "world_size": world_size, "processes": pool.size,
                     "devices": devices}

    def run(self, fn, per_process_args, timeout=None):
        return self.pool.run(fn, per_process_args, timeout)

    def close(self, kill=False):
        self.pool.close(kill=kill)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close(kill=exc[0] is not None)


@contextlib.contextmanager
def group_for(group, world_size, start):
    """`group` if given (ValueError if it has fewer than `world_size` workers), else
    `start(world_size)`, closed when the block ends."""
    if group is not None:
        if world_size > group.world_size:
            raise ValueError(f"world size {world_size} but the group has {group.world_size} "
                             "workers")
        yield group
        return
    with start(world_size) as g:
        yield g
