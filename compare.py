"""bn-compare: how PyTorch, MXNet and JAX/Flax batch norm agree and differ, with evidence.

    python compare.py                 # every report below, written to results/
    python compare.py agreement       # one report; see --help

Each backend's work runs in its own child process; this process imports no framework.
"""
from __future__ import annotations

import argparse
import sys

REPORTS = {
    "agreement": "batch_norm of every backend × impl vs the float64 NumPy reference and pairwise "
                 "(y, dx, dgamma, dbeta, running stats; 2-D/4-D; float32/float64)",
    "conventions": "what each framework's momentum weighs, default momentum/eps, running-variance "
                   "estimator, when statistics update, layout: read from the installed frameworks "
                   "and checked by an experiment",
    "trajectory": "LeNet-BN from identical parameters on identical batches, N SGD steps in every "
                  "backend × impl: per-step loss and final-parameter differences",
    "train": "LeNet-BN on Fashion-MNIST, every backend × impl: accuracy, loss, examples/s, device; "
             "loss/accuracy curves as PNG",
    "speed": "training-step throughput of every backend × impl × device, scratch/native ratio",
}


def build_parser() -> argparse.ArgumentParser:
    epilog = "reports:\n" + "\n".join(f"  {k:<12} {v}" for k, v in REPORTS.items())
    p = argparse.ArgumentParser(
        prog="compare.py", description=__doc__.split("\n")[0],
        epilog=epilog + "\n\nWith no report named, all of them run in the order above.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", nargs="?", default="all", choices=["all", *REPORTS],
                   help="which report to run (default: all)")
    p.add_argument("--backends", default="torch,mxnet,jax",
                   help="comma-separated backends (default: torch,mxnet,jax)")
    p.add_argument("--data", metavar="DIR", help="Fashion-MNIST directory (default: "
                   "$FASHION_MNIST_DIR, then the user cache, else download)")
    p.add_argument("--out", metavar="DIR", default="results",
                   help="where results.json, results.md and plots go (default: results/)")
    p.add_argument("--seed", type=int, default=0, help="seed for inputs, parameters and batch order")
    p.add_argument("--dtype", choices=["float32", "float64"], default=None,
                   help="dtype for train/speed (default float32) and the only dtype agreement and "
                        "trajectory use if given (default: both)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                   help="train/speed device: auto = the GPU where a backend can use one")
    p.add_argument("--quick", action="store_true",
                   help="small sizes: 6 epochs on at most 10,000 training images, 5 trajectory steps, short timings")
    p.add_argument("--epochs", type=int, help="training epochs (default 10; --quick: 6)")
    p.add_argument("--batch-size", type=int, default=256, help="training batch size (default 256)")
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate (default: the seeds' 1.0)")
    p.add_argument("--steps", type=int, default=None,
                   help="trajectory SGD steps (default 20; --quick: 5)")
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
    args = build_parser().parse_args(argv)
    from common import runner  # heavy lifting lives in common/; still no framework import here

    return runner.run(args)


if __name__ == "__main__":
    sys.exit(main())
