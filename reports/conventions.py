"""conventions: what each impl's momentum weighs, its defaults, running-variance estimator, when
its statistics update, its layout, initial running variance, kind of running statistics, gamma
and the precision of its momentum: claimed by the framework (signature defaults and documented
facts) and measured by an experiment of several training steps (`common.conventions`); plus the
sources' momentum translation worked through on real steps. The same experiment serves
`compare.py probe` (reports/probe.py) on any layer."""
from __future__ import annotations

import importlib

import numpy as np

from common import conventions as conv
from common import spec
from common.reference import error
from reports import Section, render, within, worst

SUMMARY = ("what each framework's momentum weighs, default momentum/eps, running-variance "
           "estimator, when statistics update, layout, kind of running statistics, gamma, "
           "momentum precision: claimed by the installed frameworks and measured by an experiment; "
           "the precision of the statistics, running statistics and output for float16/bfloat16 "
           "input, measured")
NEEDS_DATA = False
FIELDS = spec.CONVENTION_FIELDS
TRANSLATION_STEPS = 5
PRECISION_DTYPES = ("float16", "bfloat16")
# (column, precision_probe field): what the layer computed its statistics in, kept its running
# statistics in and returned, read from the framework's arrays (never declared).
PRECISION_FIELDS = (("statistics", "stats_dtype"), ("running stats", "running_dtype"),
                    ("output", "output_dtype"))


# -- child side --------------------------------------------------------------------------------
def task_probe(b, args):
    """The experiment on every impl of the backend (each built with its own defaults), and the
    precision it really computes and keeps for float16/bfloat16 input (`precision_probe` with
    the default accumulation; a refusal is kept as {"unsupported": reason})."""
    import backends
    from reports.child import describe, per_impl

    def precision(impl):
        out = {}
        for dt in PRECISION_DTYPES:
            try:
                out[dt] = b.precision_probe(impl, dt)
            except backends.UnsupportedSetting as e:
                out[dt] = {"unsupported": " ".join(str(e).split())}
            except Exception as e:  # a crash here must not lose the experiment's answer
                out[dt] = {"error": describe(e)}
        return out

    def one(impl):
        out = b.observe(impl, seed=args.get("seed", 0))
        if hasattr(b, "precision_probe"):
            out["precision"] = precision(impl)
        return out

    return per_impl(b.IMPLS, one)


def resolve(path: str):
    """The object at 'package.module.Name' or 'package.module:Name.attr'; ProbeInputError (one
    line) when it does not import."""
    module_name, sep, attrs = path.partition(":")
    parts = module_name.split(".")
    candidates = [(module_name, attrs.split("."))] if sep else [
        (".".join(parts[:i]), parts[i:]) for i in range(len(parts) - 1, 0, -1)]
    for name, rest in candidates:
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
                continue  # this prefix is not a module: try a shorter one
            raise conv.ProbeInputError(f"importing {name} failed: ModuleNotFoundError: {e}") from None
        except Exception as e:
            raise conv.ProbeInputError(f"importing {name} failed: {type(e).__name__}: "
                                       f"{' '.join(str(e).split())[:200]}") from None
        for i, attr in enumerate(rest):
            if not hasattr(obj, attr):
                owner = ".".join([name, *rest[:i]])
                raise conv.ProbeInputError(f"{path}: {owner} has no attribute {attr!r}")
            obj = getattr(obj, attr)
        return obj
    raise conv.ProbeInputError(f"{path}: no importable module in that path")


def task_layer(b, args):
    """compare.py probe: the experiment on the layer named by args["layer"]
    ('FRAMEWORK:IMPORT.PATH[(ARGS)]'); what cannot be probed comes back as {"bad_input": line}."""
    try:
        target = conv.parse_layer(args["layer"])
        factory = resolve(target["path"])
        return b.experiment(factory, tuple(target["args"]), target["kwargs"], name=target["path"],
                            seed=args.get("seed", 0))
    except (conv.ProbeInputError, ValueError) as e:
        return {"bad_input": " ".join(str(e).split())}


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


TASKS = {"probe": task_probe, "layer": task_layer, "sequence": task_sequence}


# -- parent side -------------------------------------------------------------------------------
def check_row(row: str, claimed: dict, observations: dict) -> dict:
    """One table row: the claims, the measurement, and field by field whether they agree."""
    measured = conv.measure(observations)
    return {"row": row, "claimed": claimed, "measured": measured,
            "check": conv.compare(claimed, measured)}


def row_failures(row: dict) -> list[str]:
    """A claim the experiment contradicts, or a claimed field it could not measure."""
    wrong = [f for f, c in row["check"].items() if c["agrees"] is False]
    unmeasured = [f for f, c in row["check"].items()
                  if c["claimed"] is not None and c["measured"] is None]
    out = []
    if wrong:
        out.append(f"{row['row']} claims differ from the experiment: {', '.join(wrong)}")
    if unmeasured:
        out.append(f"{row['row']}: the experiment could not measure {', '.join(unmeasured)} "
                   f"({'; '.join(row['measured']['problems']) or 'no reason given'})")
    return out


