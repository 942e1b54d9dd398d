"""Batch normalization in JAX/Flax: the d2l JAX source's batch norm first as a learner reads it
(`textbook_batch_norm`), then the same algorithm as this backend runs it (`batch_norm`, the
`BatchNorm` module), the `flax.linen.BatchNorm` adapter, and the contract's `make_layer`,
`bn_step`, `conventions` and `probe`.

Flax is channels-last: the feature axis is the LAST one (NHWC, or N×C), so per-channel
statistics reduce over every axis but the last. The contract's arrays are NCHW; `bn_step` and
`probe` transpose at the boundary.

float64 runs inside `x64_mode` only: JAX's `jax_enable_x64` is process-wide state, so it is
switched on for the duration of the call that asks for float64 and restored afterwards, never at
import time.
"""
from __future__ import annotations

import contextlib
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from backends import UnsupportedSetting, check_layer_config
from common import dtypes, precision, spec
from common.conventions import signature_arguments
from common.convert import BN_NAMES, PARAM_FIELDS, STAT_FIELDS
from common.dtypes import float_dtype as check_dtype
from common.reference import RESULT_KEYS, validate_inputs
from common.spec import IMPL_CONVENTIONS, momentum_from_decay

from backends.jax.device import select_device


def textbook_batch_norm(X, deterministic, gamma, beta, moving_mean, moving_var, eps, momentum):
    """The d2l JAX source's batch norm, as a learner reads it, channels-last; `batch_norm` below
    computes the same (tests/test_jax.py holds it to it). gamma, beta and the moving statistics
    are arrays of the broadcast shape (1, C) or (1, 1, 1, C). Returns (Y, moving_mean,
    moving_var). One change from the published code: it reduced an NHWC tensor over axes
    (0, 2, 3), PyTorch's NCHW axes, which mixes width and channels; per channel, in NHWC, is
    over (0, 1, 2)."""
    if deterministic:  # prediction mode: the moving statistics
        X_hat = (X - moving_mean) / jnp.sqrt(moving_var + eps)
    else:
        if X.ndim not in (2, 4):
            raise ValueError(f"batch norm takes 2-D or 4-D input, got {X.ndim}-D")
        if X.ndim == 2:  # fully connected: one mean and variance per feature
            mean = X.mean(axis=0)
            var = ((X - mean) ** 2).mean(axis=0)
        else:  # convolution, NHWC: per channel, over batch, height and width
            mean = X.mean(axis=(0, 1, 2), keepdims=True)
            var = ((X - mean) ** 2).mean(axis=(0, 1, 2), keepdims=True)
        X_hat = (X - mean) / jnp.sqrt(var + eps)  # the biased (÷m) batch variance
        moving_mean = momentum * moving_mean + (1.0 - momentum) * mean  # momentum weighs the OLD
        moving_var = momentum * moving_var + (1.0 - momentum) * var
    Y = gamma * X_hat + beta  # scale and shift
    return Y, moving_mean, moving_var


IMPLS = ("scratch", "native")
# Each impl's momentum convention, a key of common.spec.MOMENTUM_WEIGHS.
CONVENTION = IMPL_CONVENTIONS["jax"]
SCRATCH_MOMENTUM = 0.9  # the d2l JAX source's default (weighs the old value)
SCRATCH_EPS = 1e-5

# Variable names inside each impl's Flax module (params, batch_stats), from the converter.
VARIABLE_NAMES = {impl: {f: BN_NAMES["jax"][impl].get(f, f)
                         for f in PARAM_FIELDS + STAT_FIELDS} for impl in IMPLS}


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(
            f"unknown impl {impl!r} for the jax backend; choose from {', '.join(IMPLS)}")


def x64_enabled() -> bool:
    """Whether JAX currently creates 64-bit arrays (the effective jax_enable_x64)."""
    return jnp.asarray(np.float64(0)).dtype == np.float64


