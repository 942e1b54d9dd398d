"""train: LeNet-BN on Fashion-MNIST in every backend × impl, on the GPU where one is present:
accuracy, loss, examples/s and the device each used; loss/accuracy curves as PNG."""
from __future__ import annotations

import math
import time

from common import lenet
from reports import QUICK_TRAIN_LIMIT, Section, render

SUMMARY = ("LeNet-BN on Fashion-MNIST, every backend × impl: accuracy, loss, examples/s, device; "
           "loss/accuracy curves as PNG")
NEEDS_DATA = True
QUICK_EPOCHS = 6
QUICK_TEST = 2_000

QUICK = f"train: {QUICK_EPOCHS} epochs on at most {QUICK_TRAIN_LIMIT:,} training and the first {QUICK_TEST:,} test images"

# -- child side --------------------------------------------------------------------------------
def task_train(b, args):
    from common import data
    from reports.child import per_impl, progress_line

    ds = data.load_dataset(args["data"], limit_train=args.get("limit_train"),
                           limit_test=args.get("limit_test"), download=False)

    def run(impl):
        start = time.perf_counter()
        r = b.fit(ds, impl=impl, epochs=args["epochs"], batch_size=args["batch_size"],
                  lr=args["lr"], seed=args["seed"], device=args["device"], dtype=args["dtype"],
                  progress=progress_line(args["backend"], impl))
        r.setdefault("wall_s", time.perf_counter() - start)
        return r

    return per_impl(b.IMPLS, run)


TASKS = {"train": task_train}


# -- parent side -------------------------------------------------------------------------------
def config(s) -> dict:
    return dict(epochs=s.args.epochs or (QUICK_EPOCHS if s.quick else lenet.DEFAULT_EPOCHS),
                batch_size=s.args.batch_size, lr=s.args.lr or lenet.DEFAULT_LR, seed=s.args.seed,
                device=s.args.device, dtype=s.args.dtype or "float32", data=str(s.data_dir),
                limit_train=s.train_limit, limit_test=QUICK_TEST if s.quick else None)


def allocator_note(s) -> str:
    """How the backend processes' C allocator was set, as their info task reported it."""
    notes = {s.info(n).get("allocator") for n in s.live()} - {None}
    return "; ".join(sorted(notes)) or "unknown"


def unsupported(r: dict) -> bool:
    """An impl that refused the setting (e.g. a dtype its framework cannot train in on this
    device) with UnsupportedSetting: a stated limitation, shown with its reason, not a failure."""
    return r.get("kind") == "UnsupportedSetting"


def problems(key: str, r: dict) -> list[str]:
    """Why a training run counts as failed: an error (not a refusal, see `unsupported`), or a
    loss/accuracy that is not finite."""
    if unsupported(r):
        return []
    if "error" in r:
        return [f"{key}: {r['error'][:160]}"]
    bad = [k for k in ("final_loss", "train_acc", "test_acc") if not math.isfinite(r.get(k, float("nan")))]
    return [f"{key}: {', '.join(bad)} not finite (final loss {r.get('final_loss')})"] if bad else []


def run(s) -> Section:
    cfg = config(s)
    runs = s.per_impl("train.train", cfg, f"training on {cfg['device']}")
    rows, failures = [], []
    for key, r in runs.items():
        p = problems(key, r)
        failures += p
        if "error" in r:
            rows.append([key, "", ("unsupported: " if unsupported(r) else "error: ") + r["error"],
                         "", "", "", "", ""])
            continue
        rows.append([key, r["device"], r["final_loss"], r["train_acc"], r["test_acc"],
                     round(r["examples_per_s"]) if math.isfinite(r["examples_per_s"]) else r["examples_per_s"],
                     round(r["wall_s"], 1), render.FAIL + " " + "; ".join(p) if p else ""])
    rows += s.missing_rows(8)
    size = f"{s.train_size} train images" + (f" (--quick: at most {s.train_limit})" if s.train_limit else "")
    md = ["## Training: LeNet-BN on Fashion-MNIST", "",
          f"{size}, test images: {'first ' + str(cfg['limit_test']) if cfg['limit_test'] else 'all'} "
          f"(from {cfg['data']}); {cfg['epochs']} epochs, batch {cfg['batch_size']}, SGD lr {cfg['lr']}, "
          f"{cfg['dtype']}, device `{cfg['device']}`. examples/s counts training steps only; wall time "
          f"includes evaluation and compilation. A loss or accuracy that is not finite is a failure. "
          f"Memory: {allocator_note(s)}.", "",
          render.md_table(["run", "device", "final loss", "train acc", "test acc", "examples/s",
                           "wall s", "note"], rows)]
    payload = {"config": cfg, "runs": runs}
    plots = []
    if not s.args.no_plots and render.plot_training(runs, s.plot_path("training.png")):
        plots.append("training.png")
        md += ["", "![training curves](training.png)"]
    return Section(payload, "\n".join(md), failures, plots)
