"""port: LeNet-BN trained in each framework, its native checkpoint converted to every other
framework (correctly, and with each mistake a careless converter makes), loaded in a fresh child
process of the target and compared with the source: test accuracy, logits, argmax agreement and
the first layer whose activations diverge (cascaded and isolated, `common.divergence`). Round
trips A→B→A through real files must give the original checkpoint back bit for bit. Fine-tuning
after the port measures what even a correct port cannot carry over, and why: the same K steps in
source and target, and in one framework's from-scratch layer in float64 from the source's
settings to the target's, one convention changed at a time (variance estimator, momentum
meaning, float32 momentum), so each cause is measured apart from the frameworks' rounding.

Every framework's work runs in its own child processes (`TASKS`); this process converts with
`common.convert` and judges. The tasks `read` and `write` also serve `compare.py convert`.
"""
from __future__ import annotations

import pathlib
import re
import tempfile

import numpy as np

from common import checkpoint, convert, data, divergence, lenet, spec
from reports import Section, render, train, within, worst

SUMMARY = ("LeNet-BN trained in each framework, converted to every other (correctly and with each "
           "porting mistake), loaded in a fresh process: accuracy, logits, first divergent layer; "
           "round trips; fine-tuning drift and its causes")
NEEDS_DATA = True
QUICK_EPOCHS = 2  # after 1 epoch at lr 1.0 every model predicts one class in inference
STEPS, QUICK_STEPS = 20, 3  # fine-tuning steps after the port
PROBE = 128  # test images whose per-layer activations are compared
QUICK = (f"port: {QUICK_EPOCHS} epochs of training (unless --epochs), {QUICK_STEPS} fine-tuning "
         f"steps (else {STEPS})")

KINDS = ("correct", *convert.MISTAKES)
# Where each porting mistake first shows (None: not at inference). Measured per layer, a mistake
# found anywhere else is flagged.
EXPECTED_LAYER = {"correct": None, "momentum-copied": None, "eps-default": "bn1",
                  "no-flatten-permutation": "fc1", "kernel-reshaped": "conv1", "fix-gamma": "bn1"}
# The ports fine-tuned after the port, and in which dtypes: float32 beside float64 shows the
# rounding a correct port cannot avoid; a copied momentum's drift is its meaning, as large in
# float64 as in float32.
TUNED_DTYPES = {"correct": ("float32", "float64"), "momentum-copied": ("float64",)}
TUNED_KINDS = tuple(TUNED_DTYPES)
# The convention chains (each convention's effect alone) all run in one framework's from-scratch
# layer in float64, the first of these that is available: the cheapest to run here (5 steps at
# batch 256 and an evaluation of 2,000 images, CPU seconds: MXNet 1.1-1.4, PyTorch 2.3-3.7,
# JAX 6.6-7.5, most of it compiling each setting).
CHAIN_FRAMEWORKS = ("mxnet", "torch", "jax")
EXT = {"torch": ".pt", "mxnet": ".params", "jax": ".msgpack"}
PORT_DIR = "port"  # under --out: the trained checkpoints and their correct ports
# The train report's batch-norm settings: canonical eps and decay, each native layer's own
# running-variance estimator (common.convert.target_config).
TRAIN_BN = {"eps": 1e-5, "decay": 0.9, "unbiased": False}
LOGIT_TOL = divergence.TOLERANCE  # float32 1e-4, float64 1e-10: the targets
MIN_ARGMAX = 0.999
_FRAMEWORK = "|".join(EXT)
_OWN_FILE = re.compile(  # the names `_name` gives the files kept in PORT_DIR
    rf"^({_FRAMEWORK})(-to-({_FRAMEWORK}))?({'|'.join(map(re.escape, EXT.values()))})"
    rf"({re.escape(checkpoint.SIDECAR_SUFFIX)})?$")


def plan(n: int, batch_size: int, seed: int, epochs: int, steps: int):
    """(training batches: index arrays of `epochs` epochs, as `fit` takes them; the first `steps`
    full batches after them, for fine-tuning). The same in every process."""
    train_idx = [i for e in range(epochs)
                 for i in data.batch_indices(n, batch_size, seed=seed, epoch=e)]
    tune, epoch = [], epochs
    while len(tune) < steps:
        tune += data.batch_indices(n, batch_size, seed=seed, epoch=epoch, drop_last=True)
        epoch += 1
    return train_idx, tune[:steps]


def source_config(framework: str, steps: int) -> dict:
    """The bn_config a source trains and saves with: the train report's settings under its
    native layer's variance estimator, and how many batches it saw."""
    return dict(convert.target_config(TRAIN_BN, framework, "native")[0], num_batches_tracked=steps)


# -- child side --------------------------------------------------------------------------------
class _Data:
    """The splits in a backend's process, converted from uint8 once per dtype (so float32 and
    float64 images are each the exact k/255 of their dtype)."""

    def __init__(self, args):
        self.raw = {split: data.load(split, args["data"], limit=args.get(f"limit_{split}"),
                                     download=False) for split in ("train", "test")}
        self._x = {}

    def x(self, split, dtype):
        key = (split, np.dtype(dtype).name)
        if key not in self._x:
            self._x[key] = data.to_nchw_float(self.raw[split][0], np.dtype(dtype))
        return self._x[key]

    def y(self, split):
        return self.raw[split][1]

    def batches(self, idx, dtype):
        x, y = self.x("train", dtype), self.y("train")
        return [(x[i], y[i]) for i in idx]


