"""precision: batch norm and LeNet-BN in float16 and bfloat16, every backend × impl, against the
float64 reference.

Four parts, all from one child process per backend:
- which dtypes each framework could run on the device (an `UnsupportedSetting` is a framework's
  stated limitation, listed with its reason, never a failure);
- `bn_step` on float16/bfloat16 inputs of several scales (unit, a large mean where statistics in
  the input dtype break, a large spread whose squares overflow float16), with the framework's
  mixed-precision idiom (`accumulate="float32"`) and with statistics in the input dtype
  (`accumulate="input"`, shown to lose), against `common.reference.bn_step` on the same values
  widened to float64, with the tolerance `common.precision.tolerance` derives from the dtype's
  epsilon;
- the precision each layer really uses (`precision_probe`: the dtypes of its output, gradients
  and running statistics as produced and kept, and its statistics' precision measured from the
  output's error on a large-mean input);
- LeNet-BN: a trajectory from identical parameters on identical batches, and a short training
  run, in each precision next to float32 (float16 with and without loss scaling).
"""
from __future__ import annotations

import math

import numpy as np

from common import dtypes, lenet, precision
from common.reference import RESULT_KEYS, bn_step, error, random_case
from reports import QUICK_TRAIN_LIMIT, Section, render, train, trajectory, within, worst

SUMMARY = ("float16/bfloat16: batch norm of every backend × impl vs the float64 reference at "
           "several scales (idiom vs statistics in the input dtype), the precision each layer "
           "really uses, LeNet-BN trajectory and training per precision next to float32")
NEEDS_DATA = True

SHAPE = (16, 6, 8, 8)  # m = 1024 values per channel
WIDE_STD = 100.0  # |x| up to ~400: x² overflows float16 (65504) beyond |x| = 256


def scales(dtype) -> dict:
    """Input scales of the bn_step cases: label -> (mean, std)."""
    return {"unit": (0.0, 1.0), "large mean": (precision.large_mean(dtype), 1.0),
            "wide": (0.0, WIDE_STD)}


# (label, dtype, loss_scale): None is the dtype's default (common.dtypes.loss_scale)
TRAJECTORY_RUNS = (("float32", "float32", None), ("bfloat16", "bfloat16", None),
                   ("float16", "float16", None), ("float16, no loss scaling", "float16", 1.0))
TRAIN_DTYPES = ("float32", "bfloat16", "float16")
FORWARD_LAYERS = 9  # LeNet-BN: 2 conv, 4 BN, 3 dense layers, each rounding its output once
STEPS, QUICK_STEPS, QUICK_BATCH = 20, 3, 64
EPOCHS, QUICK_EPOCHS, QUICK_TRAIN, QUICK_TEST = 5, 2, 512, 256

QUICK = (f"precision: bn_step cases as in a full run; LeNet-BN trajectory ({QUICK_STEPS} steps, "
         f"batch {QUICK_BATCH}, float16 only with loss scaling) and training ({QUICK_EPOCHS} "
         f"epochs on {QUICK_TRAIN:,} images) for the native impls only")


# -- child side --------------------------------------------------------------------------------
def _numbers(out: dict) -> dict:
    """An impl's arrays as float64 (bfloat16 does not survive an .npz) with their dtype names."""
    return {"values": {k: np.asarray(v).astype(np.float64) for k, v in out.items()},
            "dtypes": {k: np.asarray(v).dtype.name for k, v in out.items()}}


