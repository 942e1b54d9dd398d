"""`compare.py probe FRAMEWORK:IMPORT.PATH[(ARGS)]`: what any batch-norm layer does, measured.

The layer is built in that framework's child process and put through the conventions experiment
(`common.conventions`, the same one the conventions report runs on the suite's impls, via
`reports.conventions.TASKS["layer"]`). Printed: one conventions row (claims from the layer's
signature and the documented facts of its family, each ✓/✗ against the measurement), what its
running statistics are, its momentum in every other framework's and source's meaning, and its
agreement with `common.reference.bn_step` under the conventions it was measured to have.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

from common import conventions as conv
from common import spec
from reports import child, render
from reports.conventions import FIELDS, cell, fmt_value
from reports.session import UsageError, log, one_line

EPILOG = """examples:
  compare.py probe torch:torch.nn.BatchNorm2d
  compare.py probe 'torch:torch.nn.BatchNorm2d(momentum=None)'
  compare.py probe 'flax:flax.linen.BatchNorm(momentum=0.9, use_fast_variance=False)'
  compare.py probe mxnet:mxnet.gluon.nn.BatchNorm --expect decay=0.9,running_var=biased
  compare.py probe torch:mypkg.layers:MyBN

FRAMEWORK is torch, mxnet or flax (jax). ARGS are keyword (or positional) arguments written as
Python literals, parsed with ast.literal_eval (never eval). The channel count is passed where
the constructor takes one (num_features, in_channels, ...) and was not given.

--expect fields: """ + ", ".join(conv.EXPECT_FIELDS) + """ (momentum and eps are aliases of
default_momentum and default_eps; decay is the canonical weight kept on the old value;
momentum_weighs takes old/new).

exit status:
  0    the layer was measured (✗ cells are findings, not failures)
  1    an --expect field differs (each is listed), or the framework is unavailable, its
       process crashed or ran past --timeout (the reason is printed)
  2    bad input, one line: a malformed spec, an unimportable path, something that is not a
       batch-norm layer, a layer that needs arguments it was not given"""

SUMMARY = "measure any batch-norm layer's conventions: FRAMEWORK:IMPORT.PATH[(ARGS)] (probe --help)"


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """Bad options: one line and exit status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog: str = "compare.py probe") -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__.split("\n")[0].split(": ", 1)[1],
               epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("layer", metavar="FRAMEWORK:IMPORT.PATH[(ARGS)]",
                   help="the layer class or factory to probe")
    p.add_argument("--expect", metavar="FIELD=VALUE[,...]",
                   help="exit 1 unless the layer measures so (e.g. decay=0.99,running_var=biased)")
    p.add_argument("--seed", type=int, default=0, help="seed of the experiment's inputs (default 0)")
    p.add_argument("--python", metavar="INTERPRETER",
                   help="run the framework under another Python (e.g. MXNet's numpy<2 environment)")
    p.add_argument("--json", action="store_true", help="print the whole measurement as JSON")
    p.add_argument("--timeout", type=float, default=600, metavar="SECONDS",
                   help="kill the framework's process after this long (default 600)")
    return p


def validate(args) -> tuple[dict, dict]:
    """The parsed layer spec and expectations; UsageError (one line) for bad input."""
    try:
        target = conv.parse_layer(args.layer)
        expected = conv.parse_expect(args.expect)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {args.seed}")
    if not (args.timeout > 0 and args.timeout != float("inf")):
        raise UsageError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if args.python is not None and not pathlib.Path(args.python).exists():
        raise UsageError(f"--python {args.python}: does not exist")
    return target, expected


def translation(decay: float) -> list[dict]:
    """The canonical decay as every convention's own `momentum` (common.spec)."""
    return [{"convention": c, "momentum_weighs": w, "momentum": spec.momentum_from_decay(decay, c)}
            for c, w in spec.MOMENTUM_WEIGHS.items()]


def analyse(spec_text: str, result: dict, expected: dict) -> dict:
    """Everything `probe` reports, from the child's experiment result (pure)."""
    measured = conv.measure(result["observations"])
    out = {"layer": spec_text, "built": result["built"], "family": result["family"],
           "claimed": result["claimed"], "measured": measured,
           "check": conv.compare(result["claimed"], measured),
           "agreement": conv.agreement(result["observations"], measured),
           "unmet": {f: {"expected": e, "measured": got}
                     for f, (e, got) in conv.unmet(expected, measured).items()}}
    if measured["running_stats"] == "EMA" and measured["decay"] is not None:
        out["translation"] = translation(measured["decay"])
    return out


