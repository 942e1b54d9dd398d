"""bn-compare: how PyTorch, MXNet and JAX/Flax batch norm agree and differ, with evidence.

    python compare.py                 # every report below, written to results/
    python compare.py agreement       # one report; see --help
    python compare.py probe torch:torch.nn.BatchNorm2d   # any layer's conventions, measured
    python compare.py convert --from torch --to jax IN OUT   # a command; see convert --help

Each backend's work runs in its own child process; this process imports no framework. The
engine is the `reports` package; this file is only the command line.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Commands with their own parser, dispatched before the report parser: name -> module providing
# SUMMARY, build_parser(prog) and main(args) -> exit status.
COMMANDS = {"probe": "reports.probe", "convert": "reports.convert"}

EXIT_CODES = """exit status:
  0    every check of every report that ran passed
  1    a check failed, a report crashed, or a backend was unavailable or its child process
       crashed (a backend named by --allow-missing may be unavailable without failing)
  2    bad input, refused in one line before any backend starts (options, data, --out)
  130  interrupted: results.json keeps the finished reports and says "interrupted": true"""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """Bad options: one line and exit status 2, like every other bad input (argparse would
        print the whole usage first)."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    import reports

    summaries = reports.summaries()
    quick = "; ".join(q for q in (getattr(reports.load(n), "QUICK", None) for n in reports.ORDER) if q)
    epilog = ("reports (run in this order when none is named):\n"
              + "\n".join(f"  {k:<12} {v}" for k, v in summaries.items()) + "\n\ncommands:\n"
              + "\n".join(f"  {k:<12} {importlib.import_module(m).SUMMARY}" for k, m in COMMANDS.items())
              + "\n\n" + EXIT_CODES
              + "\n\nResults: OUT/results.json and OUT/results.md (+ PNG plots). Running one report "
              "replaces only its own section of an existing results.json; the others are kept.")
    p = Parser(
        prog="compare.py", description=__doc__.split("\n")[0], epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", nargs="?", default="all", choices=["all", *summaries],
                   help="which report to run (default: all)")
    p.add_argument("--backends", default="torch,mxnet,jax",
                   help="comma-separated backends (default: torch,mxnet,jax)")
    p.add_argument("--allow-missing", metavar="NAME[,NAME]|all", default=None,
                   help="backends that may be unavailable without failing the run (their rows say "
                        "why); default: $BN_COMPARE_ALLOW_MISSING, else none")
    p.add_argument("--data", metavar="DIR", help="Fashion-MNIST directory (default: "
                   "$FASHION_MNIST_DIR, then the user cache, else download once)")
    p.add_argument("--out", metavar="DIR", default="results",
                   help="where results.json, results.md and plots go (default: results/)")
    p.add_argument("--seed", type=int, default=0,
                   help="non-negative seed for inputs, parameters and batch order (default 0)")
    p.add_argument("--dtype", choices=["float32", "float64", "float16", "bfloat16"], default=None,
                   help="dtype for train/speed (default float32; float16/bfloat16 train in each "
                        "framework's mixed-precision idiom); the only dtype agreement and "
                        "trajectory use if given (float32/float64; default: both); the only low "
                        "precision the precision report uses if float16/bfloat16 (default: both)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                   help="train/speed device: auto = the GPU where a backend can use one")
    p.add_argument("--quick", action="store_true", help="small sizes: " + quick.replace("%", "%%"))
    p.add_argument("--epochs", type=int, help="training epochs (default 10; --quick: 6)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="training batch size, at most the training set's size (default 256)")
    p.add_argument("--lr", type=float, default=None,
                   help="SGD learning rate, positive and finite (default: the seeds' 1.0)")
    p.add_argument("--steps", type=int, default=None,
                   help="trajectory and sync training SGD steps (default 20; --quick: 5)")
    sync = reports.load("sync")
    p.add_argument("--world-sizes", default=sync.WORLD_SIZES, metavar="W[,W...]",
                   help=f"sync: numbers of workers (default {sync.WORLD_SIZES}; at most "
                        f"{sync.MAX_WORLD})")
    p.add_argument("--shards", default="", metavar="A+B[+...][,...]",
                   help="sync: rows per worker of the unequal step for the world size of its "
                        "length, e.g. 40+16+8+0 (default: 48+16 on 2 workers, 40+16+8+0 on 4: "
                        "the middle workers get n/4, n/8, ..., the last none); also the unequal "
                        "training split when it adds up to the training batch")
    p.add_argument("--sync-timeout", type=float, default=sync.DEFAULT_TIMEOUT, metavar="S",
                   help="sync: a collective times out after S seconds, a worker's job after "
                        f"{sync.JOB_FACTOR}×S; a worker that crashes or hangs ends its backend's "
                        "part with a row saying which (default %(default)g)")
    p.add_argument("--python", action="append", default=[], metavar="NAME=INTERPRETER",
                   help="run backend NAME under another Python (e.g. mxnet=/opt/mx/bin/python, "
                        "since MXNet needs numpy<2); repeatable")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--default-malloc", action="store_true",
                   help="keep glibc's default malloc settings in the backend processes (by default "
                        "they keep freed memory for reuse: on a 2-core CPU JAX trains ~30%% "
                        "faster, PyTorch a few %%)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        command = importlib.import_module(COMMANDS[argv[0]])
        return command.main(command.build_parser(f"compare.py {argv[0]}").parse_args(argv[1:]))
    args = build_parser().parse_args(argv)
    import reports
    from reports import session

    return session.run(args, reports.ORDER if args.report == "all" else (args.report,))


if __name__ == "__main__":
    sys.exit(main())
