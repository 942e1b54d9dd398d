"""agreement: `batch_norm` of every backend × impl against the float64 reference, and pairwise.

Seeded inputs (2-D and 4-D, a batch of two, a large-mean float64 case, float32 and float64,
training and inference) go through every impl and through `common.reference.bn_step`. Where an
impl cannot do what was asked (native PyTorch has no biased running variance, Flax and MXNet no
unbiased one; MXNet applies momentum in float32) it runs its own convention, is checked against
the reference under that convention, and the gap to what was asked is listed as a convention.
"""
from __future__ import annotations

import inspect
import itertools

import numpy as np

from common import spec
from common.reference import RESULT_KEYS, TOLERANCE, bn_step, error, random_case, within_tolerance
from reports import Section, render, within, worst
from reports.session import full_precision_only

SUMMARY = ("batch_norm of every backend × impl vs the float64 NumPy reference and pairwise "
           "(y, dx, dgamma, dbeta, running stats; 2-D/4-D; float32/float64)")
NEEDS_DATA = False

SHAPES = {"2-D": (64, 16), "4-D": (16, 6, 8, 8), "2-D small batch": (2, 8), "4-D small batch": (2, 3, 3, 3)}
SETTINGS = ((0.9, 1e-5), (0.1, 1e-3))  # (decay, eps)
LARGE_MEAN = 1e4


# -- child side --------------------------------------------------------------------------------
def task_bn(b, args):
    """Every case through every impl; a setting an impl cannot express is retried with the
    impl's own running-variance convention and labelled."""
    import backends
    from reports.child import exact_numerics, per_impl, describe

    exact_numerics(b)
    accepted = inspect.signature(b.bn_step).parameters

    def run(impl):
        results = []
        for case in args["cases"]:
            kw = dict(training=case["training"], eps=case["eps"], decay=case["decay"], impl=impl)
            options = case.get("options") or {}
            if options:  # a framework-specific default, run only where the impl has it
                if not set(options) <= set(accepted):
                    results.append({"skipped": "option not offered by this backend"})
                    continue
                try:
                    results.append({"out": b.bn_step(**case["inputs"], unbiased=case["unbiased"],
                                                     **kw, **options)})
                except backends.UnsupportedSetting as e:
                    results.append({"skipped": str(e)})
                continue
            try:
                results.append({"out": b.bn_step(**case["inputs"], unbiased=case["unbiased"], **kw)})
            except backends.UnsupportedSetting as e:
                own = not case["unbiased"]
                try:
                    out = b.bn_step(**case["inputs"], unbiased=own, **kw)
                    results.append({"out": out, "convention": "unbiased running variance" if own
                                    else "biased running variance", "note": str(e)})
                except Exception as e2:
                    results.append({"error": describe(e2)})
            except Exception as e:
                results.append({"error": describe(e)})
        return results

    return per_impl(args["impls"], run)


TASKS = {"bn": task_bn}


# -- parent side -------------------------------------------------------------------------------
validate = full_precision_only("agreement")


def cases(seed: int, dtypes) -> list[dict]:
    out = []
    for dtype, (shape_name, shape), (decay, eps), training in itertools.product(
            dtypes, SHAPES.items(), SETTINGS, (True, False)):
        out.append(dict(dtype=dtype, shape=shape_name, decay=decay, eps=eps, training=training,
                        unbiased=False))
    for dtype, shape_name in itertools.product(dtypes, ("2-D", "4-D")):
        out.append(dict(dtype=dtype, shape=shape_name, decay=0.9, eps=1e-5, training=True, unbiased=True))
    for i, c in enumerate(out):
        c["inputs"] = random_case(SHAPES[c["shape"]], seed=seed * 1000 + i, dtype=np.dtype(c["dtype"]))
    if "float64" in dtypes:
        # Large mean, small spread: the two-pass variance is exact to ~1e-12 here, while Flax's
        # default E[x²] − E[x]² cancels two numbers near 1e8 (error ~eps·mean² ≈ 2e-8).
        large = random_case(SHAPES["4-D"], seed=seed * 1000 + len(out), mean=LARGE_MEAN)
        # Centring values near 1e4 that differ by ~1 loses log10(1e4) digits in ANY float64
        # implementation (the reference too): the tolerance for this case is 100× (1e-8), still
        # ~300× below the fast-variance gap.
        base = dict(dtype="float64", shape="4-D", decay=0.9, eps=1e-5, training=True, unbiased=False,
                    inputs=large, mean=LARGE_MEAN, tolerance_scale=100.0)
        out.append(dict(base))
        out.append(dict(base, options={"fast_variance": True},
                        label="Flax default fast variance E[x²]−E[x]²"))
    return out


