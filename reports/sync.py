"""sync: synchronized batch norm on W workers, against the full-batch float64 reference.

Three parts, one engine per backend (`backends.<name>.SyncGroup`, started once for the largest
world size and reused for the smaller ones):

- **Steps**: one training step of every backend × sync impl on W = 1, 2, 4 workers (`--world-sizes`),
  equal and unequal shards (default 48+16 on 2 workers, 40+16+8+0 on 4; `--shards`), 2-D and 4-D,
  float64 and float32, against `common.sync.reference_step` (`common.reference.bn_step` on the
  concatenated batch): y, dx, dgamma, dbeta and the running statistics. A native impl that
  departs from it is held to the convention Flax's `BatchNorm(axis_name)` and MXNet's contrib
  `SyncBatchNorm` follow, per-worker moments averaged unweighted
  (`common.sync.unweighted_reference_step`): matching it is a labelled convention, not a
  failure; matching neither is a failure. A native a platform cannot run (torch
  `nn.SyncBatchNorm` on CPU tensors, MXNet contrib in float64 or with an empty shard) is a row
  with the framework's own reason, not a failure; our from-scratch engines have no such excuse.
- **Training**: data-parallel LeNet-BN (gradients all-reduced) on real Fashion-MNIST batches,
  with synchronized batch norm (equal and unequal shards) and with local batch norm (equal
  shards), against `common.lenet_reference.train`, single-process full-batch float64 SGD. Sync:
  losses and parameters within 1e-10. Local: how far it drifts, per step (plotted); its only
  verdict is that it stays finite.
- **Timing** per world size: the engines' own "seconds" for the training loop (after
  compilation, communication included), per step.

Reliability: collectives time out after `--sync-timeout` s and a worker job after twice that;
a worker that crashes or hangs kills the whole engine (`backends.pool`), and the report ends
that backend with one row saying which rank and why. The whole backend process is killed if it
has not answered after `child_timeout`.

Fault injection, for testing that path end to end: with BN_COMPARE_SYNC_FAULT=crash (or hang)
in the environment, the last worker process of every engine exits with code 3 (or sleeps for
an hour) right after the engine starts, while the other ranks wait for it in a real all-reduce.
"""
from __future__ import annotations

import collections
import inspect
import math
import os
import pathlib
import sys
import time

import numpy as np

from common import lenet, lenet_reference
from common import sync as cs
from common.reference import RESULT_KEYS, error, random_case
from reports import Section, render, trajectory, within, worst

SUMMARY = ("synchronized batch norm on 1, 2, 4 workers (equal and unequal shards) vs the "
           "full-batch reference, the natives side by side; data-parallel LeNet-BN with sync vs "
           "local batch norm; timing per world size")
NEEDS_DATA = True
WORLD_SIZES = "1,2,4"
MAX_WORLD = 16
STEP_ROWS = 64  # rows of a batch-norm step's batch, unless --shards says otherwise
SHAPES = {"2-D": (16,), "4-D": (3, 4, 4)}  # a row's shape in each layout
QUICK_SHAPES = ("4-D",)
EPS, DECAY = 1e-5, 0.9
TRAIN_TOLERANCE = 1e-10  # float64 sync training vs full-batch SGD: only summation order differs
DEFAULT_TIMEOUT = 300.0
JOB_FACTOR = 2  # a worker job may take this many --sync-timeout (a collective only one)
FAULT_ENV = "BN_COMPARE_SYNC_FAULT"
FAULTS = ("crash", "hang")
NATIVE = "native"
UNWEIGHTED = ("per-worker moments averaged unweighted (each worker counts 1/W whatever its "
              "rows: Flax BatchNorm(axis_name), MXNet contrib SyncBatchNorm; google/flax#2417)")
EMPTY_NAN = "an empty shard's 0/0 mean makes the statistics NaN"

QUICK = (f"sync: the {', '.join(QUICK_SHAPES)} step only; training as trajectory's "
         f"({trajectory.QUICK_STEPS} steps at batch {trajectory.QUICK_BATCH})")


