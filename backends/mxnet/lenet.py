"""LeNet-BN in Gluon with the from-scratch or the native batch norm, canonical <-> Gluon
parameter conversion, and `lenet_train` / `lenet_eval`.

Gluon's Conv2D (O×I×kH×kW) and Dense (out×in, flattening C×H×W) use PyTorch's layouts, and the
layer attributes carry the canonical names (`conv1.weight`, `bn1.running_var`, ...), so the
conversion is a lookup and a dtype cast.
"""
from __future__ import annotations

import numpy as np

import mxnet as mx
from mxnet import autograd, gluon
from mxnet.gluon import nn

from common import lenet as canonical
from common import spec

from .bn import BatchNorm, PerModeGraph, make_layer
from .device import context
from .precision import MixedPrecision, array, mx_dtype, numpy


class LeNet(PerModeGraph):
    """conv(1→6, 5) → BN → sigmoid → max-pool 2 → conv(6→16, 5) → BN → sigmoid → max-pool 2 →
    dense(256→120) → BN → sigmoid → dense(120→84) → BN → sigmoid → dense(84→10).

    With from-scratch BN layers and hybridized, the training graph returns the layers' new
    running statistics after the logits and `forward` writes them back, so the statistics are
    updated in the forward pass as in the source, and survive `hybridize()`.
    """

    def __init__(self, make_bn, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.conv1 = nn.Conv2D(6, kernel_size=5, in_channels=1)
            self.bn1 = make_bn(6, 4)
            self.conv2 = nn.Conv2D(16, kernel_size=5, in_channels=6)
            self.bn2 = make_bn(16, 4)
            self.fc1 = nn.Dense(120, in_units=256)
            self.bn3 = make_bn(120, 2)
            self.fc2 = nn.Dense(84, in_units=120)
            self.bn4 = make_bn(84, 2)
            self.fc3 = nn.Dense(10, in_units=84)
        self._scratch = [b for b in (self.bn1, self.bn2, self.bn3, self.bn4)
                         if isinstance(b, BatchNorm)]

    def hybrid_forward(self, F, x):
        def block(x, conv, bn):
            return F.Pooling(F.Activation(bn(conv(x)), act_type="sigmoid"), kernel=(2, 2),
                             stride=(2, 2), pool_type="max")

        x = block(block(x, self.conv1, self.bn1), self.conv2, self.bn2)
        x = F.Activation(self.bn3(self.fc1(x)), act_type="sigmoid")
        x = F.Activation(self.bn4(self.fc2(x)), act_type="sigmoid")
        logits = self.fc3(x)
        if F is mx.sym and autograd.is_training() and self._scratch:
            return (logits,) + tuple(s for b in self._scratch for s in b.traced_stats)
        return logits

    def forward(self, x):
        out = super().forward(x)
        if not isinstance(out, (list, tuple)):
            return out
        logits, *stats = out
        for b, mean, var in zip(self._scratch, stats[::2], stats[1::2]):
            b.set_running_stats(mean, var)
        return logits


def build(impl, *, eps=1e-5, decay=0.9, unbiased=False):
    """An uninitialised LeNet-BN with `impl`'s batch norm, configured from canonical terms."""
    return LeNet(lambda c, d: make_layer(impl, c, d, eps=eps, decay=decay, unbiased=unbiased))


def _param(net, name):
    layer, field = name.split(".")
    return getattr(getattr(net, layer), field)


def load_params(net, params, dtype, ctx):
    """Initialise `net` on `ctx` in `dtype` and set it to the canonical `params` (float16: batch
    norm keeps float32, as `cast` leaves it)."""
    canonical.validate_params(params)
    net.initialize(ctx=ctx)
    net.cast(mx_dtype(dtype))
    for name in canonical.param_shapes():
        p = _param(net, name)
        p.set_data(array(params[name], p.dtype, ctx))


def to_canonical(net) -> dict[str, np.ndarray]:
    return {name: _param(net, name).data().asnumpy() for name in canonical.param_shapes()}


def _ctx(device):
    return context(device)[0]


def lenet_train(params, batches, *, lr, impl, eps=1e-5, decay=0.9, unbiased=None,
                dtype="float64", device="cpu", loss_scale=None) -> dict:
    """Plain SGD on mean cross-entropy, one step per batch, from canonical `params`.

    `unbiased=None` keeps both impls' own (biased) running variance. The native layer applies
    its momentum as a float32 (conventions()["native"]["momentum_dtype"]), so in float64 its
    running statistics follow decay=float32(decay). The update `w -= lr * grad` is done here in
    `dtype` (gluon.Trainer's sgd_update also takes the learning rate as a float32); `fit` uses
    the Trainer. float16 (GPU only; `precision.MixedPrecision`): the network cast to float16 with
    batch norm in float32, float32 master weights, static loss scaling.
    """
    spec.check_decay(decay)
    ctx = _ctx(device)
    mp = MixedPrecision(dtype, ctx, loss_scale)
    net = build(impl, eps=eps, decay=decay, unbiased=bool(unbiased))
    load_params(net, params, mp.dtype, ctx)
    net.hybridize(static_alloc=True)
    trainable = [p for p in net.collect_params().values() if p.grad_req != "null"]
    master = mp.master_weights(trainable)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    losses = []
    for x, y in batches:
        X = array(x, mp.dtype, ctx)
        Y = mx.nd.array(y, dtype=mp.float_dtype, ctx=ctx)
        with autograd.record():
            loss = loss_fn(mp.logits(net(X)), Y).mean()
            scaled = mp.scaled(loss)
        scaled.backward()
        mp.sgd(trainable, lr, master)
        losses.append(float(loss.asscalar()))
    out = to_canonical(net)
    out.update({name: master[_param(net, name).name].asnumpy() for name in out
                if _param(net, name).name in master})
    return {"losses": losses, "params": out, **mp.summary()}


def lenet_eval(params, x, *, impl, dtype="float64", device="cpu") -> np.ndarray:
    """Logits in inference mode (running statistics)."""
    ctx = _ctx(device)
    mp = MixedPrecision(dtype, ctx)
    net = build(impl)
    load_params(net, params, mp.dtype, ctx)
    net.hybridize()
    return numpy(net(array(x, mp.dtype, ctx)))
