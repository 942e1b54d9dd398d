"""`compare.py convert`: a LeNet-BN checkpoint from one framework's own format to another's.

    python compare.py convert --from torch --to jax model.pt model.msgpack

The source framework reads IN in one child process and the target framework writes OUT in
another (the port report's `read` and `write` tasks); this process imports no framework and
converts with `common.convert`. IN may be a file of this project (with its `.bn.json` settings
sidecar) or a framework's own file without one: a PyTorch `state_dict` of LeNetBN or of the
textbook `nn.Sequential`, Gluon parameters of LeNet or of the d2l `nn.Sequential`, Flax
variables; without a sidecar the framework's layer defaults are its settings. OUT is the target's
own format with a sidecar holding eps, momentum (in the target's meaning) and the variance
estimator, both written atomically. `--from` and `--to` may name the same framework: the file is
rewritten in that framework's LeNet-BN names with a sidecar (e.g. a textbook `nn.Sequential`
state_dict becomes a LeNetBN one).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

from common import checkpoint, convert, spec
from reports import child

SUMMARY = "convert a LeNet-BN checkpoint to another framework's format (convert --help)"

EXIT_CODES = """exit status:
  0  OUT and its settings sidecar OUT.bn.json written (atomically)
  1  a framework is unavailable (the reason is printed) or its process failed
  2  bad input, in one line, before anything is written: an unknown framework, IN missing,
     empty, truncated or not a checkpoint of --from's format, keys or shapes that are not
     LeNet-BN's (the key is named), settings the layer cannot run, OUT existing without --force"""


class UsageError(Exception):
    """Bad input: one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line and exit status 2, like every other bad input."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog: str = "compare.py convert") -> argparse.ArgumentParser:
    p = Parser(prog=prog, description="Convert a LeNet-BN checkpoint from one framework's own format to another's.",
               epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True, choices=convert.FRAMEWORKS,
                   help="the framework whose format IN is in")
    p.add_argument("--to", dest="target", required=True, choices=convert.FRAMEWORKS,
                   help="the framework whose format OUT is written in")
    p.add_argument("input", metavar="IN", help="the checkpoint to convert")
    p.add_argument("output", metavar="OUT", help="where to write the converted checkpoint")
    p.add_argument("--force", action="store_true",
                   help="replace OUT (and its sidecar) if it exists")
    p.add_argument("--python", action="append", default=[], metavar="NAME=INTERPRETER",
                   help="run framework NAME under another Python (e.g. mxnet=/opt/mx/bin/python); "
                        "repeatable")
    return p


def check(args) -> dict:
    """The command line checked without any framework: {framework: interpreter}; UsageError
    for bad input."""
    python = {}
    for item in args.python:
        name, sep, exe = item.partition("=")
        if not sep or name not in convert.FRAMEWORKS or not exe:
            raise UsageError(f"--python {item!r}: expected NAME=INTERPRETER with NAME in "
                             f"{', '.join(convert.FRAMEWORKS)}")
        if not pathlib.Path(exe).exists():
            raise UsageError(f"--python {item!r}: {exe} does not exist")
        python[name] = exe
    src, out = pathlib.Path(args.input), pathlib.Path(args.output)
    if not src.is_file():
        raise UsageError(f"IN {src}: {'is a directory' if src.is_dir() else 'no such file'}")
    if not os.access(src, os.R_OK):
        raise UsageError(f"IN {src}: not readable")
    if src.stat().st_size == 0:
        raise UsageError(f"IN {src}: the file is empty")
    if out.is_dir():
        raise UsageError(f"OUT {out} is a directory; give a file name")
    existing = [p for p in (out, checkpoint.sidecar_path(out)) if p.exists()]
    if existing and not args.force:
        raise UsageError(f"OUT {existing[0]} exists; use --force to replace it")
    parent = out.parent
    if not parent.is_dir():
        raise UsageError(f"OUT {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"OUT {out}: cannot write in {parent}")
    return python


def _fail(message: str, status: int) -> int:
    print(f"compare.py convert: {'error: ' if status == 2 else ''}{' '.join(message.split())}",
          file=sys.stderr)
    return status


def target_impl(impl: str, target: str) -> str:
    """The source's impl if the target has it, else its family (scratch-analytic → scratch)."""
    return impl if impl in spec.IMPL_CONVENTIONS[target] else convert.family(impl)


def main(args) -> int:
    try:
        python = check(args)
    except UsageError as e:
        return _fail(str(e), 2)
    src_path = str(pathlib.Path(args.input).resolve())
    out_path = str(pathlib.Path(args.output).resolve())
    r = child.call(args.source, "port.read", {"path": src_path}, python=python.get(args.source))
    if "result" not in r:
        return _fail(r.get("unavailable") or r.get("failed"), 1)
    read = r["result"]
    if "error" in read:
        return _fail(read["error"], 2)
    impl = target_impl(read["impl"], args.target)
    if args.source == args.target:
        ported = {"params": read["params"], "bn_config": read["bn_config"], "changes": []}
    else:
        ported = convert.port(read["params"], read["bn_config"], source=args.source,
                              target=args.target, source_impl=read["impl"], target_impl=impl)
    job = {"path": out_path, "params": ported["params"], "bn_config": ported["bn_config"],
           "impl": impl}
    w = child.call(args.target, "port.write", {"jobs": [job]}, python=python.get(args.target))
    if "result" not in w:
        return _fail(w.get("unavailable") or w.get("failed"), 1)
    written = w["result"][0]
    if "error" in written:
        return _fail(f"writing {args.output}: {written['error']}", 1)
    settings = ", ".join(f"{k} {v:g}" for k, v in ported["bn_config"].items()
                         if k in ("eps", "decay"))
    print(f"wrote {args.output} and {checkpoint.sidecar_path(args.output).name}: "
          f"{args.source} {read['impl']} ({read['layout']} layout"
          f"{', settings from its sidecar' if read['sidecar'] else ', no sidecar: the layer defaults'}"
          f") -> {args.target} {impl}; canonical {settings}")
    for change in ported["changes"]:
        print(f"note: {change}", file=sys.stderr)
    return 0