def task_run(b, args):
    """Every part of the report for one backend: per impl, the bn_step cases with both
    accumulation settings, the precision probes, the LeNet-BN trajectories and training runs."""
    import traceback

    import backends
    from common import data
    from reports.child import describe, exact_numerics, progress_line

    exact_numerics(b)
    device = args["device"]
    conventions = b.conventions()

    def attempt(fn):
        try:
            return {"result": fn()}
        except backends.UnsupportedSetting as e:
            return {"unsupported": str(e)}
        except Exception as e:  # one combination's crash must not lose the others
            return {"error": describe(e), "traceback": traceback.format_exc(limit=6)}

    def bn_part(impl):
        unbiased = conventions[impl]["running_var"] == "unbiased"
        cases = []
        for case in args["cases"]:
            inputs = {k: dtypes.cast(v, case["dtype"]) for k, v in case["inputs"].items()}
            for acc in dtypes.ACCUMULATE:
                r = attempt(lambda: _numbers(b.bn_step(
                    **inputs, training=True, unbiased=unbiased, impl=impl, accumulate=acc,
                    device=device)))
                cases.append({"case": case["label"], "dtype": case["dtype"], "accumulate": acc,
                              **r})
        probes = [{"dtype": dt, "accumulate": acc,
                   **attempt(lambda: b.precision_probe(impl, dt, accumulate=acc, device=device))}
                  for dt in args["dtypes"] for acc in dtypes.ACCUMULATE]
        return {"unbiased": unbiased, "cases": cases, "probes": probes}

    out = {}
    for impl in b.IMPLS:
        progress_line(args["backend"], impl)("bn_step cases and precision probes")
        out[impl] = bn_part(impl)

    batches = list(zip(args["xs"], args["ys"]))
    for impl in args["lenet_impls"] or b.IMPLS:
        say = progress_line(args["backend"], impl)
        runs = {}
        for label, dt, scale in args["trajectory_runs"]:
            say(f"trajectory: {len(batches)} steps, {label}")
            r = attempt(lambda: b.lenet_train(args["params"], batches, lr=args["lr"], impl=impl,
                                              decay=0.9, unbiased=None, dtype=dt, device=device,
                                              loss_scale=scale))
            if "result" in r:
                r["result"] = {"losses": [float(v) for v in r["result"]["losses"]],
                               "params": {k: np.asarray(v, np.float64)
                                          for k, v in r["result"]["params"].items()},
                               "precision": r["result"].get("precision")}
            runs[label] = r
        out.setdefault(impl, {})["trajectory"] = runs

    ds = data.load_dataset(args["data"], limit_train=args["limit_train"],
                           limit_test=args["limit_test"], download=False)
    for impl in args["lenet_impls"] or b.IMPLS:
        say = progress_line(args["backend"], impl)
        out[impl]["train"] = {dt: attempt(lambda: b.fit(
            ds, impl=impl, epochs=args["epochs"], batch_size=args["batch_size"], lr=args["lr"],
            seed=args["seed"], device=device, dtype=dt, progress=say))
            for dt in TRAIN_DTYPES}
    return out


TASKS = {"run": task_run}


# -- parent side -------------------------------------------------------------------------------
def low_dtypes(s) -> list[str]:
    """float16 and bfloat16, or the one --dtype names."""
    return [s.args.dtype] if s.args.dtype in dtypes.LOW else list(dtypes.LOW)


def cases(seed: int, low) -> list[dict]:
    """Seeded bn_step inputs per dtype and scale, rounded to the dtype and sent as float64."""
    out = []
    for i, dt in enumerate(low):
        for j, (label, (mean, std)) in enumerate(scales(dt).items()):
            inputs = random_case(SHAPE, seed=seed * 100 + 10 * i + j, mean=mean, scale=std,
                                 dtype=dtypes.float_dtype(dt))
            out.append({"label": label, "dtype": dt, "mean": mean, "std": std,
                        "inputs": {k: v.astype(np.float64) for k, v in inputs.items()}})
    return out


def check_case(case: dict, res: dict, unbiased: bool) -> dict:
    """One bn_step result against the reference on the same (widened) inputs: the error of
    every quantity relative to max(1, max |ref|), the tolerance, the dtypes, and the verdict."""
    ref = bn_step(**case["inputs"], training=True, unbiased=unbiased)
    tol = precision.tolerance(case["dtype"], case["inputs"]["x"])
    got = res["result"]
    errors = {k: error(got["values"][k], ref[k])[1] for k in RESULT_KEYS}
    bad_dtype = [k for k in ("y", "dx") if got["dtypes"][k] != case["dtype"]]
    worst_key = max(errors, key=lambda k: errors[k] if errors[k] == errors[k] else math.inf)
    ok = all(within(e, tol) for e in errors.values()) and not bad_dtype
    return {"errors": errors, "tolerance": tol, "dtypes": got["dtypes"], "worst": worst_key,
            "worst_error": worst(errors.values()), "wrong_dtype": bad_dtype, "pass": ok}


