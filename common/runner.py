"""compare.py's engine: runs each backend's work in a child process (`backends.worker`) and turns
the results into tables, plots, results.json and results.md.

No framework is imported here. A backend that is unavailable, fails or crashes becomes a row that
says why; every other result is still written, after each report, atomically.
"""
from __future__ import annotations

import datetime
import itertools
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

from common import conventions as conv
from common import data, io, lenet, report, spec
from common.reference import RESULT_KEYS, TOLERANCE, bn_step, error, random_case, within_tolerance

REPO = pathlib.Path(__file__).resolve().parent.parent
ORDER = ("agreement", "conventions", "trajectory", "train", "speed")
SHAPES = {"2-D": (64, 16), "4-D": (16, 6, 8, 8), "2-D small batch": (2, 8), "4-D small batch": (2, 3, 3, 3)}
SETTINGS = ((0.9, 1e-5), (0.1, 1e-3))  # (decay, eps)
TRAJECTORY_DECAY = 0.9
LARGE_MEAN = 1e4


class UsageError(Exception):
    """Bad command-line input: reported in one line, never as a traceback."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Context:
    def __init__(self, args):
        self.args = args
        self.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        from backends import names  # the registry itself imports no framework

        unknown = [b for b in self.backends if b not in names()]
        if unknown or not self.backends:
            raise UsageError(f"--backends: unknown {unknown or 'empty list'}; choose from {', '.join(names())}")
        self.python = {}
        for item in args.python:
            name, sep, exe = item.partition("=")
            if not sep or name not in names() or not exe:
                raise UsageError(f"--python {item!r}: expected NAME=INTERPRETER with NAME in {', '.join(names())}")
            if not pathlib.Path(exe).exists():
                raise UsageError(f"--python {item!r}: {exe} does not exist")
            self.python[name] = exe
        for flag in ("epochs", "batch_size", "steps"):
            v = getattr(args, flag)
            if v is not None and v < 1:
                raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {v}")
        if args.lr is not None and not args.lr > 0:
            raise UsageError(f"--lr must be positive, got {args.lr}")
        if args.data is not None and not pathlib.Path(args.data).is_dir():
            raise UsageError(f"--data {args.data}: not a directory")
        self.out = pathlib.Path(args.out)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--out {args.out}: cannot create it ({e.strerror})") from None
        self.dtypes = [args.dtype] if args.dtype else ["float64", "float32"]
        self.results = {
            "command": [sys.executable, "compare.py", *sys.argv[1:]],
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": {"platform": platform.platform(), "python": sys.version.split()[0],
                     "numpy": np.__version__, "cpus": os.cpu_count()},
            "settings": {k: v for k, v in vars(args).items()},
            "backends": {},
            "reports": {},
        }
        self.markdown = {}
        self.failures = []

    # -- child processes -------------------------------------------------------------------
    def call(self, name: str, task: str, args: dict) -> dict:
        """Run `task` for backend `name` in a child process; returns {"result": ...},
        {"unavailable": reason} or {"failed": reason}."""
        with tempfile.TemporaryDirectory(prefix="bn-compare-") as tmp:
            src, dst = os.path.join(tmp, "in"), os.path.join(tmp, "out")
            io.save(src, {"backend": name, **args})
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
                BN_COMPARE_MALLOC="default" if self.args.default_malloc else "tuned")
            cmd = [self.python.get(name, sys.executable), "-m", "backends.worker", task, src, dst]
            tail = []
            try:
                proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, bufsize=1)
            except OSError as e:
                return {"failed": f"could not start {cmd[0]}: {e}"}
            for line in proc.stdout:
                line = line.rstrip()
                if line.startswith(f"[{name}"):
                    log("  " + line)  # the worker's own progress lines
                tail = (tail + [line])[-15:]
            code = proc.wait()
            if code != 0 or not os.path.exists(dst + ".json"):
                return {"failed": f"{name} child exited with code {code}: " + " | ".join(tail[-6:])}
            out = io.load(dst)
            result = out.get("result")
            if isinstance(result, dict) and "failed" in result:  # the task crashed as a whole
                return {"failed": f"{name} {task}: {result['failed']}"}
            return out

    def info(self, name: str) -> dict:
        """Versions, impls and claimed conventions of a backend (cached); records availability."""
        if name not in self.results["backends"]:
            log(f"[{name}] loading ...")
            r = self.call(name, "info", {})
            entry = {"python": self.python.get(name, sys.executable)}
            if "result" in r:
                entry.update(available=True, reason=None, **r["result"])
            else:
                entry.update(available=False, reason=r.get("unavailable") or r.get("failed"))
                log(f"[{name}] unavailable: {entry['reason']}")
            self.results["backends"][name] = entry
        return self.results["backends"][name]

    def live(self):
        return [n for n in self.backends if self.info(n)["available"]]

    def unavailable_rows(self, width: int):
        return [[n, "unavailable: " + self.info(n)["reason"]] + [""] * (width - 2)
                for n in self.backends if not self.info(n)["available"]]

    # -- data --------------------------------------------------------------------------------
    def data_dir(self) -> str:
        return str(data.find_data_dir(self.args.data, progress=log))

    # -- output ------------------------------------------------------------------------------
    def save(self, name: str, payload: dict, markdown: str) -> None:
        self.results["reports"][name] = payload
        self.markdown[name] = markdown
        self.results["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self.results["failures"] = self.failures
        self.out.mkdir(parents=True, exist_ok=True)
        import json

        io.write_atomic(self.out / "results.json", json.dumps(io.jsonable(self.results), indent=1))
        io.write_atomic(self.out / "results.md", self.render())
        print("\n" + markdown + "\n", flush=True)

    def render(self) -> str:
        lines = ["# bn-compare results", "",
                 f"Command: `{' '.join(self.results['command'][1:])}`  ",
                 f"Started {self.results['started']} on {self.results['host']['platform']}, "
                 f"Python {self.results['host']['python']}, numpy {self.results['host']['numpy']}.", ""]
        rows = []
        for n, b in self.results["backends"].items():
            versions = ", ".join(f"{k} {v}" for k, v in (b.get("versions") or {}).items())
            rows.append([n, "yes" if b["available"] else "no: " + str(b["reason"]), versions])
        lines += [report.md_table(["backend", "available", "versions"], rows), ""]
        lines += [self.markdown[k] + "\n" for k in ORDER if k in self.markdown]
        return "\n".join(lines)


def per_impl(ctx: Context, task: str, args: dict, what: str) -> dict:
    """Run `task` in each live backend's child; results keyed "backend/impl" (a backend whose
    child failed as a whole becomes one "backend" entry with the error)."""
    runs = {}
    for name in ctx.live():
        log(f"[{name}] {what} ...")
        r = ctx.call(name, task, {**args, "backend": name})
        if "result" not in r:
            runs[name] = {"error": r.get("failed") or r.get("unavailable")}
            continue
        for impl, res in r["result"].items():
            runs[f"{name}/{impl}"] = res
    return runs


# ---------------------------------------------------------------------------------------------
# agreement
def agreement_cases(seed: int, dtypes):
    cases = []
    for dtype, (shape_name, shape), (decay, eps), training in itertools.product(
            dtypes, SHAPES.items(), SETTINGS, (True, False)):
        cases.append(dict(dtype=dtype, shape=shape_name, decay=decay, eps=eps, training=training,
                          unbiased=False))
    for dtype, shape_name in itertools.product(dtypes, ("2-D", "4-D")):
        cases.append(dict(dtype=dtype, shape=shape_name, decay=0.9, eps=1e-5, training=True, unbiased=True))
    for i, c in enumerate(cases):
        c["inputs"] = random_case(SHAPES[c["shape"]], seed=seed * 1000 + i, dtype=np.dtype(c["dtype"]))
    if "float64" in dtypes:
        # Large mean, small spread: the two-pass variance is exact to ~1e-12 here, while Flax's
        # default E[x²] − E[x]² cancels two numbers near 1e8 (error ~eps·mean² ≈ 2e-8).
        large = random_case(SHAPES["4-D"], seed=seed * 1000 + len(cases), mean=LARGE_MEAN)
        # Centring values near 1e4 that differ by ~1 loses log10(1e4) digits in ANY float64
        # implementation (the reference too): the tolerance for this case is 100× (1e-8), still
        # ~300× below the fast-variance gap.
        base = dict(dtype="float64", shape="4-D", decay=0.9, eps=1e-5, training=True, unbiased=False,
                    inputs=large, mean=LARGE_MEAN, tolerance_scale=100.0)
        cases.append(dict(base))
        cases.append(dict(base, options={"fast_variance": True},
                          label="Flax default fast variance E[x²]−E[x]²"))
    return cases


def run_agreement(ctx: Context) -> dict:
    cases = agreement_cases(ctx.args.seed, ctx.dtypes)
    refs = [bn_step(**c["inputs"], training=c["training"], eps=c["eps"], decay=c["decay"],
                    unbiased=c["unbiased"]) for c in cases]
    raw = {}
    for name in ctx.live():
        log(f"[{name}] agreement: {len(cases)} cases × {len(ctx.info(name)['impls'])} impls")
        r = ctx.call(name, "bn", {"cases": cases, "impls": ctx.info(name)["impls"]})
        raw[name] = r
    table, conventions_seen, outputs = [], [], {}
    for name, r in raw.items():
        if "result" not in r:
            table.append({"backend": name, "error": r.get("failed") or r.get("unavailable")})
            continue
        for impl, per_case in r["result"].items():
            if isinstance(per_case, dict):  # the whole impl failed
                table.append({"backend": name, "impl": impl, "error": per_case["error"]})
                continue
            claimed = ctx.info(name)["conventions"].get(impl, {})
            for dtype in ctx.dtypes:
                cell = {k: {"abs": 0.0, "rel": 0.0, "pass": True} for k in RESULT_KEYS}
                errors = []
                for i, (c, ref, res) in enumerate(zip(cases, refs, per_case)):
                    if c["dtype"] != dtype:
                        continue
                    if "skipped" in res:
                        continue
                    if "error" in res:
                        errors.append(f"{c['shape']} training={c['training']}: {res['error']}")
                        continue
                    if c.get("options"):  # a framework default the reference does not follow
                        gap = max(error(res["out"][q], ref[q])[0] for q in RESULT_KEYS)
                        conventions_seen.append(dict(backend=name, impl=impl, dtype=dtype, shape=c["shape"],
                                                     convention=c["label"] + f" (input mean {c['mean']:g})",
                                                     running_stats_gap=gap, quantity="all outputs"))
                        continue
                    expected, labels = ref, []
                    unbiased = c["unbiased"]
                    if "convention" in res:  # the impl ran with its own variance estimator
                        labels.append(res["convention"])
                        unbiased = not unbiased
                    applied = spec.effective_decay(c["decay"], claimed)
                    if applied != c["decay"] and c["training"] and dtype == "float64":
                        labels.append(f"momentum applied in {claimed['momentum_dtype']}")
                    else:
                        applied = c["decay"]
                    if labels:
                        # Checked against the reference under the impl's own convention; the gap to
                        # the requested setting is reported as a convention, not noise.
                        expected = bn_step(**c["inputs"], training=c["training"], eps=c["eps"],
                                           decay=applied, unbiased=unbiased)
                        gap = max(error(res["out"][q], ref[q])[0] for q in ("running_mean", "running_var"))
                        conventions_seen.append(dict(backend=name, impl=impl, dtype=dtype, shape=c["shape"],
                                                     convention="; ".join(labels), running_stats_gap=gap))
                    outputs.setdefault((name, impl, dtype), {})[i] = (res["out"], bool(labels),
                                                                      c.get("tolerance_scale", 1.0))
                    for k in RESULT_KEYS:
                        a, rel = error(res["out"][k], expected[k])
                        ok = within_tolerance(res["out"][k], expected[k], dtype, c.get("tolerance_scale", 1.0)) and \
                            np.asarray(res["out"][k]).dtype == np.dtype(dtype)
                        scale = c.get("tolerance_scale", 1.0)  # shown in tolerance units
                        cell[k]["abs"] = max(cell[k]["abs"], a / scale)
                        cell[k]["rel"] = max(cell[k]["rel"], rel / scale)
                        cell[k]["pass"] &= bool(ok)
                ok = all(v["pass"] for v in cell.values()) and not errors
                table.append({"backend": name, "impl": impl, "dtype": dtype, "errors": cell,
                              "failures": errors, "pass": ok})
                if not ok:
                    ctx.failures.append(f"agreement: {name}/{impl} {dtype}")
    pairwise = pairwise_agreement(outputs, ctx.dtypes)
    for p in pairwise:
        if not p["pass"]:
            ctx.failures.append(f"agreement pairwise: {p['a']} vs {p['b']} {p['dtype']}")
    md = agreement_markdown(ctx, table, pairwise, conventions_seen, len(cases))
    payload = {"tolerance": TOLERANCE, "cases": [{k: v for k, v in c.items() if k != "inputs"} for c in cases],
               "rows": table, "pairwise": pairwise, "conventions": conventions_seen}
    ctx.save("agreement", payload, md)
    return payload


def pairwise_agreement(outputs, dtypes):
    """Max difference between every two backend/impl outputs on the same inputs; running
    statistics are left out where either side followed its own convention."""
    rows = []
    for dtype in dtypes:
        keys = sorted(k for k in outputs if k[2] == dtype)
        for ka, kb in itertools.combinations(keys, 2):
            worst = 0.0
            for i in outputs[ka].keys() & outputs[kb].keys():
                (oa, conv_a, scale), (ob, conv_b, _) = outputs[ka][i], outputs[kb][i]
                for k in RESULT_KEYS:
                    if k.startswith("running") and (conv_a or conv_b):
                        continue
                    worst = max(worst, error(oa[k], ob[k])[0 if dtype == "float64" else 1] / scale)
            rows.append({"a": "/".join(ka[:2]), "b": "/".join(kb[:2]), "dtype": dtype,
                         "max_diff": worst, "pass": worst <= 2 * TOLERANCE[dtype]})
    return rows


def agreement_markdown(ctx, table, pairwise, conventions_seen, n_cases) -> str:
    lines = ["## Agreement: batch_norm vs the float64 reference", "",
             f"{n_cases} seeded cases (shapes {', '.join(f'{k} {v}' for k, v in SHAPES.items())}; "
             f"decay/eps {SETTINGS}; training and inference; biased and unbiased running variance; "
             f"float64 4-D with mean {LARGE_MEAN:g}, std 1, held to a 100× looser tolerance because "
             "centring it loses 4 digits in any float64 implementation; its errors count at 1/100). "
             "Each cell: max abs error over the cases (float64) or max error relative to max(1, |ref|) "
             f"(float32), {report.PASS} within tolerance (float64 ≤ {TOLERANCE['float64']:g} abs, "
             f"float32 ≤ {TOLERANCE['float32']:g} rel), {report.FAIL} outside it.", ""]
    headers = ["backend", "impl", "dtype", *RESULT_KEYS, "result"]
    rows = []
    for t in table:
        if "error" in t:
            rows.append([t["backend"], t.get("impl", "—"), "—", *["" for _ in RESULT_KEYS], "error: " + t["error"]])
            continue
        measure = "abs" if t["dtype"] == "float64" else "rel"
        cells = [f"{report.fmt(t['errors'][k][measure])} {report.PASS if t['errors'][k]['pass'] else report.FAIL}"
                 for k in RESULT_KEYS]
        verdict = "pass" if t["pass"] else "FAIL" + ("; " + "; ".join(t["failures"][:2]) if t["failures"] else "")
        rows.append([t["backend"], t["impl"], t["dtype"], *cells, verdict])
    rows += ctx.unavailable_rows(len(headers))
    lines.append(report.md_table(headers, rows))
    if conventions_seen:
        lines += ["", "**Differences that come from a convention, not from noise** (checked above against the "
                  "reference under the impl's own convention; here the gap to the requested setting):", ""]
        seen = {}
        for c in conventions_seen:
            key = (c["backend"], c["impl"], c["dtype"], c["convention"])
            seen[key] = max(seen.get(key, 0.0), c["running_stats_gap"])
        lines.append(report.md_table(["backend", "impl", "dtype", "convention", "gap to the reference"],
                                     [[*k, v] for k, v in seen.items()]))
    if pairwise:
        lines += ["", "**Pairwise across backends**: max difference between two impls over every case "
                  "and quantity (float64 abs, float32 relative; the large-mean case counts at 1/100), "
                  f"{report.PASS} within 2× the tolerance.", ""]
        for dtype in dict.fromkeys(p["dtype"] for p in pairwise):
            cells = {(p["a"], p["b"]): p for p in pairwise if p["dtype"] == dtype}
            names = sorted({k for pair in cells for k in pair})
            rows = [[a, *[(f"{report.fmt(cells[(a, b)]['max_diff'])} "
                           f"{report.PASS if cells[(a, b)]['pass'] else report.FAIL}") if (a, b) in cells
                          else "" for b in names[1:]]] for a in names[:-1]]
            lines += [report.md_table([dtype, *names[1:]], rows), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# conventions
def run_conventions(ctx: Context) -> dict:
    rows = []
    for name in ctx.live():
        log(f"[{name}] conventions: probing every impl")
        r = ctx.call(name, "probe", {})
        if "result" not in r:
            rows.append({"row": name, "error": r.get("failed") or r.get("unavailable")})
            continue
        for impl, pr in r["result"].items():
            claimed = ctx.info(name)["conventions"].get(impl, {})
            if "error" in pr:
                rows.append({"row": f"{name}/{impl}", "claimed": claimed, "error": pr["error"]})
                ctx.failures.append(f"conventions: {name}/{impl} probe failed")
                continue
            measured = conv.infer(pr["result"], pr["x"])
            check = conv.check(claimed, measured, pr["result"])
            rows.append({"row": f"{name}/{impl}", "claimed": claimed, "measured": measured,
                         "check": {f: {"claimed": c, "measured": m, "agrees": ok} for f, (c, m, ok) in check.items()}})
            if not all(ok for _, _, ok in check.values()):
                ctx.failures.append(f"conventions: {name}/{impl} claims differ from the experiment")
    # The seeds' sources: their formulas are the from-scratch impls of torch and mxnet.
    for source, backend in (("torch-source", "torch"), ("mxnet-source", "mxnet")):
        scratch = next((r for r in rows if r["row"] == f"{backend}/scratch" and "check" in r), None)
        claimed = spec.SOURCES[source]
        entry = {"row": source, "claimed": claimed, "checked_by": f"{backend}/scratch" if scratch else None}
        if scratch:
            entry["check"] = {f: {"claimed": claimed[f], "measured": scratch["measured"].get(f),
                                  "agrees": claimed[f] == scratch["measured"].get(f)}
                              for f in ("momentum_weighs", "running_var", "stats_update")}
        rows.append(entry)
    translation = worked_translation(ctx)
    md = conventions_markdown(ctx, rows, translation)
    payload = {"rows": rows, "translation": translation}
    ctx.save("conventions", payload, md)
    return payload


def worked_translation(ctx: Context) -> dict:
    """The sources' literal momentum=0.9 run for k steps in each source's scratch impl, against the
    closed form; and the translation that makes them agree."""
    k = 5
    rng = np.random.default_rng(ctx.args.seed)
    c = 4
    xs = [rng.normal(rng.normal(size=c), 1.0, size=(32, c)) for _ in range(k)]
    base = dict(gamma=np.ones(c), beta=np.zeros(c), running_mean=np.zeros(c), running_var=np.ones(c),
                eps=1e-5, xs=xs, impl="scratch")
    out = {"momentum_literal": 0.9, "steps": k,
           "mxnet_source_0.9_as_torch_source": spec.translate_momentum(0.9, "mxnet-source", "torch-source"),
           "runs": {}}
    plan = {"torch": "torch-source", "mxnet": "mxnet-source"}
    for name, source in plan.items():
        if name not in ctx.live():
            continue
        decay = spec.decay_from_momentum(0.9, source)
        r = ctx.call(name, "sequence", {"runs": {"literal": dict(base, decay=decay)}})
        if "result" not in r:
            out["runs"][source] = {"error": r.get("failed")}
            continue
        got = r["result"]["literal"]
        closed = {"running_mean": base["running_mean"], "running_var": base["running_var"]}
        for x in xs:
            closed = {"running_mean": spec.running_update(closed["running_mean"], x.mean(0), decay),
                      "running_var": spec.running_update(closed["running_var"], x.var(0), decay)}
        err = max(error(got[q], closed[q])[0] for q in closed)
        out["runs"][source] = {"decay": decay, "running_mean": got["running_mean"], "closed_form_error": err,
                               "matches_closed_form": err <= 1e-10, "last_batch_mean": xs[-1].mean(0)}
        if err > 1e-10:
            ctx.failures.append(f"conventions: {source} literal 0.9 run differs from the closed form")
    runs = out["runs"]
    if all(s in runs and "running_mean" in runs[s] for s in plan.values()):
        out["gap_between_sources"] = error(runs["torch-source"]["running_mean"], runs["mxnet-source"]["running_mean"])[0]
    return out


def conventions_markdown(ctx, rows, translation) -> str:
    fields = ["momentum_weighs", "default_momentum", "default_eps", "running_var", "stats_update",
              "layout", "initial_running_var"]
    lines = ["## Conventions", "",
             "Native rows are read from the installed frameworks; every checkable claim is measured in "
             f"this run by one training step of a fresh layer ({report.PASS}: the experiment agrees, "
             f"{report.FAIL}: it does not, with the measured value). Source rows are checked through the "
             "from-scratch impl that follows them.", ""]
    table = []
    for r in rows:
        if "error" in r and "claimed" not in r:
            table.append([r["row"], "error: " + r["error"]] + [""] * (len(fields) - 1))
            continue
        cells = []
        for f in fields:
            v = report.fmt(r["claimed"].get(f))
            chk = (r.get("check") or {}).get(f)
            if chk is not None:
                v += f" {report.PASS}" if chk["agrees"] else f" {report.FAIL} (measured {report.fmt(chk['measured'])})"
            cells.append(v)
        table.append([r["row"], *cells])
    table += ctx.unavailable_rows(len(fields) + 1)
    lines.append(report.md_table(["impl", *fields], table))
    notes = [f"- **{r['row']}**: {r['claimed']['notes']}" for r in rows
             if isinstance(r.get("claimed"), dict) and r["claimed"].get("notes")]
    if notes:
        lines += ["", *notes]
    t = translation
    lines += ["", "### Worked translation", "",
              f"The MXNet source's `momentum=0.9` weighs the new batch, so it equals the PyTorch source's "
              f"`momentum={report.fmt(t['mxnet_source_0.9_as_torch_source'])}` (canonical decay "
              f"{report.fmt(spec.decay_from_momentum(0.9, 'mxnet-source'))}). Running the sources' literal "
              f"`0.9` in both for {t['steps']} training steps from running mean 0:", ""]
    trows = []
    for source, r in t["runs"].items():
        if "error" in r:
            trows.append([source, "—", "error: " + str(r["error"]), "", ""])
            continue
        trows.append([source, r["decay"], np.array2string(np.asarray(r["running_mean"]), precision=4),
                      np.array2string(np.asarray(r["last_batch_mean"]), precision=4),
                      f"{report.fmt(r['closed_form_error'])} {report.PASS if r['matches_closed_form'] else report.FAIL}"])
    lines.append(report.md_table(["source", "decay kept", "running mean after k steps",
                                  "last batch mean", "error vs closed form"], trows))
    if "gap_between_sources" in t:
        lines += ["", f"The two sources' running means differ by up to {report.fmt(t['gap_between_sources'])}: "
                  "the MXNet source keeps only 10% of the old value, so its running mean is essentially "
                  "the last batch's."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# trajectory
def trajectory_batches(ctx: Context, steps: int, batch_size: int, dtype: str):
    images, labels = data.load("train", ctx.data_dir(), download=False)
    x = data.to_nchw_float(images, np.dtype(dtype))
    xs, ys = [], []
    for epoch in itertools.count():
        for idx in data.batch_indices(len(x), batch_size, seed=ctx.args.seed, epoch=epoch, drop_last=True):
            if len(xs) == steps:
                return xs, ys
            xs.append(x[idx])
            ys.append(labels[idx])


def run_trajectory(ctx: Context) -> dict:
    quick = ctx.args.quick
    steps = ctx.args.steps or (5 if quick else 20)
    batch_size = 64 if quick else ctx.args.batch_size
    lr = ctx.args.lr or lenet.DEFAULT_LR
    params = lenet.init_params(ctx.args.seed)
    payload = {"steps": steps, "batch_size": batch_size, "lr": lr, "dtypes": {}}
    md = ["## Trajectory: LeNet-BN from identical parameters on identical batches", "",
          f"{steps} SGD steps (lr {lr}, batch {batch_size}) from the same canonical parameters "
          f"(seed {ctx.args.seed}) on the same Fashion-MNIST batches. Differences are against the first "
          "run in the table. float64 agreement to ~1e-9 or better is expected; float32 is reported.", ""]
    try:
        batches = {dt: trajectory_batches(ctx, steps, batch_size, dt) for dt in ctx.dtypes}
    except (data.DataError, ValueError) as e:
        md.append(f"Not run: {e}")
        ctx.failures.append(f"trajectory: not run: {e}")
        ctx.save("trajectory", {"error": str(e)}, "\n".join(md))
        return payload
    for dtype in ctx.dtypes:
        xs, ys = batches[dtype]
        runs = per_impl(ctx, "trajectory", {"params": params, "xs": xs, "ys": ys, "lr": lr,
                                             "decay": TRAJECTORY_DECAY, "dtype": dtype},
                        f"trajectory: {steps} steps, {dtype}")
        payload["dtypes"][dtype] = summarise_trajectory(ctx, runs, dtype)
        md.append(trajectory_markdown(ctx, payload["dtypes"][dtype], dtype))
    ctx.save("trajectory", payload, "\n".join(md))
    return payload


def summarise_trajectory(ctx, runs, dtype):
    ok = {k: r for k, r in runs.items() if "losses" in r}
    summary = {"runs": {}, "baseline": next(iter(ok), None)}
    tol = 1e-9 if dtype == "float64" else None
    if not ok:
        summary["runs"] = {k: {"error": r.get("error")} for k, r in runs.items()}
        return summary
    base = ok[summary["baseline"]]
    for key, r in runs.items():
        if "losses" not in r:
            summary["runs"][key] = {"error": r.get("error")}
            continue
        loss_diff = np.abs(np.asarray(r["losses"]) - np.asarray(base["losses"])).tolist()
        pdiff = lenet.max_abs_diff(r["params"], base["params"])
        labels, excluded = [], set()
        for k, run in ((key, r), (summary["baseline"], base)):
            name, _, impl = k.partition("/")
            claimed = ctx.info(name)["conventions"].get(impl, {})
            if run.get("convention"):
                labels.append(f"{k}: {run['convention']}")
                excluded.add("running_var")
            if dtype == "float64" and spec.effective_decay(TRAJECTORY_DECAY, claimed) != TRAJECTORY_DECAY:
                labels.append(f"{k}: momentum applied in {claimed['momentum_dtype']}")
                excluded |= {"running_mean", "running_var"}
        convention = "; ".join(dict.fromkeys(labels))
        compared = {p: d for p, d in pdiff.items() if p.rsplit(".", 1)[-1] not in excluded}
        first = next((p for p, d in compared.items() if tol is not None and d > tol), None)
        entry = {"losses": r["losses"], "loss_diff": loss_diff, "max_loss_diff": max(loss_diff),
                 "param_diff": pdiff, "max_param_diff": max(compared.values()),
                 "first_divergence": first, "convention": convention}
        if tol is not None:
            entry["pass"] = max(loss_diff) <= tol and first is None
            if not entry["pass"]:
                ctx.failures.append(f"trajectory: {key} {dtype} diverges ({first or 'loss'})")
        summary["runs"][key] = entry
    if not ctx.args.no_plots and dtype == ctx.dtypes[0]:
        path = report.plot_trajectory({k: v["loss_diff"] for k, v in summary["runs"].items()
                                       if "loss_diff" in v and k != summary["baseline"]},
                                      ctx.out / f"trajectory_{dtype}.png", summary["baseline"])
        summary["plot"] = path
    return summary


def trajectory_markdown(ctx, s, dtype) -> str:
    rows = []
    for key, r in s["runs"].items():
        if "error" in r:
            rows.append([key, "", "", "", "", "error: " + str(r["error"])])
            continue
        verdict = ("—" if "pass" not in r else report.PASS if r["pass"] else
                   f"{report.FAIL} first differs at {r['first_divergence'] or 'the loss'}")
        note = f" (running statistics a convention changes are excluded: {r['convention']})" if r["convention"] else ""
        rows.append([key, r["losses"][0], r["losses"][-1], r["max_loss_diff"], r["max_param_diff"], verdict + note])
    rows += ctx.unavailable_rows(6)
    out = [f"**{dtype}** (baseline: {s['baseline']})", "",
           report.md_table(["run", "first loss", "last loss", "max |Δloss|", "max |Δparam|", "result"], rows), ""]
    if s.get("plot"):
        out.append(f"![trajectory]({pathlib.Path(s['plot']).name})\n")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# train
def run_train(ctx: Context) -> dict:
    quick = ctx.args.quick
    cfg = dict(epochs=ctx.args.epochs or (6 if quick else lenet.DEFAULT_EPOCHS),
               batch_size=ctx.args.batch_size, lr=ctx.args.lr or lenet.DEFAULT_LR, seed=ctx.args.seed,
               device=ctx.args.device, dtype=ctx.args.dtype or "float32",
               limit_train=10000 if quick else None, limit_test=2000 if quick else None)
    md = ["## Training: LeNet-BN on Fashion-MNIST", ""]
    try:
        cfg["data"] = ctx.data_dir()
        ds = data.load_dataset(cfg["data"], limit_train=cfg["limit_train"], limit_test=cfg["limit_test"],
                               download=False)
    except (data.DataError, ValueError) as e:
        md.append(f"Not run: {e}")
        ctx.failures.append(f"train: not run: {e}")
        ctx.save("train", {"error": str(e)}, "\n".join(md))
        return {}
    md += [f"{ds.describe()}; {cfg['epochs']} epochs, batch {cfg['batch_size']}, SGD lr {cfg['lr']}, "
           f"{cfg['dtype']}, device `{cfg['device']}`. examples/s counts training steps only; wall time "
           "includes evaluation and compilation. Memory: " + allocator_note(ctx) + ".", ""]
    runs = per_impl(ctx, "train", cfg, f"training on {cfg['device']}")
    rows = []
    for key, r in runs.items():
        if "error" in r:
            ctx.failures.append(f"train: {key}: {r['error'][:120]}")
            rows.append([key, "", "error: " + r["error"], "", "", "", "", ""])
            continue
        rows.append([key, r["device"], r["final_loss"], r["train_acc"], r["test_acc"], round(r["examples_per_s"]),
                     round(r["wall_s"], 1), ""])
    rows += [[n, "", "unavailable", "", "", "", "", ""] for n in ctx.backends if not ctx.info(n)["available"]]
    md.append(report.md_table(["run", "device", "final loss", "train acc", "test acc", "examples/s",
                               "wall s", "note"], rows))
    payload = {"config": cfg, "runs": runs}
    if not ctx.args.no_plots:
        path = report.plot_training(runs, ctx.out / "training.png")
        if path:
            payload["plot"] = path
            md += ["", "![training curves](training.png)"]
    ctx.save("train", payload, "\n".join(md))
    return payload


# ---------------------------------------------------------------------------------------------
# speed
SOURCE_BASELINES = {  # examples/s of the sources' own code on the 2-core CPU, batch 256 (measured by the
    # project before this suite existed; the speed issue records them)
    "torch": {"scratch": 5.9e3, "native": 9.2e3},
    "mxnet": {"scratch": 0.8e3, "native": 4.5e3},
    "jax": {"native": 6.2e3},
}


def allocator_note(ctx: Context) -> str:
    """How the backend processes' C allocator was set, as their info task reported it."""
    notes = {ctx.info(n).get("allocator") for n in ctx.live()} - {None}
    return "; ".join(sorted(notes)) or "unknown"


