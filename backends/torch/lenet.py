"""LeNet-BN in PyTorch with from-scratch or native batch norm; conversion between the canonical
NumPy parameter dict (`common.lenet`, already in PyTorch layout) and the model; `lenet_train`,
`lenet_eval`.
"""
from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common import convert
from common import lenet as canon

from .bn import check_impl, make_layer
from .device import resolve_device
from .precision import MixedPrecision, numpy, torch_dtype



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

    def steps(self):
        """(layer name, function) in `common.lenet.LAYERS` order: the one definition of the
        forward pass, which `forward` and `lenet_layers` both run."""
        pool = functools.partial(F.max_pool2d, kernel_size=2)
        return (("conv1", self.conv1), ("bn1", self.bn1), ("sigmoid1", torch.sigmoid),
                ("pool1", pool), ("conv2", self.conv2), ("bn2", self.bn2),
                ("sigmoid2", torch.sigmoid), ("pool2", pool),
                ("flatten", functools.partial(torch.flatten, start_dim=1)), ("fc1", self.fc1),
                ("bn3", self.bn3), ("sigmoid3", torch.sigmoid), ("fc2", self.fc2),
                ("bn4", self.bn4), ("sigmoid4", torch.sigmoid), ("fc3", self.fc3))

    def forward(self, x):
        for _, fn in self.steps():
            x = fn(x)
        return x


def load_params(model: LeNetBN, params) -> None:
    """Copy the canonical dict into `model` in place (cast to its dtype and device), with
    num_batches_tracked 0, through the converter's state_dict (`common.convert`)."""
    canon.validate_params(params)
    state = convert.to_flat("torch", canon.cast(params, np.float64), model.impl)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})


def get_params(model: LeNetBN) -> dict[str, np.ndarray]:
    """The canonical dict (NumPy, the model's dtype) of `model`'s parameters and running stats."""
    return convert.from_flat("torch", {k: v.detach().cpu().numpy().copy()
                                       for k, v in model.state_dict().items()})


def build_lenet(impl, *, eps=1e-5, decay=0.9, unbiased=None, device="cpu", dtype=torch.float32,
                params=None, fix_gamma=False) -> LeNetBN:
    """LeNet-BN on `device` holding `params` (default: `common.lenet.init_params(0)`). Built on the
    meta device first, so building never draws from torch's global RNG. `fix_gamma=True` runs
    with every gamma 1, as MXNet's fix_gamma does (PyTorch has no such option)."""
    check_impl(impl)
    with torch.device("meta"):
        model = LeNetBN(impl, eps=eps, decay=decay, unbiased=unbiased, dtype=torch_dtype(dtype))
    model.to_empty(device=device)
    params = canon.init_params(0) if params is None else params
    load_params(model, convert.fixed_gamma(params) if fix_gamma else params)
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
                dtype="float64", device="cpu", record=False, loss_scale=None) -> dict:
    """Plain SGD on mean cross-entropy over `batches` of (x, y) NumPy pairs; running statistics
    update as `impl` does. Returns {"losses": [float per step], "params": canonical dict}, with
    `record` "history": the canonical dict after every step, and for float16/bfloat16
    (autocast, `MixedPrecision`) "precision": what ran."""
    dev, _ = resolve_device(device)
    mp = MixedPrecision(dtype, dev, loss_scale)
    model = build_lenet(impl, eps=eps, decay=decay, unbiased=unbiased, device=dev,
                        dtype=mp.param_dtype, params=params)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses, history = [], []
    for x, y in batches:
        yb = torch.as_tensor(np.asarray(y), dtype=torch.int64).to(dev)
        losses.append(sgd_step(model, opt, _images(x, mp.param_dtype, dev), yb, mp)[0])
        if record:
            history.append(get_params(model))
    out = {"losses": torch.stack(losses).tolist() if losses else [], "params": get_params(model),
           **mp.summary()}
    if record:
        out["history"] = history
    return out


def lenet_eval(params, x, *, impl, dtype="float64", device="cpu", eps=1e-5,
               fix_gamma=False) -> np.ndarray:
    """Logits (N×10, NumPy) in inference mode, i.e. with the running statistics, with the
    checkpoint's eps (and MXNet's fix_gamma, see `build_lenet`); float16 and bfloat16 under
    autocast, logits in that dtype."""
    dev, _ = resolve_device(device)
    mp = MixedPrecision(dtype, dev)
    model = build_lenet(impl, eps=eps, device=dev, dtype=mp.param_dtype, params=params,
                        fix_gamma=fix_gamma).eval()
    with torch.no_grad(), mp.autocast():
        return numpy(model(_images(x, mp.param_dtype, dev)))


def lenet_layers(params, x, *, impl, dtype="float64", device="cpu", eps=1e-5, fix_gamma=False,
                 inputs=None) -> dict:
    """Every layer's output ({name in `common.lenet.LAYERS`: NumPy array}) in inference mode; a
    layer named in `inputs` is fed that array instead of the previous layer's output."""
    dev, _ = resolve_device(device)
    tdt = torch_dtype(dtype)
    x = _images(x, tdt, dev)
    inputs = {k: torch.tensor(np.asarray(v), dtype=tdt, device=dev)
              for k, v in canon.check_layer_inputs(inputs, len(x)).items()}
    model = build_lenet(impl, eps=eps, device=dev, dtype=tdt, params=params,
                        fix_gamma=fix_gamma).eval()
    with torch.no_grad():
        out = canon.run_layers(model.steps(), x, inputs)
    return {k: v.cpu().numpy() for k, v in out.items()}