def check_bn(name: str, impl: str, part: dict, all_cases: list[dict]) -> tuple[list, list]:
    """Rows (one per case × accumulate) and failures of one impl's bn_step results: the idiom
    (accumulate="float32") must pass every case; statistics in the input dtype must lose on the
    large-mean case (else the switch has no effect); a crash fails; a refusal is listed."""
    by_case = {(c["label"], c["dtype"]): c for c in all_cases}
    rows, failures = [], []
    for r in part["cases"]:
        row = {"backend": name, "impl": impl, "case": r["case"], "dtype": r["dtype"],
               "accumulate": r["accumulate"]}
        if "unsupported" in r or "error" in r:
            row.update({k: r[k] for k in ("unsupported", "error") if k in r})
            if "error" in r:
                failures.append(f"{name}/{impl} {r['dtype']} {r['case']} accumulate="
                                f"{r['accumulate']}: {r['error'][:160]}")
            rows.append(row)
            continue
        row.update(check_case(by_case[(r["case"], r["dtype"])], r, part["unbiased"]))
        if row["wrong_dtype"]:
            failures.append(f"{name}/{impl} {r['dtype']} {r['case']}: {', '.join(row['wrong_dtype'])} "
                            f"not returned in {r['dtype']}")
        elif r["accumulate"] == "float32" and not row["pass"]:
            failures.append(f"{name}/{impl} {r['dtype']} {r['case']}: {row['worst']} error "
                            f"{row['worst_error']:.3g} above the tolerance {row['tolerance']:.3g}")
        elif r["accumulate"] == "input" and r["case"] == "large mean" and row["pass"]:
            failures.append(f"{name}/{impl} {r['dtype']} accumulate='input' loses nothing on the "
                            "large-mean case: the switch has no effect")
        rows.append(row)
    return rows, failures


def check_probes(name: str, impl: str, part: dict) -> tuple[list, list]:
    rows, failures = [], []
    for p in part["probes"]:
        row = {"backend": name, "impl": impl, "dtype": p["dtype"], "accumulate": p["accumulate"]}
        if "result" in p:
            row.update(p["result"])
        else:
            row.update({k: p[k] for k in ("unsupported", "error") if k in p})
            if "error" in p:
                failures.append(f"{name}/{impl} precision_probe {p['dtype']}: {p['error'][:160]}")
        rows.append(row)
    return rows, failures


def first_loss_tolerance(dtype: str, loss: float) -> float:
    """|Δ first loss| allowed against float32: the first loss is a forward pass from identical
    parameters, in which each of LeNet-BN's FORWARD_LAYERS rounds its output to the dtype once
    (eps/2 relative; batch norm renormalises and the sigmoid contracts, so the roundings add up
    without amplification): FORWARD_LAYERS × eps/2 × max(1, loss)."""
    return FORWARD_LAYERS * precision.eps(dtype) / 2 * max(1.0, abs(loss))