def run_speed(ctx: Context) -> dict:
    quick = ctx.args.quick
    cfg = dict(device=ctx.args.device, batch_size=ctx.args.batch_size, dtype=ctx.args.dtype or "float32",
               steps=50, repeats=3 if quick else 5)
    runs = per_impl(ctx, "speed", cfg, f"speed on {cfg['device']}")
    rows = []
    for key, r in runs.items():
        name, _, impl = key.partition("/")
        if "error" in r:
            ctx.failures.append(f"speed: {key}: {r['error'][:120]}")
            rows.append([key, "", "error: " + r["error"], "", "", "", "", "", "", ""])
            continue
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
    rows += [[n, "", "unavailable", "", "", "", "", "", "", ""] for n in ctx.backends
             if not ctx.info(n)["available"]]
    md = ["## Speed: training-step throughput", "",
          f"Batch {cfg['batch_size']}, {cfg['dtype']}, device `{cfg['device']}`; median of {cfg['repeats']} "
          f"timed runs of {cfg['steps']} steps after warm-up, with device synchronisation. Each backend "
          "runs in its own process; its impls are compiled and warmed up first and then timed "
          "round-robin (run r of every impl before run r + 1 of any), so a slow spell of the machine "
          "hits them alike. Memory: " + allocator_note(ctx) + ". "
          "step time / native is the ratio measured in this run (1.0 = as fast as native); the eager "
          "columns time the uncompiled path where the fast one is compiled (PyTorch on CUDA). "
          "× source native / × source scratch: speed over the seeds' own code measured on the 2-core CPU "
          "(PyTorch 9.2k / 5.9k, MXNet 4.5k / 0.8k, Flax native 6.2k examples/s; CPU rows only).", "",
          report.md_table(["run", "device", "path", "examples/s", "compile s", "step time / native",
                           "eager examples/s", "eager step time / native", "× source native",
                           "× source scratch"], rows)]
    payload = {"config": cfg, "runs": runs, "source_baselines": SOURCE_BASELINES}
    ctx.save("speed", payload, "\n".join(md))
    return payload


