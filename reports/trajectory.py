"""trajectory: LeNet-BN from identical parameters on identical batches, N SGD steps in every
backend × impl, each measured against the float64 NumPy training reference
(`common.lenet_reference`), never against another run under test.

The verdict is per step (`check_trajectory`): step k of a run is redone by the reference from the
run's own state after step k − 1, so float32 rounding does not compound and the verdict means the
same for any number of steps. How far each run drifts from the reference trained from the start
(|Δloss| per step, max |Δparam|, the first parameter in forward order that leaves its tolerance)
is shown beside it as information: in float32 it grows quickly for any correct implementation.
"""
from __future__ import annotations

import itertools
import pathlib

import numpy as np

from common import data, lenet, lenet_reference, spec
from reports import Section, render
from reports.session import full_precision_only

SUMMARY = ("LeNet-BN from identical parameters on identical batches, N SGD steps in every "
           "backend × impl, each step checked against the float64 NumPy training reference")
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
            r = b.lenet_train(args["params"], batches, unbiased=False, record=True, **kw)
            r["unbiased"] = False
        except backends.UnsupportedSetting as e:
            r = b.lenet_train(args["params"], batches, unbiased=None, record=True, **kw)
            r["convention"] = "its own running-variance estimator"
            r["note"] = str(e)
        r["losses"] = [float(v) for v in r["losses"]]
        return r

    return per_impl(b.IMPLS, run)


TASKS = {"trajectory": task_trajectory}


# -- parent side -------------------------------------------------------------------------------
validate = full_precision_only("trajectory")


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


def conventions_of(run_: dict, claimed: dict) -> tuple[float, bool, str]:
    """(decay, unbiased, label) that a run really applied: the impl's own running-variance
    estimator where it could not take the biased one, and MXNet's float32 momentum."""
    labels, unbiased = [], False
    if run_.get("convention"):
        unbiased = claimed.get("running_var") == "unbiased"
        labels.append(f"{'unbiased' if unbiased else 'biased'} running variance (its own)")
    decay = spec.effective_decay(DECAY, claimed)
    if decay != DECAY:
        labels.append(f"momentum applied in {claimed['momentum_dtype']}")
    return decay, unbiased, "; ".join(labels)


def summarise(runs: dict, params0, batches_, *, lr, dtype, claimed: dict) -> tuple[dict, list[str]]:
    """Each run against the reference (`check_trajectory`); the parameter history stays out of
    the results. Pure apart from the reference's arithmetic."""
    out, failures = {}, []
    for key, r in runs.items():
        if "losses" not in r:
            out[key] = {"error": r.get("error")}
            failures.append(f"{key} {dtype}: {str(r.get('error'))[:160]}")
            continue
        name, _, impl = key.partition("/")
        decay, unbiased, label = conventions_of(r, claimed.get(name, {}).get(impl, {}))
        try:
            c = lenet_reference.check_trajectory(params0, batches_, r, lr=lr, decay=decay,
                                                 unbiased=unbiased, dtype=dtype)
        except ValueError as e:
            out[key] = {"error": f"not checkable: {e}"}
            failures.append(f"{key} {dtype}: not checkable: {e}")
            continue
        c.pop("tolerance")
        out[key] = {"losses": r["losses"], "convention": label, **c}
        if not c["pass"]:
            f = c["local"]["first_failure"]
            where = (f"step {f['step'] + 1}, {f['quantity']}: {f['error']:.3g} > {f['tolerance']:.3g}"
                     if f else "; ".join(c["problems"])[:160])
            failures.append(f"{key} {dtype} departs from the reference ({where})")
    return out, failures


