"""speed: training-step throughput of every backend × impl × device, scratch/native ratio."""
from __future__ import annotations

import math

from reports import Section, render
from reports.train import allocator_note, unsupported

SUMMARY = "training-step throughput of every backend × impl × device, scratch/native ratio"
NEEDS_DATA = False
STEPS = 50
QUICK_REPEATS, REPEATS = 3, 5

SOURCE_BASELINES = {  # examples/s of the sources' own code on the 2-core CPU, batch 256 (measured by the
    # project before this suite existed; the speed issue records them)
    "torch": {"scratch": 5.9e3, "native": 9.2e3},
    "mxnet": {"scratch": 0.8e3, "native": 4.5e3},
    "jax": {"native": 6.2e3},
}

QUICK = f"speed: {QUICK_REPEATS} timed runs per impl (else {REPEATS})"

# -- child side --------------------------------------------------------------------------------
def task_speed(b, args):
    """Every impl's timer first (build, compile, warm up), then the timed runs round-robin:
    run r of every impl before run r + 1 of any, so a slow spell of the machine hits every impl
    alike and the scratch/native ratio compares like with like. An impl that fails keeps its
    error; the others go on."""
    import backends
    from reports.child import per_impl, progress_line

    say = progress_line(args["backend"])

    def make(impl):
        progress_line(args["backend"], impl)(f"compiling and warming up on {args['device']} ...")
        return b.speed_timer(impl=impl, device=args["device"], batch_size=args["batch_size"],
                             dtype=args["dtype"], steps=args["steps"])

    out = per_impl(b.IMPLS, make)
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
def run(s) -> Section:
    cfg = dict(device=s.args.device, batch_size=s.args.batch_size, dtype=s.args.dtype or "float32",
               steps=STEPS, repeats=QUICK_REPEATS if s.quick else REPEATS)
    runs = s.per_impl("speed.speed", cfg, f"speed on {cfg['device']}")
    rows, failures = [], []
    for key, r in runs.items():
        name, _, impl = key.partition("/")
        if "error" in r:
            if not unsupported(r):
                failures.append(f"{key}: {r['error'][:160]}")
            rows.append([key, "", ("unsupported: " if unsupported(r) else "error: ") + r["error"],
                         "", "", "", "", "", "", ""])
            continue
        if not (r["examples_per_s"] > 0 and math.isfinite(r["examples_per_s"])):
            failures.append(f"{key}: examples/s {r['examples_per_s']}")
        native = runs.get(f"{name}/native", {})
        ratio = native["examples_per_s"] / r["examples_per_s"] if "examples_per_s" in native else None
        cpu = r["device"].startswith("cpu")
        base = SOURCE_BASELINES.get(name, {})
        vs_native = r["examples_per_s"] / base["native"] if cpu and "native" in base else None
        vs_scratch = (r["examples_per_s"] / base["scratch"]
                      if cpu and impl.startswith("scratch") and "scratch" in base else None)
        eager = r.get("eager_examples_per_s")
        eager_ratio = (native["eager_examples_per_s"] / eager
                       if eager and native.get("eager_examples_per_s") else None)
        rows.append([key, r["device"], r.get("path", ""), round(r["examples_per_s"]), r.get("compile_s"),
                     ratio, round(eager) if eager else None, eager_ratio, vs_native, vs_scratch])
    rows += s.missing_rows(10)
    md = ["## Speed: training-step throughput", "",
          f"Batch {cfg['batch_size']}, {cfg['dtype']}, device `{cfg['device']}`; median of {cfg['repeats']} "
          f"timed runs of {cfg['steps']} steps after warm-up, with device synchronisation. Each backend "
          "runs in its own process; its impls are compiled and warmed up first and then timed "
          "round-robin (run r of every impl before run r + 1 of any), so a slow spell of the machine "
          "hits them alike. Memory: " + allocator_note(s) + ". "
          "step time / native is the ratio measured in this run (1.0 = as fast as native); the eager "
          "columns time the uncompiled path where the fast one is compiled (PyTorch on CUDA). "
          "× source native / × source scratch: speed over the seeds' own code measured on the 2-core CPU "
          "(PyTorch 9.2k / 5.9k, MXNet 4.5k / 0.8k, Flax native 6.2k examples/s; CPU rows only).", "",
          render.md_table(["run", "device", "path", "examples/s", "compile s", "step time / native",
                           "eager examples/s", "eager step time / native", "× source native",
                           "× source scratch"], rows)]
    return Section({"config": cfg, "runs": runs, "source_baselines": SOURCE_BASELINES},
                   "\n".join(md), failures)
