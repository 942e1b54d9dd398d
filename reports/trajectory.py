"""trajectory: LeNet-BN from identical parameters on identical batches, N SGD steps in every
backend × impl: per-step loss and final-parameter differences."""
from __future__ import annotations

import itertools
import pathlib

import numpy as np

from common import data, lenet, spec
from reports import Section, render, within, worst

SUMMARY = ("LeNet-BN from identical parameters on identical batches, N SGD steps in every "
           "backend × impl: per-step loss and final-parameter differences")
NEEDS_DATA = True
DECAY = 0.9
QUICK_STEPS, STEPS = 5, 20
QUICK_BATCH = 64

QUICK = f"trajectory: {QUICK_STEPS} steps at batch {QUICK_BATCH} (else {STEPS} at --batch-size)"

# -- child side --------------------------------------------------------------------------------
def task_trajectory(b, args):
    import backends
    from reports.child import exact_numerics, per_impl

    exact_numerics(b)
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

    return per_impl(b.IMPLS, run)


TASKS = {"trajectory": task_trajectory}


# -- parent side -------------------------------------------------------------------------------
def validate(s) -> None:
    """float16/bfloat16 have their own tolerances and report: refused here, up front."""
    from reports.session import UsageError

    if s.args.dtype in ("float16", "bfloat16"):
        raise UsageError(f"--dtype {s.args.dtype}: the trajectory report compares float32 and float64; "
                         f"float16/bfloat16 are the precision report's (compare.py precision), "
                         "and train and speed take them too")


def settings(s) -> dict:
    return {"steps": s.args.steps or (QUICK_STEPS if s.quick else STEPS),
            "batch_size": QUICK_BATCH if s.quick else s.args.batch_size,
            "lr": s.args.lr or lenet.DEFAULT_LR}


def batches(data_dir, steps: int, batch_size: int, dtype: str, seed: int):
    """The first `steps` full batches of the training set, epoch after epoch (the session has
    checked that a batch fits in the training set, so every epoch yields at least one)."""
    images, labels = data.load("train", data_dir, download=False)
    x = data.to_nchw_float(images, np.dtype(dtype))
    xs, ys = [], []
    for epoch in itertools.count():
        chunks = data.batch_indices(len(x), batch_size, seed=seed, epoch=epoch, drop_last=True)
        if not chunks:
            raise ValueError(f"batch size {batch_size} is larger than the training set ({len(x)})")
        for idx in chunks:
            if len(xs) == steps:
                return xs, ys
            xs.append(x[idx])
            ys.append(labels[idx])


def run(s) -> Section:
    cfg = settings(s)
    params = lenet.init_params(s.args.seed)
    payload = {**cfg, "dtypes": {}}
    md = ["## Trajectory: LeNet-BN from identical parameters on identical batches", "",
          f"{cfg['steps']} SGD steps (lr {cfg['lr']}, batch {cfg['batch_size']}) from the same canonical "
          f"parameters (seed {s.args.seed}) on the same Fashion-MNIST batches. Differences are against "
          "the first run in the table. float64 agreement to ~1e-9 or better is expected; float32 is reported.", ""]
    failures, plots = [], []
    for dtype in s.dtypes:
        xs, ys = batches(s.data_dir, cfg["steps"], cfg["batch_size"], dtype, s.args.seed)
        runs = s.per_impl("trajectory.trajectory", {"params": params, "xs": xs, "ys": ys, "lr": cfg["lr"],
                                                    "decay": DECAY, "dtype": dtype},
                          f"trajectory: {cfg['steps']} steps, {dtype}")
        summary, f = summarise(runs, dtype, {n: s.info(n)["conventions"] for n in s.live()})
        failures += f
        if not s.args.no_plots and dtype == s.dtypes[0]:
            path = render.plot_log_curves(
                {k: v["loss_diff"] for k, v in summary["runs"].items() if "loss_diff" in v and k != summary["baseline"]},
                s.plot_path(f"trajectory_{dtype}.png"), xlabel="SGD step",
                ylabel=f"|loss − {summary['baseline']} loss|",
                title="LeNet-BN trajectory agreement (exact 0 drawn at 1e-18)")
            if path:
                summary["plot"] = pathlib.Path(path).name
                plots.append(summary["plot"])
        payload["dtypes"][dtype] = summary
        md.append(markdown(summary, dtype, s.missing_rows))
    return Section(payload, "\n".join(md), failures, plots)


def summarise(runs: dict, dtype: str, claimed: dict) -> tuple[dict, list[str]]:
    ok = {k: r for k, r in runs.items() if "losses" in r}
    summary = {"runs": {}, "baseline": next(iter(ok), None)}
    failures = [f"{k} {dtype}: {r.get('error', '')[:160]}" for k, r in runs.items() if "losses" not in r]
    tol = 1e-9 if dtype == "float64" else None
    if not ok:
        summary["runs"] = {k: {"error": r.get("error")} for k, r in runs.items()}
        return summary, failures
    base = ok[summary["baseline"]]
    for key, r in runs.items():
        if "losses" not in r:
            summary["runs"][key] = {"error": r.get("error")}
            continue
        loss_diff = np.abs(np.asarray(r["losses"]) - np.asarray(base["losses"])).tolist()
        pdiff = lenet.max_abs_diff(r["params"], base["params"])
        labels, excluded = [], set()
        for k, run_ in ((key, r), (summary["baseline"], base)):
            name, _, impl = k.partition("/")
            c = claimed.get(name, {}).get(impl, {})
            if run_.get("convention"):
                labels.append(f"{k}: {run_['convention']}")
                excluded.add("running_var")
            if dtype == "float64" and spec.effective_decay(DECAY, c) != DECAY:
                labels.append(f"{k}: momentum applied in {c['momentum_dtype']}")
                excluded |= {"running_mean", "running_var"}
        compared = {p: d for p, d in pdiff.items() if p.rsplit(".", 1)[-1] not in excluded}
        first = next((p for p, d in compared.items() if tol is not None and not within(d, tol)), None)
        entry = {"losses": r["losses"], "loss_diff": loss_diff, "max_loss_diff": worst(loss_diff),
                 "param_diff": pdiff, "max_param_diff": worst(compared.values()),
                 "first_divergence": first, "convention": "; ".join(dict.fromkeys(labels))}
        if tol is not None:
            entry["pass"] = within(entry["max_loss_diff"], tol) and first is None
            if not entry["pass"]:
                failures.append(f"{key} {dtype} diverges ({first or 'loss'})")
        summary["runs"][key] = entry
    return summary, failures


def markdown(summary, dtype, missing_rows) -> str:
    rows = []
    for key, r in summary["runs"].items():
        if "error" in r:
            rows.append([key, "", "", "", "", "error: " + str(r["error"])])
            continue
        verdict = ("—" if "pass" not in r else render.PASS if r["pass"] else
                   f"{render.FAIL} first differs at {r['first_divergence'] or 'the loss'}")
        note = f" (running statistics a convention changes are excluded: {r['convention']})" if r["convention"] else ""
        rows.append([key, r["losses"][0], r["losses"][-1], r["max_loss_diff"], r["max_param_diff"], verdict + note])
    rows += missing_rows(6)
    out = [f"**{dtype}** (baseline: {summary['baseline']})", "",
           render.md_table(["run", "first loss", "last loss", "max |Δloss|", "max |Δparam|", "result"], rows), ""]
    if summary.get("plot"):
        out.append(f"![trajectory]({summary['plot']})\n")
    return "\n".join(out)
