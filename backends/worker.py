"""Child-process entry point for compare.py: runs one task for one backend.

    python -m backends.worker TASK IN_PREFIX OUT_PREFIX

Reads the task's arguments from IN_PREFIX.{json,npz} (common.io) and writes the result to
OUT_PREFIX.{json,npz}. One process per backend keeps one framework's threads, GPU memory or crash
away from another's numbers. Progress goes to stderr, one line at a time.
"""
from __future__ import annotations

import inspect
import sys
import time
import traceback

import numpy as np

import backends
from common import io
from common.conventions import probe_input


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
    return {"impls": list(b.IMPLS), "versions": b.versions(), "conventions": b.conventions()}


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
        kw = dict(lr=args["lr"], impl=impl, decay=args["decay"], dtype=args["dtype"])
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
    if not hasattr(b, "speed"):
        return {impl: {"error": "this backend has no speed() yet"} for impl in b.IMPLS}
    name = args["backend"]

    def run(impl):
        print(f"[{name}/{impl}] timing on {args['device']} ...", file=sys.stderr, flush=True)
        return b.speed(impl=impl, device=args["device"], batch_size=args["batch_size"],
                       dtype=args["dtype"], steps=args["steps"], repeats=args["repeats"])

    return _per_impl(b.IMPLS, run)


TASKS = {name[5:]: fn for name, fn in globals().items() if name.startswith("task_")}


def main(argv) -> int:
    task, in_prefix, out_prefix = argv
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
