"""conventions: what each impl's momentum weighs, its defaults, running-variance estimator, when
its statistics update and its layout, as claimed by the framework and as measured by an
experiment; plus the sources' momentum translation worked through on real steps."""
from __future__ import annotations

import numpy as np

from common import conventions as conv
from common import spec
from common.conventions import probe_input
from common.reference import error
from reports import Section, render, within, worst

SUMMARY = ("what each framework's momentum weighs, default momentum/eps, running-variance "
           "estimator, when statistics update, layout: read from the installed frameworks and "
           "checked by an experiment")
NEEDS_DATA = False
FIELDS = ("momentum_weighs", "default_momentum", "default_eps", "running_var", "stats_update",
          "layout", "initial_running_var")
TRANSLATION_STEPS = 5


# -- child side --------------------------------------------------------------------------------
def task_probe(b, args):
    from reports.child import per_impl

    x = probe_input()
    return per_impl(b.IMPLS, lambda impl: {"x": x, "result": b.probe(impl, x)})


def task_sequence(b, args):
    """k chained training steps of one impl at each requested decay: final running stats."""
    from reports.child import exact_numerics

    exact_numerics(b)
    out = {}
    for label, run in args["runs"].items():
        rm, rv = run["running_mean"], run["running_var"]
        for x in run["xs"]:
            r = b.bn_step(x, run["gamma"], run["beta"], rm, rv, np.ones_like(x), training=True,
                          eps=run["eps"], decay=run["decay"], impl=run["impl"])
            rm, rv = r["running_mean"], r["running_var"]
        out[label] = {"running_mean": rm, "running_var": rv}
    return out


TASKS = {"probe": task_probe, "sequence": task_sequence}


# -- parent side -------------------------------------------------------------------------------
def check_probe(row: str, claimed: dict, probe_result: dict, x) -> dict:
    """One table row from a probe: the claims, the measurement, and field-by-field agreement."""
    measured = conv.infer(probe_result, x)
    check = conv.check(claimed, measured, probe_result)
    return {"row": row, "claimed": claimed, "measured": measured,
            "check": {f: {"claimed": c, "measured": m, "agrees": ok} for f, (c, m, ok) in check.items()}}


def source_rows(rows: list[dict]) -> list[dict]:
    """The seeds' sources, checked through the from-scratch impl that follows each."""
    out = []
    for source, backend in (("torch-source", "torch"), ("mxnet-source", "mxnet")):
        scratch = next((r for r in rows if r["row"] == f"{backend}/scratch" and "check" in r), None)
        claimed = spec.SOURCES[source]
        entry = {"row": source, "claimed": claimed, "checked_by": f"{backend}/scratch" if scratch else None}
        if scratch:
            entry["check"] = {f: {"claimed": claimed[f], "measured": scratch["measured"].get(f),
                                  "agrees": claimed[f] == scratch["measured"].get(f)}
                              for f in ("momentum_weighs", "running_var", "stats_update")}
        out.append(entry)
    return out


def translation_inputs(seed: int):
    rng = np.random.default_rng(seed)
    c = 4
    xs = [rng.normal(rng.normal(size=c), 1.0, size=(32, c)) for _ in range(TRANSLATION_STEPS)]
    return dict(gamma=np.ones(c), beta=np.zeros(c), running_mean=np.zeros(c), running_var=np.ones(c),
                eps=1e-5, xs=xs, impl="scratch")


def closed_form(base: dict, decay: float) -> dict:
    stats = {"running_mean": base["running_mean"], "running_var": base["running_var"]}
    for x in base["xs"]:
        stats = {"running_mean": spec.running_update(stats["running_mean"], x.mean(0), decay),
                 "running_var": spec.running_update(stats["running_var"], x.var(0), decay)}
    return stats


def worked_translation(s) -> tuple[dict, list[str]]:
    """The sources' literal momentum=0.9 run for k steps in each source's scratch impl, against
    the closed form; and the translation that makes them agree."""
    base = translation_inputs(s.args.seed)
    out = {"momentum_literal": 0.9, "steps": TRANSLATION_STEPS,
           "mxnet_source_0.9_as_torch_source": spec.translate_momentum(0.9, "mxnet-source", "torch-source"),
           "runs": {}}
    failures = []
    plan = {"torch": "torch-source", "mxnet": "mxnet-source"}
    for name, source in plan.items():
        if name not in s.live():
            continue
        decay = spec.decay_from_momentum(0.9, source)
        r = s.call(name, "conventions.sequence", {"runs": {"literal": dict(base, decay=decay)}})
        if "result" not in r:
            out["runs"][source] = {"error": r.get("failed")}
            continue
        got = r["result"]["literal"]
        closed = closed_form(base, decay)
        err = worst(error(got[q], closed[q])[0] for q in closed)
        ok = within(err, 1e-10)
        out["runs"][source] = {"decay": decay, "running_mean": got["running_mean"], "closed_form_error": err,
                               "matches_closed_form": ok, "last_batch_mean": base["xs"][-1].mean(0)}
        if not ok:
            failures.append(f"{source} literal 0.9 run differs from the closed form ({err:.3g})")
    runs = out["runs"]
    if all(src in runs and "running_mean" in runs[src] for src in plan.values()):
        out["gap_between_sources"] = error(runs["torch-source"]["running_mean"],
                                           runs["mxnet-source"]["running_mean"])[0]
    return out, failures