def reference(case: dict, *, decay=None, unbiased=None) -> dict:
    return bn_step(**case["inputs"], training=case["training"], eps=case["eps"],
                   decay=case["decay"] if decay is None else decay,
                   unbiased=case["unbiased"] if unbiased is None else unbiased)


def check_impl(name, impl, per_case, all_cases, refs, claimed, dtypes):
    """Rows (one per dtype) of one impl's results against the reference; also the conventions it
    followed and its outputs for the pairwise comparison. Pure: no process, no framework."""
    rows, conventions_seen, outputs = [], [], {}
    for dtype in dtypes:
        cell = {k: {"abs": 0.0, "rel": 0.0, "pass": True} for k in RESULT_KEYS}
        errors, compared = [], 0
        for i, (c, ref, res) in enumerate(zip(all_cases, refs, per_case)):
            if c["dtype"] != dtype or "skipped" in res:
                continue
            if "error" in res:
                errors.append(f"{c['shape']} training={c['training']}: {res['error']}")
                continue
            if c.get("options"):  # a framework default the reference does not follow
                gap = worst(error(res["out"][q], ref[q])[0] for q in RESULT_KEYS)
                conventions_seen.append(dict(backend=name, impl=impl, dtype=dtype, shape=c["shape"],
                                             convention=c["label"] + f" (input mean {c['mean']:g})",
                                             running_stats_gap=gap, quantity="all outputs"))
                continue
            expected, labels, unbiased = ref, [], c["unbiased"]
            if "convention" in res:  # the impl ran with its own variance estimator
                labels.append(res["convention"])
                unbiased = not unbiased
            applied = spec.effective_decay(c["decay"], claimed)
            if applied != c["decay"] and c["training"] and dtype == "float64":
                labels.append(f"momentum applied in {claimed['momentum_dtype']}")
            else:
                applied = c["decay"]
            if labels:
                # Checked against the reference under the impl's own convention; the gap to the
                # requested setting is reported as a convention, not noise.
                expected = reference(c, decay=applied, unbiased=unbiased)
                gap = worst(error(res["out"][q], ref[q])[0] for q in ("running_mean", "running_var"))
                conventions_seen.append(dict(backend=name, impl=impl, dtype=dtype, shape=c["shape"],
                                             convention="; ".join(labels), running_stats_gap=gap))
            scale = c.get("tolerance_scale", 1.0)
            outputs[i] = (res["out"], bool(labels), scale)
            compared += 1
            for k in RESULT_KEYS:
                a, rel = error(res["out"][k], expected[k])
                ok = within_tolerance(res["out"][k], expected[k], dtype, scale) and \
                    np.asarray(res["out"][k]).dtype == np.dtype(dtype)
                cell[k]["abs"] = worst([a / scale], cell[k]["abs"])  # shown in tolerance units
                cell[k]["rel"] = worst([rel / scale], cell[k]["rel"])
                cell[k]["pass"] &= bool(ok)
        ok = compared > 0 and all(v["pass"] for v in cell.values()) and not errors
        if compared == 0 and not errors:
            errors.append("no case was compared")
        rows.append({"backend": name, "impl": impl, "dtype": dtype, "errors": cell,
                     "failures": errors, "pass": ok})
    return rows, conventions_seen, outputs


def pairwise(outputs: dict, dtypes) -> list[dict]:
    """Max difference between every two backend/impl outputs on the same inputs; running
    statistics are left out where either side followed its own convention."""
    rows = []
    for dtype in dtypes:
        keys = sorted(k for k in outputs if k[2] == dtype)
        for ka, kb in itertools.combinations(keys, 2):
            diffs = []
            for i in outputs[ka].keys() & outputs[kb].keys():
                (oa, conv_a, scale), (ob, conv_b, _) = outputs[ka][i], outputs[kb][i]
                diffs += [error(oa[k], ob[k])[0 if dtype == "float64" else 1] / scale
                          for k in RESULT_KEYS if not (k.startswith("running") and (conv_a or conv_b))]
            w = worst(diffs)
            rows.append({"a": "/".join(ka[:2]), "b": "/".join(kb[:2]), "dtype": dtype,
                         "max_diff": w, "pass": within(w, 2 * TOLERANCE[dtype])})
    return rows


