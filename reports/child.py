"""Running one task of one backend in a child process, both sides.

Parent: `call(backend, task, args, ...)` starts `python -m reports.child TASK IN OUT`, relays the
child's progress lines, and returns {"result": ...}, {"unavailable": reason} or
{"failed": reason}. One process per backend keeps one framework's threads, GPU memory or crash
away from another's numbers; an interrupt or timeout kills the child (and its children).

Child: `main()` tunes the C allocator, loads the backend (unavailable: says why), looks the task
up (`info`, or `REPORT.TASK` from a report module's TASKS) and writes its result. Arrays travel
in an .npz beside a JSON file (never pickle), so a child on numpy 1.x and a parent on numpy 2.x,
or two different interpreters, read each other's files.
"""
from __future__ import annotations

import ctypes
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import traceback

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent


# -- exchange format ---------------------------------------------------------------------------
def _split(obj, arrays):
    if isinstance(obj, np.ndarray):
        key = f"a{len(arrays)}"
        arrays[key] = obj
        return {"__array__": key}
    if isinstance(obj, dict):
        return {str(k): _split(v, arrays) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, arrays) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _join(obj, arrays):
    if isinstance(obj, dict):
        if set(obj) == {"__array__"}:
            return arrays[obj["__array__"]]
        return {k: _join(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, arrays) for v in obj]
    return obj


def save(prefix, obj) -> None:
    """Write `obj` (dicts, lists, numbers, strings, arrays) to prefix.json + prefix.npz."""
    arrays = {}
    meta = _split(obj, arrays)
    np.savez(f"{prefix}.npz", **arrays)
    pathlib.Path(f"{prefix}.json").write_text(json.dumps(meta))


def load(prefix):
    with np.load(f"{prefix}.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return _join(json.loads(pathlib.Path(f"{prefix}.json").read_text()), arrays)


# -- parent side -------------------------------------------------------------------------------
def _kill(proc: subprocess.Popen) -> None:
    """Kill the child's whole process group (a backend may have started workers of its own)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):
        proc.kill()
    proc.wait()


def call(backend: str, task: str, args: dict, *, python: str | None = None, env: dict | None = None,
         timeout: float | None = None, progress=None) -> dict:
    """Run `task` for `backend` in a child process. Lines the child prints that start with
    "[backend" go to `progress`; the last lines go into the failure reason."""
    with tempfile.TemporaryDirectory(prefix="bn-compare-") as tmp:
        src, dst = os.path.join(tmp, "in"), os.path.join(tmp, "out")
        save(src, {"backend": backend, **args})
        child_env = dict(os.environ, **(env or {}))
        child_env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
        cmd = [python or sys.executable, "-m", "reports.child", task, src, dst]
        try:
            proc = subprocess.Popen(cmd, cwd=REPO, env=child_env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1,
                                    start_new_session=True)
        except OSError as e:
            return {"failed": f"could not start {cmd[0]}: {e}"}
        timer = None
        timed_out = threading.Event()
        if timeout is not None:
            def expire():
                timed_out.set()
                _kill(proc)
            timer = threading.Timer(timeout, expire)
            timer.daemon = True
            timer.start()
        tail = []
        try:
            for line in proc.stdout:
                line = line.rstrip()
                if progress is not None and line.startswith(f"[{backend}"):
                    progress("  " + line)
                tail = (tail + [line])[-15:]
            code = proc.wait()
        except BaseException:  # KeyboardInterrupt included: never leave the child running
            _kill(proc)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if timed_out.is_set():
            return {"failed": f"{backend} {task}: no result within {timeout:g} s; the child "
                              "process was killed"}
        if code != 0 or not os.path.exists(dst + ".json"):
            return {"failed": f"{backend} child exited with code {code}: " + " | ".join(tail[-6:])}
        out = load(dst)
        result = out.get("result")
        if isinstance(result, dict) and "failed" in result:  # the task crashed as a whole
            return {"failed": f"{backend} {task}: {result['failed']}"}
        return out


# -- child side --------------------------------------------------------------------------------
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


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def per_impl(impls, fn):
    """fn(impl) for each impl; a failure becomes {"error": ..., "kind": ...} for that impl only."""
    import backends

    out = {}
    for impl in impls:
        try:
            out[impl] = fn(impl)
        except (backends.UnsupportedSetting, backends.DeviceUnavailable) as e:
            out[impl] = {"error": describe(e), "kind": type(e).__name__}
        except Exception as e:  # one impl's crash must not lose the others' results
            out[impl] = {"error": describe(e), "kind": type(e).__name__,
                         "traceback": traceback.format_exc(limit=8)}
    return out


def progress_line(backend: str, impl: str | None = None):
    """A function that prints one progress line for compare.py to relay."""
    tag = f"[{backend}/{impl}]" if impl else f"[{backend}]"
    return lambda msg: print(f"{tag} {msg}", file=sys.stderr, flush=True)


def exact_numerics(b) -> None:
    if hasattr(b, "exact_numerics"):
        b.exact_numerics()


def task_info(b, args):
    return {"impls": list(b.IMPLS), "versions": b.versions(), "conventions": b.conventions(),
            "allocator": ALLOCATOR}


def find_task(task: str):
    """`info`, or `REPORT.TASK` from that report module's TASKS."""
    if task == "info":
        return task_info
    report, _, name = task.partition(".")
    import reports

    return reports.load(report).TASKS[name]


def main(argv) -> int:
    global ALLOCATOR
    import backends

    task, in_prefix, out_prefix = argv
    ALLOCATOR = tune_allocator(os.environ.get(MALLOC_ENV, "tuned"))  # before any framework loads
    args = load(in_prefix)
    try:
        b = backends.load(args["backend"])
    except backends.BackendUnavailable as e:
        save(out_prefix, {"unavailable": str(e)})
        return 0
    try:
        result = find_task(task)(b, args)
    except Exception as e:
        result = {"failed": describe(e), "traceback": traceback.format_exc(limit=8)}
    save(out_prefix, {"result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
