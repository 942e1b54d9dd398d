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

from backends import DeviceUnavailable, UnsupportedSetting
from backends.jax.bn import CONVENTION, check_dtype, check_impl, make_layer, x64_mode
from common import convert
from common import lenet as canon
from common.spec import momentum_from_decay


class LeNetBN(nn.Module):
    """conv(6,5)→BN→sigmoid→maxpool2→conv(16,5)→BN→sigmoid→maxpool2→flatten→fc(120)→BN→sigmoid
    →fc(84)→BN→sigmoid→fc(10), channels-last, with `impl`'s batch norm."""

    impl: str = "scratch"
    momentum: float | None = None  # in the impl's own meaning; None: the impl's default
    eps: float = 1e-5
    unbiased: bool = False
    precision: object = None  # matmul/conv precision (None: JAX's default for the device)

    @nn.compact
    def __call__(self, x, train: bool, inputs=None, every_layer=False):
        """Logits; with `every_layer`, every layer's output by name (`common.lenet.LAYERS`, in
        this module's NHWC layout). A layer named in `inputs` gets that array as its input."""
        def bn(name):
            return make_layer(self.impl, momentum=self.momentum, eps=self.eps,
                              unbiased=self.unbiased, use_running_average=not train, name=name)

        conv = functools.partial(nn.Conv, kernel_size=(5, 5), padding="VALID",
                                 precision=self.precision)
        dense = functools.partial(nn.Dense, precision=self.precision)
        pool = functools.partial(nn.max_pool, window_shape=(2, 2), strides=(2, 2))
        steps = (("conv1", conv(6, name="conv1")), ("bn1", bn("bn1")), ("sigmoid1", nn.sigmoid),
                 ("pool1", pool), ("conv2", conv(16, name="conv2")), ("bn2", bn("bn2")),
                 ("sigmoid2", nn.sigmoid), ("pool2", pool),
                 # H×W×C order; fc1's kernel rows are permuted to match
                 ("flatten", lambda h: h.reshape((h.shape[0], -1))),
                 ("fc1", dense(120, name="fc1")), ("bn3", bn("bn3")), ("sigmoid3", nn.sigmoid),
                 ("fc2", dense(84, name="fc2")), ("bn4", bn("bn4")), ("sigmoid4", nn.sigmoid),
                 ("fc3", dense(10, name="fc3")))
        out = canon.run_layers(steps, x, inputs)
        return out if every_layer else out["fc3"]


def variables_of(params, impl, dtype) -> dict:
    """Flax variables (NumPy, `dtype`) of canonical `params` for `impl`'s LeNetBN."""
    canon.validate_params(params)
    return convert.to_flax(canon.cast(params, dtype), impl)


def nchw_to_nhwc(x):
    return np.moveaxis(np.asarray(x), 1, -1)


def select_device(device="auto"):
    """(jax.Device, description) for "auto" (a GPU when JAX sees one), "cpu" or "gpu"."""
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
    if device in ("auto", "gpu"):
        try:
            gpus = jax.devices("gpu")
        except RuntimeError as e:
            gpus, reason = [], str(e).splitlines()[0]
        else:
            reason = "jax.devices('gpu') is empty"
        if gpus:
            d = gpus[0]
            kind = "cuda" if "nvidia" in d.device_kind.lower() else d.platform
            return d, f"{kind}:{d.id} ({d.device_kind})"
        if device == "gpu":
            raise DeviceUnavailable(
                f"JAX sees no GPU (backend {jax.default_backend()!r}; {reason}). Install a CUDA "
                f"build (pip install 'jax[cuda12]') or use device='cpu'.")
    return jax.devices("cpu")[0], "cpu"


def build(impl, *, eps, decay, unbiased, precision=None) -> LeNetBN:
    """The LeNet-BN module for `impl` with canonical `decay`; `unbiased=None` is the impl's own
    (biased for both)."""
    check_impl(impl)
    if unbiased and impl == "native":
        raise UnsupportedSetting(
            "flax.linen.BatchNorm keeps a biased running variance; unbiased=True is not "
            "expressible")
    return LeNetBN(impl=impl, momentum=momentum_from_decay(decay, CONVENTION[impl]), eps=eps,
                   unbiased=bool(unbiased), precision=precision)


def make_train_step(model: LeNetBN, lr: float):
    """A pure SGD step ((params, batch_stats, opt_state), x, y) → (state, loss, n_correct), to be
    wrapped in jax.jit or lax.scan. Running statistics come from the training-mode forward."""
    tx = optax.sgd(lr)

    def loss_fn(params, batch_stats, x, y):
        logits, updated = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                      train=True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (updated["batch_stats"], logits)

    def step(state, x, y):
        params, batch_stats, opt_state = state
        (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        correct = jnp.sum(jnp.argmax(logits, axis=-1) == y, dtype=jnp.int32)
        return (params, batch_stats, opt_state), loss, correct

    return tx, step


@functools.lru_cache(maxsize=32)
def _jitted_step(impl, eps, decay, unbiased, lr):
    model = build(impl, eps=eps, decay=decay, unbiased=unbiased, precision="highest")
    tx, step = make_train_step(model, lr)
    return tx, jax.jit(step)


@functools.lru_cache(maxsize=8)
def _jitted_inference(impl, eps, every_layer=False):
    model = build(impl, eps=eps, decay=0.9, unbiased=False, precision="highest")
    return jax.jit(functools.partial(model.apply, train=False, every_layer=every_layer))


def lenet_train(params, batches, *, lr, impl, eps=1e-5, decay=0.9, unbiased=None,
                dtype="float64", device="cpu") -> dict:
    """The contract's lenet_train: plain SGD from canonical `params` over NCHW `batches`, one
    jitted step per batch; losses are read back once, after the last step."""
    check_impl(impl)
    dt = check_dtype(dtype)
    dev, _ = select_device(device)
    tx, step = _jitted_step(impl, float(eps), float(decay), bool(unbiased), float(lr))
    variables = variables_of(params, impl, dt)
    with x64_mode(dt):
        variables = jax.device_put(variables, dev)
        state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
        losses = []
        for x, y in batches:
            xb = jax.device_put(nchw_to_nhwc(np.asarray(x, dtype=dt)), dev)
            yb = jax.device_put(np.asarray(y, dtype=np.int32), dev)
            state, loss, _ = step(state, xb, yb)
            losses.append(loss)
        losses = [float(v) for v in jax.device_get(losses)]
        out = convert.from_flax(jax.device_get({"params": state[0], "batch_stats": state[1]}))
    return {"losses": losses, "params": {k: v.astype(dt) for k, v in out.items()}}


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
    dt = check_dtype(dtype)
    dev, _ = select_device(device)
    variables = variables_of(convert.fixed_gamma(params) if fix_gamma else params, impl, dt)
    fn = _jitted_inference(impl, float(eps), inputs is not None)
    with x64_mode(dt):
        args = [jax.device_put(a, dev) for a in (variables, nchw_to_nhwc(np.asarray(x, dtype=dt)))]
        if inputs is None:
            return np.asarray(fn(*args), dtype=dt)
        inputs = {k: np.asarray(v, dt) for k, v in inputs.items()}
        out = fn(*args, inputs=jax.device_put(inputs, dev))
        return {k: np.asarray(v, dtype=dt) for k, v in out.items()}