def run(s) -> Section:
    cfg = settings(s)
    params = lenet.init_params(s.args.seed)
    payload = {**cfg, "decay": DECAY, "dtypes": {}}
    tol = {dt: lenet_reference.local_tolerance(dt, cfg["batch_size"], cfg["lr"]) for dt in s.dtypes}
    md = ["## Trajectory: LeNet-BN against the float64 training reference", "",
          f"{cfg['steps']} SGD steps (lr {cfg['lr']}, batch {cfg['batch_size']}, decay {DECAY}) from the "
          f"same canonical parameters (seed {s.args.seed}) on the same Fashion-MNIST batches, in every "
          "backend × impl, each under the conventions it really applies. **Verdict, per step:** step k "
          "is redone by the float64 NumPy reference (`common/lenet_reference.py`: forward, analytic "
          "backward, SGD, running statistics) from the run's own state after step k − 1; the loss "
          "and every parameter must agree within a tolerance relative to max(1, |ref|): "
          + ", ".join(f"{dt} loss {render.fmt(tol[dt]['loss'])}, parameters up to "
                      f"{render.fmt(max(v for k, v in tol[dt].items() if k != 'loss'))}" for dt in s.dtypes)
          + " (float32: C·eps·√m for sums of m terms, larger before a max-pool, whose near-ties "
          "may route a gradient differently; see `local_tolerance`). worst/tol is the largest error "
          "over steps and quantities as a fraction of its tolerance. **Drift from the reference** "
          "(information, no verdict): the run against the reference trained from the start; in "
          "float32 it grows quickly for any correct implementation.", ""]
    failures, plots = [], []
    for dtype in s.dtypes:
        xs, ys = batches(s.data_dir, cfg["steps"], cfg["batch_size"], dtype, s.args.seed)
        runs = s.per_impl("trajectory.trajectory", {"params": params, "xs": xs, "ys": ys, "lr": cfg["lr"],
                                                    "decay": DECAY, "dtype": dtype},
                          f"trajectory: {cfg['steps']} steps, {dtype}")
        s.log(f"checking {len(runs)} {dtype} runs against the float64 reference ...")
        summary, f = summarise(runs, params, list(zip(xs, ys)), lr=cfg["lr"], dtype=dtype,
                               claimed={n: s.info(n)["conventions"] for n in s.live()})
        failures += f
        entry = {"runs": summary, "tolerance": tol[dtype]}
        if not s.args.no_plots:
            path = render.plot_log_curves(
                {k: v["global"]["loss"] for k, v in summary.items() if "global" in v},
                s.plot_path(f"trajectory_{dtype}.png"), xlabel="SGD step",
                ylabel="|loss − reference loss|",
                title=f"LeNet-BN {dtype}: drift from the float64 reference (0 drawn at 1e-18)")
            if path:
                entry["plot"] = pathlib.Path(path).name
                plots.append(entry["plot"])
        payload["dtypes"][dtype] = entry
        md.append(markdown(entry, dtype, s.missing_rows))
    return Section(payload, "\n".join(md), failures, plots)


def markdown(entry, dtype, missing_rows) -> str:
    rows = []
    for key, r in entry["runs"].items():
        if "error" in r:
            rows.append([key, "", "", "", "error: " + str(r["error"]), "", "", ""])
            continue
        loc, glob = r["local"], r["global"]
        worst = loc["max"]["ratio"]
        where = loc["worst_ratio"][loc["ratio"].index(worst)] if worst in loc["ratio"] else ""
        if r["pass"]:
            verdict = render.PASS
        else:
            f = loc["first_failure"]
            verdict = (f"{render.FAIL} step {f['step'] + 1}: {f['quantity']} {render.fmt(f['error'])}"
                       if f else f"{render.FAIL} {'; '.join(r['problems'])}")
        if r["convention"]:
            verdict += f" (as it applies: {r['convention']})"
        div = glob["first_divergence"]
        rows.append([key, r["losses"][0], r["losses"][-1], f"{render.fmt(worst)} ({where})", verdict,
                     glob["max"]["loss"], glob["max"]["param"],
                     f"step {div['step'] + 1}, {div['name']}" if div else "none"])
    rows += missing_rows(8)
    out = [f"**{dtype}**", "",
           render.md_table(["run", "first loss", "last loss", "worst/tol (where)", "per-step verdict",
                            "drift: max |Δloss|", "drift: max |Δparam|", "drift: first leaves tolerance"], rows), ""]
    if entry.get("plot"):
        out.append(f"![trajectory drift]({entry['plot']})\n")
    return "\n".join(out)
