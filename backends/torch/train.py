"""LeNet-BN training loop (`fit`), device selection and versions for the PyTorch backend.

The loop keeps the whole data set on the device and gathers each batch there by index; loss and
accuracy accumulate in device tensors and are read once per epoch, so no step waits on the host.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from backends import DeviceUnavailable
from common import lenet as canon
from common.data import batch_indices

from .bn import check_impl
from .lenet import build_lenet, sgd_step, torch_dtype

EVAL_CHUNK = 4096


def _no_cuda_reason() -> str:
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return (f"this PyTorch build ({torch.__version__}) is CPU-only (torch.version.cuda is "
                "None); install a CUDA build of torch to train on a GPU")
    return (f"torch.cuda.is_available() is False (PyTorch {torch.__version__}, CUDA "
            f"{torch.version.cuda}): no GPU or driver is visible (check nvidia-smi and "
            "CUDA_VISIBLE_DEVICES)")


def resolve_device(device="auto") -> tuple[torch.device, str]:
    """(torch.device, description) for "auto" (CUDA if usable, else CPU), "cpu", "gpu"/"cuda" or
    "cuda:N". A GPU request that cannot be met raises DeviceUnavailable saying why."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise ValueError(f"device must be a string such as 'auto', 'cpu' or 'gpu', got {device!r}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu"), "cpu"
    if device in ("auto", "gpu", "cuda") or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"device={device!r} needs a CUDA GPU, but {_no_cuda_reason()}. "
                                    "Use device='cpu' or 'auto'.")
        if device.startswith("cuda:"):
            dev = torch.device(device)
            if dev.index >= torch.cuda.device_count():
                raise DeviceUnavailable(f"device={device!r}: only {torch.cuda.device_count()} "
                                        "CUDA device(s) visible")
        else:
            dev = torch.device("cuda", torch.cuda.current_device())
        return dev, f"{dev} ({torch.cuda.get_device_name(dev)})"
    raise ValueError(f"device must be 'auto', 'cpu', 'gpu' or 'cuda[:N]', got {device!r}")


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


def _correct(model, x, y) -> torch.Tensor:
    """Number of correct predictions (a device tensor) in inference mode."""
    model.eval()
    total = torch.zeros((), dtype=torch.int64, device=x.device)
    with torch.no_grad():
        for s in range(0, len(x), EVAL_CHUNK):
            total += (model(x[s:s + EVAL_CHUNK]).argmax(1) == y[s:s + EVAL_CHUNK]).sum()
    return total


def fit(data, *, impl, epochs, batch_size=256, lr=1.0, seed=0, device="auto", dtype="float32",
        eps=1e-5, decay=0.9, params=None, progress=None) -> dict:
    """Train LeNet-BN with `impl` on `data` (see backends/__init__.py for the contract).

    examples_per_s counts only the training steps of each epoch, timed between device
    synchronisations; test accuracy is measured after each epoch and not timed."""
    wall0 = time.perf_counter()
    check_impl(impl)
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    train_x, train_y, test_x, test_y = _arrays(data)
    dev, desc = resolve_device(device)
    tdt = torch_dtype(dtype)
    model = build_lenet(impl, eps=eps, decay=decay, device=dev, dtype=tdt,
                        params=canon.init_params(seed) if params is None else params)
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def put(a, dt):
        return torch.as_tensor(np.ascontiguousarray(a), dtype=dt).to(dev)

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
            loss, logits = sgd_step(model, opt, X.index_select(0, idx), yb)
            loss_sum += loss * (e - s)
            correct += (logits.argmax(1) == yb).sum()
        _sync(dev)
        seconds = time.perf_counter() - t0
        test_correct = _correct(model, Xt, Yt)
        loss_total, n_correct, n_test_correct = torch.stack(
            [loss_sum, correct.double(), test_correct.double()]).tolist()
        total_examples += n
        total_seconds += seconds
        row = dict(epoch=epoch + 1, loss=loss_total / n, train_acc=n_correct / n,
                   test_acc=n_test_correct / len(Xt) if len(Xt) else float("nan"),
                   examples_per_s=n / seconds, seconds=seconds)
        history.append(row)
        if progress is not None:
            progress(f"torch/{impl} epoch {row['epoch']}/{epochs}: loss {row['loss']:.4f}, "
                     f"train acc {row['train_acc']:.3f}, test acc {row['test_acc']:.3f}, "
                     f"{row['examples_per_s']:,.0f} examples/s on {desc}")
    last = history[-1]
    return dict(device=desc, history=history, final_loss=last["loss"],
                train_acc=last["train_acc"], test_acc=last["test_acc"],
                examples_per_s=total_examples / total_seconds,
                wall_s=time.perf_counter() - wall0)


def versions() -> dict[str, str]:
    """Framework package versions (plus the CUDA toolkit torch was built with, if any)."""
    out = {"torch": torch.__version__}
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out
