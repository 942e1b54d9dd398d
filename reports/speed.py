"""speed: training-step throughput of every backend × impl × device, scratch/native ratio."""
from __future__ import annotations

import math

import reports
from reports import Section, render
from reports.train import allocator_note, unsupported

SUMMARY = "training-step throughput of every backend × impl × device, scratch/native ratio"
NEEDS_DATA = False
QUICK_STEPS, STEPS = 10, 50  # timed steps per run
QUICK_REPEATS, REPEATS = 3, 5
QUICK = (f"speed: {QUICK_REPEATS} timed runs of {QUICK_STEPS} steps per timer (else {REPEATS} of "
         f"{STEPS})")

NOISY_SPREAD = 0.25  # (max − min) / median of a row's timed runs above this: marked noisy
SOURCE_PREFIX = "source-"  # timers of the sources' own training loop (backends' source.py)


# -- child side --------------------------------------------------------------------------------
def task_speed(b, args):
    """Every impl's timer, and the two source-style baselines' (`source_timer`), first (build,
    compile, warm up), then the timed runs round-robin:
    run r of every impl before run r + 1 of any, so a slow spell of the machine hits every impl
    alike and the scratch/native ratio compares like with like. An impl that fails keeps its
    error; the others go on."""
    import backends
    from reports.child import per_impl, progress_line

    say = progress_line(args["backend"])

    def make(impl):
        progress_line(args["backend"], impl)(f"compiling and warming up on {args['device']} ...")
        source = impl.startswith(SOURCE_PREFIX)
        timer = b.source_timer if source else b.speed_timer
        return timer(impl=impl[len(SOURCE_PREFIX):] if source else impl, device=args["device"],
                     batch_size=args["batch_size"], dtype=args["dtype"], steps=args["steps"])

    sources = [SOURCE_PREFIX + i for i in ("scratch", "native")] if hasattr(b, "source_timer") else []
    out = per_impl([*b.IMPLS, *sources], make)
    timers = {impl: t for impl, t in out.items() if not isinstance(t, dict)}
    runs = {impl: [] for impl in timers}
    for r in range(args["repeats"]):
        say(f"timed round {r + 1}/{args['repeats']}: {', '.join(timers)}")
        for impl, result in per_impl(list(timers), lambda impl: timers[impl].run()).items():
            if "error" in result:
                out[impl] = result
                del timers[impl]
            else:
                runs[impl].append(result)
    for impl, timer in timers.items():
        out[impl] = backends.speed_result(timer.info, runs[impl])
        out[impl]["interleaved"] = True
    return out


TASKS = {"speed": task_speed}


# -- parent side -------------------------------------------------------------------------------
def spread(r: dict) -> float:
    """(max − min) / median of a row's timed runs (NaN-safe: NaN when not finite)."""
    runs = r.get("runs") or [r["examples_per_s"]]
    lo, hi, mid = min(runs), max(runs), r["examples_per_s"]
    return (hi - lo) / mid if mid > 0 and math.isfinite(hi - lo) else float("nan")


