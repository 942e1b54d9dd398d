"""LeNet-BN in Flax (NHWC inside) and the contract's `lenet_train` / `lenet_eval` /
`lenet_layers`.

The canonical PyTorch-layout parameters become Flax variables through `common.convert`
(HWIO conv kernels, in×out dense kernels, fc1's columns permuted once from PyTorch's C×H×W
flatten order to NHWC's H×W×C instead of transposing activations on every step).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from backends import UnsupportedSetting
from backends.jax.bn import check_impl, make_layer, x64_mode
from backends.jax.device import select_device
from backends.jax.precision import MixedPrecision, float_logits, optimizer
from common import convert
from common import lenet as canon


class LeNetBN(nn.Module):
    """conv(6,5)→BN→sigmoid→maxpool2→conv(16,5)→BN→sigmoid→maxpool2→flatten→fc(120)→BN→sigmoid
    →fc(84)→BN→sigmoid→fc(10), channels-last, with `impl`'s batch norm."""

    impl: str = "scratch"
    decay: float = 0.9  # canonical (common.spec): the weight kept on the old running value
    eps: float = 1e-5
    unbiased: bool = False
    precision: object = None  # matmul/conv precision (None: JAX's default for the device)
    # Another batch-norm module class (e.g. the synchronized one of backends/jax/sync.py), built
    # with momentum, epsilon, unbiased, use_running_average and name; None: `impl`'s layer.
    bn_module: object = None
    dtype: object = None  # what every layer computes in (None: its inputs'; jax/precision.py)

    @nn.compact
    def __call__(self, x, train: bool, mask=None, inputs=None, every_layer=False):
        """Logits of `x` (NHWC); with `every_layer`, every layer's output by name
        (`common.lenet.LAYERS`, in this module's NHWC layout). A layer named in `inputs` gets
        that array as its input. `mask` (N,), where given, marks the rows that count in the
        batch statistics (padding for unequal shards); it goes to every batch-norm layer."""
        def make(name, features, dims):
            if self.bn_module is None:
                return make_layer(self.impl, features, dims, eps=self.eps, decay=self.decay,
                                  unbiased=self.unbiased, use_running_average=not train, name=name,
                                  dtype=self.dtype)
            # the module's own momentum: old-weight in every JAX batch norm, so it is the decay
            return self.bn_module(momentum=self.decay, epsilon=self.eps,
                                  unbiased=self.unbiased, use_running_average=not train, name=name)

        def bn(name, features, dims):
            layer = make(name, features, dims)
            if mask is None:
                return layer
            return lambda h: layer(h, mask=mask.reshape((-1,) + (1,) * (h.ndim - 1)))

        conv = functools.partial(nn.Conv, kernel_size=(5, 5), padding="VALID",
                                 precision=self.precision, dtype=self.dtype)
        dense = functools.partial(nn.Dense, precision=self.precision, dtype=self.dtype)
        pool = functools.partial(nn.max_pool, window_shape=(2, 2), strides=(2, 2))
        steps = (("conv1", conv(6, name="conv1")), ("bn1", bn("bn1", 6, 4)),
                 ("sigmoid1", nn.sigmoid), ("pool1", pool), ("conv2", conv(16, name="conv2")),
                 ("bn2", bn("bn2", 16, 4)), ("sigmoid2", nn.sigmoid), ("pool2", pool),
                 # H×W×C order; fc1's kernel rows are permuted to match
                 ("flatten", lambda h: h.reshape((h.shape[0], -1))),
                 ("fc1", dense(120, name="fc1")), ("bn3", bn("bn3", 120, 2)),
                 ("sigmoid3", nn.sigmoid), ("fc2", dense(84, name="fc2")),
                 ("bn4", bn("bn4", 84, 2)), ("sigmoid4", nn.sigmoid), ("fc3", dense(10, name="fc3")))
        out = canon.run_layers(steps, x, inputs)
        return out if every_layer else out["fc3"]


def variables_of(params, impl, dtype) -> dict:
    """Flax variables (NumPy, `dtype`) of canonical `params` for `impl`'s LeNetBN."""
    canon.validate_params(params)
    return convert.to_flax(canon.cast(params, dtype), impl)


def nchw_to_nhwc(x):
    return np.moveaxis(np.asarray(x), 1, -1)


def build(impl, *, eps, decay, unbiased, precision=None, dtype=None) -> LeNetBN:
    """The LeNet-BN module for `impl` with canonical `decay`; `unbiased=None` is the impl's own
    (biased for both); `dtype`: what it computes in (None: its inputs')."""
    check_impl(impl)
    if unbiased and impl == "native":
        raise UnsupportedSetting(
            "flax.linen.BatchNorm keeps a biased running variance; unbiased=True is not "
            "expressible")
    return LeNetBN(impl=impl, decay=decay, eps=eps, unbiased=bool(unbiased), precision=precision,
                   dtype=dtype)