def source_rows(rows: list[dict]) -> list[dict]:
    """The seeds' sources, checked through the from-scratch impl that follows each."""
    out = []
    for source, backend in (("torch-source", "torch"), ("mxnet-source", "mxnet")):
        scratch = next((r for r in rows if r["row"] == f"{backend}/scratch" and "check" in r), None)
        claimed = spec.claims(source, {})
        entry = {"row": source, "claimed": claimed, "checked_by": f"{backend}/scratch" if scratch else None}
        if scratch:
            entry["measured"] = scratch["measured"]
            entry["check"] = conv.compare(claimed, scratch["measured"])
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
        s.log(f"[{name}] conventions: the experiment on every impl")
        r = s.call(name, "conventions.probe", {"seed": s.args.seed})
        if "result" not in r:
            rows.append({"row": name, "error": r.get("failed") or r.get("unavailable")})
            continue
        for impl, pr in r["result"].items():
            claimed = s.info(name)["conventions"].get(impl, {})
            if "error" in pr:
                rows.append({"row": f"{name}/{impl}", "claimed": claimed, "error": pr["error"]})
                failures.append(f"{name}/{impl} experiment failed: {pr['error'][:160]}")
                continue
            row = check_row(f"{name}/{impl}", claimed, pr["observations"])
            if "precision" in pr:
                row["precision"] = pr["precision"]
                failures += [f"{name}/{impl} precision_probe {dt}: {p['error'][:160]}"
                             for dt, p in pr["precision"].items() if "error" in p]
            rows.append(row)
            failures += row_failures(row)
    sources = source_rows(rows)
    rows += sources
    failures += [f"{r['row']} differs from its scratch impl" for r in sources
                 if "check" in r and any(c["agrees"] is False for c in r["check"].values())]
    translation, t_failures = worked_translation(s)
    return Section({"rows": rows, "translation": translation},
                   markdown(rows, translation, s.missing_rows), failures + t_failures)


def fmt_value(v) -> str:
    """A claimed or measured value: lists element-wise; measured floats with enough digits to
    show why they differ from a claim."""
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt_value(x) for x in v) + "]"
    if isinstance(v, float) and abs(v) < 1e-12:
        return "0"
    if isinstance(v, float) and v == v and 1e-3 <= abs(v) < 1e5:
        return f"{v:.10g}" if abs(v - round(v, 3)) > 1e-12 else render.fmt(v)
    return render.fmt(v)


def cell(check: dict) -> str:
    """"claimed ✓", "claimed ✗ (measured X)", "claimed (measured X)" without a mark where the
    two cannot be compared ("—" where nothing was claimed), the bare claim where the experiment
    could not measure the field."""
    c, m, ok = check["claimed"], check["measured"], check["agrees"]
    if ok is True:
        return f"{render.fmt(c)} {render.PASS}"
    if ok is False:
        return f"{render.fmt(c)} {render.FAIL} (measured {fmt_value(m)})"
    if m is not None:  # nothing claimed, or a value the claim cannot be compared with
        return f"{render.fmt(c)} (measured {fmt_value(m)})"
    return render.fmt(c)


def precision_cell(p: dict | None, field: str) -> str:
    if p is None:
        return "—"
    if "unsupported" in p:
        return "refused"
    if "error" in p:
        return "error"
    return str(p.get(field))


def precision_markdown(rows) -> list[str]:
    """The measured precision per impl and low-precision input dtype (no claim to check: the
    dtypes are read from what the layer produced and kept)."""
    measured = [r for r in rows if r.get("precision")]
    if not measured:
        return []
    head = [f"{dt} {col}" for dt in PRECISION_DTYPES for col, _ in PRECISION_FIELDS]
    table = [[r["row"], *(precision_cell(r["precision"].get(dt), f) for dt in PRECISION_DTYPES
                          for _, f in PRECISION_FIELDS)] for r in measured]
    lines = ["", "### Precision, measured", "",
             "One training step of each impl, as built by default, on a float16 or bfloat16 "
             "large-mean input (`precision_probe`): the dtypes are read from the arrays the "
             "framework returned and kept; the statistics' precision is the candidate whose error "
             "against float64 is nearest the output's (see the precision report).", "",
             render.md_table(["impl", *head], table)]
    refused = [f"- **{r['row']}** {dt}: {p.get('unsupported') or p.get('error')}"
               for r in measured for dt, p in r["precision"].items()
               if "unsupported" in p or "error" in p]
    return lines + (["", *refused] if refused else [])


def markdown(rows, translation, missing_rows) -> str:
    lines = ["## Conventions", "",
             "Claims come from the installed frameworks (constructor signature defaults read with "
             "`inspect`) and the documented facts in `common/spec.py`; every claim is then measured "
             "by an experiment of several training steps on fresh layers (`common/conventions.py`; "
             f"{render.PASS}: the experiment agrees, {render.FAIL}: it does not, with the measured "
             "value; no mark: not measurable). Source rows are checked through the from-scratch "
             "impl that follows them.", ""]
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["row"], "error: " + r["error"]] + [""] * (len(FIELDS) - 1))
            continue
        if "check" not in r:
            table.append([r["row"], *(render.fmt(r["claimed"].get(f)) for f in FIELDS)])
            continue
        table.append([r["row"], *(cell(r["check"][f]) for f in FIELDS)])
    table += missing_rows(len(FIELDS) + 1)
    lines.append(render.md_table(["impl", *FIELDS], table))
    notes = [f"- **{r['row']}**: {r['claimed']['notes']}" for r in rows
             if isinstance(r.get("claimed"), dict) and r["claimed"].get("notes")]
    notes += [f"- **{r['row']}** (measured): {'; '.join(r['measured']['problems'])}" for r in rows
              if isinstance(r.get("measured"), dict) and r["measured"].get("problems")]
    if notes:
        lines += ["", *notes]
    lines += precision_markdown(rows)
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
