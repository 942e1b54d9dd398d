"""The orchestrator behind compare.py: validates the input before any backend starts, runs the
reports, and owns the one failure policy.

Exit status: 0 when every check of every report that ran passed; 1 when one failed, a report
crashed, or a backend was unavailable or its child process crashed (unless --allow-missing
names it); 2 for bad input, refused up front with one line; 130 when interrupted (the reports
that finished are kept and the results file says it was interrupted).
"""
from __future__ import annotations

import math
import os
import pathlib
import platform
import signal
import sys
import time
import traceback
import uuid

import numpy as np

import backends
import reports
from common import data
from reports import child, render, store

# The speed report trains on synthetic data and has no training set to check --batch-size
# against: it takes at most a batch as large as Fashion-MNIST's training set.
MAX_SYNTHETIC_BATCH = 60_000
ALLOW_MISSING_ENV = "BN_COMPARE_ALLOW_MISSING"


class UsageError(Exception):
    """Bad input: reported in one line with exit status 2, before any backend starts."""


def full_precision_only(report: str):
    """A report's `validate` that refuses `--dtype float16/bfloat16` up front: those have their
    own tolerances, in the precision report."""
    def validate(s) -> None:
        if s.args.dtype in ("float16", "bfloat16"):
            raise UsageError(f"--dtype {s.args.dtype}: the {report} report compares float32 and "
                             "float64; float16/bfloat16 are the precision report's (compare.py "
                             "precision), and train and speed take them too")
    return validate


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def parse_names(value: str, option: str, *, allow_all=False) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    if allow_all and names == ["all"]:
        return list(backends.names())
    unknown = [n for n in names if n not in backends.names()]
    if unknown:
        raise UsageError(f"{option}: unknown backend {', '.join(unknown)}; choose from "
                         f"{', '.join(backends.names())}" + (" or all" if allow_all else ""))
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"{option}: {', '.join(dup)} given more than once")
    return names