def run(s) -> Section:
    all_cases = cases(s.args.seed, s.dtypes)
    refs = [reference(c) for c in all_cases]
    table, conventions_seen, outputs, failures = [], [], {}, []
    for name in s.live():
        impls = s.info(name)["impls"]
        s.log(f"[{name}] agreement: {len(all_cases)} cases × {len(impls)} impls")
        r = s.call(name, "agreement.bn", {"cases": all_cases, "impls": impls})
        if "result" not in r:
            table.append({"backend": name, "error": r.get("failed") or r.get("unavailable")})
            continue
        for impl, per_case in r["result"].items():
            if isinstance(per_case, dict):  # the whole impl failed
                table.append({"backend": name, "impl": impl, "error": per_case["error"]})
                failures.append(f"{name}/{impl} failed: {per_case['error'][:160]}")
                continue
            claimed = s.info(name)["conventions"].get(impl, {})
            rows, seen, outs = check_impl(name, impl, per_case, all_cases, refs, claimed, s.dtypes)
            table += rows
            conventions_seen += seen
            for i, o in outs.items():
                outputs.setdefault((name, impl, all_cases[i]["dtype"]), {})[i] = o
            failures += [f"{name}/{impl} {r_['dtype']} disagrees with the reference"
                         for r_ in rows if not r_["pass"]]
    pairs = pairwise(outputs, s.dtypes)
    failures += [f"pairwise {p['a']} vs {p['b']} {p['dtype']}" for p in pairs if not p["pass"]]
    payload = {"tolerance": TOLERANCE,
               "cases": [{k: v for k, v in c.items() if k != "inputs"} for c in all_cases],
               "rows": table, "pairwise": pairs, "conventions": conventions_seen}
    return Section(payload, markdown(table, pairs, conventions_seen, len(all_cases), s.missing_rows),
                   failures)


def markdown(table, pairs, conventions_seen, n_cases, missing_rows) -> str:
    lines = ["## Agreement: batch_norm vs the float64 reference", "",
             f"{n_cases} seeded cases (shapes {', '.join(f'{k} {v}' for k, v in SHAPES.items())}; "
             f"decay/eps {SETTINGS}; training and inference; biased and unbiased running variance; "
             f"float64 4-D with mean {LARGE_MEAN:g}, std 1, held to a 100× looser tolerance because "
             "centring it loses 4 digits in any float64 implementation; its errors count at 1/100). "
             "Each cell: max abs error over the cases (float64) or max error relative to max(1, |ref|) "
             f"(float32), {render.PASS} within tolerance (float64 ≤ {TOLERANCE['float64']:g} abs, "
             f"float32 ≤ {TOLERANCE['float32']:g} rel), {render.FAIL} outside it or not finite.", ""]
    headers = ["backend", "impl", "dtype", *RESULT_KEYS, "result"]
    rows = []
    for t in table:
        if "error" in t:
            rows.append([t["backend"], t.get("impl", "—"), "—", *["" for _ in RESULT_KEYS],
                         "error: " + t["error"]])
            continue
        measure = "abs" if t["dtype"] == "float64" else "rel"
        cells = [render.cell(t["errors"][k][measure], t["errors"][k]["pass"]) for k in RESULT_KEYS]
        verdict = "pass" if t["pass"] else "FAIL" + ("; " + "; ".join(t["failures"][:2]) if t["failures"] else "")
        rows.append([t["backend"], t["impl"], t["dtype"], *cells, verdict])
    rows += missing_rows(len(headers))
    lines.append(render.md_table(headers, rows))
    if conventions_seen:
        lines += ["", "**Differences that come from a convention, not from noise** (checked above against the "
                  "reference under the impl's own convention; here the gap to the requested setting):", ""]
        seen = {}
        for c in conventions_seen:
            key = (c["backend"], c["impl"], c["dtype"], c["convention"])
            seen[key] = worst([c["running_stats_gap"]], seen.get(key, 0.0))
        lines.append(render.md_table(["backend", "impl", "dtype", "convention", "gap to the reference"],
                                     [[*k, v] for k, v in seen.items()]))
    if pairs:
        lines += ["", "**Pairwise across backends**: max difference between two impls over every case "
                  "and quantity (float64 abs, float32 relative; the large-mean case counts at 1/100), "
                  f"{render.PASS} within 2× the tolerance.", ""]
        for dtype in dict.fromkeys(p["dtype"] for p in pairs):
            cells = {(p["a"], p["b"]): p for p in pairs if p["dtype"] == dtype}
            names = sorted({k for pair in cells for k in pair})
            rows = [[a, *[render.cell(cells[(a, b)]["max_diff"], cells[(a, b)]["pass"])
                          if (a, b) in cells else "" for b in names[1:]]] for a in names[:-1]]
            lines += [render.md_table([dtype, *names[1:]], rows), ""]
    return "\n".join(lines)