@contextlib.contextmanager
def _config_x64(value: bool):
    previous = bool(jax.config.read("jax_enable_x64"))
    jax.config.update("jax_enable_x64", value)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def _x64_context():
    """The installed JAX's scoped x64 switch: `jax.enable_x64` (jax >= 0.8),
    `jax.experimental.enable_x64` (older), else a config update restored on exit."""
    scoped = getattr(jax, "enable_x64", None)
    if callable(scoped):
        return scoped(True)
    try:
        from jax.experimental import enable_x64
    except ImportError:
        return _config_x64(True)
    return enable_x64(True)


@contextlib.contextmanager
def x64_mode(dtype):
    """Enable 64-bit JAX types while the block runs if `dtype` is float64; no-op otherwise."""
    if check_dtype(dtype) != np.float64 or x64_enabled():
        yield
        return
    with _x64_context():
        yield


def batch_norm(X, gamma, beta, moving_mean, moving_var, eps, momentum, training, unbiased=False):
    """From-scratch batch norm, channel axis last. Returns (Y, moving_mean, moving_var).

    Training normalises with the batch mean and the biased two-pass variance and returns
    `momentum * moving + (1 - momentum) * batch_stat` (the d2l JAX convention: `momentum` weighs
    the OLD value); the variance statistic is ÷(m-1) when `unbiased`. Inference normalises with
    the moving statistics and returns them unchanged.
    """
    if X.ndim not in (2, 4):
        raise ValueError(f"X must be 2-D (N, C) or 4-D (N, H, W, C); got shape {X.shape}")
    if not training:
        Y = (X - moving_mean) * (gamma * jax.lax.rsqrt(moving_var + eps)) + beta
        return Y, moving_mean, moving_var
    axes = tuple(range(X.ndim - 1))
    mean = X.mean(axis=axes)
    var = jnp.square(X - mean).mean(axis=axes)
    # gamma * X_hat + beta with gamma / sqrt(var + eps) folded per channel: one multiply-add per
    # element (LeNet-BN training measured ~5% faster on an H100 than dividing elementwise).
    Y = (X - mean) * (gamma * jax.lax.rsqrt(var + eps)) + beta
    if unbiased:
        m = X.size // X.shape[-1]
        var = var * (m / (m - 1))
    moving_mean = momentum * moving_mean + (1.0 - momentum) * mean
    moving_var = momentum * moving_var + (1.0 - momentum) * var
    return Y, moving_mean, moving_var


class BatchNorm(nn.Module):
    """From-scratch batch norm as a Flax module (channel axis last).

    Parameters `gamma`, `beta`; running statistics `moving_mean` (zeros) and `moving_var` (ones)
    in the `batch_stats` collection, updated only in training mode
    (`use_running_average=False`), which needs `mutable=['batch_stats']` in `apply`, as with
    `flax.linen.BatchNorm`.

    Precision (`common.dtypes.ACCUMULATE`): `accumulate="float32"` computes in
    jnp.promote_types(input, float32), as Flax's own layer does, and casts the output to `dtype`
    (None: the input's); `accumulate="input"` computes in the input dtype, with parameters and
    statistics kept in `param_dtype` (make_layer sets it to the input dtype then).
    """

    use_running_average: bool | None = None
    momentum: float = SCRATCH_MOMENTUM
    epsilon: float = SCRATCH_EPS
    unbiased: bool = False
    param_dtype: object = jnp.float32
    dtype: object = None
    accumulate: str = "float32"

    def state(self, x, use_running_average):
        """(training?, gamma, beta, moving_mean, moving_var) for input `x`; call from a compact
        method (this one's and the synchronized subclass's `__call__`)."""
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average)
        c = (x.shape[-1],)
        gamma = self.param("gamma", nn.initializers.ones, c, self.param_dtype)
        beta = self.param("beta", nn.initializers.zeros, c, self.param_dtype)
        moving_mean = self.variable("batch_stats", "moving_mean", jnp.zeros, c, self.param_dtype)
        moving_var = self.variable("batch_stats", "moving_var", jnp.ones, c, self.param_dtype)
        return use_running_average, gamma, beta, moving_mean, moving_var

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None):
        use_running_average, gamma, beta, moving_mean, moving_var = self.state(
            x, use_running_average)
        out_dtype = x.dtype if self.dtype is None else self.dtype
        work = (x.dtype if self.accumulate == "input"
                else jnp.promote_types(jnp.promote_types(x.dtype, jnp.float32), gamma.dtype))
        y, new_mean, new_var = batch_norm(
            *(a.astype(work) for a in (x, gamma, beta, moving_mean.value, moving_var.value)),
            self.epsilon, self.momentum, training=not use_running_average,
            unbiased=self.unbiased)
        if not use_running_average and not self.is_initializing():
            moving_mean.value = new_mean.astype(moving_mean.value.dtype)
            moving_var.value = new_var.astype(moving_var.value.dtype)
        return y.astype(out_dtype)