def _running_line(m: dict) -> str:
    kind = m["running_stats"]
    if kind == "EMA":
        line = (f"an EMA with canonical decay {fmt_value(m['decay'])} (the weight kept on the old "
                f"running value, constant over {len(m['decays'])} steps)")
    elif kind == "cumulative average":
        line = ("a cumulative average: measured decays per step "
                + ", ".join(fmt_value(d) for d in m["decays"]) + " = 1 − 1/k, so no constant "
                "momentum of any framework reproduces it")
    elif kind == "none":
        line = ("none: the layer keeps no running statistics and normalises with the batch's in "
                "inference")
    else:
        line = kind or "not identified"
    if m.get("eval") and kind != "none":
        line += f"; inference normalises with the {m['eval']}"
    return line


def markdown(r: dict) -> str:
    m = r["measured"]
    lines = [f"## Probe: {r['layer']}", "",
             f"Built as `{r['built']}`"
             + (f" (family {r['family']}: claims from its signature and the documented facts in "
                f"common/spec.py)" if r["family"] else " (no documented family: claims from its "
                                                         "signature only)")
             + f"; measured in float64 on {m['layout']} input by {len(m['decays'] or []) or conv.STEPS} "
             f"training steps, one inference and {conv.MOMENTUM_STEPS} steps at each explicit "
             f"momentum {', '.join(map(str, conv.MOMENTA))}. {render.PASS}: the measurement agrees "
             f"with the claim, {render.FAIL}: it does not (measured value shown), no mark: nothing "
             "to compare.", "",
             render.md_table(["layer", *FIELDS], [[r["built"], *(cell(r["check"][f]) for f in FIELDS)]]),
             "", f"Running statistics: {_running_line(m)}."]
    if m.get("beta") not in (None, "learnable"):
        lines.append(f"Beta: {m['beta']}.")
    if m["problems"]:
        lines += ["", "Not identified:", *(f"- {p}" for p in m["problems"])]
    if "translation" in r:
        lines += ["", f"### Its momentum in every convention (canonical decay {fmt_value(m['decay'])})", "",
                  render.md_table(["convention", "momentum weighs", "momentum"],
                                  [[t["convention"], t["momentum_weighs"], fmt_value(t["momentum"])]
                                   for t in r["translation"]])]
    a = r["agreement"]
    lines += ["", "### Against common.reference.bn_step under the measured conventions", ""]
    if "skipped" in a:
        lines.append(f"Not compared: {a['skipped']}.")
    else:
        settings = (f"eps {fmt_value(m['default_eps'])}, gamma {m['gamma']}, beta {m['beta']}, "
                    f"running statistics {m['running_stats']}"
                    + (f" with the {m['running_var']} variance" if m.get("running_var") else ""))
        lines += [f"Each training step from the layer's own previous state ({settings}); "
                  f"float64, tolerance {render.fmt(1e-10)} absolute.", "",
                  render.md_table(["quantity", "max abs error"],
                                  [[q, f"— ({v['skipped']})" if "skipped" in v
                                    else render.cell(v["error"], v["pass"])] for q, v in a.items()])]
    if r["unmet"]:
        lines += ["", "### --expect not met", "",
                  *(f"- {f}: expected {fmt_value(v['expected'])}, measured {fmt_value(v['measured'])}"
                    for f, v in r["unmet"].items())]
    return "\n".join(lines)


def main(args) -> int:
    """compare.py probe, with its parsed arguments (`build_parser`)."""
    try:
        target, expected = validate(args)
    except UsageError as e:
        print(f"compare.py probe: error: {one_line(e)}", file=sys.stderr)
        return 2
    log(f"[{target['backend']}] probing {args.layer} ...")
    r = child.call(target["backend"], "conventions.layer", {"layer": args.layer, "seed": args.seed},
                   python=args.python, progress=log, timeout=args.timeout)
    if "result" not in r:
        print(f"compare.py probe: {one_line(r.get('unavailable') or r.get('failed'))}", file=sys.stderr)
        return 1
    if "bad_input" in r["result"]:
        print(f"compare.py probe: error: {one_line(r['result']['bad_input'])}", file=sys.stderr)
        return 2
    report = analyse(args.layer, r["result"], expected)
    print(render.to_json(report) if args.json else markdown(report))
    if report["unmet"]:
        log("compare.py probe: --expect not met: " + "; ".join(
            f"{f}={fmt_value(v['expected'])} (measured {fmt_value(v['measured'])})"
            for f, v in report["unmet"].items()))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