RUNNERS = {"agreement": run_agreement, "conventions": run_conventions, "trajectory": run_trajectory,
           "train": run_train, "speed": run_speed}


def run(args) -> int:
    try:
        ctx = Context(args)
    except UsageError as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 2
    which = ORDER if args.report == "all" else (args.report,)
    start = time.perf_counter()
    try:
        for name in which:
            log(f"== {name} ==")
            try:
                RUNNERS[name](ctx)
            except (data.DataError, KeyboardInterrupt):
                raise
            except Exception as e:  # one report's bug must not lose the others' results
                ctx.failures.append(f"{name}: crashed: {type(e).__name__}: {e}")
                ctx.save(name, {"error": f"{type(e).__name__}: {e}",
                                "traceback": traceback.format_exc(limit=6)},
                         f"## {name}\n\nNot completed: {type(e).__name__}: {e}")
    except data.DataError as e:
        print(f"compare.py: data error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("compare.py: interrupted; reports finished so far are in "
              f"{ctx.out / 'results.json'}", file=sys.stderr)
        return 130
    log(f"done in {time.perf_counter() - start:.0f} s: {ctx.out / 'results.json'}, {ctx.out / 'results.md'}")
    if ctx.failures:
        log("checks that failed:\n  " + "\n  ".join(ctx.failures))
        return 1
    return 0
