"""Batch normalization in PyTorch: the textbook formulation of the d2l PyTorch source first,
then the same algorithm tuned for speed (autograd and closed-form backward), the `BatchNorm`
layer, the native `nn.BatchNorm1d/2d` adapter, `make_layer`, `bn_step`, `conventions`, `probe`.

The source: `moving = momentum * moving + (1 - momentum) * batch` (momentum weighs the OLD running
value, i.e. it is the canonical decay) and the biased batch variance. Two things differ from the
source in the layer, on purpose: the mode is an explicit argument (the source's
`torch.is_grad_enabled()` test is kept in `textbook_batch_norm` and as
`BatchNorm(mode="grad_enabled")`, to show that it ignores `model.eval()`), and the running
statistics are registered buffers, so `state_dict()` saves them and `.to()` moves them.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from backends import UnsupportedSetting, check_layer_config
from common import dtypes, precision, spec
from common.conventions import signature_arguments
from common.reference import RESULT_KEYS, validate_inputs

from .device import resolve_device
from .precision import autocast, check_autocast, numpy, tensor, torch_dtype


def textbook_batch_norm(X, gamma, beta, moving_mean, moving_var, eps, momentum):
    """The d2l PyTorch source's batch norm, as a learner reads it; the kernels below compute the
    same (tests/test_torch.py holds them to it). gamma, beta and the moving statistics have the
    broadcast shape (1, C) or (1, C, 1, 1). Returns (Y, moving_mean, moving_var)."""
    if not torch.is_grad_enabled():  # the source's test for prediction mode
        X_hat = (X - moving_mean) / torch.sqrt(moving_var + eps)
    else:
        if X.dim() not in (2, 4):
            raise ValueError(f"batch norm takes 2-D or 4-D input, got {X.dim()}-D")
        if X.dim() == 2:  # fully connected: one mean and variance per feature
            mean = X.mean(dim=0)
            var = ((X - mean) ** 2).mean(dim=0)
        else:  # convolution: per channel, over batch, height and width (shape kept to broadcast)
            mean = X.mean(dim=(0, 2, 3), keepdim=True)
            var = ((X - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        X_hat = (X - mean) / torch.sqrt(var + eps)  # the biased (÷m) batch variance
        moving_mean = momentum * moving_mean + (1.0 - momentum) * mean  # momentum weighs the OLD
        moving_var = momentum * moving_var + (1.0 - momentum) * var
    Y = gamma * X_hat + beta  # scale and shift
    return Y, moving_mean.detach(), moving_var.detach()


IMPLS = ("scratch", "scratch-analytic", "native")
# What decides training vs inference: module.training, or the source's torch.is_grad_enabled().
MODES = ("training", "grad_enabled")
DEFAULT_MOMENTUM = 0.9  # the source's value, in its own (old-weight) meaning
DEFAULT_EPS = 1e-5
CONVENTION = spec.IMPL_CONVENTIONS["torch"]


def _layout(ndim: int):
    if ndim not in (2, 4):
        raise ValueError(f"batch norm takes 2-D (N, C) or 4-D (N, C, H, W) input, got {ndim}-D")
    dims = (0,) if ndim == 2 else (0, 2, 3)
    return dims, (1, -1) + (1,) * (ndim - 2)


def _var_stat(var, X, unbiased):
    """The batch variance fed to the running variance: biased, or ÷(m-1) if `unbiased`."""
    m = X.numel() // X.shape[1]
    return var * (m / (m - 1)) if unbiased else var


def _moving(moving, batch_stat, momentum):
    return (momentum * moving + (1.0 - momentum) * batch_stat.reshape(moving.shape)).detach()


def _channel_mean(X, dims, shape):
    """Per-channel mean over every dim but 1, broadcastable as `shape`.

    On CPU a contiguous N×C×H×W tensor is summed over H×W first (contiguous, vectorised) and
    then over N: several times faster than one reduction over (0, 2, 3), which walks the
    strided layout (torch.var_mean on CPU is slower still). The 1/m scaling is applied to the
    C sums, so autograd's backward only broadcasts (mean's backward divides the full tensor).
    CUDA does one reduction."""
    m = X.numel() // X.shape[1]
    if X.dim() == 4 and not X.is_cuda and X.is_contiguous():
        return (X.view(X.shape[0], X.shape[1], -1).sum(-1).sum(0) * (1.0 / m)).view(shape)
    return X.sum(dim=dims, keepdim=True) * (1.0 / m)


def _channel_sq_mean(Xc, dims, shape):
    """Per-channel mean of Xc², broadcastable as `shape`. On CPU, for contiguous N×C×H×W, the
    squared norms of the (n, c) rows: no Xc² temporary in forward (measured with autograd on
    the 256×6×24×24 layer: ~25% less forward + backward time than sum(Xc * Xc))."""
    m = Xc.numel() // Xc.shape[1]
    if Xc.dim() == 4 and not Xc.is_cuda and Xc.is_contiguous():
        rows = Xc.view(Xc.shape[0], Xc.shape[1], -1)
        return (torch.linalg.vector_norm(rows, dim=-1).square().sum(0) * (1.0 / m)).view(shape)
    return (Xc * Xc).sum(dim=dims, keepdim=True) * (1.0 / m)


def _channel_sum(t, dims):
    """Per-channel sum (C,) over `dims`; the spatial dims first on CPU (see _channel_mean)."""
    if t.dim() == 4 and not t.is_cuda and t.is_contiguous():
        return t.view(t.shape[0], t.shape[1], -1).sum(-1).sum(0)
    return t.sum(dim=dims)


def batch_norm(X, gamma, beta, moving_mean, moving_var, eps, momentum, training, unbiased=False):
    """From-scratch batch norm with autograd, the d2l PyTorch source's algorithm.

    Returns (Y, new_moving_mean, new_moving_var); the moving statistics come back detached and
    unchanged in inference. `unbiased` feeds the ÷(m-1) batch variance to the running variance
    (normalisation always uses the biased one, as PyTorch's own layer does).

    The source's formula gamma * (X - mean) / sqrt(var + eps) + beta, with the operations chosen
    so that autograd's backward makes few passes over the activations: multiply by
    rsqrt instead of dividing by sqrt (DivBackward squares and negates the full tensor), gamma
    folded into the per-channel scale, means as sums scaled on the C-vector, and X + (-mean)
    (SubBackward negates the full gradient before reducing it); see also `_channel_mean` and
    `_channel_sq_mean`."""
    if not training:
        _, shape = _layout(X.dim())
        X_hat = (X - moving_mean.reshape(shape)) / torch.sqrt(moving_var.reshape(shape) + eps)
        return gamma.reshape(shape) * X_hat + beta.reshape(shape), moving_mean, moving_var
    Y, mean, var = _scratch_train(X, gamma, beta, eps)
    var_stat = _var_stat(var, X, unbiased)
    return Y, _moving(moving_mean, mean, momentum), _moving(moving_var, var_stat, momentum)


def _scratch_train(X, gamma, beta, eps):
    """Training-mode forward of `batch_norm` (autograd): (Y, batch mean, biased batch
    variance), the statistics as (C,) tensors."""
    dims, shape = _layout(X.dim())
    mean = _channel_mean(X, dims, shape)
    Xc = X + (-mean)
    var = _channel_sq_mean(Xc, dims, shape)
    scale = gamma.reshape(shape) * torch.rsqrt(var + eps)
    if X.is_cuda:
        Y = torch.addcmul(beta.reshape(shape), Xc, scale)
    else:  # see BatchNormFunction: a multiply and an in-place add beat one addcmul on CPU
        Y = (Xc * scale).add_(beta.reshape(shape))
    return Y, mean.view(-1), var.view(-1)


class BatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm with the closed-form backward (the formula of
    `common.reference.bn_step`) instead of autograd through mean and variance.

    forward(x, gamma, beta, eps) -> (y, batch_mean, biased_batch_var); the statistics are
    non-differentiable outputs so the caller can update running statistics in forward.

    x_hat is never stored: xc = x - mean and 1/sigma are, which saves a pass each way. On CPU
    the variance is the squared norm of each (n, c) row of xc (no temporary), and a
    multiply-add with two broadcast operands is split into a multiply and an in-place add
    (TensorIterator's broadcast multiply-add is slower than the two); on CUDA, where eager
    speed is kernel launches, the fused forms are kept."""

    @staticmethod
    def forward(ctx, x, gamma, beta, eps):
        dims, shape = _layout(x.dim())
        m = x.numel() // x.shape[1]
        if x.is_cuda:  # one fused Welford kernel
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            xc = x - mean.view(shape)
        else:
            mean = _channel_mean(x, dims, shape).view(-1)
            xc = x - mean.view(shape)
            var = _channel_sq_mean(xc, dims, shape).view(-1)
        inv_std = torch.rsqrt(var + eps)
        scale = gamma * inv_std
        if x.is_cuda:
            y = torch.addcmul(beta.view(shape), xc, scale.view(shape))
        else:
            y = (xc * scale.view(shape)).add_(beta.view(shape))
        ctx.m = m
        ctx.save_for_backward(xc, inv_std, scale)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dmean, _dvar):
        xc, inv_std, scale = ctx.saved_tensors
        dims, shape = _layout(xc.dim())
        dbeta = _channel_sum(dy, dims)
        dgamma = _channel_sum(dy * xc, dims).mul_(inv_std)
        dx = None
        if ctx.needs_input_grad[0]:
            # dx = scale * (dy - mean(dy) - x_hat * mean(dy * x_hat)), x_hat = xc * inv_std,
            # as scale * dy + k * xc + b with per-channel k and b
            s_m = scale * (-1.0 / ctx.m)
            k, b = (s_m * inv_std * dgamma).view(shape), (s_m * dbeta).view(shape)
            dx = torch.addcmul(b, xc, k) if xc.is_cuda else (xc * k).add_(b)
            dx.addcmul_(dy, scale.view(shape))
        return dx, dgamma, dbeta, None