def _guard(fn):
    """fn(), or {"error": ...}: one file's failure must not lose the others' results."""
    from reports.child import describe

    try:
        return fn()
    except Exception as e:
        return {"error": describe(e)}


def _evaluate(b, ck, d, args, *, fix_gamma=False, float64=False, layers=False, source_acts=None):
    """A loaded checkpoint on the test set: logits and accuracy in its dtype; with `float64`
    also the logits of its parameters cast to float64; with `layers` the activations of the
    first PROBE test images; with `source_acts` the per-layer errors against them, cascaded and
    isolated."""
    p, cfg = ck["params"], ck["bn_config"]
    dt = convert.float_dtype(p).name
    kw = dict(impl=ck["impl"], eps=cfg["eps"], fix_gamma=fix_gamma, device=args["device"])
    logits = b.lenet_eval(p, d.x("test", dt), dtype=dt, **kw)
    out = {"logits": logits, "test_acc": float(np.mean(logits.argmax(1) == d.y("test")))}
    if float64:
        out["logits64"] = b.lenet_eval(lenet.cast(p, np.float64), d.x("test", "float64"),
                                       dtype="float64", **kw)
    probe = d.x("test", dt)[:args["probe"]]
    if layers:
        out["acts"] = b.lenet_layers(p, probe, dtype=dt, **kw)
    if source_acts is not None:
        tol = divergence.TOLERANCE[dt]
        cascaded = b.lenet_layers(p, probe, dtype=dt, **kw)
        isolated = b.lenet_layers(p, probe, dtype=dt, inputs=divergence.isolated_inputs(source_acts),
                                  **kw)
        out["layers"] = {"cascaded": divergence.compare(source_acts, cascaded, tol=tol),
                         "isolated": divergence.compare(source_acts, isolated, tol=tol)}
    return out


def _finetune(b, ck, d, tune_idx, args, *, impl=None, dtypes=("float32", "float64")):
    """`len(tune_idx)` SGD steps from the checkpoint, per dtype, under its bn_config: the
    parameters and running statistics reached, the losses, and the test logits then."""
    cfg, impl = ck["bn_config"], impl or ck["impl"]
    out = {}
    for dt in dtypes:
        r = b.lenet_train(lenet.cast(ck["params"], dt), d.batches(tune_idx, dt), lr=args["lr"],
                          impl=impl, eps=cfg["eps"], decay=cfg["decay"], unbiased=cfg["unbiased"],
                          dtype=dt, device=args["device"])
        logits = b.lenet_eval(r["params"], d.x("test", dt), impl=impl, dtype=dt, eps=cfg["eps"],
                              device=args["device"])
        out[dt] = {"params": r["params"], "losses": [float(v) for v in r["losses"]],
                   "logits": logits, "test_acc": float(np.mean(logits.argmax(1) == d.y("test")))}
    return out


def task_train(b, args):
    """Train LeNet-BN (native BN) from the seed's parameters, save the framework's own
    checkpoint, read it back from the file, evaluate it and fine-tune it."""
    from reports.child import exact_numerics, progress_line

    exact_numerics(b)
    say = progress_line(args["backend"], "native")
    d = _Data(args)
    dt, cfg = args["dtype"], args["bn_config"]
    train_idx, tune_idx = plan(len(d.y("train")), args["batch_size"], args["seed"], args["epochs"],
                               args["steps"])
    say(f"port: training {len(train_idx)} steps ({args['epochs']} epoch(s), {dt})")
    run = b.lenet_train(lenet.cast(lenet.init_params(args["seed"]), dt), d.batches(train_idx, dt),
                        lr=args["lr"], impl="native", eps=cfg["eps"], decay=cfg["decay"],
                        unbiased=cfg["unbiased"], dtype=dt, device=args["device"])
    b.save_checkpoint(run["params"], args["path"], impl="native", bn_config=cfg)
    ck = b.read_checkpoint(args["path"])
    say(f"port: evaluating {args['path']} and fine-tuning it {len(tune_idx)} steps")
    return {"losses": [float(v) for v in run["losses"]], "path": args["path"], "checkpoint": ck,
            **_evaluate(b, ck, d, args, float64=True, layers=True),
            "finetune": _finetune(b, ck, d, tune_idx, args)}


def task_read(b, args):
    """A checkpoint in this framework's format read as canonical params and bn_config; bad
    input (missing, truncated, foreign, keys or shapes that are not LeNet-BN's) is
    {"error": one line}."""
    try:
        return b.read_checkpoint(args["path"])
    except ValueError as e:
        return {"error": " ".join(str(e).split())}


def _write(b, jobs):
    out = []
    for job in jobs:
        def one(job=job):
            b.save_checkpoint(job["params"], job["path"], impl=job["impl"],
                              bn_config=job["bn_config"])
            return {"path": job["path"], **({"read": b.read_checkpoint(job["path"])}
                                            if job.get("read_back") else {})}
        out.append(_guard(one))
    return out


def task_write(b, args):
    """Write checkpoints ({"path", "params", "bn_config", "impl", "read_back"} each) in this
    framework's format; with read_back, read each back from its file."""
    return _write(b, args["jobs"])