def summarise_trajectory(key: str, runs: dict) -> tuple[dict, list]:
    """Per run of one backend/impl: losses, |Δloss| and parameter differences against its
    float32 run, the loss scale used and steps skipped; first-loss and finiteness checks."""
    base = runs.get("float32", {}).get("result")
    out, failures = {}, []
    for label, r in runs.items():
        if "result" not in r:
            out[label] = {k: r[k] for k in ("unsupported", "error") if k in r}
            if "error" in r:
                failures.append(f"{key} trajectory {label}: {r['error'][:160]}")
            continue
        res = r["result"]
        losses = res["losses"]
        entry = {"losses": losses, "precision": res.get("precision"),
                 "finite": all(math.isfinite(v) for v in losses)}
        if not entry["finite"]:
            failures.append(f"{key} trajectory {label}: a loss is not finite")
        if base is not None and label != "float32":
            dloss = [abs(a - b_) for a, b_ in zip(losses, base["losses"])]
            pdiff = lenet.max_abs_diff(res["params"], base["params"])
            dt = label.split(",")[0]
            tol = first_loss_tolerance(dt, base["losses"][0])
            entry.update(loss_diff=dloss, max_loss_diff=worst(dloss),
                         max_param_diff=worst(pdiff.values()), first_loss_tolerance=tol,
                         first_loss_ok=within(dloss[0], tol) if dloss else False)
            if not entry["first_loss_ok"]:
                failures.append(f"{key} trajectory {label}: first loss differs from float32 by "
                                f"{dloss[0] if dloss else float('nan'):.3g} (tolerance {tol:.3g})")
        out[label] = entry
    return out, failures


def settings(s) -> dict:
    quick = s.quick
    return {"device": s.args.device, "seed": s.args.seed, "lr": s.args.lr or lenet.DEFAULT_LR,
            "steps": s.args.steps or (QUICK_STEPS if quick else STEPS),
            "trajectory_batch": QUICK_BATCH if quick else s.args.batch_size,
            "epochs": s.args.epochs or (QUICK_EPOCHS if quick else EPOCHS),
            "batch_size": s.args.batch_size, "data": str(s.data_dir),
            "limit_train": min(QUICK_TRAIN, QUICK_TRAIN_LIMIT) if quick else None,
            "limit_test": QUICK_TEST if quick else None,
            "lenet_impls": ["native"] if quick else None}


def run(s) -> Section:
    low = low_dtypes(s)
    cfg = settings(s)
    all_cases = cases(s.args.seed, low)
    xs, ys = trajectory.batches(s.data_dir, cfg["steps"], cfg["trajectory_batch"], "float32",
                                s.args.seed)
    runs = [r for r in TRAJECTORY_RUNS if (r[1] == "float32" or r[1] in low)
            and not (s.quick and r[2] is not None)]
    args = {**cfg, "dtypes": low, "cases": all_cases, "xs": xs, "ys": ys,
            "params": lenet.init_params(s.args.seed), "trajectory_runs": runs}
    bn_rows, probe_rows, support, trajectories, training, failures = [], [], {}, {}, {}, []
    for name in s.live():
        s.log(f"[{name}] precision: {len(all_cases)} bn_step cases × 2 accumulation settings, "
              f"probes, LeNet-BN trajectories and training on {cfg['device']}")
        r = s.call(name, "precision.run", {**args, "backend": name})
        if "result" not in r:
            support[name] = {"error": r.get("failed") or r.get("unavailable")}
            continue
        for impl, part in r["result"].items():
            key = f"{name}/{impl}"
            rows, f = check_bn(name, impl, part, all_cases)
            bn_rows += rows
            failures += f
            rows, f = check_probes(name, impl, part)
            probe_rows += rows
            failures += f
            if "trajectory" in part:
                trajectories[key], f = summarise_trajectory(key, part["trajectory"])
                failures += f
            if "train" in part:
                training[key] = part["train"]
                for dt, t in part["train"].items():
                    if "error" in t:
                        failures.append(f"{key} training {dt}: {t['error'][:160]}")
                    elif "result" in t:
                        failures += train.problems(f"{key} training {dt}", t["result"])
            support[key] = support_row(part, low)
    payload = {"config": {k: v for k, v in cfg.items()}, "dtypes": low, "shape": SHAPE,
               "scales": {dt: scales(dt) for dt in low},
               "tolerance": "2 eps(dtype) + log2(m) eps(float32) max_c |mean_c|/std_c",
               "support": support, "bn": bn_rows, "probes": probe_rows,
               "trajectory": trajectories,
               "train": {k: {dt: (t["result"] if "result" in t else t) for dt, t in v.items()}
                         for k, v in training.items()}}
    plots = []
    md = markdown(payload, cfg, s.missing_rows)
    if not s.args.no_plots:
        md, plots = _plots(s, payload, md)
    return Section(payload, md, failures, plots)