def native_defaults() -> dict:
    """Defaults of the installed flax.linen.BatchNorm (its dataclass field defaults)."""
    fields = {f.name: f.default for f in dataclasses.fields(nn.BatchNorm)}
    return {"momentum": fields["momentum"], "epsilon": fields["epsilon"],
            "use_fast_variance": fields.get("use_fast_variance")}


def has_fast_variance_option() -> bool:
    return "use_fast_variance" in {f.name for f in dataclasses.fields(nn.BatchNorm)}


def has_float32_reductions_option() -> bool:
    return "force_float32_reductions" in {f.name for f in dataclasses.fields(nn.BatchNorm)}


def precision_fields(impl: str, dtype, accumulate: str) -> dict:
    """The Flax module fields that give `impl` computing in `dtype` (None: the input's) the
    statistics precision `accumulate`: Flax's own `dtype`/`param_dtype` (float32 parameters)
    and, for accumulate="input", its `force_float32_reductions=False`; the from-scratch module's
    `dtype`, `accumulate` and, for "input", parameters in `dtype`."""
    dtypes.check_accumulate(accumulate)
    fields = {} if dtype is None else {"dtype": jnp.dtype(check_dtype(dtype))}
    if impl == "scratch":
        fields["accumulate"] = accumulate
        if accumulate == "input" and dtype is not None:
            fields["param_dtype"] = fields["dtype"]
        return fields
    if accumulate == "input":
        if not has_float32_reductions_option():
            raise UnsupportedSetting("this Flax's BatchNorm has no force_float32_reductions "
                                     "option: its statistics are always at least float32")
        fields["force_float32_reductions"] = False
    return fields


def own_layer(impl: str, *, momentum=None, eps=None, unbiased=False, fast_variance=False,
              **kw) -> nn.Module:
    """A batch-norm module of `impl` with `momentum`/`eps` in the impl's OWN meaning (None: its
    default), as `conventions` and `probe` need it; everything else goes through `make_layer`.
    The native layer gets `use_fast_variance=fast_variance` where the installed Flax has that
    option (None keeps Flax's default), so it computes the two-pass variance of the reference
    unless asked otherwise. `kw`: Flax module fields (use_running_average, name, dtype, ...)."""
    check_impl(impl)
    opts = {}
    if momentum is not None:
        opts["momentum"] = momentum
    if eps is not None:
        opts["epsilon"] = eps
    if impl == "scratch":
        return BatchNorm(unbiased=unbiased, **opts, **kw)
    if unbiased:
        raise UnsupportedSetting(
            "flax.linen.BatchNorm keeps a biased (÷m) running variance and has no option for "
            "the unbiased ÷(m-1) estimator")
    if fast_variance is not None and has_fast_variance_option():
        opts["use_fast_variance"] = fast_variance
    return nn.BatchNorm(**opts, **kw)


def make_layer(impl, num_features, num_dims, *, eps=1e-5, decay=0.9, unbiased=None,
               accumulate="float32", fast_variance=False, use_running_average=None, name=None,
               dtype=None) -> nn.Module:
    """The contract's make_layer (backends/contract.py): a Flax batch-norm module of `impl` for
    canonical `decay`, translated to the impl's momentum; `unbiased=None` is the impl's own
    (biased) estimator. Flax takes the feature count from the input at `init`, so
    `num_features` and `num_dims` are validated, not stored. Options: `fast_variance` (see
    `own_layer`), the Flax fields `use_running_average` and `name`, and `dtype`, the dtype the
    layer computes and returns in (None: the input's) with `accumulate` as in
    `precision_fields`."""
    check_impl(impl)
    check_layer_config(num_features, num_dims, eps, decay)
    return own_layer(impl, momentum=momentum_from_decay(decay, CONVENTION[impl]), eps=eps,
                     unbiased=bool(unbiased), fast_variance=fast_variance,
                     use_running_average=use_running_average, name=name,
                     **precision_fields(impl, dtype, accumulate))