def task_examine(b, args):
    """In a process that did not write them: evaluate ported checkpoints against their source's
    activations and fine-tune some; fine-tune the sources' parameters under each setting of the
    convention chains (the from-scratch layer, float64); write the round-trip files."""
    from reports.child import exact_numerics, progress_line

    exact_numerics(b)
    say = progress_line(args["backend"], "native")
    d = _Data(args)
    _, tune_idx = plan(len(d.y("train")), args["batch_size"], args["seed"], args["epochs"],
                       args["steps"])
    out = {"evaluate": [], "finetune": [], "chain": []}
    say(f"port: loading and evaluating {len(args['evaluate'])} ported checkpoints")
    for job in args["evaluate"]:
        out["evaluate"].append(_guard(lambda: _evaluate(
            b, b.read_checkpoint(job["path"]), d, args, fix_gamma=job["fix_gamma"],
            float64=job["float64"], source_acts=args["acts"][job["source"]])))
    say(f"port: fine-tuning {len(args['finetune'])} ported checkpoints {len(tune_idx)} steps")
    for job in args["finetune"]:
        out["finetune"].append(_guard(lambda: _finetune(b, b.read_checkpoint(job["path"]), d,
                                                        tune_idx, args, dtypes=job["dtypes"])))
    if args["chain"]:
        say(f"port: {len(args['chain'])} convention variants, from-scratch layer, float64")
    for job in args["chain"]:
        variant = {"params": job["params"], "bn_config": job["bn_config"], "impl": "scratch"}
        out["chain"].append(_guard(lambda: _finetune(b, variant, d, tune_idx, args,
                                                     dtypes=["float64"])["float64"]))
    out["write"] = _write(b, args["write"])
    return out


TASKS = {"train": task_train, "read": task_read, "write": task_write, "examine": task_examine}


# -- parent side: pure functions ---------------------------------------------------------------
def _max_abs(a, b) -> float:
    """Largest |a − b| (NaN if either has a NaN; inf if the shapes differ)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b), initial=0.0)) if a.size else 0.0


def agreement(a, b) -> float:
    """Fraction of examples whose argmax agrees; NaN when either side has a non-finite logit (no
    verdict may pass it) or the shapes differ."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan")
    return float(np.mean(a.argmax(1) == b.argmax(1)))


def port_row(source: str, target: str, kind: str, dtype: str, src: dict, tgt: dict,
             port: dict) -> dict:
    """One row: the source's evaluation of its own checkpoint (`src`) against the target's of
    the ported one (`tgt`), with the verdict for a correct port (targets: argmax agreement ≥
    MIN_ARGMAX, logits within LOGIT_TOL in the checkpoint's dtype and in float64, no divergent
    layer) or, for a mistake, whether it was found where it should be (`flag`)."""
    row = {"from": source, "to": target, "kind": kind, "dtype": dtype,
           "applies": port["applies"], "changes": port.get("changes", []),
           "expected_layer": EXPECTED_LAYER[kind] if port["applies"] else None}
    if not port["applies"]:
        return row
    if "error" in tgt:
        return dict(row, error=tgt["error"], **({"pass": False} if kind == "correct" else {}))
    row.update(test_acc_from=src["test_acc"], test_acc_to=tgt["test_acc"],
               max_abs_logit_diff=_max_abs(src["logits"], tgt["logits"]),
               argmax_agreement=agreement(src["logits"], tgt["logits"]),
               first_divergent_layer=tgt["layers"]["cascaded"]["first_divergent_layer"],
               first_divergent_layer_isolated=tgt["layers"]["isolated"]["first_divergent_layer"],
               layer_errors={m: tgt["layers"][m]["errors"] for m in ("cascaded", "isolated")},
               layer_tolerance=tgt["layers"]["cascaded"]["tol"])
    if kind == "correct":
        row["max_abs_logit_diff_float64"] = _max_abs(src["logits64"], tgt["logits64"])
        row["problems"] = correct_problems(row, dtype)
        row["pass"] = not row["problems"]
    else:
        found = (row["first_divergent_layer"], row["first_divergent_layer_isolated"])
        want = row["expected_layer"]
        if found != (want, want):
            row["flag"] = (f"expected {'at ' + want if want else 'no divergent layer'}, found "
                           f"{found[0] or 'none'} (cascaded) / {found[1] or 'none'} (isolated)")
    return row


def correct_problems(row: dict, dtype: str) -> list[str]:
    """Why a correct port misses its targets (NaN-safe: a NaN misses every one)."""
    out = []
    if not within(row["max_abs_logit_diff"], LOGIT_TOL[dtype]):
        out.append(f"logits differ by {render.fmt(row['max_abs_logit_diff'])} > "
                   f"{LOGIT_TOL[dtype]:g} ({dtype})")
    if not within(MIN_ARGMAX, row["argmax_agreement"]):
        out.append(f"argmax agreement {row['argmax_agreement']} < {MIN_ARGMAX}")
    if not within(row["max_abs_logit_diff_float64"], LOGIT_TOL["float64"]):
        out.append(f"float64 logits differ by {render.fmt(row['max_abs_logit_diff_float64'])} > "
                   f"{LOGIT_TOL['float64']:g}")
    for mode in ("", "_isolated"):
        layer = row[f"first_divergent_layer{mode}"]
        if layer:
            out.append(f"activations diverge at {layer} ({mode[1:] or 'cascaded'})")
    return out


def round_trip(original, back) -> dict:
    """Whether checkpoint `back` (A→B→A) is `original` bit for bit: weights and sidecar."""
    out = {}
    for what, a, b in (("weights", original, back),
                       ("sidecar", checkpoint.sidecar_path(original), checkpoint.sidecar_path(back))):
        try:
            out[f"{what}_identical"] = pathlib.Path(a).read_bytes() == pathlib.Path(b).read_bytes()
        except OSError as e:
            out[f"{what}_identical"] = False
            out["error"] = f"{e.strerror}: {e.filename}"
    out["pass"] = out["weights_identical"] and out["sidecar_identical"]
    return out


