"""LeNet-BN in Gluon with the from-scratch or the native batch norm, canonical <-> Gluon
parameter conversion, and `lenet_train` / `lenet_eval`.

Gluon's Conv2D (O×I×kH×kW) and Dense (out×in, flattening C×H×W) use PyTorch's layouts, and the
layer attributes carry the canonical names (`conv1.weight`, `bn1.running_var`, ...), so the
conversion (`common.convert`) is a lookup and a dtype cast.
"""
from __future__ import annotations

import numpy as np

import mxnet as mx
from mxnet import autograd, gluon
from mxnet.gluon import nn

from common import convert
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

    def stages(self):
        """(layer, its batch norm, max-pool after the sigmoid?) in forward order; fc3 follows.
        The chain as backends/mxnet/sync.py walks it, shard by shard (`steps` is the same
        chain layer by layer)."""
        return ((self.conv1, self.bn1, True), (self.conv2, self.bn2, True),
                (self.fc1, self.bn3, False), (self.fc2, self.bn4, False))

    @staticmethod
    def activate(F, z, pool):
        """The sigmoid after a batch norm, then the 2×2 max-pool where `pool`."""
        a = F.Activation(z, act_type="sigmoid")
        return F.Pooling(a, kernel=(2, 2), stride=(2, 2), pool_type="max") if pool else a

    def steps(self, F):
        """(layer name, function) in `common.lenet.LAYERS` order for `F` (mx.nd or mx.sym): the
        one definition of the forward pass, which `hybrid_forward` and `lenet_layers` run."""
        def sigmoid(x):
            return F.Activation(x, act_type="sigmoid")

        def pool(x):
            return F.Pooling(x, kernel=(2, 2), stride=(2, 2), pool_type="max")

        return (("conv1", self.conv1), ("bn1", self.bn1), ("sigmoid1", sigmoid), ("pool1", pool),
                ("conv2", self.conv2), ("bn2", self.bn2), ("sigmoid2", sigmoid), ("pool2", pool),
                ("flatten", F.flatten), ("fc1", self.fc1), ("bn3", self.bn3),
                ("sigmoid3", sigmoid), ("fc2", self.fc2), ("bn4", self.bn4),
                ("sigmoid4", sigmoid), ("fc3", self.fc3))

    def hybrid_forward(self, F, x):
        for _, fn in self.steps(F):
            x = fn(x)
        logits = x
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


def build(impl, *, eps=1e-5, decay=0.9, unbiased=False, fix_gamma=False):
    """An uninitialised LeNet-BN with `impl`'s batch norm, configured from canonical terms;
    `fix_gamma=True`: see `make_layer`."""
    return LeNet(lambda c, d: make_layer(impl, c, d, eps=eps, decay=decay, unbiased=unbiased,
                                         fix_gamma=fix_gamma))


def _params(net):
    """The net's Parameters by the structural names Gluon's save_parameters uses."""
    return net._collect_params_with_prefix()


def load_params(net, params, dtype, ctx):
    """Initialise `net` on `ctx` (a context, or a list of contexts: one replica on each) in
    `dtype` and set it to the canonical `params` (float16: batch norm keeps float32, as `cast`
    leaves it)."""
    canonical.validate_params(params)
    net.initialize(ctx=ctx)
    net.cast(mx_dtype(dtype))
    first = ctx[0] if isinstance(ctx, (list, tuple)) else ctx  # set_data fills every context
    targets = _params(net)
    flat = convert.to_flat("mxnet", canonical.cast(params, np.float64), "native")
    for key, value in flat.items():
        targets[key].set_data(array(value, targets[key].dtype, first))


def to_canonical(net, master=None) -> dict[str, np.ndarray]:
    """The canonical dict of `net`; `master` ({Parameter name: float32 copy}) replaces the
    float16 parameters it holds by their float32 master weights."""
    master = master or {}
    return convert.from_flat("mxnet", {k: master.get(p.name, p.data()).asnumpy()
                                       for k, p in _params(net).items()})


def _ctx(device):
    return context(device)[0]


def lenet_train(params, batches, *, lr, impl, eps=1e-5, decay=0.9, unbiased=None,
                dtype="float64", device="cpu", record=False, loss_scale=None) -> dict:
    """Plain SGD on mean cross-entropy, one step per batch, from canonical `params`; with
    `record`, "history" holds the canonical dict after every step.

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
    losses, history = [], []
    for x, y in batches:
        X = array(x, mp.dtype, ctx)
        Y = mx.nd.array(y, dtype=mp.float_dtype, ctx=ctx)
        with autograd.record():
            loss = loss_fn(mp.logits(net(X)), Y).mean()
            scaled = mp.scaled(loss)
        scaled.backward()
        mp.sgd(trainable, lr, master)
        losses.append(float(loss.asscalar()))
        if record:
            history.append(to_canonical(net))
    out = {"losses": losses, "params": to_canonical(net, master), **mp.summary()}
    if record:
        out["history"] = history
    return out


def _inference_net(impl, params, *, eps, fix_gamma, dtype, ctx):
    """LeNet-BN holding `params` for inference. fix_gamma: MXNet's own (scale=False) in the
    native layer; the from-scratch layer, which has none, runs with every gamma 1."""
    native_fix = fix_gamma and impl == "native"
    net = build(impl, eps=eps, fix_gamma=native_fix)
    load_params(net, convert.fixed_gamma(params) if fix_gamma and not native_fix else params,
                dtype, ctx)
    return net


def lenet_eval(params, x, *, impl, dtype="float64", device="cpu", eps=1e-5,
               fix_gamma=False) -> np.ndarray:
    """Logits in inference mode (running statistics) with the checkpoint's eps and fix_gamma."""
    ctx = _ctx(device)
    mp = MixedPrecision(dtype, ctx)
    net = _inference_net(impl, params, eps=eps, fix_gamma=fix_gamma, dtype=mp.dtype, ctx=ctx)
    net.hybridize()
    return numpy(net(array(x, mp.dtype, ctx)))


def lenet_layers(params, x, *, impl, dtype="float64", device="cpu", eps=1e-5, fix_gamma=False,
                 inputs=None) -> dict:
    """Every layer's output (`common.lenet.LAYERS`, NumPy) in inference mode, run imperatively;
    a layer named in `inputs` is fed that array instead of the previous layer's output."""
    ctx = _ctx(device)
    x = np.asarray(x)
    inputs = {k: mx.nd.array(v, dtype=dtype, ctx=ctx)
              for k, v in canonical.check_layer_inputs(inputs, len(x)).items()}
    net = _inference_net(impl, params, eps=eps, fix_gamma=fix_gamma, dtype=dtype, ctx=ctx)
    out = canonical.run_layers(net.steps(mx.nd), mx.nd.array(x, dtype=dtype, ctx=ctx), inputs)
    return {k: v.asnumpy() for k, v in out.items()}
