"""LeNet-BN in PyTorch with from-scratch or native batch norm; conversion between the canonical
NumPy parameter dict (`common.lenet`, already in PyTorch layout) and the model; `lenet_train`,
`lenet_eval`.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common import lenet as canon

from .bn import check_impl, make_layer
from .device import resolve_device
from .precision import MixedPrecision, numpy, torch_dtype

_NATIVE_NAMES = {"gamma": "weight", "beta": "bias"}


class LeNetBN(nn.Module):
    """The seeds' LeNet-BN: conv(1→6,5) → BN → sigmoid → maxpool 2 → conv(6→16,5) → BN →
    sigmoid → maxpool 2 → flatten → fc(256→120) → BN → sigmoid → fc(120→84) → BN →
    sigmoid → fc(84→10)."""

    def __init__(self, impl, *, eps=1e-5, decay=0.9, unbiased=None, device=None, dtype=None):
        super().__init__()
        self.impl = impl
        f = dict(device=device, dtype=dtype)
        bn = dict(eps=eps, decay=decay, unbiased=unbiased, **f)
        self.conv1 = nn.Conv2d(1, 6, 5, **f)
        self.bn1 = make_layer(impl, 6, 4, **bn)
        self.conv2 = nn.Conv2d(6, 16, 5, **f)
        self.bn2 = make_layer(impl, 16, 4, **bn)
        self.fc1 = nn.Linear(256, 120, **f)
        self.bn3 = make_layer(impl, 120, 2, **bn)
        self.fc2 = nn.Linear(120, 84, **f)
        self.bn4 = make_layer(impl, 84, 2, **bn)
        self.fc3 = nn.Linear(84, 10, **f)

    def forward(self, x):
        x = F.max_pool2d(torch.sigmoid(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(torch.sigmoid(self.bn2(self.conv2(x))), 2)
        x = torch.sigmoid(self.bn3(self.fc1(torch.flatten(x, 1))))
        x = torch.sigmoid(self.bn4(self.fc2(x)))
        return self.fc3(x)


def torch_name(name: str, impl: str) -> str:
    """Canonical name → the model's state_dict key (native BN calls gamma/beta weight/bias)."""
    layer, field = name.rsplit(".", 1)
    if impl == "native":
        field = _NATIVE_NAMES.get(field, field)
    return f"{layer}.{field}"


def load_params(model: LeNetBN, params) -> None:
    """Copy the canonical dict into `model` in place (cast to its dtype and device)."""
    canon.validate_params(params)
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    with torch.no_grad():
        for name in canon.param_shapes():
            tensors[torch_name(name, model.impl)].copy_(torch.as_tensor(np.asarray(params[name])))
        for name, t in tensors.items():
            if name.endswith("num_batches_tracked"):
                t.zero_()


def get_params(model: LeNetBN) -> dict[str, np.ndarray]:
    """The canonical dict (NumPy, the model's dtype) of `model`'s parameters and running stats."""
    sd = model.state_dict()
    return {name: numpy(sd[torch_name(name, model.impl)]) for name in canon.param_shapes()}


def build_lenet(impl, *, eps=1e-5, decay=0.9, unbiased=None, device="cpu", dtype=torch.float32,
                params=None) -> LeNetBN:
    """LeNet-BN on `device` holding `params` (default: `common.lenet.init_params(0)`). Built on the
    meta device first, so building never draws from torch's global RNG."""
    check_impl(impl)
    with torch.device("meta"):
        model = LeNetBN(impl, eps=eps, decay=decay, unbiased=unbiased, dtype=torch_dtype(dtype))
    model.to_empty(device=device)
    load_params(model, canon.init_params(0) if params is None else params)
    return model


def sgd_step(model, opt, x, y, mp: MixedPrecision | None = None):
    """One training step (mean cross-entropy, plain SGD); returns (loss, logits), detached and
    left on the device so callers decide when to synchronise. `mp`: the mixed-precision policy
    (autocast, float32 loss, loss scaling); None is plain full precision."""
    with mp.autocast() if mp else contextlib.nullcontext():
        logits = model(x)
    loss = F.cross_entropy(logits.to(mp.param_dtype) if mp else logits, y)
    opt.zero_grad(set_to_none=True)
    if mp:
        mp.backward(loss, model.parameters())
    else:
        loss.backward()
    opt.step()
    return loss.detach(), logits.detach()


def _images(x, dtype, device):
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[1:] != (1, 28, 28):
        raise ValueError(f"images must be N×1×28×28, got shape {x.shape}")
    return torch.as_tensor(x, dtype=dtype).to(device)


def lenet_train(params, batches, *, lr, impl, eps=1e-5, decay=0.9, unbiased=None,
                dtype="float64", device="cpu", loss_scale=None) -> dict:
    """Plain SGD on mean cross-entropy over `batches` of (x, y) NumPy pairs; running statistics
    update as `impl` does. Returns {"losses": [float per step], "params": canonical dict}, and
    for float16/bfloat16 (autocast, `MixedPrecision`) "precision": what ran."""
    dev, _ = resolve_device(device)
    mp = MixedPrecision(dtype, dev, loss_scale)
    model = build_lenet(impl, eps=eps, decay=decay, unbiased=unbiased, device=dev,
                        dtype=mp.param_dtype, params=params)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for x, y in batches:
        yb = torch.as_tensor(np.asarray(y), dtype=torch.int64).to(dev)
        losses.append(sgd_step(model, opt, _images(x, mp.param_dtype, dev), yb, mp)[0])
    return {"losses": torch.stack(losses).tolist() if losses else [], "params": get_params(model),
            **mp.summary()}


def lenet_eval(params, x, *, impl, dtype="float64", device="cpu") -> np.ndarray:
    """Logits (N×10, NumPy) in inference mode, i.e. with the running statistics (float16 and
    bfloat16 under autocast, logits in that dtype)."""
    dev, _ = resolve_device(device)
    mp = MixedPrecision(dtype, dev)
    model = build_lenet(impl, device=dev, dtype=mp.param_dtype, params=params).eval()
    with torch.no_grad(), mp.autocast():
        return numpy(model(_images(x, mp.param_dtype, dev)))