def drift(a: dict, b: dict) -> dict:
    """How far two fine-tuned models ({"params", "logits"}) are apart: largest |Δ| of running
    means, of trainable parameters and of test logits, the largest relative Δ of running
    variances, argmax agreement. NaN propagates (reports.worst)."""
    pa, pb = a["params"], b["params"]
    names = lenet.param_shapes()

    def over(pick, fn):
        return worst(fn(pa[k], pb[k]) for k in names if pick(k))

    def rel(x, y):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        return float(np.max(np.abs(y / x - 1.0)))

    return {"running_mean": over(lambda k: k.endswith(".running_mean"), _max_abs),
            "running_var_rel": over(lambda k: k.endswith(".running_var"), rel),
            "weights": over(lambda k: not lenet.is_running_stat(k), _max_abs),
            "logits": _max_abs(a["logits"], b["logits"]),
            "argmax_agreement": agreement(a["logits"], b["logits"])}


def _f32(decay: float, claimed: dict) -> float:
    return spec.effective_decay(decay, claimed)


def convention_chain(source_cfg: dict, target_cfg: dict, claimed_source: dict,
                     claimed_target: dict) -> list[tuple[str, float, bool]]:
    """The fine-tuning settings from the source's, as its native layer runs them, to the
    target's, one convention changed at a time: [(what changed, decay, unbiased), ...], the
    first being the source's. `claimed_*` are the native layers' conventions (MXNet's applies
    momentum in float32: `spec.effective_decay`)."""
    ds, us = source_cfg["decay"], bool(source_cfg["unbiased"])
    dt, ut = target_cfg["decay"], bool(target_cfg["unbiased"])
    word = {True: "unbiased", False: "biased"}
    eff_s, eff_t = _f32(ds, claimed_source), _f32(dt, claimed_target)
    steps = [("source, as its layer runs", eff_s, us),
             (f"float32 momentum, source: decay {eff_s!r} -> {ds!r}", ds, us),
             (f"variance estimator: {word[us]} -> {word[ut]}", ds, ut),
             (f"momentum meaning: decay {ds:g} -> {dt:g}", dt, ut),
             (f"float32 momentum, target: decay {dt!r} -> {eff_t!r}", eff_t, ut)]
    out = [steps[0]]
    for label, decay, unbiased in steps[1:]:
        if (decay, unbiased) != out[-1][1:]:
            out.append((label, decay, unbiased))
    return out


def cause_of(label: str) -> str:
    """The cause a chain step measures ("variance estimator", ...), without its numbers."""
    return label.split(":")[0].replace(", source", "").replace(", target", "")


def fine_tune_row(source, target, kind, chain, chain_runs, src_ft, tgt_ft) -> dict:
    """The drift after fine-tuning one port: each convention on its own (consecutive steps of
    `chain`, all run by one framework's from-scratch layer in float64), all of them together,
    what they leave unexplained in float64 (the target's native run against that layer run with
    the target's conventions), and the two frameworks in float64 and float32.
    `chain_runs`: {(decay, unbiased): run}; src_ft/tgt_ft: {dtype: run}."""
    row = {"from": source, "to": target, "kind": kind, "steps": []}
    runs = [chain_runs.get((d, u), {"error": "not run"}) for _, d, u in chain]
    problems = [r["error"] for r in [*runs, *src_ft.values(), *tgt_ft.values()] if "error" in r]
    if problems or not src_ft or not tgt_ft:
        return dict(row, error="; ".join(problems) or "fine-tuning did not run")
    for (label, _, _), prev, cur in zip(chain[1:], runs, runs[1:]):
        row["steps"].append({"cause": label, **drift(prev, cur)})
    row["conventions"] = drift(runs[0], runs[-1])
    row["source_native_vs_chain"] = drift(runs[0], src_ft["float64"])
    row["unexplained_float64"] = drift(runs[-1], tgt_ft["float64"])
    for dt in tgt_ft:  # the dtypes the port was fine-tuned in (TUNED_DTYPES)
        row[dt] = dict(drift(src_ft[dt], tgt_ft[dt]), test_acc_from=src_ft[dt]["test_acc"],
                       test_acc_to=tgt_ft[dt]["test_acc"])
    return row


def fine_tune_problems(key: str, runs: dict) -> list[str]:
    """A fine-tuning run whose losses or logits are not finite is a failure."""
    out = []
    for dt, r in runs.items():
        if "error" in r:
            out.append(f"{key} {dt}: {r['error'][:160]}")
            break  # one line for a crash that took every dtype
        if not (np.all(np.isfinite(r["losses"])) and np.all(np.isfinite(r["logits"]))):
            out.append(f"{key} {dt}: fine-tuning loss or logits not finite")
    return out


def not_applicable(kind: str) -> str:
    return {"momentum-copied": "the momentum means the same in both",
            "eps-default": "the target's default eps is the source's eps",
            "no-flatten-permutation": "same layout (NCHW) on both sides",
            "kernel-reshaped": "same layout (NCHW) on both sides",
            "fix-gamma": "neither side is MXNet"}.get(kind, "")


