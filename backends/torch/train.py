"""LeNet-BN training loop (`fit`), the throughput benchmark (`speed`), `exact_numerics` and
versions for the PyTorch backend (device selection is in `device.py`).

The loop keeps the whole data set on the device and gathers each batch there by index; loss and
accuracy accumulate in device tensors and are read once per epoch, so no step waits on the host.
`speed` times `DeviceSteps`, the same SGD step with even the batch index on the device, so that
on CUDA the whole step can be captured once in a CUDA graph and replayed.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from backends import DeviceUnavailable, epoch_line, positive_int, synthetic_batches, time_alone
from common import lenet as canon
from common.data import batch_indices

from .bn import check_impl
from .device import resolve_device
from .lenet import build_lenet, sgd_step
from .precision import MixedPrecision

EVAL_CHUNK = 4096
SPEED_PATHS = ("auto", "eager", "cuda-graph", "compile")
SPEED_BATCHES = 16  # distinct synthetic batches the timed steps cycle through


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _arrays(data):
    missing = [f for f in ("train_x", "train_y", "test_x", "test_y") if not hasattr(data, f)]
    if missing:
        raise ValueError(f"data must be a common.data.Dataset; missing {', '.join(missing)}")
    for split in ("train", "test"):
        x, y = np.asarray(getattr(data, f"{split}_x")), np.asarray(getattr(data, f"{split}_y"))
        if x.ndim != 4 or x.shape[1:] != (1, 28, 28) or len(x) != len(y):
            raise ValueError(f"{split}_x must be N×1×28×28 with one label each; got "
                             f"{x.shape} and {y.shape}")
    if len(data.train_x) == 0:
        raise ValueError("train_x is empty")
    return data.train_x, data.train_y, data.test_x, data.test_y


def _correct(model, x, y, mp) -> torch.Tensor:
    """Number of correct predictions (a device tensor) in inference mode."""
    model.eval()
    total = torch.zeros((), dtype=torch.int64, device=x.device)
    with torch.no_grad(), mp.autocast():
        for s in range(0, len(x), EVAL_CHUNK):
            total += (model(x[s:s + EVAL_CHUNK]).argmax(1) == y[s:s + EVAL_CHUNK]).sum()
    return total


def fit(data, *, impl, epochs, batch_size=256, lr=1.0, seed=0, device="auto", dtype="float32",
        eps=1e-5, decay=0.9, params=None, progress=None, loss_scale=None) -> dict:
    """Train LeNet-BN with `impl` on `data` (see backends/contract.py for the contract); float16
    and bfloat16 train under autocast with float32 parameters (`MixedPrecision`).

    examples_per_s counts only the training steps of each epoch, timed between device
    synchronisations; test accuracy is measured after each epoch and not timed."""
    wall0 = time.perf_counter()
    check_impl(impl)
    epochs = positive_int("epochs", epochs)
    train_x, train_y, test_x, test_y = _arrays(data)
    dev, desc = resolve_device(device)
    mp = MixedPrecision(dtype, dev, loss_scale)
    tdt = mp.param_dtype  # the data's dtype too: autocast casts it for the convolutions
    model = build_lenet(impl, eps=eps, decay=decay, device=dev, dtype=tdt,
                        params=canon.init_params(seed) if params is None else params)
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def put(a, dt):
        return torch.as_tensor(np.ascontiguousarray(a)).to(device=dev, dtype=dt)

    X, Y = put(train_x, tdt), put(train_y, torch.int64)
    Xt, Yt = put(test_x, tdt), put(test_y, torch.int64)
    n = len(X)
    history, total_examples, total_seconds = [], 0, 0.0
    for epoch in range(epochs):
        chunks = batch_indices(n, batch_size, seed=seed, epoch=epoch)
        perm = torch.from_numpy(np.concatenate(chunks)).to(dev)
        bounds = np.cumsum([0] + [len(c) for c in chunks]).tolist()
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        model.train()
        _sync(dev)
        t0 = time.perf_counter()
        for s, e in zip(bounds[:-1], bounds[1:]):
            idx = perm[s:e]
            yb = Y.index_select(0, idx)
            loss, logits = sgd_step(model, opt, X.index_select(0, idx), yb, mp)
            loss_sum += loss * (e - s)
            correct += (logits.argmax(1) == yb).sum()
        _sync(dev)
        seconds = time.perf_counter() - t0
        test_correct = _correct(model, Xt, Yt, mp)
        loss_total, n_correct, n_test_correct = torch.stack(
            [loss_sum, correct.double(), test_correct.double()]).tolist()
        total_examples += n
        total_seconds += seconds
        row = dict(epoch=epoch + 1, loss=loss_total / n, train_acc=n_correct / n,
                   test_acc=n_test_correct / len(Xt) if len(Xt) else float("nan"),
                   examples_per_s=n / seconds, seconds=seconds)
        history.append(row)
        if progress is not None:
            progress(epoch_line(row, epochs, desc))
    last = history[-1]
    return dict(device=desc, history=history, final_loss=last["loss"],
                train_acc=last["train_acc"], test_acc=last["test_acc"],
                examples_per_s=total_examples / total_seconds,
                wall_s=time.perf_counter() - wall0, **mp.summary())


class DeviceSteps:
    """SGD steps of `model` on device-resident data: step i trains on X[order[i % len(order)]],
    Y[...] (`order`: steps × batch int64 indices on the device) and writes its loss to
    `losses[i % len(order)]`. The step counter lives on the device too, so no step waits on the
    host and the step is the same code on every path:

    "eager"       `lenet.sgd_step` (the step `lenet_train` and `fit` take) called per step;
    "cuda-graph"  that step (gather, forward, loss, backward, SGD update, running statistics, loss
                  record, counter) captured once in a CUDA graph and replayed (CUDA only);
    "compile"     the model under torch.compile; on CUDA also captured as in "cuda-graph".

    Capture needs warm-up steps (cuDNN/cuBLAS plans, compilation); they run on a side stream
    and the model is restored afterwards, so step 0 starts from the given parameters."""

    WARMUP = 3

    def __init__(self, model, opt, X, Y, order, path="eager", mp=None):
        if path not in SPEED_PATHS[1:]:
            raise ValueError(f"path must be one of {', '.join(SPEED_PATHS[1:])}, got {path!r}")
        if path == "cuda-graph" and X.device.type != "cuda":
            raise DeviceUnavailable(f"path='cuda-graph' needs a CUDA device, got {X.device}")
        self.model, self.opt, self.X, self.Y, self.order, self.path = model, opt, X, Y, order, path
        self.mp = mp
        dev = X.device
        self.counter = torch.zeros(1, dtype=torch.int64, device=dev)
        self.losses = torch.zeros(len(order), dtype=X.dtype, device=dev)
        self.forward = torch.compile(model) if path == "compile" else model
        self.graph = None
        if dev.type == "cuda" and path != "eager":
            self._capture()

    def _step(self):
        idx = self.order.index_select(0, self.counter).view(-1)
        loss, _ = sgd_step(self.forward, self.opt, self.X.index_select(0, idx),
                           self.Y.index_select(0, idx), self.mp)
        self.losses.index_copy_(0, self.counter, loss.view(1))
        self.counter.add_(1).remainder_(len(self.order))

    def _capture(self):
        dev = self.X.device
        state = [*self.model.parameters(), *self.model.buffers()]
        saved = [t.detach().clone() for t in state]
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                self._step()
        torch.cuda.current_stream(dev).wait_stream(side)
        # grads are allocated in the graph's pool by the captured backward and rewritten per replay
        self.opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        with torch.no_grad():  # in place: the graph holds these addresses
            for t, v in zip(state, saved):
                t.copy_(v)
            self.counter.zero_()
            self.losses.zero_()

    def run(self, n: int) -> None:
        """The next `n` steps, queued on the device without waiting for them."""
        for _ in range(n):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()


def _speed_path(path: str, dev: torch.device) -> str:
    if path not in SPEED_PATHS:
        raise ValueError(f"path must be one of {', '.join(SPEED_PATHS)}, got {path!r}")
    if path == "auto":
        return "compile" if dev.type == "cuda" else "eager"
    if path == "cuda-graph" and dev.type != "cuda":
        raise DeviceUnavailable("path='cuda-graph' needs a CUDA device; use path='eager' on CPU")
    return path


PATH_NAMES = {("cuda", "eager"): "eager, data on the GPU", ("cpu", "eager"): "eager",
              ("cuda", "cuda-graph"): "CUDA graph of the whole step",
              ("cuda", "compile"): "torch.compile + CUDA graph of the whole step",
              ("cpu", "compile"): "torch.compile (inductor, C++)"}


class SpeedTimer:
    """The contract's speed timer (see backends/contract.py): built, compiled/captured and
    warmed up on creation; `run()` times `steps` steps.

    Synthetic Fashion-MNIST-shaped data (seeded NumPy, pixels in [0, 1), SPEED_BATCHES batches)
    lives on the device. `path`: "auto" is "compile" (torch.compile + CUDA graph) on CUDA
    and "eager" on CPU, where torch.compile (7-30 s of C++ compilation per impl on 2 cores) gave
    no reliable gain (native and scratch-analytic within noise of eager, scratch at most ~10%);
    "eager", "cuda-graph" or "compile" ask for one. On CUDA the eager path is timed as well
    ("eager_examples_per_s"), and a failing torch.compile falls back to the CUDA graph of the
    eager step (said in "note"). compile_s is the setup: data upload, compilation or capture,
    and the warm-up steps."""

    def __init__(self, *, impl, device="auto", batch_size=256, dtype="float32", steps=50,
                 path="auto", seed=0):
        check_impl(impl)
        self.batch_size, self.steps = (positive_int(k, v) for k, v in
                                       dict(batch_size=batch_size, steps=steps).items())
        self.dev, desc = resolve_device(device)
        path = _speed_path(path, self.dev)
        tdt = MixedPrecision(dtype, self.dev).param_dtype
        rng = np.random.default_rng(seed)
        batch_size = self.batch_size
        count = synthetic_batches(batch_size, SPEED_BATCHES)
        n = count * batch_size
        dev = self.dev
        X = torch.as_tensor(rng.random((n, 1, 28, 28)), dtype=tdt).to(dev)
        Y = torch.as_tensor(rng.integers(0, 10, n), dtype=torch.int64).to(dev)
        order = torch.as_tensor(rng.permutation(n).reshape(count, batch_size)).to(dev)
        params = canon.init_params(seed)

        def setup(p):
            model = build_lenet(impl, device=dev, dtype=tdt, params=params).train()
            opt = torch.optim.SGD(model.parameters(), lr=canon.DEFAULT_LR)
            return DeviceSteps(model, opt, X, Y, order, p, MixedPrecision(dtype, dev))

        notes = []
        _sync(dev)
        t0 = time.perf_counter()
        with _cudnn_benchmark(dev.type == "cuda"):  # autotuned conv plans
            try:
                self.runner = setup(path)
            except Exception as e:
                if path != "compile" or dev.type != "cuda":
                    raise
                notes.append(f"torch.compile failed ({type(e).__name__}: {str(e)[:200]}); "
                             "timed the CUDA graph of the eager step")
                path = "cuda-graph"
                t0 = time.perf_counter()
                self.runner = setup(path)
            self.runner.run(DeviceSteps.WARMUP)
            _sync(dev)
            compile_s = time.perf_counter() - t0
            self.eager = None
            if dev.type == "cuda" and path != "eager":
                self.eager = setup("eager")
                self.eager.run(DeviceSteps.WARMUP)
                _sync(dev)
        self.info = {"compile_s": compile_s, "device": desc, "path": PATH_NAMES[dev.type, path],
                     **self.runner.mp.summary()}
        if dev.type == "cuda":
            self.info["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32,
                                 "cudnn": torch.backends.cudnn.allow_tf32}
        if self.eager is not None:
            notes.append("eager path timed as well (eager_examples_per_s)")
        if notes:
            self.info["note"] = "; ".join(notes)

    def _time(self, steps_obj) -> float:
        _sync(self.dev)
        t0 = time.perf_counter()
        steps_obj.run(self.steps)
        _sync(self.dev)
        return self.steps * self.batch_size / (time.perf_counter() - t0)

    def run(self) -> dict:
        with _cudnn_benchmark(self.dev.type == "cuda"):
            out = {"examples_per_s": self._time(self.runner)}
            if self.eager is not None:
                out["eager_examples_per_s"] = self._time(self.eager)
        return out


@contextlib.contextmanager
def _cudnn_benchmark(on: bool):
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on or saved
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


speed_timer = SpeedTimer


def speed(*, impl, device="auto", batch_size=256, dtype="float32", steps=50, repeats=5,
          path="auto", seed=0) -> dict:
    """Training-step throughput of LeNet-BN with `impl` (contract in backends/contract.py):
    `repeats` runs of a `SpeedTimer`."""
    return time_alone(SpeedTimer(impl=impl, device=device, batch_size=batch_size, dtype=dtype,
                                 steps=steps, path=path, seed=seed), repeats)


def exact_numerics() -> None:
    """No TF32 and no reduced-precision float32 matmuls or convolutions in this process, for
    agreement and trajectory runs on a GPU (TF32 keeps 10 mantissa bits). CPU results do not
    change."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def versions() -> dict[str, str]:
    """Framework package versions (plus the CUDA toolkit torch was built with, if any)."""
    out = {"torch": torch.__version__}
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out