def check_settings(args) -> None:
    """Everything about the command line that needs no file and no framework."""
    if args.seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {args.seed}")
    for flag in ("epochs", "batch_size", "steps"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {v}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a positive finite number, got {args.lr}")
    if args.data is not None and not pathlib.Path(args.data).is_dir():
        raise UsageError(f"--data {args.data}: not a directory")


class Session:
    """One compare.py run: validated settings, backend processes, results store."""

    log = staticmethod(log)

    def __init__(self, args, which):
        self.args = args
        self.which = list(which)
        check_settings(args)
        if not self.which:
            raise UsageError("no report to run")
        self.backends = parse_names(args.backends, "--backends")
        if not self.backends:
            raise UsageError("--backends: empty list")
        allow = args.allow_missing if args.allow_missing is not None else os.environ.get(ALLOW_MISSING_ENV, "")
        self.allowed_missing = parse_names(allow, "--allow-missing", allow_all=True)
        self.python = {}
        for item in args.python:
            name, sep, exe = item.partition("=")
            if not sep or name not in backends.names() or not exe:
                raise UsageError(f"--python {item!r}: expected NAME=INTERPRETER with NAME in "
                                 f"{', '.join(backends.names())}")
            if not pathlib.Path(exe).exists():
                raise UsageError(f"--python {item!r}: {exe} does not exist")
            self.python[name] = exe
        self.out = pathlib.Path(args.out)
        try:
            render.check_writable(self.out)
        except OSError as e:
            raise UsageError(f"--out {args.out}: cannot write there ({e.strerror or e})") from None
        self.dtypes = [args.dtype] if args.dtype else ["float64", "float32"]
        self.modules = {name: reports.load(name) for name in self.which}
        self.data_dir = None
        self.train_size = None
        if any(getattr(m, "NEEDS_DATA", False) for m in self.modules.values()):
            self._check_data()
        limit = self.train_size or MAX_SYNTHETIC_BATCH
        if args.batch_size > limit:
            where = (f"the training set ({limit} images in {self.data_dir})" if self.train_size
                     else f"{limit} (the Fashion-MNIST training set; the speed report uses synthetic data)")
            raise UsageError(f"--batch-size {args.batch_size} is larger than {where}")
        for m in self.modules.values():
            if hasattr(m, "validate"):
                m.validate(self)
        self._info = {}
        self._trouble = {}  # backend -> why it could not take part in the current report
        started = store.now()
        self.store = store.Store(self.out, {
            "command": [sys.executable, "compare.py", *sys.argv[1:]], "started": started,
            "id": uuid.uuid4().hex[:12],
            "requested": self.which, "backends": self.backends,
            "allowed_missing": self.allowed_missing,
            "host": {"platform": platform.platform(), "python": sys.version.split()[0],
                     "numpy": np.__version__, "cpus": os.cpu_count()},
            "settings": {k: v for k, v in vars(args).items()}})

    def _check_data(self) -> None:
        """Find (or download, once) and fully validate the data before any backend starts."""
        try:
            # only the files that did arrive are worth a line; a failure is the one error line
            self.data_dir = data.find_data_dir(
                self.args.data, progress=lambda msg: msg.endswith(": ok") and log(msg))
            n = len(data.load("train", self.data_dir, download=False)[1])
            data.load("test", self.data_dir, download=False)
        except data.DataError as e:
            raise UsageError(f"data: {one_line(e)}") from None
        self.train_size = min(n, self.train_limit) if self.train_limit else n

    @property
    def quick(self) -> bool:
        return self.args.quick

    @property
    def train_limit(self) -> int | None:
        return reports.QUICK_TRAIN_LIMIT if self.args.quick else None

    # -- backends -----------------------------------------------------------------------------
    def call(self, name: str, task: str, args: dict, *, timeout: float | None = None) -> dict:
        """Run `task` in backend `name`'s child process. A crash is recorded against the current
        report (the failure policy), and the caller still gets {"failed": why} to show."""
        env = {child.MALLOC_ENV: "default" if self.args.default_malloc else "tuned"}
        r = child.call(name, task, args, python=self.python.get(name), env=env, timeout=timeout,
                       progress=log)
        if "result" not in r:
            self._trouble.setdefault(name, r.get("failed") or r.get("unavailable"))
        return r

    def info(self, name: str) -> dict:
        """Versions, impls and claimed conventions of a backend (asked once per run)."""
        if name not in self._info:
            log(f"[{name}] loading ...")
            r = child.call(name, "info", {}, python=self.python.get(name),
                           env={child.MALLOC_ENV: "default" if self.args.default_malloc else "tuned"})
            entry = {"python": self.python.get(name, sys.executable)}
            if "result" in r:
                entry.update(available=True, reason=None, **r["result"])
            else:
                entry.update(available=False, reason=r.get("unavailable") or r.get("failed"))
                log(f"[{name}] unavailable: {entry['reason']}")
            self._info[name] = entry
            self.store._doc()["backends"][name] = entry
        return self._info[name]

    def live(self) -> list[str]:
        return [n for n in self.backends if self.info(n)["available"]]

    def missing(self) -> dict[str, str]:
        """Requested backends that are unavailable, with why (and whether that is allowed)."""
        return {n: self.info(n)["reason"] + (" (allowed by --allow-missing)" if n in self.allowed_missing else "")
                for n in self.backends if not self.info(n)["available"]}

    def missing_rows(self, width: int) -> list[list]:
        """A table row per unavailable backend: its name and why, padded to `width` cells."""
        return [[n, "unavailable: " + why] + [""] * (width - 2) for n, why in self.missing().items()]

    def per_impl(self, task: str, args: dict, what: str) -> dict:
        """Run `task` in each live backend's child; results keyed "backend/impl" (a child that
        failed as a whole becomes one "backend" entry with the error)."""
        runs = {}
        for name in self.live():
            log(f"[{name}] {what} ...")
            r = self.call(name, task, {**args, "backend": name})
            if "result" not in r:
                runs[name] = {"error": r.get("failed") or r.get("unavailable")}
                continue
            for impl, res in r["result"].items():
                runs[f"{name}/{impl}"] = res
        return runs

    def plot_path(self, filename: str) -> pathlib.Path:
        return self.out / filename

    # -- the failure policy ----------------------------------------------------------------
    def policy_failures(self) -> list[str]:
        """Failures every report shares: a requested backend that is unavailable (unless
        allowed) or whose child process crashed during this report."""
        out = []
        for n in self.backends:
            info = self.info(n)
            if not info["available"]:
                if n not in self.allowed_missing:
                    out.append(f"backend {n} unavailable: {info['reason'][:200]}")
            elif n in self._trouble:
                out.append(f"backend {n} child process failed: {self._trouble[n][:200]}")
        return out

    def run_report(self, name: str) -> bool:
        """Run one report and save its section; True if it passed."""
        log(f"== {name} ==")
        self._trouble = {}
        started = store.now()
        try:
            section = self.modules[name].run(self)
        except Exception as e:  # one report's bug must not lose the others' results
            section = reports.Section(
                {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)},
                f"## {name}\n\nNot completed: {type(e).__name__}: {e}", [f"crashed: {type(e).__name__}: {e}"])
        section.failures = [*section.failures, *self.policy_failures()]
        if self.allowed_missing:
            section.payload.setdefault("allowed_missing", self.allowed_missing)
        section.payload.setdefault("missing", self.missing())
        meta = {"command": self.store.run["command"], "run": self.store.run["id"],
                "started": started, "finished": store.now(),
                "settings": self.store.run["settings"], "backends": self.backends,
                "allowed_missing": self.allowed_missing}
        self.store.save_section(name, section, meta)
        print("\n" + section.markdown + "\n", flush=True)
        return not section.failures


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run(args, which) -> int:
    t0 = time.perf_counter()
    try:
        s = Session(args, which)
    except UsageError as e:
        print(f"compare.py: error: {one_line(e)}", file=sys.stderr)
        return 2
    previous = signal.signal(signal.SIGTERM, _terminate)
    done, failed = [], []
    try:
        for name in s.which:
            if not s.run_report(name):
                failed.append(name)
            done.append(name)
        s.store.write(finished=True)
    except KeyboardInterrupt:
        s.store.write(interrupted=True)
        print(f"compare.py: interrupted; {s.out / store.JSON_NAME} is marked interrupted and holds "
              f"this run's finished reports ({', '.join(done) or 'none'})"
              + (" beside earlier runs' sections" if set(s.store.doc["reports"]) - set(done) else ""),
              file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    log(f"done in {time.perf_counter() - t0:.0f} s: {s.out / store.JSON_NAME}, {s.out / store.MD_NAME}")
    if s.store.moved:
        log(f"an earlier results file this version cannot merge into was kept as {', '.join(s.store.moved)}")
    if failed:
        doc = s.store.doc
        log("checks that failed:\n  " + "\n  ".join(f"{n}: {f}" for n in failed for f in doc["reports"][n]["failures"]))
        return 1
    return 0