def support_row(part: dict, low) -> dict:
    """What one impl could run, per part and dtype ("bn_step float16 float32", ..., "lenet_train
    float16", "fit float16"): "ran", the refusal ("unsupported: why") or "error: why"."""
    def state(results):
        results = list(results)
        for kind in ("error", "unsupported"):
            for r in results:
                if kind in r:
                    return f"{kind}: {r[kind]}"
        return "ran" if results else "not run"

    row = {}
    for dt in low:
        for acc in dtypes.ACCUMULATE:
            row[f"bn_step {dt} {acc}"] = state(c for c in part["cases"]
                                               if c["dtype"] == dt and c["accumulate"] == acc)
    for dt in low:
        row[f"lenet_train {dt}"] = state(r for label, r in part.get("trajectory", {}).items()
                                         if label.split(",")[0] == dt)
    for dt in low:
        row[f"fit {dt}"] = state([part["train"][dt]] if dt in part.get("train", {}) else [])
    return row


# -- Markdown ----------------------------------------------------------------------------------
def _reasons():
    """A footnote numbering for refusal reasons: cell text -> "✗ [n]"."""
    notes = {}

    def cell(state: str) -> str:
        if state == "ran":
            return render.PASS
        if state == "not run":
            return "—"
        kind, _, why = state.partition(": ")
        n = notes.setdefault(state, len(notes) + 1)
        return f"{'✗' if kind == 'unsupported' else 'error'} [{n}]"

    return cell, notes