# -- settings (parent side; pure but for the environment variable) -----------------------------
def parse_world_sizes(text: str) -> list[int]:
    """`--world-sizes` "1,2,4" as sorted ints in 1..MAX_WORLD; ValueError (one line) if not."""
    try:
        sizes = [int(v) for v in str(text).split(",")]
    except ValueError:
        raise ValueError(f"--world-sizes {text}: expected comma-separated integers, e.g. "
                         f"{WORLD_SIZES}") from None
    bad = [w for w in sizes if not 1 <= w <= MAX_WORLD]
    if bad:
        raise ValueError(f"--world-sizes {text}: a world size is 1 to {MAX_WORLD} workers "
                         f"(processes or devices on this machine), got {bad[0]}")
    dup = sorted({w for w in sizes if sizes.count(w) > 1})
    if dup:
        raise ValueError(f"--world-sizes {text}: {dup[0]} given more than once")
    return sorted(sizes)


def parse_shards(text) -> dict[int, list[int]]:
    """`--shards` "40+16+8+0,48+16" as {world size: rows per worker}; ValueError if malformed."""
    out = {}
    for split in filter(None, (text or "").split(",")):
        try:
            sizes = [int(v) for v in split.split("+")]
        except ValueError:
            raise ValueError(f"--shards {text}: expected rows per worker joined by +, e.g. "
                             "40+16+8+0 (several splits comma-separated)") from None
        if any(v < 0 for v in sizes):
            raise ValueError(f"--shards {split}: rows per worker must be >= 0")
        if len(sizes) in out:
            raise ValueError(f"--shards {text}: two splits for {len(sizes)} workers")
        out[len(sizes)] = sizes
    return out