def to_variables(impl, gamma, beta, running_mean, running_var) -> dict:
    """Flax variables {'params', 'batch_stats'} of `impl`'s module from per-channel arrays."""
    names = VARIABLE_NAMES[impl]
    values = dict(gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
    return {"params": {names[f]: values[f] for f in PARAM_FIELDS},
            "batch_stats": {names[f]: values[f] for f in STAT_FIELDS}}


def stats_of(impl, batch_stats) -> dict:
    names = VARIABLE_NAMES[impl]
    return {f: batch_stats[names[f]] for f in STAT_FIELDS}


def _to_last(a):
    return np.moveaxis(a, 1, -1) if a.ndim == 4 else a


def _to_first(a):
    return np.moveaxis(a, -1, 1) if a.ndim == 4 else a


def layer_step(layer, impl, x, variables, dy, *, training, **call_kwargs):
    """One forward + vjp of a Flax batch-norm `layer` on channels-last `x`: returns
    (y, dx, dgamma, dbeta, {running_mean, running_var}) as JAX arrays. `call_kwargs` go to
    the layer's call (e.g. `mask=`)."""
    names = VARIABLE_NAMES[impl]
    stats = variables["batch_stats"]

    def forward(x, gamma, beta):
        v = {"params": {names["gamma"]: gamma, names["beta"]: beta}, "batch_stats": stats}
        if training:
            y, updated = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"],
                                     **call_kwargs)
            return y, updated["batch_stats"]
        return layer.apply(v, x, use_running_average=True, **call_kwargs), stats

    p = variables["params"]
    y, vjp, new_stats = jax.vjp(forward, x, p[names["gamma"]], p[names["beta"]], has_aux=True)
    dx, dgamma, dbeta = vjp(dy)
    return y, dx, dgamma, dbeta, stats_of(impl, new_stats)


