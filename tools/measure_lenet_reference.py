"""Measure every backend × impl's LeNet-BN training run against the float64 NumPy reference:
worst local (per-step) error and global divergence per step, for the float32 tolerance of
`common.lenet_reference.check_trajectory`.

    python tools/measure_lenet_reference.py [--steps 20] [--batch-sizes 64,256] [--dtype float32]
"""
import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # this checkout first

import backends
from common import data, lenet, spec
from common import lenet_reference as ref

SAMPLE = "/work/shared/data/fashion-mnist-sample"


def batches_for(steps, batch_size, dtype, seed=0):
    images, labels = data.load("train", SAMPLE, download=False)
    x = data.to_nchw_float(images, np.dtype(dtype))
    out, epoch = [], 0  # as compare.py's trajectory: epochs of the sample until `steps` batches
    while len(out) < steps:
        idx = data.batch_indices(len(x), batch_size, seed=seed, epoch=epoch, drop_last=True)
        out += [(x[i], labels[i]) for i in idx][:steps - len(out)]
        epoch += 1
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-sizes", default="64,256")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--lr", type=float, default=1.0)
    ap.add_argument("--backends", default="torch,mxnet,jax")
    ap.add_argument("--json")
    a = ap.parse_args()
    params = lenet.init_params(0)
    out = {}
    for bs in map(int, a.batch_sizes.split(",")):
        batches = batches_for(a.steps, bs, a.dtype)
        for name in a.backends.split(","):
            b = backends.load(name)
            for impl in b.IMPLS:
                claimed = b.conventions()[impl]
                unbiased = claimed["running_var"] == "unbiased"
                decay = spec.effective_decay(0.9, claimed)
                t = time.perf_counter()
                run = b.lenet_train(params, batches, lr=a.lr, impl=impl, decay=0.9,
                                    unbiased=unbiased or None, dtype=a.dtype, record=True)
                c = ref.check_trajectory(params, batches, run, lr=a.lr, decay=decay,
                                         unbiased=unbiased, dtype=a.dtype)
                key = f"{name}/{impl}/b{bs}"
                out[key] = c
                lo, gl = c["local"], c["global"]
                mx = lo["max"]
                k = int(np.argmax(lo["ratio"]))
                print(f"{key:28s} local loss {mx['loss']:.2e} running {mx['running']:.2e} "
                      f"trainable {mx['trainable']:.2e}; worst/tolerance {mx['ratio']:.3f} "
                      f"({lo['worst_ratio'][k]}, step {k}) | global max loss {gl['max']['loss']:.1e} "
                      f"param {gl['max']['param']:.1e}, first divergence {gl['first_divergence']} "
                      f"| pass {c['pass']} [{time.perf_counter() - t:.0f}s]", flush=True)
                for g in ("loss", "running", "trainable", "ratio"):
                    print(f"    local {g} per step:", " ".join(f"{v:.1e}" for v in lo[g]))
                print("    local max per quantity:", " ".join(
                    f"{q}:{e:.1e}({e / c['tolerance'][q]:.2f})" for q, e in lo["per_quantity"].items()))
                print("    global |dloss| per step:", " ".join(f"{v:.1e}" for v in gl["loss"]))
                print("    global max |dparam| per step:", " ".join(f"{v:.1e}" for v in gl["param"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1, default=float)


if __name__ == "__main__":
    sys.exit(main())