def markdown(p: dict, cfg: dict, missing_rows) -> str:
    low = p["dtypes"]
    devices = {}
    for r in p["probes"]:
        if "device" in r:
            devices.setdefault(r["device"], []).append(r["backend"])
    ran_on = "; ".join(f"{d} ({', '.join(dict.fromkeys(b))})" for d, b in devices.items())
    lines = ["## Precision: float16 and bfloat16 against the float64 reference", "",
             f"Device `{cfg['device']}`: batch norm and the probes ran on {ran_on or 'nothing'}; "
             "the training table says where each run trained. "
             "float16 (eps 2⁻¹⁰ = 9.8e-4) and bfloat16 (eps 2⁻⁷ = 7.8e-3) in each framework's "
             "mixed-precision idiom (PyTorch `torch.autocast` over a float32 layer, Flax "
             "`dtype=` with float32 `param_dtype`, MXNet `cast('float16')` with batch norm kept "
             "float32), and the from-scratch layers with statistics in at least float32 "
             "(`accumulate=\"float32\"`, the default) or in the input dtype (`accumulate=\"input\"`).", ""]
    cell, notes = _reasons()
    keys = []
    for row in p["support"].values():
        keys += [k for k in row if k not in keys]
    rows = []
    for k, row in p["support"].items():
        if "error" in row and len(row) == 1:
            rows.append([k, "error: " + str(row["error"])] + [""] * (len(keys) - 1))
            continue
        rows.append([k, *[cell(row.get(c, "not run")) for c in keys]])
    rows += missing_rows(len(keys) + 1)
    lines += ["### What each framework could run", "",
              f"{render.PASS}: ran; ✗ [n]: the framework refused (`UnsupportedSetting`), with the "
              "reason below; —: not run in this mode.", "",
              render.md_table(["impl", *keys], rows), ""]
    lines += [f"[{n}] {state.partition(': ')[2]}" + "  " for state, n in notes.items()]
    lines += ["", "### bn_step against the float64 reference", "",
              f"Input N×C×H×W = {'×'.join(map(str, p['shape']))} (m = "
              f"{p['shape'][0] * p['shape'][2] * p['shape'][3]} values per channel), training step, "
              "decay 0.9, eps 1e-5, each impl's own running-variance estimator; scales: " +
              "; ".join(f"{dt}: " + ", ".join(f"{k} (mean {m:g}, std {sd:g})"
                                              for k, (m, sd) in p["scales"][dt].items())
                        for dt in low) +
              ". The reference takes the same float16/bfloat16 values widened to float64. Each "
              "cell: the worst error over y, dx, dgamma, dbeta and the running statistics, "
              "relative to max(1, max |ref|), and the quantity it is in; tolerance = 2 eps(dtype) "
              "+ log2(m) eps(float32) × max over channels of |mean|/std (an output rounded to the "
              "dtype plus up to three more roundings, and the float32 mean's error magnified by "
              "centring; `common.precision.tolerance`). Statistics in the input dtype are "
              "expected to fail the large-mean case (a ✗ there is the demonstration, not a "
              "failure).", ""]
    labels = list(scales(low[0]))
    grouped = {}
    for r in p["bn"]:
        grouped.setdefault((r["backend"], r["impl"], r["accumulate"], r["dtype"]), {})[r["case"]] = r
    rows = []
    for (b, impl, acc, dt), by in grouped.items():
        cells = []
        for lab in labels:
            r = by.get(lab)
            if r is None:
                cells.append("")
            elif "unsupported" in r or "error" in r:
                cells.append(cell(("unsupported: " + r["unsupported"]) if "unsupported" in r
                                  else "error: " + r["error"]))
            else:
                txt = f"{render.cell(r['worst_error'], r['pass'])} ({r['worst']})"
                if r["wrong_dtype"]:
                    txt += f" {', '.join(r['wrong_dtype'])} not {dt}"
                cells.append(f"{txt}, tol {render.fmt(r['tolerance'])}")
        rows.append([f"{b}/{impl}", acc, dt, *cells])
    lines += [render.md_table(["impl", "accumulate", "dtype", *labels], rows), ""]
    lines += ["### The precision each layer really uses", "",
              "`precision_probe`: one training step on a large-mean input (float16: mean 512.25, "
              "bfloat16: 64.25, std 1, m = 64), gamma 1, beta 0. The dtypes are read from the "
              "arrays the framework returned and kept. The statistics' precision is measured: the "
              "output's error against float64 next to the error the same step gives at best with "
              "statistics rounded to each candidate precision; the nearest candidate wins "
              "(\"or wider\": float32 and float64 statistics give the same rounded output).", ""]
    rows = []
    for r in p["probes"]:
        if "unsupported" in r or "error" in r:
            rows.append([f"{r['backend']}/{r['impl']}", r["dtype"], r["accumulate"],
                         cell(("unsupported: " + r["unsupported"]) if "unsupported" in r
                              else "error: " + r["error"]), "", "", "", "", "", ""])
            continue
        cand = r["candidate_errors"]
        rows.append([f"{r['backend']}/{r['impl']}", r["dtype"], r["accumulate"], r["stats_dtype"],
                     r["stats_error"], ", ".join(f"{k} {render.fmt(v)}" for k, v in cand.items()),
                     r["output_dtype"], r["grad_dtype"], r["param_dtype"], r["running_dtype"]])
    lines += [render.md_table(["impl", "input", "accumulate", "statistics computed in",
                               "output error", "best error per candidate", "output", "dx",
                               "dgamma", "running stats kept in"], rows), ""]
    lines += trajectory_markdown(p["trajectory"], cfg)
    lines += training_markdown(p["train"], cfg)
    return "\n".join(lines)


def _loss_scale(entry) -> str:
    prec = (entry or {}).get("precision") or {}
    if not prec:
        return "—"
    skipped = prec.get("skipped_steps", 0)
    return f"×{render.fmt(prec['loss_scale'])}" + (f", {skipped} skipped" if skipped else "")


