"""Child-process entry point for compare.py: runs one task for one backend.

    python -m backends.worker TASK IN_PREFIX OUT_PREFIX

Reads the task's arguments from IN_PREFIX.{json,npz} (common.io) and writes the result to
OUT_PREFIX.{json,npz}. One process per backend keeps one framework's threads, GPU memory or crash
away from another's numbers. Progress goes to stderr, one line at a time.
"""
from __future__ import annotations

import ctypes
import inspect
import os
import sys
import time
import traceback

import numpy as np

import backends
from common import io
from common.conventions import probe_input


# glibc's defaults hand every freed block over 128 KiB (up to 32 MiB, adaptively) back to the
# OS, so each training step page-faults its activations in again; XLA's CPU runtime takes one
# ~36 MB temporary block per LeNet-BN step (batch 256), above any default threshold. With the
# threshold raised but one arena per thread, JAX runs were erratic (4.9k-11k examples/s); with
# one arena they are steady.
# Measured with `compare.py speed` on the 2-core CPU, tuned vs --default-malloc: JAX/XLA
# 8.6-8.8k -> 11.3-11.7k examples/s, PyTorch native 22.6k -> 23.0-23.9k; MXNet pools its own
# memory (no change).
MALLOC_ENV = "BN_COMPARE_MALLOC"  # "tuned" (default) or "default"; compare.py --default-malloc
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 1 << 30


def tune_allocator(mode: str = "tuned") -> str:
    """Keep freed memory in the process for reuse, in one arena (glibc `mallopt`); call it
    before any framework starts threads. Returns what was done."""
    if mode == "default":
        return "default malloc settings (--default-malloc)"
    if mode != "tuned":
        return f"default malloc settings (unknown {MALLOC_ENV}={mode!r}; use tuned or default)"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return "default malloc settings (no glibc mallopt on this platform)"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # glibc before 2.26 caps the mmap threshold at 32 MiB
    mmap = next((t for t in (MMAP_THRESHOLD, 32 << 20) if mallopt(M_MMAP_THRESHOLD, t) == 1), 0)
    if not mmap or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1 or mallopt(M_ARENA_MAX, 1) != 1:
        return "default malloc settings (mallopt refused the tuning)"
    return (f"glibc malloc tuned: one arena, blocks up to {mmap >> 20} MiB from the heap, "
            f"trim threshold {TRIM_THRESHOLD >> 20} MiB (freed memory is reused, not handed "
            "back to the OS)")


ALLOCATOR = "not set (not a compare.py child process)"


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _per_impl(impls, fn):
    """fn(impl) for each impl; a failure becomes {"error": ...} for that impl only."""
    out = {}
    for impl in impls:
        try:
            out[impl] = fn(impl)
        except (backends.UnsupportedSetting, backends.DeviceUnavailable) as e:
            out[impl] = {"error": _error(e), "kind": type(e).__name__}
        except Exception as e:  # one impl's crash must not lose the others' results
            out[impl] = {"error": _error(e), "kind": type(e).__name__,
                         "traceback": traceback.format_exc(limit=8)}
    return out


def _exact(b):
    if hasattr(b, "exact_numerics"):
        b.exact_numerics()


def task_info(b, args):
    return {"impls": list(b.IMPLS), "versions": b.versions(), "conventions": b.conventions(),
            "allocator": ALLOCATOR}


def task_bn(b, args):
    """Every case through every impl; a setting an impl cannot express is retried with the
    impl's own running-variance convention and labelled."""
    _exact(b)

    accepted = inspect.signature(b.bn_step).parameters

    def run(impl):
        results = []
        for case in args["cases"]:
            kw = dict(training=case["training"], eps=case["eps"], decay=case["decay"], impl=impl)
            options = case.get("options") or {}
            if options:  # a framework-specific default, run only where the impl has it
                if not set(options) <= set(accepted):
                    results.append({"skipped": "option not offered by this backend"})
                    continue
                try:
                    results.append({"out": b.bn_step(**case["inputs"], unbiased=case["unbiased"],
                                                     **kw, **options)})
                except backends.UnsupportedSetting as e:
                    results.append({"skipped": str(e)})
                continue
            try:
                results.append({"out": b.bn_step(**case["inputs"], unbiased=case["unbiased"], **kw)})
            except backends.UnsupportedSetting as e:
                own = not case["unbiased"]
                try:
                    out = b.bn_step(**case["inputs"], unbiased=own, **kw)
                    results.append({"out": out, "convention": "unbiased running variance" if own
                                    else "biased running variance", "note": str(e)})
                except Exception as e2:
                    results.append({"error": _error(e2)})
            except Exception as e:
                results.append({"error": _error(e)})
        return results

    return _per_impl(args["impls"], run)


