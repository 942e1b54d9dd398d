"""Phase-1 measurement behind the `port` report (a sketch of its rows, in one process).

Trains LeNet-BN (native BN, float32, lr 1.0, batch 256) in each framework on the Fashion-MNIST
sample, saves its native checkpoint, ports it to every other framework correctly and with each
porting mistake (common.convert.port), writes and reloads the target's native file, evaluates the
test set in the target and compares with the source; then fine-tunes K steps on the same batches
in source and target (correct and momentum-copied ports) and measures the drift.

    python docs/port-sketch/measure.py [--epochs 3] [--steps 20] [--data DIR]
"""
import argparse
import json
import pathlib
import sys
import tempfile

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
import backends  # noqa: E402
from common import convert, data, divergence, lenet  # noqa: E402

DT = np.float32


def batches(ds, epochs, seed=0, first_epoch=0):
    return [(ds.train_x[i], ds.train_y[i]) for e in range(first_epoch, first_epoch + epochs)
            for i in data.batch_indices(len(ds.train_x), 256, seed=seed, epoch=e)]


def fine_tune(b, t, p_s, p_t, cfg_s, cfg_t, tune, x, y, dt, label):
    """K SGD steps on the same batches in source and target from the ported checkpoint (cast to
    `dt`): how far running statistics, weights and logits drift apart."""
    p_s, p_t = lenet.cast(p_s, dt), lenet.cast(p_t, dt)
    s_run = b.lenet_train(p_s, tune, lr=1.0, impl="native", eps=cfg_s["eps"],
                          decay=cfg_s["decay"], dtype=dt)
    t_run = t.lenet_train(p_t, tune, lr=1.0, impl="native", eps=cfg_t["eps"],
                          decay=cfg_t["decay"], dtype=dt)
    ls = b.lenet_eval(s_run["params"], x, impl="native", dtype=dt, eps=cfg_s["eps"])
    lt = t.lenet_eval(t_run["params"], x, impl="native", dtype=dt, eps=cfg_t["eps"])
    diff = lenet.max_abs_diff(s_run["params"], t_run["params"])
    rel_var = max(float(np.max(np.abs(t_run["params"][f"{bn}.running_var"]
                                      / s_run["params"][f"{bn}.running_var"] - 1)))
                  for bn in lenet.BN_LAYERS)
    return dict(label, dtype=dt, steps=len(tune), decay_from=cfg_s["decay"],
                decay_to=cfg_t["decay"], unbiased_from=cfg_s["unbiased"],
                unbiased_to=cfg_t["unbiased"],
                max_abs_running_mean_diff=max(v for k, v in diff.items()
                                              if k.endswith("running_mean")),
                max_rel_running_var_diff=rel_var,
                max_abs_weight_diff=max(v for k, v in diff.items()
                                        if not lenet.is_running_stat(k)),
                max_abs_logit_diff=float(np.max(np.abs(lt - ls))),
                argmax_agreement=float(np.mean(lt.argmax(1) == ls.argmax(1))),
                test_acc_from=float(np.mean(ls.argmax(1) == y)),
                test_acc_to=float(np.mean(lt.argmax(1) == y)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--data", default=str(pathlib.Path(__file__).resolve().parents[3]
                                          / "shared/data/fashion-mnist-sample"))
    args = ap.parse_args()
    ds = data.load_dataset(args.data, download=False)
    B = {n: backends.load(n) for n in backends.names()}
    cfg0 = {"eps": 1e-5, "decay": 0.9, "unbiased": False}
    tmp = pathlib.Path(tempfile.mkdtemp())
    x, y = ds.test_x.astype(DT), ds.test_y
    probe = ds.test_x[:256].astype(DT)
    train = batches(ds, args.epochs)
    tune = batches(ds, 2, seed=1)[:args.steps]
    rows, tuning = [], []
    for src, b in B.items():
        cfg = convert.target_config(cfg0, src, "native")[0]
        run = b.lenet_train(lenet.init_params(0), train, lr=1.0, impl="native", eps=cfg["eps"],
                            decay=cfg["decay"], dtype="float32")
        cfg = dict(cfg, num_batches_tracked=len(train)) if src == "torch" else cfg
        b.save_checkpoint(run["params"], tmp / src, impl="native", bn_config=cfg)
        params, cfg = b.load_checkpoint(tmp / src)
        logits_src = b.lenet_eval(params, x, impl="native", dtype="float32", eps=cfg["eps"])
        acc_src = float(np.mean(logits_src.argmax(1) == y))
        acts_src = b.lenet_layers(params, probe, impl="native", dtype="float32", eps=cfg["eps"])
        print(f"trained {src}: {len(train)} steps, loss {run['losses'][-1]:.3f}, "
              f"test acc {acc_src:.4f}", file=sys.stderr, flush=True)
        for tgt, t in B.items():
            if tgt == src:
                continue
            for kind in [None] + list(convert.MISTAKES):
                r = convert.port(params, cfg, source=src, target=tgt, mistake=kind)
                path = tmp / f"{src}-{tgt}-{kind}"
                t.save_checkpoint(r["params"], path, impl="native", bn_config=r["bn_config"])
                p_t, cfg_t = t.load_checkpoint(path)
                kw = dict(impl="native", dtype="float32", eps=cfg_t["eps"], fix_gamma=r["fix_gamma"])
                logits_t = t.lenet_eval(p_t, x, **kw)
                acts_t = t.lenet_layers(p_t, probe, **kw)
                iso = t.lenet_layers(p_t, probe, inputs=divergence.isolated_inputs(acts_src), **kw)
                tol = divergence.TOLERANCE["float32"]
                rows.append({
                    "from": src, "to": tgt, "kind": kind or "correct", "applies": r["applies"],
                    "test_acc_from": acc_src,
                    "test_acc_to": float(np.mean(logits_t.argmax(1) == y)),
                    "max_abs_logit_diff": float(np.max(np.abs(logits_t - logits_src))),
                    "argmax_agreement": float(np.mean(logits_t.argmax(1) == logits_src.argmax(1))),
                    "first_divergent_layer":
                        divergence.compare(acts_src, acts_t, tol=tol)["first_divergent_layer"],
                    "first_divergent_isolated":
                        divergence.compare(acts_src, iso, tol=tol)["first_divergent_layer"],
                    "bn_config_to": cfg_t, "changes": r["changes"]})
                if kind in (None, "momentum-copied"):
                    for dt in ("float32", "float64"):
                        label = {"from": src, "to": tgt, "kind": kind or "correct"}
                        tuning.append(fine_tune(b, t, params, p_t, cfg, cfg_t, tune, x, y, dt,
                                                label))
    print(json.dumps({"port": rows, "fine_tune": tuning}, indent=1, default=str))
    print(markdown(rows, tuning), file=sys.stderr)


