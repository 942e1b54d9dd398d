"""Float64 NumPy LeNet-BN training reference, and the per-step check of a training run against it.

The reference every backend's `lenet_train` is measured against: the forward pass with named
activations (`common.lenet.LAYERS`), mean cross-entropy, the analytic backward through the dense
layers, sigmoid, max-pooling, convolution and batch norm, plain SGD, and the running statistics
(canonical `decay`, `common.spec`). Batch norm is `common.reference.bn_step` (forward with a zero
upstream gradient, backward with the real one), so the project has one BN. NumPy only.
"""
from __future__ import annotations

import math

import numpy as np

from common import lenet
from common.lenet import LAYERS, _conv2d, _maxpool2
from common.reference import bn_step, error, float_dtype
from common.spec import check_decay

TRAINABLE = tuple(n for n in lenet.param_shapes() if not lenet.is_running_stat(n))
NUM_CLASSES = 10
FLOAT32_EPS = float(np.finfo(np.float32).eps)  # 1.19e-7


# -- input checks ---------------------------------------------------------------------------------
def _params(params) -> dict[str, np.ndarray]:
    lenet.validate_params(params)
    return lenet.cast(params, np.float64)


def _images(x) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[1:] != (1, 28, 28):
        raise ValueError(f"images must be N×1×28×28, got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"images must be numbers, got dtype {x.dtype}")
    x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("images contain non-finite values (NaN or inf)")
    return x


def _labels(y, n: int) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match the images, got {y.shape}")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if not np.all((y == np.round(y)) & (y >= 0) & (y < NUM_CLASSES)):
        raise ValueError(f"labels must be integers in [0, {NUM_CLASSES}), got {y[:8]!r}...")
    return y.astype(np.int64)


def _settings(lr, eps, decay) -> None:
    if lr is not None and not (isinstance(lr, (int, float, np.number)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if not (isinstance(eps, (int, float, np.number)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    check_decay(decay)


# -- forward and backward -------------------------------------------------------------------------
def _kind(name: str) -> str:
    return name.rstrip("0123456789")


def _sigmoid(z):
    e = np.exp(-np.abs(z))  # never overflows
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _bn(p, layer, h, dy, *, training, eps, decay=0.9, unbiased=False) -> dict:
    return bn_step(h, p[f"{layer}.gamma"], p[f"{layer}.beta"], p[f"{layer}.running_mean"],
                   p[f"{layer}.running_var"], dy, training=training, eps=eps, decay=decay,
                   unbiased=unbiased)


def _forward(p, x, *, training, eps, decay=0.9, unbiased=False):
    """(activations in LAYERS order, updated running statistics) for float64 `p` and `x`."""
    acts, running = {}, {}
    h = x
    for name in LAYERS:
        kind = _kind(name)
        if kind == "conv":
            h = _conv2d(h, p[f"{name}.weight"], p[f"{name}.bias"])
        elif kind == "fc":
            h = h @ p[f"{name}.weight"].T + p[f"{name}.bias"]
        elif kind == "bn":
            r = _bn(p, name, h, np.zeros_like(h), training=training, eps=eps, decay=decay,
                    unbiased=unbiased)
            h = r["y"]
            running[f"{name}.running_mean"], running[f"{name}.running_var"] = r["running_mean"], r["running_var"]
        elif kind == "sigmoid":
            h = _sigmoid(h)
        elif kind == "pool":
            h = _maxpool2(h)
        elif kind == "flatten":
            h = h.reshape(len(h), -1)  # C×H×W order, as PyTorch's flatten
        acts[name] = h
    return acts, running


def _cross_entropy(logits, y):
    """Mean cross-entropy and its gradient with respect to the logits."""
    n = len(y)
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    dlogits = np.exp(logp)
    dlogits[np.arange(n), y] -= 1.0
    return float(-logp[np.arange(n), y].mean()), dlogits / n


def _maxpool2_backward(inp, dout):
    """The gradient goes to the first maximum of each 2×2 window in row-major order (PyTorch's
    choice; exact ties do not occur between float64 sigmoid outputs that differ)."""
    n, c, h, w = inp.shape
    win = inp.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
    mask = np.zeros_like(win)
    np.put_along_axis(mask, win.argmax(axis=-1)[..., None], 1.0, axis=-1)
    g = mask * dout[..., None]
    return g.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)


def _conv2d_backward(inp, w, dout, *, need_input_grad):
    """(dweight, dbias, dinput) of a valid, stride-1 convolution; dinput is the full
    convolution of `dout` with the flipped kernel (None unless asked for)."""
    windows = np.lib.stride_tricks.sliding_window_view(inp, w.shape[2:], axis=(2, 3))
    dw = np.einsum("nchwij,nohw->ocij", windows, dout, optimize=True)
    dinp = None
    if need_input_grad:
        kh, kw = w.shape[2:]
        padded = np.pad(dout, ((0, 0), (0, 0), (kh - 1, kh - 1), (kw - 1, kw - 1)))
        dinp = _conv2d(padded, w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3), np.zeros(w.shape[1]))
    return dw, dout.sum(axis=(0, 2, 3)), dinp


def _backward(p, x, acts, dlogits, *, eps):
    """Gradients of the loss (given d loss / d logits) for every trainable parameter."""
    grads = {}
    dh = dlogits
    for i in reversed(range(len(LAYERS))):
        name, kind = LAYERS[i], _kind(LAYERS[i])
        inp = acts[LAYERS[i - 1]] if i else x
        if kind == "fc":
            w = p[f"{name}.weight"]
            grads[f"{name}.weight"], grads[f"{name}.bias"] = dh.T @ inp, dh.sum(axis=0)
            dh = dh @ w
        elif kind == "sigmoid":
            s = acts[name]
            dh = dh * s * (1.0 - s)
        elif kind == "bn":  # training mode: the batch statistics depend on the input too
            r = _bn(p, name, inp, dh, training=True, eps=eps)
            grads[f"{name}.gamma"], grads[f"{name}.beta"] = r["dgamma"], r["dbeta"]
            dh = r["dx"]
        elif kind == "flatten":
            dh = dh.reshape(inp.shape)
        elif kind == "pool":
            dh = _maxpool2_backward(inp, dh)
        elif kind == "conv":
            grads[f"{name}.weight"], grads[f"{name}.bias"], dh = _conv2d_backward(
                inp, p[f"{name}.weight"], dh, need_input_grad=i > 0)
    return {n: grads[n] for n in TRAINABLE}


def _step(p, x, y, *, lr, eps, decay, unbiased):
    """One SGD step on validated float64 inputs: (loss, new params in canonical order)."""
    acts, running = _forward(p, x, training=True, eps=eps, decay=decay, unbiased=unbiased)
    loss, dlogits = _cross_entropy(acts["fc3"], y)
    grads = _backward(p, x, acts, dlogits, eps=eps)
    new = {n: p[n] - lr * grads[n] if n in grads else running[n] for n in lenet.param_shapes()}
    return loss, new


# -- public API -----------------------------------------------------------------------------------
def activations(params, x, *, training=False, eps=1e-5) -> dict[str, np.ndarray]:
    """Every named activation (`LAYERS` order) of images `x` (N×1×28×28), float64. Inference
    mode normalises with the running statistics, training mode with the batch's."""
    _settings(None, eps, 0.9)
    return _forward(_params(params), _images(x), training=training, eps=eps)[0]


def loss_and_grads(params, x, y, *, eps=1e-5) -> tuple[float, dict[str, np.ndarray]]:
    """Mean cross-entropy of a training-mode forward and its gradient for every trainable
    parameter (weights, biases, gamma, beta; canonical names)."""
    _settings(None, eps, 0.9)
    p, x = _params(params), _images(x)
    acts, _ = _forward(p, x, training=True, eps=eps)
    loss, dlogits = _cross_entropy(acts["fc3"], _labels(y, len(x)))
    return loss, _backward(p, x, acts, dlogits, eps=eps)


def step(params, x, y, *, lr, eps=1e-5, decay=0.9, unbiased=False) -> tuple[float, dict]:
    """One SGD step: (loss before the update, new canonical params incl. running statistics,
    updated as canonical `decay`, the variance statistic ÷(m−1) if `unbiased`)."""
    _settings(lr, eps, decay)
    x = _images(x)
    return _step(_params(params), x, _labels(y, len(x)), lr=lr, eps=eps, decay=decay,
                 unbiased=unbiased)


def train(params, batches, *, lr, eps=1e-5, decay=0.9, unbiased=False, record=False) -> dict:
    """The backends' `lenet_train` contract in float64: {"losses": [float per step], "params":
    canonical dict}; `record=True` adds "history", the canonical params after every step."""
    _settings(lr, eps, decay)
    p = _params(params)
    losses, history = [], []
    for x, y in batches:
        x = _images(x)
        loss, p = _step(p, x, _labels(y, len(x)), lr=lr, eps=eps, decay=decay, unbiased=unbiased)
        losses.append(loss)
        if record:
            history.append(p)
    out = {"losses": losses, "params": {k: v.copy() for k, v in p.items()}}
    if record:
        out["history"] = history
    return out


# -- checking a training run ----------------------------------------------------------------------
# Values each batch-norm layer's per-channel statistics sum over, per example: conv1's 24×24
# outputs, conv2's 8×8, one for fc1 and fc2.
SUMMED_PER_EXAMPLE = {"bn1": 576, "bn2": 64, "bn3": 1, "bn4": 1}
BEFORE_POOL = ("conv1", "bn1", "conv2", "bn2")  # layers whose gradient passes a max-pool
# float32 tolerance = C · eps32 · sqrt(m) (× max(1, lr) for trainable parameters); see
# local_tolerance for where each C comes from.
FLOAT32_C = {"loss": 1.0, "running": 8.0, "trainable": 2.0, "before_pool": 100.0}
FLOAT64_TOLERANCE = 1e-10


def quantities() -> list[str]:
    """What a step is checked on, in forward order: the loss (computed before the update), then
    every canonical parameter and running statistic after it."""
    return ["loss", *lenet.param_shapes()]


def local_tolerance(dtype, batch_size: int, lr: float = 1.0) -> dict[str, float]:
    """Per-quantity tolerance (relative to max(1, |reference|)) of one training step taken from
    a run's own state, for `check_trajectory`.

    float64: 1e-10 for every quantity. Implementations differ in summation order only: measured
    worst local error 1.3e-13 (every backend × impl, 20 steps at batches 64 and 256).

    float32: C · eps32 · sqrt(m), eps32 = 1.19e-7; trainable parameters × max(1, lr), since
    their error is lr × the gradient's. m is the largest float32 sum behind the quantity: a sum
    of m terms rounded in sequence carries a random-walk error ~eps32 · sqrt(m) relative to its
    terms (MXNet's native layer, the noisiest, behaves like that). Measured worst local errors,
    every backend × impl, 20 steps at lr 1.0 from init_params(0) on the sample, batches 16, 64
    and 256 (the trajectory report's runs), as a fraction of eps32 · sqrt(m):
      loss (m = 576·N, bn1's statistics):                ≤ 0.086 → C = 1   (≥ 11× margin)
      running statistics of bn_l (m = N·H_l·W_l):        ≤ 0.93  → C = 8   (≥ 8.6×)
      fc1, bn3, fc2, bn4, fc3 parameters (m = 576·N):    ≤ 0.16  → C = 2   (≥ 12×)
      conv1, bn1, conv2, bn2 parameters (m = 576·N):     ≤ 11.9  → C = 100 (≥ 8.4×)
    (worst error / tolerance over all 21 runs: 0.12, MXNet native at batch 256).
    The last group's gradients pass a max-pool. Where two entries of a pooling window differ by
    less than float32 rounding (sigmoid outputs ~1e-7 apart: a few windows per step at batch 64),
    a float32 run may route that window's gradient to the other entry: correct for its own
    numbers, yet an O(lr/N) change in the upstream gradient. (Measured: jax at batch 64, step 11,
    conv2.weight 2.1e-4; rerouting the reference's 21 windows whose entries are < 1e-6 apart
    brings the step's worst error to 4.5e-6.) A fixed float32 tolerance on a whole trajectory
    would instead have to cover divergence that compounds: ~1e-5 after step 1, ~1e-2 by step 19.

    What it still catches in float32 (tests/test_lenet_reference.py): momentum applied the wrong
    way (running statistics off by ~1); batch norm normalising with the ÷(m−1) variance (loss
    off by 9.5e-5, 2.9e-4, 9.3e-4 in steps 0-2 at batch 64 against a tolerance of 2.3e-5;
    2.6e-5, 1.7e-4, 3.1e-4 at batch 256 against 4.6e-5); a running variance kept ÷(m−1) where ÷m
    is asked (bn3/bn4 off by ~0.1·var/(N−1): 2.1e-4 at batch 64 against 7.6e-6, 4.8e-5 at 256
    against 1.5e-5). Not caught in float32: a gradient error below C·eps32·sqrt(m)·lr in conv1,
    bn1, conv2 or bn2 (2.3e-3 at batch 64); the float64 check (1e-10) is the one that pins
    gradients.
    """
    dt = float_dtype(dtype)
    names = quantities()
    if dt == np.float64:
        return dict.fromkeys(names, FLOAT64_TOLERANCE)
    n = int(batch_size)
    if n < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    tol = {"loss": FLOAT32_C["loss"] * FLOAT32_EPS * math.sqrt(576 * n)}
    for name in names[1:]:
        layer = name.split(".")[0]
        if lenet.is_running_stat(name):
            tol[name] = FLOAT32_C["running"] * FLOAT32_EPS * math.sqrt(SUMMED_PER_EXAMPLE[layer] * n)
        else:
            c = FLOAT32_C["before_pool" if layer in BEFORE_POOL else "trainable"]
            tol[name] = c * FLOAT32_EPS * math.sqrt(576 * n) * max(1.0, lr)
    return tol


def _run_problems(run, steps: int, dt) -> tuple[list[str], int]:
    """(what is wrong with a run's output, how many of its steps can still be compared). NaN is
    left to the verdict; wrong names or shapes leave nothing to compare."""
    problems, unusable = [], False
    if len(run["losses"]) != steps:
        problems.append(f"{len(run['losses'])} losses for {steps} batches")
    if len(run["history"]) != steps:
        problems.append(f"{len(run['history'])} history entries for {steps} batches")
    for k, p in enumerate(list(run["history"]) + [run["params"]]):
        where = f"history[{k}]" if k < len(run["history"]) else "params"
        if not isinstance(p, dict):
            problems.append(f"{where} is a {type(p).__name__}, not a canonical dict")
            unusable = True
            continue
        structure = lenet.param_problems(p, finite=False)
        problems += [f"{where}: {m}" for m in structure]
        unusable |= bool(structure)
        wrong = sorted({str(np.asarray(v).dtype) for v in p.values()} - {dt.name})
        if wrong:
            problems.append(f"{where}: dtype {', '.join(wrong)}, expected {dt.name}")
    if run["history"] and not unusable:
        last = run["history"][-1]
        if not all(np.array_equal(run["params"][n], last[n], equal_nan=True) for n in last):
            problems.append("params differ from the last history entry")
    return problems, 0 if unusable else min(steps, len(run["losses"]), len(run["history"]))


def _nanmax(values) -> float:
    """max that is NaN if any value is NaN (so a verdict on it fails); 0 for no values."""
    return float(np.max(np.asarray(values, np.float64))) if len(values) else 0.0


def _worst(values: dict, names) -> str:
    """The name with the largest value, NaN counting as largest."""
    return max(names, key=lambda n: (math.isnan(values[n]), values[n]))


def check_trajectory(params0, batches, run, *, lr, eps=1e-5, decay=0.9, unbiased=False, dtype,
                     tolerance=None) -> dict:
    """A training run (a backend's `lenet_train(..., record=True)` result) against the float64
    reference, with a verdict that means the same for any number of steps.

    `params0`, `batches`, `lr`, `eps` are what the run was given; `decay` and `unbiased` are what
    it really applies (e.g. `common.spec.effective_decay` for MXNet's native layer, unbiased for
    PyTorch's), `dtype` the run's. `tolerance`: a number, or {quantity: number}, overriding
    `local_tolerance` (for tests).

    Local (the verdict): step k is redone by the reference from the run's own state after step
    k−1 (cast to float64) on batch k; the run's loss and new parameters must agree within
    `local_tolerance`, relative to max(1, |reference|). Float32 rounding does not compound here.
    Global (information): the run against the reference trained from `params0` — absolute
    differences of the loss and the parameters per step, and the first parameter (forward
    order) whose relative difference exceeds its local tolerance. A NaN anywhere fails; a run
    with the wrong number of steps, names, shapes or dtype, or whose `params` is not its last
    history entry, fails with the reason in "problems" (its steps are still compared where the
    names and shapes allow).

    Returns {"dtype", "steps", "lr", "eps", "decay", "unbiased", "tolerance": {quantity: tol},
    "local": {"loss", "running", "trainable": [worst relative error per step], "worst_running",
    "worst_trainable": [its name per step], "ratio": [worst error / tolerance per step],
    "worst_ratio": [its name], "max": {same keys: worst over steps}, "per_quantity": {quantity:
    worst over steps}, "first_failure": None or {"step", "quantity", "error", "tolerance"}},
    "global": {"loss", "param": [absolute difference per step], "worst_param": [name per step],
    "max": {"loss", "param"}, "first_divergence": None or {"step", "name", "error"}},
    "reference_losses", "problems": [str], "pass": bool}. Bad arguments (a run without
    "history", bad batches or settings) raise ValueError.
    """
    _settings(lr, eps, decay)
    dt = float_dtype(dtype)
    if not isinstance(run, dict) or not {"losses", "params", "history"} <= set(run):
        have = sorted(run) if isinstance(run, dict) else type(run).__name__
        raise ValueError(f"run must be lenet_train's result with record=True (losses, params, "
                         f"history); got {have}")
    batches = [(x, _labels(y, len(x))) for x, y in ((_images(x), y) for x, y in batches)]
    if not batches:
        raise ValueError("check_trajectory needs at least one batch")
    p0 = _params(params0)
    names = list(lenet.param_shapes())
    tol = local_tolerance(dt, max(len(x) for x, _ in batches), lr)
    if tolerance is not None:
        tol.update(tolerance if isinstance(tolerance, dict) else dict.fromkeys(tol, tolerance))
        if set(tol) != set(quantities()) or not all(float(t) >= 0 for t in tol.values()):
            raise ValueError(f"tolerance must be a number >= 0 or {{quantity: number >= 0}}, got {tolerance!r}")
    problems, comparable = _run_problems(run, len(batches), dt)
    running = [n for n in names if lenet.is_running_stat(n)]
    trainable = [n for n in names if not lenet.is_running_stat(n)]
    ref = train(p0, batches, lr=lr, eps=eps, decay=decay, unbiased=unbiased, record=True)
    local = {k: [] for k in ("loss", "running", "worst_running", "trainable", "worst_trainable",
                             "ratio", "worst_ratio")}
    glob = {"loss": [], "param": [], "worst_param": []}
    per_quantity, first_failure, first_divergence = {}, None, None
    for k in range(comparable):
        start = p0 if k == 0 else run["history"][k - 1]
        got, loss = run["history"][k], float(run["losses"][k])
        if all(np.all(np.isfinite(v)) for v in start.values()):
            ref_loss, ref_new = _step(lenet.cast(start, np.float64), *batches[k], lr=lr, eps=eps,
                                      decay=decay, unbiased=unbiased)
            errs = {"loss": abs(loss - ref_loss) / max(1.0, abs(ref_loss)),
                    **{n: error(got[n], ref_new[n])[1] for n in names}}
        else:  # the run's own state is already broken: nothing to step from
            errs = dict.fromkeys(quantities(), math.nan)
        ratio = {q: e / tol[q] if tol[q] > 0 else 0.0 if e == 0 else e * math.inf
                 for q, e in errs.items()}
        for q, e in errs.items():
            per_quantity[q] = e if math.isnan(e) or math.isnan(per_quantity.get(q, 0.0)) \
                else max(per_quantity.get(q, 0.0), e)
        local["loss"].append(errs["loss"])
        for group, members in (("running", running), ("trainable", trainable)):
            w = _worst(errs, members)
            local[group].append(errs[w])
            local[f"worst_{group}"].append(w)
        w = _worst(ratio, list(ratio))
        local["ratio"].append(ratio[w])
        local["worst_ratio"].append(w)
        if first_failure is None:
            first_failure = next(({"step": k, "quantity": q, "error": errs[q], "tolerance": tol[q]}
                                  for q in quantities() if not (errs[q] <= tol[q])), None)
        gdiff = {n: error(got[n], ref["history"][k][n])[0] for n in names}
        w = _worst(gdiff, names)
        glob["loss"].append(abs(loss - ref["losses"][k]))
        glob["param"].append(gdiff[w])
        glob["worst_param"].append(w)
        if first_divergence is None:
            rel = {n: error(got[n], ref["history"][k][n])[1] for n in names}
            first_divergence = next(({"step": k, "name": n, "error": rel[n]}
                                     for n in names if not (rel[n] <= tol[n])), None)
    local["max"] = {g: _nanmax(local[g]) for g in ("loss", "running", "trainable", "ratio")}
    local["per_quantity"] = per_quantity
    local["first_failure"] = first_failure
    glob["max"] = {q: _nanmax(glob[q]) for q in ("loss", "param")}
    glob["first_divergence"] = first_divergence
    ok = not problems and first_failure is None and local["max"]["ratio"] <= 1.0
    return {"dtype": dt.name, "steps": len(batches), "lr": lr, "eps": eps, "decay": decay,
            "unbiased": unbiased, "tolerance": tol, "local": local, "global": glob,
            "reference_losses": ref["losses"], "problems": problems, "pass": bool(ok)}