def rows_of(runs: dict) -> tuple[list[dict], list[str]]:
    """One row per timer: throughput, spread, noisy flag, the ratio to native (step time) and to
    the source-style baselines measured in the same run, in the same process. Pure."""
    rows, failures = [], []
    for key, r in runs.items():
        name, _, impl = key.partition("/")
        if "error" in r:
            if not unsupported(r):
                failures.append(f"{key}: {r['error'][:160]}")
            rows.append({"run": key, "error": r["error"], "unsupported": unsupported(r)})
            continue
        eps = r["examples_per_s"]
        if not (math.isfinite(eps) and eps > 0):
            failures.append(f"{key}: examples/s {eps}")
        sp = spread(r)
        row = {"run": key, "device": r["device"], "path": r.get("path", ""), "examples_per_s": eps,
               "min": min(r.get("runs") or [eps]), "max": max(r.get("runs") or [eps]),
               "spread": sp, "noisy": not reports.within(sp, NOISY_SPREAD),
               "compile_s": r.get("compile_s"), "eager_examples_per_s": r.get("eager_examples_per_s")}

        def ratio(other_key, field="examples_per_s", mine=eps):
            other = runs.get(f"{name}/{other_key}", {})
            return other[field] / mine if mine and other.get(field) and "error" not in other else None

        if not impl.startswith(SOURCE_PREFIX):
            row["step_time_vs_native"] = ratio("native")
            eager = row["eager_examples_per_s"]
            row["eager_step_time_vs_native"] = ratio("native", "eager_examples_per_s", eager) if eager else None
            src = {k: runs.get(f"{name}/{SOURCE_PREFIX}{k}", {}) for k in ("native", "scratch")}
            row["x_source_native"] = (eps / src["native"]["examples_per_s"]
                                      if src["native"].get("examples_per_s") else None)
            row["x_source_scratch"] = (eps / src["scratch"]["examples_per_s"]
                                       if impl.startswith("scratch") and src["scratch"].get("examples_per_s")
                                       else None)
        rows.append(row)
    return rows, failures


def run(s) -> Section:
    cfg = dict(device=s.args.device, batch_size=s.args.batch_size, dtype=s.args.dtype or "float32",
               steps=QUICK_STEPS if s.quick else STEPS,
               repeats=QUICK_REPEATS if s.quick else REPEATS)
    runs = s.per_impl("speed.speed", cfg, f"speed on {cfg['device']}")
    rows, failures = rows_of(runs)
    table = []
    for r in rows:
        if "error" in r:
            why = "unsupported: " if r.get("unsupported") else "error: "
            table.append([r["run"], "", why + r["error"]] + [""] * 9)
            continue
        noisy = " (noisy)" if r["noisy"] else ""
        table.append([r["run"], r["device"], r["path"], round(r["examples_per_s"]),
                      f"{r['min']:,.0f}–{r['max']:,.0f} ({render.fmt(100 * r['spread'], 2)}%)" + noisy,
                      r["compile_s"], _ratio(r.get("step_time_vs_native"), noisy),
                      round(r["eager_examples_per_s"]) if r["eager_examples_per_s"] else None,
                      _ratio(r.get("eager_step_time_vs_native"), noisy),
                      _ratio(r.get("x_source_native"), noisy), _ratio(r.get("x_source_scratch"), noisy)])
    table += s.missing_rows(11)
    md = ["## Speed: training-step throughput", "",
          f"Batch {cfg['batch_size']}, {cfg['dtype']}, device `{cfg['device']}`; median of {cfg['repeats']} "
          f"timed runs of {cfg['steps']} steps after warm-up, with device synchronisation. Each backend "
          "runs in its own process; its timers are built, compiled and warmed up first and then timed "
          "round-robin (run r of every timer before run r + 1 of any), so a slow spell of the machine "
          "hits them alike. Memory: " + allocator_note(s) + ". "
          "step time / native: the ratio measured in this run (1.0 = as fast as native); the eager "
          "columns time the uncompiled path where the fast one is compiled (PyTorch on CUDA). "
          "`source-*` rows train the way the sources do (backends' `source.py`: the textbook model "
          "with the source's from-scratch layer or the native one, a host→device copy, the source's "
          "step and a loss read-back per batch); × source native / × source scratch are this run's "
          "throughput over theirs. spread: min–max of the timed runs; a row whose spread exceeds "
          f"{NOISY_SPREAD:.0%} of its median is marked noisy and its ratios are not to be trusted.", "",
          render.md_table(["run", "device", "path", "examples/s", "spread of runs", "compile s",
                           "step time / native", "eager examples/s", "eager step time / native",
                           "× source native", "× source scratch"], table)]
    return Section({"config": cfg, "runs": runs, "rows": rows, "noisy_spread": NOISY_SPREAD},
                   "\n".join(md), failures)


def _ratio(v, noisy: str) -> str:
    return "—" if v is None else render.fmt(v) + noisy