def batch_norm_analytic(X, gamma, beta, moving_mean, moving_var, eps, momentum, training,
                        unbiased=False):
    """`batch_norm` with the hand-written backward of `BatchNormFunction`; same signature and
    results (to rounding)."""
    if not training:
        _, shape = _layout(X.dim())
        scale = gamma.reshape(-1) * torch.rsqrt(moving_var.reshape(-1) + eps)
        # subtract first: folding the mean into the shift loses float32 digits for large means
        Y = torch.addcmul(beta.reshape(shape), X - moving_mean.reshape(shape), scale.view(shape))
        return Y, moving_mean, moving_var
    Y, mean, var = BatchNormFunction.apply(X, gamma.reshape(-1), beta.reshape(-1), eps)
    var_stat = _var_stat(var, X, unbiased)
    # lerp(moving, batch, 1 - m) = m * moving + (1 - m) * batch in one kernel
    return (Y, torch.lerp(moving_mean, mean.view(moving_mean.shape), 1.0 - momentum),
            torch.lerp(moving_var, var_stat.view(moving_var.shape), 1.0 - momentum))


class BatchNorm(nn.Module):
    """From-scratch batch-norm layer (the source's `BatchNorm(num_features, num_dims)`).

    `momentum` weighs the old running value (canonical decay); running statistics are buffers
    updated in place during training forward passes. `analytic=True` uses the closed-form
    backward; `unbiased=True` updates the running variance with the ÷(m-1) estimator (what
    `nn.BatchNorm*d` does); `mode="grad_enabled"` reproduces the source's mode test.

    float16/bfloat16 input (`common.dtypes.ACCUMULATE`): with `accumulate="float32"` (default)
    the statistics and the normalisation are computed in float32 and only the output is cast
    back to the input dtype (build the layer in float32: gamma, beta and the running statistics
    stay float32); with `accumulate="input"` everything runs in the input dtype (build the layer
    in that dtype), so the mean, the variance and the centred values are rounded to it."""

    def __init__(self, num_features, num_dims=4, *, eps=DEFAULT_EPS, momentum=DEFAULT_MOMENTUM,
                 unbiased=False, analytic=False, mode="training", accumulate="float32",
                 device=None, dtype=None):
        super().__init__()
        _layout(num_dims)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        spec.check_decay(momentum)
        factory = dict(device=device, dtype=dtype)
        self.num_features, self.num_dims = num_features, num_dims
        self.eps, self.momentum, self.unbiased, self.analytic, self.mode = (
            eps, momentum, unbiased, analytic, mode)
        self.accumulate = dtypes.check_accumulate(accumulate)
        self.gamma = nn.Parameter(torch.ones(num_features, **factory))
        self.beta = nn.Parameter(torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def _work_dtype(self, X):
        """The dtype the layer computes in for input X (see the class docstring)."""
        if self.accumulate == "float32" and X.dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        return X.dtype

    def forward(self, X):
        if X.dim() != self.num_dims:
            raise ValueError(f"BatchNorm(num_dims={self.num_dims}) got {X.dim()}-D input")
        training = torch.is_grad_enabled() if self.mode == "grad_enabled" else self.training
        work = self._work_dtype(X)
        Xw, gamma, beta = (t if t.dtype == work else t.to(work) for t in (X, self.gamma, self.beta))
        if not training:
            fn = batch_norm_analytic if self.analytic else batch_norm
            stats = [t if t.dtype == work else t.to(work)
                     for t in (self.running_mean, self.running_var)]
            Y = fn(Xw, gamma, beta, *stats, self.eps, self.momentum, False)[0]
            return Y if Y.dtype == X.dtype else Y.to(X.dtype)
        fn = BatchNormFunction.apply if self.analytic else _scratch_train
        Y, mean, var = fn(Xw, gamma, beta, self.eps)
        with torch.no_grad():  # the running statistics, updated in place
            rdt = self.running_mean.dtype
            self.running_mean.lerp_(mean.to(rdt), 1.0 - self.momentum)
            self.running_var.lerp_(_var_stat(var, X, self.unbiased).to(rdt), 1.0 - self.momentum)
        return Y if Y.dtype == X.dtype else Y.to(X.dtype)

    def extra_repr(self):
        return (f"{self.num_features}, num_dims={self.num_dims}, eps={self.eps}, "
                f"momentum={self.momentum}, unbiased={self.unbiased}, analytic={self.analytic}, "
                f"mode={self.mode!r}, accumulate={self.accumulate!r}")


def check_impl(impl):
    if impl not in IMPLS:
        raise ValueError(f"unknown torch impl {impl!r}; choose from {', '.join(IMPLS)}")


def make_layer(impl, num_features, num_dims, *, eps=1e-5, decay=0.9, unbiased=None,
               accumulate="float32", device=None, dtype=None) -> nn.Module:
    """The contract's make_layer (backends/contract.py): a training-ready layer of `impl` for
    canonical `decay`; `unbiased=None` keeps the impl's own running-variance convention. Native
    BN cannot take the biased setting, nor `accumulate="input"` (its kernel decides the
    statistics' precision). `device`, `dtype`: torch factory options."""
    check_impl(impl)
    num_features = check_layer_config(num_features, num_dims, eps, decay)
    dtypes.check_accumulate(accumulate)
    momentum = spec.momentum_from_decay(decay, CONVENTION[impl])
    factory = dict(device=device, dtype=dtype)
    if impl == "native":
        if unbiased is False:
            raise UnsupportedSetting(
                "torch native nn.BatchNorm*d always updates running_var with the unbiased "
                "(÷(N-1)) batch variance and has no option for the biased one; use unbiased=True "
                "(or impl='scratch', which supports both)")
        if accumulate != "float32":
            raise UnsupportedSetting(
                "torch native nn.BatchNorm*d has no setting for the precision of its statistics "
                "(its kernel decides; precision_probe measures it); accumulate='input' applies to "
                "the from-scratch impls")
        cls = nn.BatchNorm2d if num_dims == 4 else nn.BatchNorm1d
        return cls(num_features, eps=eps, momentum=momentum, **factory)
    return BatchNorm(num_features, num_dims, eps=eps, momentum=momentum, unbiased=bool(unbiased),
                     analytic=impl == "scratch-analytic", accumulate=accumulate, **factory)


def gamma_beta(layer):
    """(gamma, beta) parameters of a scratch or native layer."""
    return (layer.gamma, layer.beta) if isinstance(layer, BatchNorm) else (layer.weight, layer.bias)


def _run_step(impl, x, gamma, beta, running_mean, running_var, dy, *, training, eps, decay,
              unbiased, accumulate, device):
    """One step of a fresh `impl` layer as bn_step runs it; returns the torch tensors (y, dx,
    dgamma, dbeta, running_mean, running_var), in the dtypes the layer produces and keeps."""
    check_impl(impl)
    dtypes.check_accumulate(accumulate)
    dev, _ = resolve_device(device)
    dt = dtypes.float_dtype(x)
    tdt = torch_dtype(dt)
    mixed = dt.name in dtypes.LOW and accumulate == "float32"
    if mixed:
        check_autocast(dev.type, tdt)
    # Mixed precision keeps the layer in float32 (the autocast idiom); otherwise the layer is in
    # the input dtype (float32/float64, or the from-scratch layer written for float16/bfloat16).
    layer_dtype = torch.float32 if mixed else tdt
    # In inference no running statistic is updated, so the estimator setting is moot.
    layer = make_layer(impl, x.shape[1], x.ndim, eps=eps, decay=decay,
                       unbiased=unbiased if training else None, accumulate=accumulate,
                       dtype=layer_dtype, device=dev)
    g, b = gamma_beta(layer)
    with torch.no_grad():
        for dst, src in ((g, gamma), (b, beta), (layer.running_mean, running_mean),
                         (layer.running_var, running_var)):
            dst.copy_(tensor(src, dst.dtype, dev))
    layer.train(training)
    xs = tensor(x, tdt, dev).requires_grad_(True)
    with torch.enable_grad():
        with autocast(dev.type, tdt if mixed else torch.float32):
            y = layer(xs)
        y.backward(tensor(dy, y.dtype, dev))
    return (y, xs.grad, g.grad, b.grad, layer.running_mean, layer.running_var)


def bn_step(x, gamma, beta, running_mean, running_var, dy, *, training, eps=1e-5, decay=0.9,
            unbiased=False, impl="scratch", accumulate="float32", device="cpu") -> dict:
    """One batch-norm step of `impl` (contract in backends/contract.py), in x's dtype. float16 and
    bfloat16 run the autocast idiom (a float32 layer, the step under `torch.autocast`), or with
    `accumulate="input"` the from-scratch layer built in the input dtype."""
    validate_inputs(x, gamma, beta, running_mean, running_var, dy,
                    training=training, eps=eps, decay=decay)
    out = _run_step(impl, np.asarray(x), gamma, beta, running_mean, running_var, dy,
                    training=training, eps=eps, decay=decay, unbiased=unbiased,
                    accumulate=accumulate, device=device)
    return {k: numpy(v) for k, v in zip(RESULT_KEYS, out)}


def precision_probe(impl, dtype, *, accumulate="float32", device="cpu") -> dict:
    """The contract's precision_probe: one training step as bn_step runs it, on
    `common.precision.probe_case(dtype)`; the dtypes are the tensors' own."""
    case = precision.probe_case(dtype)
    y, dx, dgamma, _, rm, _ = _run_step(impl, **case, training=True, eps=1e-5, decay=0.9,
                                        unbiased=None, accumulate=accumulate, device=device)
    name = lambda t: str(t.dtype).replace("torch.", "")  # noqa: E731
    return precision.probe_result(case, numpy(y), output_dtype=name(y), grad_dtype=name(dx),
                                  param_dtype=name(dgamma), running_dtype=name(rm),
                                  device=resolve_device(device)[1])


# The suite's impls as layers: (class, constructor arguments besides the channel count). The
# conventions claims read their signatures; probe.py's experiment builds them.
LAYERS = {"scratch": (BatchNorm, {}), "scratch-analytic": (BatchNorm, {"analytic": True}),
          "native": (nn.BatchNorm2d, {})}


def conventions() -> dict:
    """Claimed convention fields (`common.spec.CONVENTION_FIELDS`) per impl: the documented facts
    of its family (`common.spec.DOCUMENTED`) and its constructor's signature defaults, read with
    `inspect` from the installed torch; never read back from a built layer (the conventions
    report measures them)."""
    out = {}
    for impl in IMPLS:
        cls, kwargs = LAYERS[impl]
        if impl == "native":
            notes = ("nn.BatchNorm2d/1d: momentum weighs the new batch statistic; running_var is "
                     "always updated with the unbiased estimate while normalising with the biased "
                     "one (no biased option: bn_step raises UnsupportedSetting for "
                     "unbiased=False); CPU uses two-pass variance, CUDA Welford; mode from "
                     "module.training")
        else:
            notes = ("d2l PyTorch source formula moving = m*moving + (1-m)*batch; mode from "
                     "module.training (the source's torch.is_grad_enabled() test is kept as "
                     "mode='grad_enabled'); running stats are registered buffers; unbiased=True "
                     "option matches native")
            if impl == "scratch-analytic":
                notes += "; closed-form backward via torch.autograd.Function"
        out[impl] = dict(spec.claims(CONVENTION[impl], signature_arguments(cls, (), kwargs)),
                         notes=notes)
    return out