# -- parent side: the run ----------------------------------------------------------------------
def validate(s) -> None:
    from reports.session import UsageError

    where = s.out / PORT_DIR
    if where.exists() and not where.is_dir():
        raise UsageError(f"--out {s.args.out}: {where} exists and is not a directory (the port "
                         "report keeps its checkpoints there)")


def config(s) -> dict:
    """The train report's settings (batch, lr, seed, device, dtype, data, --quick limits) with
    this report's epochs, fine-tuning steps and probe size."""
    cfg = train.config(s)
    cfg.update(epochs=s.args.epochs or (QUICK_EPOCHS if s.quick else lenet.DEFAULT_EPOCHS),
               steps=QUICK_STEPS if s.quick else STEPS, probe=PROBE)
    return cfg


def _result(r) -> dict:
    return r["result"] if "result" in r else {"error": r.get("failed") or r.get("unavailable")}


def _clear(out_dir: pathlib.Path) -> None:
    """Remove the checkpoints an earlier run of this report left (its own names only)."""
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            if p.is_file() and _OWN_FILE.match(p.name):
                p.unlink()


def _name(source, target=None, kind="correct", back=False) -> str:
    ext = EXT[source if back or target is None else target]
    if target is None:
        return f"{source}{ext}"
    return f"{source}-to-{target}" + ("" if kind == "correct" else f"-{kind}") + \
        (f"-to-{source}" if back else "") + ext


def _ports(trained: dict, live, out_dir, tmp) -> tuple[dict, dict]:
    """Every (source, target, kind): what `common.convert.port` makes of the source's checkpoint
    ({"applies", "changes", "fix_gamma", "path"}), and the write jobs per target. Correct ports
    go to `out_dir` (kept for users), mistakes to `tmp`."""
    ports, jobs = {}, {t: [] for t in live}
    for src, res in trained.items():
        if "error" in res:
            continue
        ck = res["checkpoint"]
        for tgt in live:
            if tgt == src:
                continue
            for kind in KINDS:
                r = convert.port(ck["params"], ck["bn_config"], source=src, target=tgt,
                                 mistake=None if kind == "correct" else kind)
                info = {k: r[k] for k in ("applies", "changes", "fix_gamma", "bn_config")}
                if r["applies"]:
                    where = out_dir if kind == "correct" else tmp
                    info["path"] = str(where / _name(src, tgt, kind))
                    jobs[tgt].append(((src, tgt, kind), {
                        "path": info["path"], "params": r["params"], "bn_config": r["bn_config"],
                        "impl": "native", "read_back": kind == "correct"}))
                ports[src, tgt, kind] = info
    return ports, jobs


def run(s) -> Section:
    cfg = config(s)
    live = s.live()
    out_dir = s.out / PORT_DIR
    steps = len(plan(s.train_size, cfg["batch_size"], cfg["seed"], cfg["epochs"], cfg["steps"])[0])
    claimed = {f: s.info(f)["conventions"]["native"] for f in live}
    with tempfile.TemporaryDirectory(prefix="bn-compare-port-") as tmp:
        _clear(out_dir)
        trained = {}
        for f in live:
            s.log(f"[{f}] port: training and saving its checkpoint ...")
            trained[f] = _result(s.call(f, "port.train", {
                **cfg, "bn_config": source_config(f, steps), "path": str(out_dir / _name(f))}))
        ports, jobs = _ports(trained, live, out_dir, pathlib.Path(tmp))
        for tgt in live:
            if not jobs[tgt]:
                continue
            s.log(f"[{tgt}] port: writing {len(jobs[tgt])} ported checkpoints ...")
            res = _result(s.call(tgt, "port.write", {"jobs": [j for _, j in jobs[tgt]]}))
            results = res if isinstance(res, list) else [res] * len(jobs[tgt])  # crashed: each
            for (key, _), w in zip(jobs[tgt], results):
                ports[key]["written"] = w
        chains = _chains(trained, ports, claimed, live)
        chain_fw = next((f for f in CHAIN_FRAMEWORKS if f in live), None)
        chain_jobs = [((src, d, u), {"params": trained[src]["checkpoint"]["params"],
                                     "bn_config": dict(trained[src]["checkpoint"]["bn_config"],
                                                       decay=d, unbiased=u)})
                      for src, d, u in sorted({(k[0], d, u) for k, chain in chains.items()
                                               for _, d, u in chain})]
        examined = {f: _examine(s, cfg, f, trained, ports, chain_jobs if f == chain_fw else [],
                                live, pathlib.Path(tmp)) for f in live}
        chain_runs = {key: r for ex in examined.values()
                      for key, r in (ex.get("chain") or {}).items()}
        round_trips = _round_trips(ports, examined, out_dir)
    tuned, tune_failures = _fine_tuning(trained, examined, chains, chain_runs, live)
    return _section(s, cfg, trained, ports, examined, round_trips, (tuned, tune_failures),
                    chain_fw)


def _chains(trained, ports, claimed, live) -> dict:
    """{(source, target, kind): convention_chain} for every fine-tuned port."""
    out = {}
    for (src, tgt, kind), p in ports.items():
        if kind in TUNED_KINDS and p["applies"]:
            out[src, tgt, kind] = convention_chain(trained[src]["checkpoint"]["bn_config"],
                                                   p["bn_config"], claimed[src], claimed[tgt])
    return out