def task_sequence(b, args):
    """k chained training steps of one impl at each requested decay: final running stats."""
    _exact(b)
    out = {}
    for label, spec in args["runs"].items():
        rm, rv = spec["running_mean"], spec["running_var"]
        for x in spec["xs"]:
            r = b.bn_step(x, spec["gamma"], spec["beta"], rm, rv, np.ones_like(x), training=True,
                          eps=spec["eps"], decay=spec["decay"], impl=spec["impl"])
            rm, rv = r["running_mean"], r["running_var"]
        out[label] = {"running_mean": rm, "running_var": rv}
    return out


def task_probe(b, args):
    x = probe_input()
    return _per_impl(b.IMPLS, lambda impl: {"x": x, "result": b.probe(impl, x)})


def task_trajectory(b, args):
    _exact(b)
    batches = list(zip(args["xs"], args["ys"]))

    def run(impl):
        kw = dict(lr=args["lr"], impl=impl, decay=args["decay"], dtype=args["dtype"],
                  record=bool(args.get("record", False)))  # history for check_trajectory
        try:
            r = b.lenet_train(args["params"], batches, unbiased=False, **kw)
            r["unbiased"] = False
        except backends.UnsupportedSetting as e:
            r = b.lenet_train(args["params"], batches, unbiased=None, **kw)
            r["convention"] = "its own running-variance estimator"
            r["note"] = str(e)
        r["losses"] = [float(v) for v in r["losses"]]
        return r

    return _per_impl(b.IMPLS, run)


def task_train(b, args):
    from common import data

    ds = data.load_dataset(args["data"], limit_train=args.get("limit_train"),
                           limit_test=args.get("limit_test"), download=False)
    name = args["backend"]

    def run(impl):
        def progress(line):
            print(f"[{name}/{impl}] {line}", file=sys.stderr, flush=True)

        start = time.perf_counter()
        r = b.fit(ds, impl=impl, epochs=args["epochs"], batch_size=args["batch_size"],
                  lr=args["lr"], seed=args["seed"], device=args["device"], dtype=args["dtype"],
                  progress=progress)
        r.setdefault("wall_s", time.perf_counter() - start)
        return r

    return _per_impl(b.IMPLS, run)


def task_speed(b, args):
    """Every impl's timer first (build, compile, warm up), then the timed runs round-robin:
    run r of every impl before run r + 1 of any, so a slow spell of the machine hits every impl
    alike and the scratch/native ratio compares like with like. An impl that fails keeps its
    error; the others go on."""
    name = args["backend"]

    def make(impl):
        print(f"[{name}/{impl}] compiling and warming up on {args['device']} ...",
              file=sys.stderr, flush=True)
        return b.speed_timer(impl=impl, device=args["device"], batch_size=args["batch_size"],
                             dtype=args["dtype"], steps=args["steps"])

    out = _per_impl(b.IMPLS, make)
    timers = {impl: t for impl, t in out.items() if not isinstance(t, dict)}
    runs = {impl: [] for impl in timers}
    for r in range(args["repeats"]):
        print(f"[{name}] timed round {r + 1}/{args['repeats']}: {', '.join(timers)}",
              file=sys.stderr, flush=True)
        for impl, result in _per_impl(list(timers), lambda impl: timers[impl].run()).items():
            if "error" in result:
                out[impl] = result
                del timers[impl]
            else:
                runs[impl].append(result)
    for impl, timer in timers.items():
        out[impl] = backends.speed_result(timer.info, runs[impl])
        out[impl]["interleaved"] = True
    return out


TASKS = {name[5:]: fn for name, fn in globals().items() if name.startswith("task_")}


def main(argv) -> int:
    global ALLOCATOR
    task, in_prefix, out_prefix = argv
    ALLOCATOR = tune_allocator(os.environ.get(MALLOC_ENV, "tuned"))  # before any framework loads
    args = io.load(in_prefix)
    try:
        b = backends.load(args["backend"])
    except backends.BackendUnavailable as e:
        io.save(out_prefix, {"unavailable": str(e)})
        return 0
    try:
        result = TASKS[task](b, args)
    except Exception as e:
        result = {"failed": _error(e), "traceback": traceback.format_exc(limit=8)}
    io.save(out_prefix, {"result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