def _run_step(impl, x, gamma, beta, running_mean, running_var, dy, *, training, eps, decay,
              unbiased, accumulate, device, fast_variance=False):
    """One step of a fresh `impl` layer as bn_step runs it, channels-last on `device`; returns
    (y, dx, dgamma, dbeta, running_mean, running_var) as NumPy arrays in NCHW, each in the dtype
    the layer produced or keeps. float16/bfloat16: the layer computes in the input dtype
    (`make_layer(dtype=...)`) and its variables take the dtypes its own `init` gives them."""
    check_impl(impl)
    dtype = check_dtype(np.asarray(x).dtype)
    low = dtype.name in dtypes.LOW
    dev, _ = select_device(device)
    # Inference updates no running variance, so the estimator setting matters only in training.
    layer = make_layer(impl, np.shape(x)[1], np.ndim(x), eps=eps, decay=decay,
                       unbiased=bool(unbiased and training), fast_variance=bool(fast_variance),
                       accumulate=accumulate, dtype=dtype if low else None)
    x, dy = (np.asarray(a, dtype=dtype) for a in (x, dy))
    values = dict(gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
    with x64_mode(dtype):
        xl = jax.device_put(jnp.asarray(_to_last(x)), dev)
        if low:  # the dtypes the layer keeps its variables in, as its own init makes them
            shapes = jax.eval_shape(lambda a: layer.init(jax.random.PRNGKey(0), a,
                                                         use_running_average=False), xl)
            kept = {f: shapes["params"][VARIABLE_NAMES[impl][f]].dtype for f in PARAM_FIELDS}
            kept.update((f, v.dtype) for f, v in stats_of(impl, shapes["batch_stats"]).items())
        else:
            kept = dict.fromkeys(values, dtype)
        host = {f: np.asarray(np.asarray(v).astype(np.float64), dtype=kept[f])
                for f, v in values.items()}
        variables = jax.device_put(jax.tree_util.tree_map(jnp.asarray, to_variables(impl, **host)),
                                   dev)
        y, dx, dgamma, dbeta, stats = layer_step(
            layer, impl, xl, variables, jax.device_put(jnp.asarray(_to_last(dy)), dev),
            training=training)
        out = (_to_first(np.asarray(y)), _to_first(np.asarray(dx)), np.asarray(dgamma),
               np.asarray(dbeta), np.asarray(stats["running_mean"]), np.asarray(stats["running_var"]))
        return tuple(np.ascontiguousarray(v) for v in out)


def bn_step(x, gamma, beta, running_mean, running_var, dy, *, training, eps=1e-5, decay=0.9,
            unbiased=False, impl="scratch", fast_variance=False, accumulate="float32",
            device="cpu") -> dict:
    """The contract's bn_step (see backends/contract.py): NCHW NumPy in and out, computed
    channels-last by `impl` in the input's dtype (float16/bfloat16: Flax's `dtype` with float32
    `param_dtype`, the from-scratch module likewise; `accumulate="input"` is Flax's
    `force_float32_reductions=False` and the from-scratch module in the input dtype).
    `fast_variance=True` (native only) keeps Flax's default E[x²]−E[x]² variance instead of the
    two-pass one the adapter otherwise uses."""
    validate_inputs(x, gamma, beta, running_mean, running_var, dy,
                    training=training, eps=eps, decay=decay)
    check_impl(impl)
    if fast_variance and (impl != "native" or not has_fast_variance_option()):
        raise UnsupportedSetting(f"fast_variance applies to Flax's native BatchNorm only (impl {impl!r})")
    out = _run_step(impl, x, gamma, beta, running_mean, running_var, dy, training=training,
                    eps=eps, decay=decay, unbiased=unbiased, accumulate=accumulate,
                    device=device, fast_variance=fast_variance)
    return dict(zip(RESULT_KEYS, out))


def precision_probe(impl, dtype, *, accumulate="float32", device="cpu") -> dict:
    """The contract's precision_probe: one training step as bn_step runs it, on
    `common.precision.probe_case(dtype)`; the dtypes are the JAX arrays' own."""
    case = precision.probe_case(dtype)
    y, dx, dgamma, _, rm, _ = _run_step(impl, **case, training=True, eps=1e-5, decay=0.9,
                                        unbiased=False, accumulate=accumulate, device=device)
    return precision.probe_result(case, y, output_dtype=y.dtype.name, grad_dtype=dx.dtype.name,
                                  param_dtype=dgamma.dtype.name, running_dtype=rm.dtype.name,
                                  device=select_device(device)[1])


# The suite's impls as modules: (class, constructor arguments); probe.py's experiment builds
# them, conventions() reads their signatures.
LAYERS = {"scratch": (BatchNorm, {}), "native": (nn.BatchNorm, {})}


def conventions() -> dict:
    """Claimed convention fields per impl: the family's documented facts and the module's
    dataclass defaults read with `inspect` from the installed Flax; never read back from a built
    module (the conventions report measures them)."""
    default_fast = native_defaults()["use_fast_variance"]
    notes = {
        "scratch": "d2l JAX source: moving = momentum*moving + (1-momentum)*batch, biased two-pass "
                   "variance (unbiased=True gives the ÷(m-1) statistic), per-channel statistics "
                   "over every axis but the last; apply(..., mutable=['batch_stats']) returns the "
                   "new statistics.",
        "native": f"flax.linen.BatchNorm: ra = momentum*ra + (1-momentum)*batch; biased running "
                  f"variance only (a training step with unbiased=True raises UnsupportedSetting). "
                  f"Its default use_fast_variance={default_fast} computes E[x²]−E[x]² (clipped at "
                  f"0), which loses precision for inputs whose mean is large relative to their "
                  f"spread; this backend's adapter (bn_step, LeNet-BN, fit) sets "
                  f"use_fast_variance=False (two-pass, as the reference) where the option exists; "
                  f"the conventions experiment keeps Flax's default.",
    }
    return {impl: dict(spec.claims(CONVENTION[impl], signature_arguments(cls, (), kwargs)),
                       notes=notes[impl])
            for impl, (cls, kwargs) in LAYERS.items()}