def _examine(s, cfg, f, trained, ports, chain_jobs, live, tmp) -> dict:
    """Phase 3 in a fresh process of `f`: the ports into `f` evaluated and fine-tuned, the
    convention-chain runs given to it, and the round-trip files back into `f`."""
    def ok(key):  # written without error
        return "path" in ports.get(key, {}) and "error" not in ports[key].get("written",
                                                                             {"error": ""})

    evaluate = [(src, f, k) for src in trained for k in KINDS if ok((src, f, k))]
    finetune = [key for key in evaluate if key[2] in TUNED_KINDS]
    back = []
    for other in live:
        w = ports.get((f, other, "correct"), {}).get("written", {})
        if "read" in w:
            r = convert.port(w["read"]["params"], w["read"]["bn_config"], source=other, target=f)
            back.append((other, {"path": str(tmp / _name(f, other, back=True)),
                                 "params": r["params"], "bn_config": r["bn_config"],
                                 "impl": "native"}))
    if not (evaluate or chain_jobs or back):
        return {}
    s.log(f"[{f}] port: evaluating and fine-tuning the ports into {f} in a fresh process ...")
    res = _result(s.call(f, "port.examine", {
        **cfg, "evaluate": [{"path": ports[k]["path"], "fix_gamma": ports[k]["fix_gamma"],
                             "source": k[0], "float64": k[2] == "correct"} for k in evaluate],
        "acts": {src: trained[src]["acts"] for src in {k[0] for k in evaluate}},
        "finetune": [{"path": ports[k]["path"], "dtypes": TUNED_DTYPES[k[2]]} for k in finetune],
        "chain": [job for _, job in chain_jobs], "write": [j for _, j in back]}))
    if "error" in res:
        n = {"evaluate": len(evaluate), "finetune": len(finetune), "chain": len(chain_jobs),
             "write": len(back)}
        res = {k: [{"error": res["error"]}] * v for k, v in n.items()}
    return {"evaluate": dict(zip(evaluate, res["evaluate"])),
            "finetune": dict(zip(finetune, res["finetune"])),
            "chain": dict(zip([key for key, _ in chain_jobs], res["chain"])),
            "back": {o: dict(w, path=j["path"]) for (o, j), w in zip(back, res["write"])}}


def _round_trips(ports, examined, out_dir) -> list[dict]:
    out = []
    for f, ex in examined.items():
        for other, w in (ex.get("back") or {}).items():
            row = {"from": f, "via": other}
            if "error" in w:
                row.update({"error": w["error"], "pass": False})
            else:
                row.update(round_trip(out_dir / _name(f), w["path"]))
            out.append(row)
    return out


# -- parent side: rows, verdicts, Markdown -----------------------------------------------------
def _rows(trained, ports, examined, live, dtype) -> list[dict]:
    rows = []
    for src, res in trained.items():
        if "error" in res:
            continue
        for tgt in live:
            for kind in KINDS if tgt != src else ():
                port = ports.get((src, tgt, kind))
                if port is None:  # not converted
                    continue
                tgt_eval = (examined.get(tgt) or {}).get("evaluate", {}).get((src, tgt, kind))
                if tgt_eval is None:
                    tgt_eval = {"error": port.get("written", {}).get("error") or "not evaluated"}
                row = port_row(src, tgt, kind, dtype, res, tgt_eval, port)
                if not port["applies"]:
                    row["not_applicable"] = not_applicable(kind)
                elif kind == "correct":
                    row["checkpoint"] = str(pathlib.Path(PORT_DIR) / _name(src, tgt))
                rows.append(row)
    return rows


def _fine_tuning(trained, examined, chains, chain_runs, live) -> tuple[list[dict], list[str]]:
    """The fine-tuning rows of every port that was fine-tuned, and the failures: a run that
    crashed or whose losses or logits are not finite."""
    rows, failures = [], []
    for f, res in trained.items():
        if "error" not in res:
            failures += fine_tune_problems(f"{f} fine-tuned", res["finetune"])
    for tgt in live:
        for (src, _, kind), runs in ((examined.get(tgt) or {}).get("finetune") or {}).items():
            runs = runs if "error" not in runs else {"float32": runs, "float64": runs}
            failures += fine_tune_problems(f"{src}->{tgt} {kind} fine-tuned", runs)
            own = {(d, u): r for (s_, d, u), r in chain_runs.items() if s_ == src}
            rows.append(fine_tune_row(src, tgt, kind, chains.get((src, tgt, kind), []), own,
                                      trained[src]["finetune"], runs))
    return rows, failures


def _agree(v) -> str:
    return f"{v:.4f}" if v == v else "nan"


def _result_cell(r: dict) -> str:
    if "error" in r:
        return f"{render.FAIL} error: {r['error'][:120]}"
    if r["kind"] == "correct":
        return render.PASS if r["pass"] else f"{render.FAIL} " + "; ".join(r["problems"])
    if r.get("flag"):
        return f"⚠ {r['flag']}"
    if r["kind"] == "momentum-copied":
        return "no cost at inference; see fine-tuning"
    return f"cost: accuracy {r['test_acc_to'] - r['test_acc_from']:+.3f}"


def _ports_table(rows) -> str:
    body = []
    for r in rows:
        if not r["applies"]:
            continue
        if "error" in r:
            body.append([r["from"], r["to"], r["kind"], "", "", "", "", "", _result_cell(r)])
            continue
        layers = (f"{r['first_divergent_layer'] or 'none'} / "
                  f"{r['first_divergent_layer_isolated'] or 'none'}")
        body.append([r["from"], r["to"], r["kind"], f"{r['test_acc_from']:.4f}",
                     f"{r['test_acc_to']:.4f}", r["max_abs_logit_diff"],
                     _agree(r["argmax_agreement"]), layers, _result_cell(r)])
    return render.md_table(["from", "to", "kind", "test acc from", "test acc to", "max |Δlogit|",
                            "argmax agreement", "first divergent layer (cascaded / isolated)",
                            "result"], body)