def markdown(rows, tuning) -> str:
    out = ["| from | to | kind | applies | test_acc_from | test_acc_to | max_abs_logit_diff | "
           "argmax_agreement | first_divergent_layer (cascaded / isolated) |",
           "|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['from']} | {r['to']} | {r['kind']} | {'yes' if r['applies'] else 'n/a'} | "
            f"{r['test_acc_from']:.4f} | {r['test_acc_to']:.4f} | {r['max_abs_logit_diff']:.3g} | "
            f"{r['argmax_agreement']:.4f} | {r['first_divergent_layer']} / "
            f"{r['first_divergent_isolated']} |" for r in rows]
    out += ["", "| from | to | kind | dtype | decay | unbiased | running_mean abs diff | "
            "running_var rel diff | weight diff | logit diff | argmax agree | acc from | acc to |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['from']} | {r['to']} | {r['kind']} | {r['dtype']} | {r['decay_from']:.3g} -> "
            f"{r['decay_to']:.3g} | {r['unbiased_from']} -> {r['unbiased_to']} | "
            f"{r['max_abs_running_mean_diff']:.3g} | {r['max_rel_running_var_diff']:.3g} | "
            f"{r['max_abs_weight_diff']:.3g} | {r['max_abs_logit_diff']:.3g} | "
            f"{r['argmax_agreement']:.4f} | {r['test_acc_from']:.4f} | {r['test_acc_to']:.4f} |"
            for r in tuning]
    return "\n".join(out)


if __name__ == "__main__":
    main()