def trajectory_markdown(traj: dict, cfg: dict) -> list[str]:
    lines = ["### LeNet-BN trajectory in each precision", "",
             f"{cfg['steps']} SGD steps (lr {cfg['lr']}, batch {cfg['trajectory_batch']}) from the "
             "same canonical parameters on the same Fashion-MNIST batches, in float32 and in each "
             "low precision (float32 master parameters; float16 with and without loss scaling). "
             "Each cell: last loss, max |Δloss| against the impl's float32 run, and the loss "
             "scale used. Only the first loss (a forward pass from identical parameters) is "
             f"checked: within {FORWARD_LAYERS} × eps/2 × max(1, loss) of float32 (each of the "
             f"{FORWARD_LAYERS} layers rounds its output once); later steps are reported.", ""]
    labels = [label for label, _, _ in TRAJECTORY_RUNS
              if any(label in runs for runs in traj.values())]
    rows = []
    for key, runs in traj.items():
        cells = []
        for label in labels:
            e = runs.get(label)
            if e is None:
                cells.append("")
            elif "unsupported" in e:
                cells.append("unsupported")
            elif "error" in e:
                cells.append("error: " + e["error"][:80])
            else:
                txt = render.fmt(e["losses"][-1]) if e["losses"] else "—"
                if "max_loss_diff" in e:
                    txt += f", Δ {render.fmt(e['max_loss_diff'])} " + render.mark(e["first_loss_ok"])
                cells.append(txt + f", {_loss_scale(e)}")
        rows.append([key, *cells])
    lines += [render.md_table(["impl", *labels], rows), ""]
    return lines


def training_markdown(runs: dict, cfg: dict) -> list[str]:
    size = f"at most {cfg['limit_train']:,} training images" if cfg["limit_train"] else "the training set"
    lines = ["### LeNet-BN training in each precision", "",
             f"`fit` on {size} ({cfg['epochs']} epochs, batch {cfg['batch_size']}, lr {cfg['lr']}), "
             f"test images: {'first ' + format(cfg['limit_test'], ',') if cfg['limit_test'] else 'all'}. "
             "Δ test acc is against the same impl's float32 run; a loss or accuracy that is not "
             "finite is a failure.", ""]
    rows = []
    for key, by_dtype in runs.items():
        base = by_dtype.get("float32", {})
        for dt, r in by_dtype.items():
            if "unsupported" in r:
                rows.append([key, dt, "", "unsupported", "", "", "", "", ""])
                continue
            if "error" in r:
                rows.append([key, dt, "", "error: " + r["error"][:100], "", "", "", "", ""])
                continue
            delta = (r["test_acc"] - base["test_acc"]) if "test_acc" in base and dt != "float32" else None
            rows.append([key, dt, r["device"], r["final_loss"], r["train_acc"], r["test_acc"],
                         delta, _loss_scale(r), round(r["examples_per_s"])
                         if math.isfinite(r["examples_per_s"]) else r["examples_per_s"]])
    lines += [render.md_table(["impl", "dtype", "device", "final loss", "train acc", "test acc",
                               "Δ test acc", "loss scale", "examples/s"], rows), ""]
    return lines


def _plots(s, p: dict, md: str) -> tuple[str, list]:
    """|Δloss| per step against float32, and the training loss per epoch: one line per
    backend/impl, one colour per precision."""
    plots = []
    curves = {f"{key} | {label}": e["loss_diff"] for key, runs in p["trajectory"].items()
              for label, e in runs.items() if e.get("loss_diff")}
    if render.plot_by_group(curves, s.plot_path("precision_trajectory.png"),
                            group=lambda k: k.split(" | ")[1], log=True, xlabel="SGD step",
                            ylabel="|loss − float32 loss|",
                            title="LeNet-BN trajectory: each precision vs float32, every impl"):
        plots.append("precision_trajectory.png")
        md += "\n![precision trajectory](precision_trajectory.png)\n"
    losses = {f"{key} | {dt}": [h["loss"] for h in r["history"]]
              for key, by in p["train"].items() for dt, r in by.items()
              if isinstance(r, dict) and r.get("history")}
    if render.plot_by_group(losses, s.plot_path("precision_training.png"),
                            group=lambda k: k.split(" | ")[1], xlabel="epoch",
                            ylabel="training loss",
                            title="LeNet-BN training loss per precision, every impl"):
        plots.append("precision_training.png")
        md += "\n![precision training](precision_training.png)\n"
    return md, plots