def _drift_cells(d: dict) -> list:
    return [d["running_mean"], d["running_var_rel"], d["weights"], d["logits"],
            _agree(d["argmax_agreement"])]


def _fine_tune_table(rows, chain_fw) -> str:
    body = []
    for r in rows:
        port = f"{r['from']}→{r['to']} {r['kind']}"
        if "error" in r:
            body.append([port, f"error: {r['error'][:120]}", "", "", "", "", "", ""])
            continue
        for step in r["steps"]:
            body.append([port, f"convention: {step['cause']}", *_drift_cells(step), ""])
        body.append([port, f"all conventions ({chain_fw} from-scratch layer, float64)",
                     *_drift_cells(r["conventions"]), ""])
        body.append([port, f"not explained by them (target native vs that {chain_fw} run, float64)",
                     *_drift_cells(r["unexplained_float64"]), ""])
        for dt in [dt for dt in ("float64", "float32") if dt in r]:
            d = r[dt]
            body.append([port, f"the two frameworks, {dt}", *_drift_cells(d),
                         f"{d['test_acc_from']:.4f} → {d['test_acc_to']:.4f}"])
    return render.md_table(["port", "compared", "max |Δ running mean|", "max rel. Δ running var",
                            "max |Δ weight|", "max |Δ logit|", "argmax agreement",
                            "test acc from → to"], body)


def _span(values) -> str:
    """"lo–hi" of `values` ("nan" if any is NaN)."""
    values = [float(v) for v in values]
    if not values:
        return "—"
    hi = worst(values)
    if hi != hi:
        return "nan"
    lo = min(values)
    return render.fmt(lo) if lo == hi else f"{render.fmt(lo)}–{render.fmt(hi)}"


def why(rows) -> list[str]:
    """What the measured drift comes from, each cause with the range it produced over the ports
    (from the numbers, not asserted)."""
    ok = [r for r in rows if "error" not in r]
    causes = {}
    for r in ok:
        for step in r["steps"]:
            causes.setdefault(cause_of(step["cause"]), []).append(step)
    out = [f"- **{c}** (measured alone, float64, one framework): running variances "
           f"{_span([s['running_var_rel'] for s in steps])} apart (relative), running means "
           f"{_span([s['running_mean'] for s in steps])}, logits {_span([s['logits'] for s in steps])}"
           for c, steps in causes.items()]
    if ok:
        out.append(f"- **left unexplained in float64** by these conventions: logits "
                   f"{_span([r['unexplained_float64']['logits'] for r in ok])}, weights "
                   f"{_span([r['unexplained_float64']['weights'] for r in ok])} (the frameworks' "
                   "float64 rounding)")
        correct = [r for r in ok if r["kind"] == "correct"]
        if correct:
            out.append(f"- **float32 rounding**, amplified by the SGD steps: between the two "
                       f"frameworks a correct port's logits end "
                       f"{_span([r['float32']['logits'] for r in correct])} apart in float32 "
                       f"against {_span([r['float64']['logits'] for r in correct])} in float64, "
                       f"weights {_span([r['float32']['weights'] for r in correct])} against "
                       f"{_span([r['float64']['weights'] for r in correct])}")
    return out


def _plot(rows, s) -> str | None:
    """Per-layer errors of every port of one pair (the one where most mistakes apply)."""
    pairs = {}
    for r in rows:
        if r["applies"] and "layer_errors" in r:
            pairs.setdefault((r["from"], r["to"]), []).append(r)
    if not pairs or s.args.no_plots:
        return None
    (src, tgt), chosen = max(pairs.items(), key=lambda kv: len(kv[1]))
    panels = {mode: {r["kind"]: r["layer_errors"][mode] for r in chosen}
              for mode in ("cascaded", "isolated")}
    path = render.plot_layer_errors(
        panels, s.plot_path("port_layers.png"), layers=lenet.LAYERS,
        tol=chosen[0]["layer_tolerance"], title=f"{src} → {tgt}: max |activation error| per layer, {PROBE} test images "
              "(0 drawn at 1e-12)")
    return pathlib.Path(path).name if path else None