def unequal_sizes(n: int, world: int) -> list[int]:
    """The default unequal split of n rows: the middle workers get n/4, n/8, ... (halving),
    the last none, the first the rest. 64 rows: 48+16 on 2 workers, 40+16+8+0 on 4."""
    if world == 1:
        return [n]
    if world == 2:
        return [n - n // 4, n // 4]
    middle = [(n // 4) >> i for i in range(world - 2)]
    return [n - sum(middle), *middle, 0]


def label(sizes) -> str:
    """"4×16" for equal shards, else "40+16+8+0"."""
    return f"{len(sizes)}×{sizes[0]}" if len(set(sizes)) == 1 else "+".join(map(str, sizes))


def _check_split(sizes, what: str) -> None:
    """The engines' own shard checks (`validate_shards`) on a split, before anything runs."""
    xs = [np.zeros((n, 1)) for n in sizes]
    one = np.ones(1)
    try:
        cs.validate_shards(xs, one, one, one, one, xs, training=True, eps=EPS, decay=DECAY)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


def fault() -> str | None:
    """The fault BN_COMPARE_SYNC_FAULT asks for (None when unset); ValueError if unknown."""
    value = os.environ.get(FAULT_ENV, "")
    if value and value not in FAULTS:
        raise ValueError(f"{FAULT_ENV}={value!r}: expected {' or '.join(FAULTS)} (or unset)")
    return value or None


def settings(s) -> dict:
    """What the report runs, from the command line: world sizes, the steps' shard splits, the
    training runs. ValueError, one line, for anything the engines would refuse."""
    a = s.args
    worlds = parse_world_sizes(a.world_sizes)
    given = parse_shards(a.shards)
    extra = sorted(set(given) - set(worlds))
    if extra:
        raise ValueError(f"--shards {label(given[extra[0]])} is for {extra[0]} workers, but "
                         f"--world-sizes is {a.world_sizes}")
    if not (math.isfinite(a.sync_timeout) and a.sync_timeout > 0):
        raise ValueError(f"--sync-timeout must be a positive number of seconds, got {a.sync_timeout}")
    fault()
    train = trajectory.settings(s)
    rows = train["batch_size"]
    splits, runs = [], []
    for w in worlds:
        n = sum(given[w]) if w in given else STEP_ROWS
        kinds = [("equal", cs.equal_sizes(n, w))]
        if w > 1:
            kinds.append(("unequal", given.get(w) or unequal_sizes(n, w)))
        for kind, sizes in kinds:
            _check_split(sizes, f"--shards {label(given[w])}" if w in given else f"--world-sizes {w}")
            if kind == "equal" or sizes != kinds[0][1]:
                splits.append({"world_size": w, "kind": kind, "sizes": sizes})
        try:
            cs.shard_batches([(np.zeros((rows, 1)), np.zeros(rows))], w, sync=False)
        except ValueError as e:
            raise ValueError(f"--world-sizes {w}: the training batch ({rows} rows): {e}") from None
        runs.append({"world_size": w, "sync": True, "kind": "equal", "sizes": cs.equal_sizes(rows, w)})
        if w > 1:
            uneven = given[w] if sum(given.get(w, [])) == rows else unequal_sizes(rows, w)
            runs += [{"world_size": w, "sync": True, "kind": "unequal", "sizes": uneven},
                     {"world_size": w, "sync": False, "kind": "equal", "sizes": cs.equal_sizes(rows, w)}]
    return {"world_sizes": worlds, "splits": splits, "runs": runs,
            "shapes": list(QUICK_SHAPES if s.quick else SHAPES), "dtypes": list(s.dtypes),
            "steps": train["steps"], "batch_size": rows, "lr": train["lr"], "eps": EPS,
            "decay": DECAY, "timeout": float(a.sync_timeout), "fault": fault()}


def validate(s) -> None:
    """Bad settings end the run before any backend starts: exit 2, one line."""
    from reports.session import UsageError

    try:
        settings(s)
    except ValueError as e:
        raise UsageError(str(e)) from None


def step_cases(cfg: dict, seed: int) -> list[dict]:
    """Every (split, shape, dtype) with seeded inputs of non-zero mean (the merge has work)."""
    out = []
    for split in cfg["splits"]:
        for shape in cfg["shapes"]:
            for dtype in cfg["dtypes"]:
                rows = sum(split["sizes"])
                c = random_case((rows, *SHAPES[shape]), seed=seed * 1000 + len(out),
                                dtype=np.dtype(dtype), mean=3.0, scale=2.0)
                out.append({**split, "shape": shape, "dtype": dtype, **c})
    return out


def child_timeout(cfg: dict, jobs: int) -> float:
    """The backstop for a whole backend process: every job at its limit, plus starting."""
    return 120.0 + (jobs + 2) * JOB_FACTOR * cfg["timeout"]


# -- child side --------------------------------------------------------------------------------
def _fault_job(state, kind: str, target: bool):
    """BN_COMPARE_SYNC_FAULT in a worker process: the target exits with code 3 ("crash") or
    sleeps an hour ("hang"); the other ranks of a torch.distributed engine wait for it in an
    all-reduce, which must time out."""
    if target:
        if kind == "crash":
            os._exit(3)
        time.sleep(3600)
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_initialized():
        dist.all_reduce(sys.modules["torch"].ones(1))
    return kind


def _engine_options(start, timeout: float) -> dict:
    """Timeouts for a SyncGroup: collectives `timeout` (torch.distributed), jobs JOB_FACTOR×."""
    if "job_timeout" in inspect.signature(start).parameters:
        return {"timeout": timeout, "job_timeout": JOB_FACTOR * timeout}
    return {"timeout": JOB_FACTOR * timeout}


def _step(b, group, case) -> dict:
    """Every sync impl on one case. The requested biased running variance first; an impl that
    cannot express it runs its own (labelled); a platform limit keeps the framework's reason."""
    import backends
    from backends.pool import WorkerError
    from reports.child import describe

    xs, dys = cs.split(case["x"], case["sizes"]), cs.split(case["dy"], case["sizes"])
    inputs = {k: case[k] for k in ("gamma", "beta", "running_mean", "running_var")}
    out = {}
    for impl in b.SYNC_IMPLS:
        def step(unbiased):
            return b.sync_bn_step(xs, **inputs, dys=dys, training=True, eps=EPS, decay=DECAY,
                                  unbiased=unbiased, impl=impl, group=group)
        try:
            try:
                out[impl] = {"out": step(False), "unbiased": False}
            except backends.UnsupportedSetting as first:
                try:
                    out[impl] = {"out": step(True), "unbiased": True, "note": str(first)}
                except backends.UnsupportedSetting:
                    raise first from None
        except backends.UnsupportedSetting as e:
            out[impl] = {"unsupported": str(e)}
        except backends.DeviceUnavailable as e:
            out[impl] = {"unavailable": str(e)}
        except WorkerError:
            raise
        except Exception as e:  # noqa: BLE001  one impl's error must not lose the others
            out[impl] = {"error": describe(e)}
    return out


def _train(b, group, run, args) -> dict:
    from backends.pool import WorkerError
    from reports.child import describe

    try:
        r = b.sync_lenet_train(args["params"], list(zip(args["xs"], args["ys"])),
                               world_size=run["world_size"], shard_sizes=run["sizes"],
                               sync=run["sync"], lr=args["lr"], eps=EPS, decay=DECAY,
                               unbiased=False, dtype="float64", group=group)
    except WorkerError:
        raise
    except Exception as e:  # noqa: BLE001
        return {"error": describe(e)}
    return {"losses": [float(v) for v in r["losses"]], "params": r["params"],
            "seconds": float(r["seconds"])}


def task_sync(b, args):
    """Start the backend's engine for the largest world size, run every step case and training
    run on it, close it. A WorkerError (a worker crashed, hung or timed out: the engine is
    gone) ends the task with "failure" saying why; what finished before it is kept."""
    from backends.pool import WorkerError
    from reports.child import describe, progress_line

    say = progress_line(args["backend"])
    out = {"engine": None, "failure": None, "steps": [], "train": []}
    say(f"sync: starting the engine for {args['world']} workers ...")
    start = time.perf_counter()
    try:
        group = b.SyncGroup(args["world"], **_engine_options(b.SyncGroup, args["timeout"]))
    except Exception as e:  # noqa: BLE001
        out["failure"] = f"the engine did not start: {describe(e)}"
        return out
    out["engine"] = {**group.info, "start_s": time.perf_counter() - start}
    try:
        if args.get("fault"):
            say(f"sync: injecting a worker {args['fault']} ({FAULT_ENV})")
            n = group.info["processes"]
            group.run(_fault_job, [(args["fault"], rank == n - 1) for rank in range(n)])
        t = time.perf_counter()
        for i, case in enumerate(args["cases"]):
            if i % 8 == 0:
                say(f"sync: batch-norm steps {i + 1}-{min(i + 8, len(args['cases']))} of "
                    f"{len(args['cases'])} ...")
            out["steps"].append(_step(b, group, case))
        out["engine"]["steps_s"] = time.perf_counter() - t
        t = time.perf_counter()
        for spec in args["runs"]:
            say(f"sync: training on {spec['world_size']} workers, "
                f"{'sync' if spec['sync'] else 'local'} batch norm, {label(spec['sizes'])} ...")
            out["train"].append(_train(b, group, spec, args))
        out["engine"]["training_s"] = time.perf_counter() - t
    except WorkerError as e:
        out["failure"] = str(e)
    finally:
        group.close()
    return out


TASKS = {"sync": task_sync}


# -- parent side: verdicts (pure) --------------------------------------------------------------
def _out_dtype_problem(out, dtype) -> str | None:
    for k in RESULT_KEYS:
        for a in (out[k] if k in cs.SHARDED_KEYS else [out[k]]):
            if np.asarray(a).dtype != np.dtype(dtype):
                return f"{k} is {np.asarray(a).dtype}, not {dtype}"
    return None


def check_step(impl: str, case: dict, res: dict) -> dict:
    """One impl's result on one case, against the full-batch reference (and, for a native that
    departs from it, the unweighted convention). Returns {"status": pass | fail | convention |
    unsupported | unavailable | error, "errors", "worst", ...}; "failure" is set when it
    counts against the run. NaN-safe: a NaN error is never within a tolerance."""
    native = impl == NATIVE
    if "out" not in res:
        for status in ("unsupported", "unavailable", "error"):
            if status in res:
                row = {"status": status, "message": res[status]}
                if status == "error" or not native:
                    row["failure"] = f"{status}: {res[status]}"
                return row
        return {"status": "error", "message": f"no result: {sorted(res)}",
                "failure": "no result"}
    inputs = dict(xs=cs.split(case["x"], case["sizes"]), dys=cs.split(case["dy"], case["sizes"]),
                  **{k: case[k] for k in ("gamma", "beta", "running_mean", "running_var")})
    tol = cs.TOLERANCE[case["dtype"]]
    try:
        errs = cs.errors(res["out"], cs.reference_step(**inputs, training=True, eps=EPS,
                                                       decay=DECAY, unbiased=res["unbiased"]))
    except (KeyError, TypeError, ValueError) as e:
        return {"status": "fail", "message": f"malformed result: {type(e).__name__}: {e}",
                "failure": "malformed result"}
    row = {"errors": errs, "worst": worst(errs.values()), "tolerance": tol,
           "unbiased": res["unbiased"]}
    if res.get("note"):
        row["note"] = "its own unbiased running variance: " + res["note"]
    dtype_problem = _out_dtype_problem(res["out"], case["dtype"])
    if dtype_problem:
        return {**row, "status": "fail", "message": dtype_problem, "failure": dtype_problem}
    if within(row["worst"], tol):
        return {**row, "status": "pass"}
    if native and not res["unbiased"]:
        model = cs.model_errors(res["out"], cs.unweighted_reference_step(**inputs, eps=EPS,
                                                                         decay=DECAY))
        row.update(model_errors=model, model_worst=worst(model.values()))
        if within(row["model_worst"], tol):
            empty = 0 in case["sizes"]
            return {**row, "status": "convention",
                    "convention": UNWEIGHTED + (f"; {EMPTY_NAN}" if empty else "")}
    bad = max(errs, key=lambda k: math.inf if errs[k] != errs[k] else errs[k])  # NaN first
    why = f"{bad} {render.fmt(errs[bad])} > {tol:g}"
    return {**row, "status": "fail", "message": why, "failure": why}


def check_steps(name: str, cases: list[dict], results: list[dict]) -> tuple[list[dict], list[str]]:
    """Rows (one per case × impl) and failures for one backend; cases without a result (the
    engine failed before them) get no row: the engine's failure says why."""
    rows, failures = [], []
    for case, per_impl in zip(cases, results):
        for impl, res in per_impl.items():
            row = {"backend": name, "impl": impl, "world_size": case["world_size"],
                   "kind": case["kind"], "sizes": case["sizes"], "shape": case["shape"],
                   "dtype": case["dtype"], **check_step(impl, case, res)}
            rows.append(row)
            if "failure" in row:
                failures.append(f"{name}/{impl} {case['dtype']} {case['shape']} "
                                f"{label(case['sizes'])}: {row['failure'][:160]}")
    return rows, failures


def check_training(name: str, runs: list[dict], results: list[dict], ref: dict
                   ) -> tuple[list[dict], list[str]]:
    """Each data-parallel run against the single-process float64 reference `ref`: |Δloss| per
    step and the largest parameter error relative to max(1, |ref|). Sync batch norm must be
    within TRAIN_TOLERANCE; local batch norm only finite (its drift is the finding)."""
    rows, failures = [], []
    for run, res in zip(runs, results):
        row = {"backend": name, **run}
        problems = []
        if "error" in res:
            problems.append(res["error"])
        else:
            losses = list(res.get("losses") or [])
            if len(losses) != len(ref["losses"]):
                problems.append(f"{len(losses)} losses for {len(ref['losses'])} steps")
            drift = [abs(float(a) - b) for a, b in zip(losses, ref["losses"])]
            params = res.get("params") or {}
            problems += lenet.param_problems(params)
            param_err = (worst(error(params[k], ref["params"][k])[1] for k in ref["params"])
                         if not lenet.param_problems(params, finite=False) else math.nan)
            steps = max(len(losses), 1)
            row.update(loss_drift=drift, max_loss_drift=worst(drift), param_error=param_err,
                       ms_per_step=1e3 * float(res.get("seconds", math.nan)) / steps)
            if not all(math.isfinite(v) for v in losses):
                problems.append("a loss is not finite")
            elif run["sync"] and not within(worst([row["max_loss_drift"], param_err]),
                                            TRAIN_TOLERANCE):
                problems.append(f"departs from full-batch training: max |Δloss| "
                                f"{render.fmt(row['max_loss_drift'])}, parameters "
                                f"{render.fmt(param_err)} > {TRAIN_TOLERANCE:g}")
        row["pass"] = not problems
        row["problems"] = problems
        rows.append(row)
        if problems:
            mode = "sync" if run["sync"] else "local"
            failures.append(f"{name} training W={run['world_size']} {mode} {label(run['sizes'])}: "
                            f"{'; '.join(problems)[:160]}")
    return rows, failures


def timing(train_rows: list[dict]) -> list[dict]:
    """Per backend × world size: ms per training step with sync and with local batch norm
    (equal shards; the engines' own seconds, communication included)."""
    out = {}
    for r in train_rows:
        if r["kind"] != "equal" or "ms_per_step" not in r:
            continue
        entry = out.setdefault((r["backend"], r["world_size"]),
                               {"backend": r["backend"], "world_size": r["world_size"]})
        entry["sync_ms" if r["sync"] else "local_ms"] = r["ms_per_step"]
    return list(out.values())


# -- parent side: running and rendering --------------------------------------------------------
def run(s) -> Section:
    cfg = settings(s)
    cases = step_cases(cfg, s.args.seed)
    xs, ys = trajectory.batches(s.data_dir, cfg["steps"], cfg["batch_size"], "float64",
                                s.args.seed)
    params = lenet.init_params(s.args.seed)
    s.log(f"sync: float64 full-batch reference training, {cfg['steps']} steps ...")
    ref = lenet_reference.train(params, list(zip(xs, ys)), lr=cfg["lr"], eps=EPS, decay=DECAY,
                                unbiased=False)
    args = {"world": max(cfg["world_sizes"]), "timeout": cfg["timeout"], "fault": cfg["fault"],
            "cases": cases, "runs": cfg["runs"], "params": params, "xs": xs, "ys": ys,
            "lr": cfg["lr"]}
    limit = child_timeout(cfg, len(cases) * 2 + len(cfg["runs"]) + 1)
    engines, step_rows, train_rows, failures = {}, [], [], []
    for name in s.live():
        s.log(f"[{name}] sync: {len(cases)} step cases, {len(cfg['runs'])} training runs on up "
              f"to {args['world']} workers ...")
        r = s.call(name, "sync.sync", args, timeout=limit)
        if "result" not in r:  # the session's policy counts the crash
            engines[name] = {"failure": r.get("failed") or r.get("unavailable")}
            continue
        res = r["result"]
        engines[name] = {**(res["engine"] or {}), "failure": res["failure"],
                         "step_cases_run": f"{len(res['steps'])}/{len(cases)}",
                         "training_runs_run": f"{len(res['train'])}/{len(cfg['runs'])}"}
        if res["failure"]:
            failures.append(f"{name}: the sync engine failed: {res['failure'][:200]}")
        rows, f = check_steps(name, cases, res["steps"])
        step_rows += rows
        failures += f
        rows, f = check_training(name, cfg["runs"], res["train"], ref)
        train_rows += rows
        failures += f
    payload = {"config": {k: v for k, v in cfg.items() if k != "runs"},
               "tolerance": {"step": cs.TOLERANCE, "training": TRAIN_TOLERANCE},
               "engines": engines, "steps": step_rows, "training": train_rows,
               "timing": timing(train_rows), "reference_losses": ref["losses"]}
    plots = []
    largest = max(cfg["world_sizes"])
    curves = {f"{r['backend']} W={r['world_size']} {'sync' if r['sync'] else 'local'} BN":
              r["loss_drift"] for r in train_rows if "loss_drift" in r and r["kind"] == "equal"
              and r["world_size"] > 1 and (not r["sync"] or r["world_size"] == largest)}
    if curves and not s.args.no_plots:
        path = render.plot_log_curves(curves, s.plot_path("sync_drift.png"), xlabel="SGD step",
                                      ylabel="|loss − full-batch loss|",
                                      title="Data-parallel LeNet-BN vs full-batch SGD (float64; "
                                            "0 drawn at 1e-18)")
        if path:
            payload["plot"] = pathlib.Path(path).name
            plots.append(payload["plot"])
    return Section(payload, markdown(payload, s.missing_rows), failures, plots)


def _cell(rows: list[dict]) -> str:
    """One matrix cell: the worst error over the shapes, with the worst status among them."""
    if not rows:
        return ""
    statuses = {r["status"] for r in rows}
    for status in ("fail", "error"):
        if status in statuses:
            shown = [r["worst"] for r in rows if r["status"] == status and "worst" in r]
            return (f"{render.fmt(worst(shown))} {render.FAIL}" if shown else f"{status} {render.FAIL}")
    measured = [r["worst"] for r in rows if "worst" in r]
    if "convention" in statuses:
        return f"{render.fmt(worst(measured))} (convention)"
    if measured:
        return f"{render.fmt(worst(measured))} {render.PASS}"
    return "/".join(sorted(statuses))


def _devices(devices) -> str:
    devices = [str(d) for d in devices or []]
    if devices and len(set(devices)) == 1:
        return f"{len(devices)} × {devices[0]}"
    return ", ".join(devices[:4]) + (f", … ({len(devices)})" if len(devices) > 4 else "")


def markdown(p: dict, missing_rows) -> str:
    cfg, tol = p["config"], p["tolerance"]
    md = ["## Sync: synchronized batch norm across workers", "",
          f"Each backend's engine runs {max(cfg['world_sizes'])} workers (smaller world sizes "
          "use the first ones). **Steps:** one training step of every backend × impl on "
          f"{', '.join(map(str, cfg['world_sizes']))} workers, equal and unequal shards, "
          f"{', '.join(cfg['shapes'])}, {', '.join(cfg['dtypes'])}, against the float64 "
          "reference on the whole batch (`common.sync.reference_step`): y, dx, dgamma, dbeta, "
          "running mean and variance; each cell is the worst error relative to max(1, |ref|) "
          "over the quantities" + (" and shapes" if len(cfg["shapes"]) > 1 else "")
          + f", {render.PASS} within {tol['step']['float64']:g} (float64) / "
          f"{tol['step']['float32']:g} (float32). A native that departs from it is checked "
          "against the unweighted convention (per-worker moments averaged with weight 1/W, "
          "`common.sync.unweighted_reference_step`): a match is shown as (convention), not a "
          "failure. **Training:** data-parallel LeNet-BN, gradients all-reduced, "
          f"{cfg['steps']} SGD steps (lr {cfg['lr']}, batch {cfg['batch_size']}, float64) on "
          "Fashion-MNIST, against single-process full-batch SGD (`common.lenet_reference`); "
          f"synchronized batch norm must match within {tol['training']:g}, local batch norm "
          "shows its drift (verdict: finite). Timing: the engines' training loop after "
          "compilation, communication included. Collectives time out after "
          f"{cfg['timeout']:g} s, worker jobs after {JOB_FACTOR * cfg['timeout']:g} s.", ""]
    engine_rows = []
    for name, e in p["engines"].items():
        status = render.PASS
        if e.get("failure"):
            ran = (f" (ran {e['step_cases_run']} step cases, {e['training_runs_run']} training "
                   "runs; the rest were not run)" if "step_cases_run" in e else "")
            status = f"{render.FAIL} {e['failure']}{ran}"
        engine_rows.append([name, e.get("engine", "—"), e.get("processes", "—"),
                            _devices(e.get("devices")), e.get("start_s"), status])
    engine_rows += missing_rows(6)
    md += ["**Engines** (the device each engine used):", "",
           render.md_table(["backend", "engine", "processes", "devices", "start s", "status"],
                           engine_rows), ""]

    columns = list(dict.fromkeys((r["world_size"], label(r["sizes"])) for r in p["steps"]))
    by = collections.defaultdict(list)
    for r in p["steps"]:
        by[(r["backend"], r["impl"], r["dtype"]), (r["world_size"], label(r["sizes"]))].append(r)
    runs = list(dict.fromkeys(k for k, _ in by))
    if runs:
        md += ["**Batch-norm step vs the full-batch reference** (worst relative error):", "",
               render.md_table(["run", "dtype", *[f"W={w}: {lab}" for w, lab in columns]],
                               [[f"{n}/{i}", dt, *[_cell(by.get(((n, i, dt), c), []))
                                                   for c in columns]] for n, i, dt in runs]), ""]
    conv = [r for r in p["steps"] if r["status"] == "convention"]
    if conv:
        md += ["**The natives' convention, measured** (error against the full-batch reference "
               "per quantity; last column: against the unweighted model):", "",
               render.md_table(["run", "dtype", "shards", "shape", *RESULT_KEYS, "unweighted model"],
                               [[f"{r['backend']}/{r['impl']}", r["dtype"], label(r["sizes"]),
                                 r["shape"], *[r["errors"][k] for k in RESULT_KEYS],
                                 f"{render.fmt(r['model_worst'])} {render.PASS}"] for r in conv]),
               "", f"Convention: {UNWEIGHTED}. Where a shard is empty, {EMPTY_NAN} (the model "
               "predicts the same NaNs; the finite values are compared).", ""]
    notes = dict.fromkeys((f"{r['backend']}/{r['impl']}", r["status"], r["message"])
                          for r in p["steps"] if r["status"] in ("unsupported", "unavailable", "error"))
    if notes:
        md += ["**Not measured**, with the framework's own reason (a platform limit of a native "
               "is not a failure; an error is):", ""]
        md += [f"- {run_} {status}: {message}" for run_, status, message in notes] + [""]

    if p["training"]:
        rows = []
        for r in p["training"]:
            verdict = (render.PASS if r["pass"] else f"{render.FAIL} {'; '.join(r['problems'])}")
            if r["pass"] and not r["sync"]:
                verdict = "finite (drift shown)"
            rows.append([r["backend"], r["world_size"], "sync" if r["sync"] else "local",
                         label(r["sizes"]), r.get("max_loss_drift"), r.get("param_error"),
                         verdict, r.get("ms_per_step")])
        md += ["**Data-parallel LeNet-BN vs single-process full-batch training** (float64):", "",
               render.md_table(["backend", "W", "batch norm", "shards", "max |Δloss|",
                                "max param error", "verdict", "ms/step"], rows), ""]
    if p["timing"]:
        worlds = sorted({t["world_size"] for t in p["timing"]})
        per = {(t["backend"], t["world_size"]): t for t in p["timing"]}
        names = list(dict.fromkeys(t["backend"] for t in p["timing"]))
        md += ["**Timing per world size**, ms per training step, sync / local batch norm "
               "(equal shards; communication included):", "",
               render.md_table(["backend", *[f"W={w}" for w in worlds]],
                               [[n, *[_ms(per.get((n, w), {})) for w in worlds]] for n in names]), ""]
    if p.get("plot"):
        md.append(f"![sync drift]({p['plot']})\n")
    return "\n".join(md)


def _ms(t: dict) -> str:
    sync, local = t.get("sync_ms"), t.get("local_ms")
    return " / ".join(render.fmt(v) for v in (sync, local) if v is not None)