def run(s) -> Section:
    rows, failures = [], []
    for name in s.live():
        s.log(f"[{name}] conventions: probing every impl")
        r = s.call(name, "conventions.probe", {})
        if "result" not in r:
            rows.append({"row": name, "error": r.get("failed") or r.get("unavailable")})
            continue
        for impl, pr in r["result"].items():
            claimed = s.info(name)["conventions"].get(impl, {})
            if "error" in pr:
                rows.append({"row": f"{name}/{impl}", "claimed": claimed, "error": pr["error"]})
                failures.append(f"{name}/{impl} probe failed: {pr['error'][:160]}")
                continue
            row = check_probe(f"{name}/{impl}", claimed, pr["result"], pr["x"])
            rows.append(row)
            bad = [f for f, c in row["check"].items() if not c["agrees"]]
            if bad:
                failures.append(f"{name}/{impl} claims differ from the experiment: {', '.join(bad)}")
    rows += source_rows(rows)
    failures += [f"{r['row']} differs from its scratch impl" for r in rows
                 if r["row"].endswith("-source") and "check" in r
                 and not all(c["agrees"] for c in r["check"].values())]
    translation, t_failures = worked_translation(s)
    return Section({"rows": rows, "translation": translation},
                   markdown(rows, translation, s.missing_rows), failures + t_failures)


def markdown(rows, translation, missing_rows) -> str:
    lines = ["## Conventions", "",
             "Native rows are read from the installed frameworks; every checkable claim is measured in "
             f"this run by one training step of a fresh layer ({render.PASS}: the experiment agrees, "
             f"{render.FAIL}: it does not, with the measured value). Source rows are checked through the "
             "from-scratch impl that follows them.", ""]
    table = []
    for r in rows:
        if "error" in r and "claimed" not in r:
            table.append([r["row"], "error: " + r["error"]] + [""] * (len(FIELDS) - 1))
            continue
        cells = []
        for f in FIELDS:
            v = render.fmt(r["claimed"].get(f))
            chk = (r.get("check") or {}).get(f)
            if chk is not None:
                v += f" {render.PASS}" if chk["agrees"] else f" {render.FAIL} (measured {render.fmt(chk['measured'])})"
            cells.append(v)
        table.append([r["row"], *cells])
    table += missing_rows(len(FIELDS) + 1)
    lines.append(render.md_table(["impl", *FIELDS], table))
    notes = [f"- **{r['row']}**: {r['claimed']['notes']}" for r in rows
             if isinstance(r.get("claimed"), dict) and r["claimed"].get("notes")]
    if notes:
        lines += ["", *notes]
    t = translation
    lines += ["", "### Worked translation", "",
              f"The MXNet source's `momentum=0.9` weighs the new batch, so it equals the PyTorch source's "
              f"`momentum={render.fmt(t['mxnet_source_0.9_as_torch_source'])}` (canonical decay "
              f"{render.fmt(spec.decay_from_momentum(0.9, 'mxnet-source'))}). Running the sources' literal "
              f"`0.9` in both for {t['steps']} training steps from running mean 0:", ""]
    trows = []
    for source, r in t["runs"].items():
        if "error" in r:
            trows.append([source, "—", "error: " + str(r["error"]), "", ""])
            continue
        trows.append([source, r["decay"], np.array2string(np.asarray(r["running_mean"]), precision=4),
                      np.array2string(np.asarray(r["last_batch_mean"]), precision=4),
                      render.cell(r["closed_form_error"], r["matches_closed_form"])])
    lines.append(render.md_table(["source", "decay kept", "running mean after k steps",
                                  "last batch mean", "error vs closed form"], trows))
    if "gap_between_sources" in t:
        lines += ["", f"The two sources' running means differ by up to {render.fmt(t['gap_between_sources'])}: "
                  "the MXNet source keeps only 10% of the old value, so its running mean is essentially "
                  "the last batch's."]
    return "\n".join(lines)