def _section(s, cfg, trained, ports, examined, round_trips, fine_tuning, chain_fw) -> Section:
    dtype = cfg["dtype"]
    failures = []
    sources = {}
    for f, res in trained.items():
        if "error" in res:
            sources[f] = {"error": res["error"]}
            failures.append(f"{f}: training or saving failed: {res['error'][:160]}")
            continue
        last = res["losses"][-1] if res["losses"] else float("nan")
        sources[f] = {"steps": len(res["losses"]), "final_loss": last, "test_acc": res["test_acc"],
                      "bn_config": res["checkpoint"]["bn_config"],
                      "checkpoint": str(pathlib.Path(PORT_DIR) / _name(f))}
        if not np.isfinite(last):
            failures.append(f"{f}: training loss not finite ({last})")
    rows = _rows(trained, ports, examined, s.live(), dtype)
    for r in rows:
        where = f"{r['from']}->{r['to']} {r['kind']}"
        if "error" in r:
            failures.append(f"{where}: {r['error'][:160]}")
        elif r["kind"] == "correct" and not r["pass"]:
            failures.append(f"{where}: " + "; ".join(r["problems"]))
    failures += [f"round trip {t['from']}->{t['via']}->{t['from']}: "
                 + (t.get("error") or "not the original bit for bit "
                    f"(weights {'same' if t['weights_identical'] else 'differ'}, sidecar "
                    f"{'same' if t['sidecar_identical'] else 'differs'})")
                 for t in round_trips if not t["pass"]]
    tuned, f_failures = fine_tuning
    failures += f_failures
    kept = sorted(p.name for p in (s.out / PORT_DIR).glob("*") if _OWN_FILE.match(p.name)) \
        if (s.out / PORT_DIR).is_dir() else []
    payload = {"config": cfg, "sources": sources, "rows": rows, "round_trips": round_trips,
               "fine_tune": tuned, "chain_framework": chain_fw, "checkpoints": [f"{PORT_DIR}/{n}" for n in kept],
               "targets": {"argmax_agreement": MIN_ARGMAX, "logits": LOGIT_TOL}}
    plots = []
    plot = _plot(rows, s)
    if plot:
        plots.append(plot)
        payload["plot"] = plot
    md = markdown(payload, s, plot)
    return Section(payload, md, failures, plots)


def markdown(payload, s, plot) -> str:
    cfg, rows = payload["config"], payload["rows"]
    test = f"the first {cfg['limit_test']}" if cfg["limit_test"] else "all"
    out = ["## Porting: LeNet-BN converted between frameworks", "",
           f"Each framework trains LeNet-BN with its native batch norm (eps 1e-5, decay 0.9, its own "
           f"running-variance estimator) for {cfg['epochs']} epochs on {s.train_size} training "
           f"images (batch {cfg['batch_size']}, SGD lr {cfg['lr']}, {cfg['dtype']}, device "
           f"`{cfg['device']}`), saves its own checkpoint, reads it back and evaluates it on {test} "
           f"test images. Every checkpoint is converted to every other framework "
           f"(`common.convert.port`) correctly and with each porting mistake, written by the target "
           f"framework, then loaded in a fresh process of the target and evaluated. **Targets for a "
           f"correct port:** argmax agreement ≥ {MIN_ARGMAX:.1%}, logits within "
           f"{LOGIT_TOL['float32']:g} (float32) / {LOGIT_TOL['float64']:g} (float64: the "
           f"checkpoint's parameters cast to float64 on both sides), and no layer diverging on the "
           f"first {PROBE} test images. The first divergent layer is the first whose max "
           f"|activation error| exceeds {LOGIT_TOL[cfg['dtype']]:g}: cascaded (each framework runs "
           f"its own forward) / isolated (each target layer is fed the source's input to it). "
           f"Mistake rows are what the mistake costs; ⚠ marks one not found where it should be.", ""]
    src_rows = [[f, r.get("steps", ""), r.get("final_loss", ""), r.get("test_acc", ""),
                 r.get("checkpoint") or "error: " + r.get("error", "")]
                for f, r in payload["sources"].items()]
    out += [render.md_table(["source", "training steps", "last step loss", "test acc", "checkpoint"],
                            src_rows + s.missing_rows(5)), ""]
    out += [_ports_table(rows), ""] if rows else [
        "Fewer than two frameworks took part: nothing to port.", ""]
    na = {}
    for r in rows:
        if not r["applies"]:
            na.setdefault(r["kind"], []).append(f"{r['from']}→{r['to']}")
    if na:
        out += ["Not applicable (the mistake cannot happen between these two): "
                + "; ".join(f"{k} for {', '.join(v)} ({not_applicable(k)})" for k, v in na.items())
                + ".", ""]
    changes = sorted({c for r in rows if r["kind"] == "correct" for c in r["changes"]})
    if changes:
        out += ["What a correct port cannot carry over (the target's layer has no such setting): "
                + "; ".join(changes) + ".", ""]
    trips = payload["round_trips"]
    if trips:
        out += ["Round trips A→B→A through the files, bit for bit (weights and settings sidecar): "
                + ", ".join(f"{t['from']}→{t['via']}→{t['from']} {render.mark(t['pass'])}" for t in trips)
                + ".", ""]
    if payload["checkpoints"]:
        out += [f"Checkpoints kept in `{PORT_DIR}/` (each with its `.bn.json` settings sidecar; "
                "`compare.py convert` reads and writes the same files): "
                + ", ".join(f"`{n.split('/', 1)[1]}`" for n in payload["checkpoints"]
                            if not n.endswith(checkpoint.SIDECAR_SUFFIX))
                + ". The mistake ports and round-trip files went to a temporary directory and are "
                "gone: they are deliberately wrong, or equal to these.", ""]
    if plot:
        out += [f"![per-layer activation errors]({plot})", ""]
    tuned = payload["fine_tune"]
    if tuned:
        out += [f"**Fine-tuning after the port:** {cfg['steps']} more SGD steps on the same batches "
                "in source and target (native layers, from the same checkpoint; a correct port in "
                "float32 and float64, a copied momentum in float64). To tell the causes apart, "
                f"{payload['chain_framework']}'s from-scratch layer also runs the steps in float64 "
                "from the source's parameters, from the source's settings to the target's, one "
                "convention changed at a time: each such row is that one convention's effect, with "
                "no framework difference and no float32 rounding in it.", "",
                _fine_tune_table(tuned, payload["chain_framework"]), "", "Why they drift apart:",
                *why(tuned), ""]
    return "\n".join(out)