def make_train_step(model: LeNetBN, lr: float, loss_scale: float = 1.0):
    """A pure SGD step ((params, batch_stats, opt_state), x, y) → (state, loss, n_correct), to be
    wrapped in jax.jit or lax.scan. Running statistics come from the training-mode forward. The
    loss is computed from at least float32 logits; with `loss_scale` != 1 the gradient of the
    scaled loss is unscaled before the update, which `jax/precision.optimizer` skips when it is
    not finite."""
    tx = optimizer(lr, loss_scale)

    def loss_fn(params, batch_stats, x, y):
        logits, updated = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                      train=True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(float_logits(logits), y).mean()
        scaled = loss if loss_scale == 1.0 else loss * loss_scale
        return scaled, (loss, updated["batch_stats"], logits)

    def step(state, x, y):
        params, batch_stats, opt_state = state
        (_, (loss, batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, x, y)
        if loss_scale != 1.0:
            grads = jax.tree_util.tree_map(lambda g: g / loss_scale, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        correct = jnp.sum(jnp.argmax(logits, axis=-1) == y, dtype=jnp.int32)
        return (params, batch_stats, opt_state), loss, correct

    return tx, step


@functools.lru_cache(maxsize=32)
def _jitted_step(impl, eps, decay, unbiased, lr, compute=None, loss_scale=1.0):
    model = build(impl, eps=eps, decay=decay, unbiased=unbiased, precision="highest",
                  dtype=compute)
    tx, step = make_train_step(model, lr, loss_scale)
    return tx, jax.jit(step)


@functools.lru_cache(maxsize=8)
def _jitted_inference(impl, eps, every_layer=False, compute=None):
    model = build(impl, eps=eps, decay=0.9, unbiased=False, precision="highest", dtype=compute)
    return jax.jit(functools.partial(model.apply, train=False, every_layer=every_layer))


def lenet_train(params, batches, *, lr, impl, eps=1e-5, decay=0.9, unbiased=None,
                dtype="float64", device="cpu", record=False, loss_scale=None) -> dict:
    """The contract's lenet_train: plain SGD from canonical `params` over NCHW `batches`, one
    jitted step per batch; losses are read back once, after the last step. `record` keeps
    every step's state and returns it as "history" (canonical dicts). float16/bfloat16:
    `jax/precision.py` (Flax dtype, float32 parameters, static loss scaling)."""
    check_impl(impl)
    mp = MixedPrecision(dtype, loss_scale)
    dt = mp.param_dtype
    dev, _ = select_device(device)
    tx, step = _jitted_step(impl, float(eps), float(decay), bool(unbiased), float(lr), *mp.key())
    variables = variables_of(params, impl, dt)
    with x64_mode(dt):
        variables = jax.device_put(variables, dev)
        state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
        losses, states = [], []
        for x, y in batches:
            xb = jax.device_put(nchw_to_nhwc(np.asarray(x, dtype=dt)), dev)
            yb = jax.device_put(np.asarray(y, dtype=np.int32), dev)
            state, loss, _ = step(state, xb, yb)
            losses.append(loss)
            if record:
                states.append(state[:2])
        losses = [float(v) for v in jax.device_get(losses)]

        def canonical(s):
            out = convert.from_flax(jax.device_get({"params": s[0], "batch_stats": s[1]}))
            return {k: v.astype(dt) for k, v in out.items()}

        result = {"losses": losses, "params": canonical(state), **mp.summary(state[2])}
        if record:
            result["history"] = [canonical(s) for s in states]
    return result


def lenet_eval(params, x, *, impl, dtype="float64", device="cpu", eps=1e-5, fix_gamma=False):
    """The contract's lenet_eval: logits (N×10, `dtype`) in inference mode (running statistics),
    with the checkpoint's eps; `fix_gamma=True` runs with every gamma 1, as MXNet's fix_gamma
    does (Flax has no such option)."""
    return _inference(params, x, impl=impl, dtype=dtype, device=device, eps=eps,
                      fix_gamma=fix_gamma)


def lenet_layers(params, x, *, impl, dtype="float64", device="cpu", eps=1e-5, fix_gamma=False,
                 inputs=None) -> dict:
    """The contract's lenet_layers: every layer's output in NCHW / C×H×W-ordered features;
    `inputs` ({layer: input}, same layouts) feeds a layer that input instead of the previous
    output. The NHWC conversions are `common.convert`'s."""
    inputs = {k: convert.nhwc_activation(k, v, is_input=True)
              for k, v in canon.check_layer_inputs(inputs, len(x)).items()}
    out = _inference(params, x, impl=impl, dtype=dtype, device=device, eps=eps,
                     fix_gamma=fix_gamma, inputs=inputs)
    return {k: np.array(convert.nchw_activation(k, out[k]), order="C") for k in canon.LAYERS}


def _inference(params, x, *, impl, dtype, device, eps, fix_gamma, inputs=None):
    check_impl(impl)
    mp = MixedPrecision(dtype)
    dt = mp.param_dtype
    dev, _ = select_device(device)
    variables = variables_of(convert.fixed_gamma(params) if fix_gamma else params, impl, dt)
    fn = _jitted_inference(impl, float(eps), inputs is not None, mp.compute)
    with x64_mode(dt):
        args = [jax.device_put(a, dev) for a in (variables, nchw_to_nhwc(np.asarray(x, dtype=dt)))]
        if inputs is None:
            return np.asarray(fn(*args), dtype=mp.dt)
        inputs = {k: np.asarray(v, dt) for k, v in inputs.items()}
        out = fn(*args, inputs=jax.device_put(inputs, dev))
        return {k: np.asarray(v, dtype=mp.dt) for k, v in out.items()}
