"""Batch norm in MXNet: the MXNet source's batch norm first as a learner reads it
(`textbook_batch_norm`), then the same algorithm tuned for speed (`batch_norm`), a hybridizable
`BatchNorm` layer built on it, the native `gluon.nn.BatchNorm` adapter, and `make_layer` /
`bn_step` / `conventions` / `probe` for the contract in `backends/contract.py`.

One tuned implementation serves both imperative and hybridized use. It follows the source:
`moving = (1 - momentum) * moving + momentum * batch` (momentum weighs the NEW batch statistic,
the inverse of the PyTorch source), biased batch variance, mode from `autograd.is_training()`
unless given. It differs from the source only in which MXNet kernels carry the arithmetic: on CPU
MXNet's broadcast kernels and their reduction backward are 10-40x slower than a 1x1
convolution and a matrix product, so per-channel scale/shift and per-channel means use those
(`_PerChannel`). That is what keeps from-scratch LeNet training within 1.25x of the native
layer's step time.
"""
from __future__ import annotations

import numpy as np

import mxnet as mx
from mxnet import autograd
from mxnet.gluon import nn

from backends import UnsupportedSetting, check_layer_config
from common import dtypes, precision, spec
from common.conventions import signature_arguments
from common.reference import RESULT_KEYS, validate_inputs

from .device import context
from .precision import BF16, array, check_layer_dtype, dtype_name, mx_dtype, numpy


def textbook_batch_norm(X, gamma, beta, moving_mean, moving_var, eps, momentum):
    """The MXNet source's batch norm, as a learner reads it, in NDArray operations; `batch_norm`
    below computes the same (tests/test_mxnet.py holds it to it). gamma, beta and the moving
    statistics have the broadcast shape (1, C) or (1, C, 1, 1). Returns (Y, moving_mean,
    moving_var)."""
    if not autograd.is_training():  # the source's test for prediction mode
        X_hat = (X - moving_mean) / mx.nd.sqrt(moving_var + eps)
    else:
        if X.ndim not in (2, 4):
            raise ValueError(f"batch norm takes 2-D or 4-D input, got {X.ndim}-D")
        if X.ndim == 2:  # fully connected: one mean and variance per feature
            mean = X.mean(axis=0)
            var = ((X - mean) ** 2).mean(axis=0)
        else:  # convolution: per channel, over batch, height and width (shape kept to broadcast)
            mean = X.mean(axis=(0, 2, 3), keepdims=True)
            var = ((X - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
        X_hat = (X - mean) / mx.nd.sqrt(var + eps)  # the biased (÷m) batch variance
        moving_mean = (1.0 - momentum) * moving_mean + momentum * mean  # momentum weighs the NEW
        moving_var = (1.0 - momentum) * moving_var + momentum * var
    Y = gamma * X_hat + beta  # scale and shift
    return Y, moving_mean, moving_var


IMPLS = ("scratch", "native")
CONVENTION = spec.IMPL_CONVENTIONS["mxnet"]

SOURCE_MOMENTUM = 0.9  # the source's literal: 90% weight on the NEW batch statistic
SOURCE_EPS = 1e-5
SOURCE_INITIAL_RUNNING_VAR = 0.0  # the source: moving_var = zeros; gluon.nn.BatchNorm: ones


def _module(x):
    return mx.sym if isinstance(x, mx.sym.Symbol) else mx.nd


class _PerChannel:
    """Per-channel means and scale/shift for one input, built from kernels MXNet runs fast on CPU.

    MXNet's generic reductions over axes (0, 2, 3) and its broadcast arithmetic (whose backward
    is such a reduction) run 10-40x slower on CPU than matrix products and 1x1 convolutions. So
    a mean is a matrix-vector product with a ones vector (over H*W, then over N); scale/shift
    of NCHW data is a 1x1 convolution with the diagonal weight diag(scale) and bias shift
    (MKLDNN's dense 1x1 convolution, backward included, is faster here than its depthwise one);
    scale/shift of (N, C) data multiplies by an outer product with a ones column. Works on
    NDArrays and Symbols alike.

    `plain=True` uses MXNet's own reductions and broadcast arithmetic instead, in the input's
    dtype `dtype`: the from-scratch layer written for float16/bfloat16 (`accumulate="input"`),
    whose matrix-product kernels MXNet's CPU build lacks in those dtypes. Values per channel are
    then counted in float32 (a float16 count of ones stops at 2048).
    """

    def __init__(self, F, num_dims, num_features, plain=False, dtype="float32"):
        self.F, self.num_dims, self.num_features = F, num_dims, num_features
        self.plain, self.dtype = plain, dtype
        self._per_hw = self._ones_n = self._per_n = self._count = None

    def _columns(self, A2):
        """(N, 1) ones and 1/N from an (N, C) array: the input itself, or for NCHW the first
        per-image means (so that the full input is not reshaped again)."""
        F = self.F
        self._ones_n = F.ones_like(F.slice_axis(A2, axis=1, begin=0, end=1))
        n = F.sum(self._ones_n)
        self._per_n = F.broadcast_div(self._ones_n, n)
        self._count = n if self._count is None else self._count * n

    def _shape(self):
        return (1, -1, 1, 1) if self.num_dims == 4 else (1, -1)

    def mean(self, A):
        """(C,) mean over every axis but 1."""
        F = self.F
        if self.plain:
            if self._count is None:
                ones = F.ones_like(F.slice_axis(A, axis=1, begin=0, end=1))
                self._count = F.sum(F.cast(ones, dtype="float32"))
            return F.mean(A, axis=(0, 2, 3) if self.num_dims == 4 else (0,))
        if self.num_dims == 4:
            rows = F.reshape(A, shape=(-3, -1))  # (N*C, H*W)
            if self._per_hw is None:
                ones = F.ones_like(F.slice_axis(rows, axis=0, begin=0, end=1))
                self._count = F.sum(ones)
                self._per_hw = F.broadcast_div(ones, self._count)  # (1, H*W) of 1/(H*W)
            A = F.FullyConnected(rows, self._per_hw, no_bias=True, num_hidden=1)
            A = F.reshape(A, shape=(-1, self.num_features))  # (N, C) per-image means
        if self._per_n is None:
            self._columns(A)
        return F.reshape(F.dot(self._per_n, A, transpose_a=True), shape=(-1,))

    def affine(self, A, scale, shift):
        """A * scale + shift per channel; `scale=None` for A + shift."""
        F, c = self.F, self.num_features
        if self.plain:
            if scale is not None:
                A = F.broadcast_mul(A, F.reshape(scale, shape=self._shape()))
            return F.broadcast_add(A, F.reshape(shift, shape=self._shape()))
        if self.num_dims == 4:
            if scale is None:
                scale = F.ones_like(shift)
            weight = F.reshape(F.diag(scale), shape=(c, c, 1, 1))
            return F.Convolution(A, weight, shift, kernel=(1, 1), num_filter=c)
        if self._ones_n is None:
            self._columns(A)
        if scale is not None:
            A = A * F.dot(self._ones_n, F.reshape(scale, shape=(1, -1)))
        return A + F.dot(self._ones_n, F.reshape(shift, shape=(1, -1)))

    def count(self):
        """Values per channel (N, or N*H*W), a scalar of the input's dtype (float32 if plain);
        after a mean."""
        return self._count

    def unbiased(self, var):
        """var × m/(m-1), in var's dtype."""
        m = self.count()
        factor = m / (m - 1)
        if self.plain:
            factor = self.F.cast(factor, dtype=self.dtype)
        return self.F.broadcast_mul(var, factor)


def batch_norm(X, gamma, beta, moving_mean, moving_var, eps, momentum, training=None, *,
               unbiased=False, num_dims=None, num_features=None, plain=False, dtype="float32"):
    """The MXNet source's batch norm: returns (Y, moving_mean, moving_var), the moving statistics
    updated as `(1 - momentum) * moving + momentum * batch` in training and unchanged otherwise.

    Works on NDArrays (imperative) and Symbols (inside `hybrid_forward`); Symbols carry no
    shape, so they need `num_dims` (2 or 4) and `num_features`. `training=None` reads
    `autograd.is_training()`. `unbiased=True` feeds the ÷(m-1) variance into moving_var (the
    source uses the biased one); normalisation always uses the biased variance. `plain`, `dtype`:
    see `_PerChannel` (the layer written in float16/bfloat16).
    """
    F = _module(X)
    if F is mx.nd:
        num_dims, num_features = X.ndim, X.shape[1]
    elif num_dims is None or num_features is None:
        raise ValueError("batch_norm on Symbols needs num_dims and num_features")
    if num_dims not in (2, 4):
        raise ValueError(f"batch_norm takes 2-D (N, C) or 4-D NCHW input, got {num_dims}-D")
    if training is None:
        training = autograd.is_training()
    per_channel = _PerChannel(F, num_dims, num_features, plain, dtype)
    if not training:
        Xc = per_channel.affine(X, None, -moving_mean)
        scale = gamma / F.sqrt(moving_var + eps)
        return per_channel.affine(Xc, scale, beta), moving_mean, moving_var
    mean = per_channel.mean(X)
    # X - mean with the gradient to `mean` stopped: d(var)/d(mean) is zero, and the one path the
    # mean's gradient needs (Y = (X - mean) * scale) goes through the shift below, where
    # `stopped - mean` is exactly 0 in value. The centring then needs no weight/bias gradients.
    stopped = F.BlockGrad(mean)
    Xc = per_channel.affine(X, None, -stopped)
    var = per_channel.mean(F.square(Xc))
    scale = gamma / F.sqrt(var + eps)
    Y = per_channel.affine(Xc, scale, beta + (stopped - mean) * scale)
    if unbiased:
        var = per_channel.unbiased(var)
    moving_mean = (1.0 - momentum) * moving_mean + momentum * stopped
    moving_var = (1.0 - momentum) * moving_var + momentum * F.BlockGrad(var)
    return Y, moving_mean, moving_var


class PerModeGraph(nn.HybridBlock):
    """A HybridBlock whose graph depends on `autograd.is_training()`, hybridized once per mode.

    Gluon 1.x traces `hybrid_forward` on the first call and reuses that graph in either mode;
    a from-scratch batch norm traced in training would keep using batch statistics at
    inference. This keeps one traced graph per mode (swapping Gluon 1.9's cache attributes);
    `hybridize()` clears both.
    """

    _CACHE = ("_cached_graph", "_cached_op", "_cached_op_args", "_in_format", "_out_format")

    def forward(self, x, *args):
        mode = autograd.is_training()
        traced = self.__dict__.get("_graph_mode")
        if traced is not None and traced != mode:
            graphs = self.__dict__.setdefault("_mode_graphs", {})
            graphs[traced] = tuple(getattr(self, a) for a in self._CACHE)
            for a, v in zip(self._CACHE, graphs.pop(mode, ((), None, [], None, None))):
                object.__setattr__(self, a, v)
        self.__dict__["_graph_mode"] = mode
        return super().forward(x, *args)

    def _clear_cached_op(self):
        super()._clear_cached_op()
        self.__dict__["_mode_graphs"] = {}


class BatchNorm(PerModeGraph):
    """From-scratch batch-norm layer (`batch_norm` above) for 2-D or NCHW input.

    gamma and beta are trained; `running_mean` / `running_var` are Gluon Parameters with
    grad_req='null' (saved by `save_parameters`, never trained). `running_var` starts at
    `initial_running_var`: 0.0 by default, as the source's `moving_var = zeros(shape)`;
    `gluon.nn.BatchNorm` starts at 1.0 (pass 1.0 to match it).

    Calling the layer returns Y and, in training, writes the new running statistics into those
    Parameters. Hybridized graphs cannot assign to Parameters, so when a hybridized parent
    traces this layer it leaves the new statistics in `traced_stats` (two Symbols) for the
    parent to return as graph outputs and hand back to `set_running_stats` (see
    `backends.mxnet.lenet.LeNet`).

    `cast('float16')` (or BF16) follows Gluon's `BatchNorm.cast` with `accumulate="float32"`
    (the default): the parameters and statistics stay float32, the input is cast to float32 and
    the output back to the input dtype. With `accumulate="input"` the whole layer is cast and
    computes in that dtype, with MXNet's plain reductions (`_PerChannel(plain=True)`).
    """

    def __init__(self, num_features, num_dims, eps=SOURCE_EPS, momentum=SOURCE_MOMENTUM,
                 initial_running_var=SOURCE_INITIAL_RUNNING_VAR, unbiased=False,
                 accumulate="float32", **kwargs):
        super().__init__(**kwargs)
        if num_dims not in (2, 4):
            raise ValueError(f"num_dims must be 2 or 4, got {num_dims!r}")
        self.num_features, self.num_dims = num_features, num_dims
        self.eps, self.momentum, self.unbiased = eps, momentum, unbiased
        self.accumulate = dtypes.check_accumulate(accumulate)
        self.io_dtype = None  # float16/BF16 input with float32 parameters (cast())
        self.compute_dtype = "float32"
        self.traced_stats = None
        shape = (num_features,)
        with self.name_scope():
            self.gamma = self.params.get("gamma", shape=shape, init="ones")
            self.beta = self.params.get("beta", shape=shape, init="zeros")
            self.running_mean = self.params.get("running_mean", shape=shape, init="zeros",
                                                grad_req="null", differentiable=False)
            self.running_var = self.params.get(
                "running_var", shape=shape, init=mx.init.Constant(initial_running_var),
                grad_req="null", differentiable=False)

    def cast(self, dtype):
        dt = mx_dtype(dtype)
        low = dtype_name(dt) in dtypes.LOW
        self.io_dtype = dt if low and self.accumulate == "float32" else None
        self.compute_dtype = "float32" if self.io_dtype is not None else dt
        super().cast("float32" if self.io_dtype is not None else dt)

    def hybrid_forward(self, F, X, gamma, beta, running_mean, running_var):
        training = autograd.is_training()
        if self.io_dtype is not None:
            X = F.cast(X, dtype="float32")
        plain = dtype_name(self.compute_dtype) in dtypes.LOW
        out = batch_norm(X, gamma, beta, running_mean, running_var, self.eps, self.momentum,
                         training, unbiased=self.unbiased, num_dims=self.num_dims,
                         num_features=self.num_features, plain=plain, dtype=self.compute_dtype)
        if self.io_dtype is not None:
            out = (F.cast(out[0], dtype=self.io_dtype),) + tuple(out[1:])
        return out if training else out[0]

    def forward(self, x):
        out = super().forward(x)
        if not isinstance(out, (list, tuple)):
            return out
        y, mean, var = out
        if isinstance(y, mx.sym.Symbol):
            self.traced_stats = (mean, var)
        else:
            self.set_running_stats(mean, var)
        return y

    def set_running_stats(self, mean, var):
        with autograd.pause():
            self.running_mean.data()[:] = mean
            self.running_var.data()[:] = var


def check_impl(impl):
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose from {', '.join(IMPLS)}")


def native_layer(num_features, **kwargs):
    """`gluon.nn.BatchNorm` (momentum weighs the OLD value; keyword `epsilon`)."""
    return nn.BatchNorm(in_channels=num_features, **kwargs)


def make_layer(impl, num_features, num_dims, *, eps=1e-5, decay=0.9, unbiased=None,
               fix_gamma=False, accumulate="float32"):
    """The contract's make_layer (backends/contract.py): a fresh layer of `impl` configured from
    canonical (eps, decay, unbiased); `unbiased=None` keeps the impl's own (biased) estimator.
    `fix_gamma` (native only): built with scale=False, i.e. the operator's fix_gamma=True, gamma
    ignored. `accumulate` takes effect when the from-scratch layer is cast to float16/bfloat16
    (`BatchNorm.cast`); the native operator has no such switch."""
    check_impl(impl)
    num_features = check_layer_config(num_features, num_dims, eps, decay)
    dtypes.check_accumulate(accumulate)
    if impl == "scratch":
        if fix_gamma:
            raise UnsupportedSetting("the from-scratch BatchNorm has no fix_gamma option")
        return BatchNorm(num_features, num_dims, eps=eps,
                         momentum=spec.momentum_from_decay(decay, CONVENTION[impl]),
                         unbiased=bool(unbiased), accumulate=accumulate)
    if accumulate != "float32":
        raise UnsupportedSetting(
            "MXNet's BatchNorm operator has no setting for the precision of its statistics, and "
            "it refuses float16/bfloat16 gamma, beta and moving statistics ('This layer "
            "requires uniform type. Expected float32'): accumulate='input' applies to the "
            "from-scratch impl")
    if unbiased:
        raise UnsupportedSetting(
            "MXNet's native BatchNorm updates running_var with the biased (÷m) variance on "
            "CPU (the cuDNN path uses ÷(m-1)); unbiased=True cannot be expressed")
    return native_layer(num_features, momentum=spec.momentum_from_decay(decay, CONVENTION[impl]),
                        epsilon=eps, scale=not fix_gamma)


def _stats(layer):
    return {k: getattr(layer, k).data().asnumpy().copy() for k in ("running_mean", "running_var")}


def cast_layer(layer, dtype) -> None:
    """Cast `layer` for `dtype` input, Gluon's way: float16 through `cast` (batch norm keeps
    float32); for bfloat16 Gluon's native BatchNorm has no such rule (it would cast its
    parameters, which the operator refuses), so it stays float32."""
    dt = mx_dtype(dtype)
    if dt is BF16 and not isinstance(layer, BatchNorm):
        return
    layer.cast(dt)


def _run_step(impl, x, gamma, beta, running_mean, running_var, dy, *, training, eps, decay,
              unbiased, accumulate, device):
    """One step of a fresh `impl` layer as bn_step runs it (the scratch layer hybridized, as in
    training); returns the NDArrays (y, dx, dgamma, dbeta, running_mean, running_var)."""
    name = dtypes.float_dtype(x).name
    ctx = context(device)[0]
    check_layer_dtype(name, ctx)
    layer = make_layer(impl, x.shape[1], x.ndim, eps=eps, decay=decay,
                       unbiased=bool(unbiased and training), accumulate=accumulate)
    layer.initialize(ctx=ctx)
    cast_layer(layer, name)
    for field, value in (("gamma", gamma), ("beta", beta), ("running_mean", running_mean),
                         ("running_var", running_var)):
        param = getattr(layer, field)
        param.set_data(array(value, param.dtype, ctx))
    if impl == "scratch":
        layer.hybridize()
    X = array(x, name, ctx)
    X.attach_grad()
    with autograd.record(train_mode=training):
        y = layer(X)
    y.backward(array(dy, name, ctx), train_mode=training)  # the default is True
    return (y, X.grad, layer.gamma.grad(), layer.beta.grad(), layer.running_mean.data(),
            layer.running_var.data())


def bn_step(x, gamma, beta, running_mean, running_var, dy, *, training, eps=1e-5, decay=0.9,
            unbiased=False, impl="scratch", accumulate="float32", device="cpu") -> dict:
    """One batch-norm step by `impl` (contract in backends/contract.py). float16/bfloat16 input
    runs MXNet's idiom (float32 parameters and statistics) or, with `accumulate="input"`, the
    from-scratch layer cast to the input dtype."""
    validate_inputs(x, gamma, beta, running_mean, running_var, dy, training=training, eps=eps,
                    decay=decay)
    out = _run_step(impl, np.asarray(x), gamma, beta, running_mean, running_var, dy,
                    training=training, eps=eps, decay=decay, unbiased=unbiased,
                    accumulate=accumulate, device=device)
    return {k: numpy(v) for k, v in zip(RESULT_KEYS, out)}


def precision_probe(impl, dtype, *, accumulate="float32", device="cpu") -> dict:
    """The contract's precision_probe: one training step as bn_step runs it, on
    `common.precision.probe_case(dtype)`; the dtypes are the NDArrays' own."""
    case = precision.probe_case(dtype)
    y, dx, dgamma, _, rm, _ = _run_step(impl, **case, training=True, eps=1e-5, decay=0.9,
                                        unbiased=False, accumulate=accumulate, device=device)
    return precision.probe_result(case, numpy(y), output_dtype=dtype_name(y.dtype),
                                  grad_dtype=dtype_name(dx.dtype),
                                  param_dtype=dtype_name(dgamma.dtype),
                                  running_dtype=dtype_name(rm.dtype), device=context(device)[1])


def operator_defaults() -> dict:
    """`fix_gamma` and `eps` of the operator-level `nd.BatchNorm` as the installed MXNet applies
    them, inferred from one inference call with gamma=2, x=1, running mean 0 and variance 1:
    y = g / sqrt(1 + eps), g = 1 if gamma is fixed."""
    one = mx.nd.ones((1, 1), dtype="float64")
    y = mx.nd.BatchNorm(one, 2 * one[0], 0 * one[0], 0 * one[0], one[0]).asnumpy().item()
    fix_gamma = y < 1.5
    eps = ((1.0 if fix_gamma else 2.0) / y) ** 2 - 1.0
    return {"fix_gamma": bool(fix_gamma), "eps": float(f"{eps:.6g}")}


# The suite's impls as layers: (class, constructor arguments besides the channel count), and
# the family of documented conventions each follows (common.spec.DOCUMENTED).
LAYERS = {"scratch": (BatchNorm, {"num_dims": 4}), "native": (nn.BatchNorm, {})}


def conventions() -> dict:
    """Claimed convention fields per impl: the family's documented facts (CPU build: statistics
    update in backward with the biased variance; momentum a float32 operator parameter) and the
    constructor's signature defaults read with `inspect`; never read back from a built layer
    (the conventions report measures them)."""
    op = operator_defaults()
    notes = {
        "scratch": "the MXNet source's batch_norm: moving = (1-momentum)*moving + momentum*batch, "
                   "so momentum=0.9 keeps 10% of the old value (canonical decay 0.1); moving_var "
                   "starts at zeros (native: ones); mode from autograd.is_training(); one "
                   "implementation for imperative and hybridized use (hybridized, the new "
                   "statistics are graph outputs that the caller writes back)",
        "native": "gluon.nn.BatchNorm: momentum weighs the OLD value; on CPU the running "
                  "statistics change in the BACKWARD pass (a forward alone, even under "
                  "autograd.record(), leaves them unchanged) with the biased variance; the "
                  "cuDNN GPU path updates in forward with the unbiased variance. momentum is a "
                  "float32 operator parameter (0.9 runs as 0.8999999762). The operator-level "
                  f"nd/sym.BatchNorm defaults to fix_gamma={op['fix_gamma']} (gamma ignored) "
                  f"and eps={op['eps']:g}; Gluon passes fix_gamma=False and eps=1e-5",
    }
    return {impl: dict(spec.claims(CONVENTION[impl], signature_arguments(cls, (), kwargs)),
                       notes=notes[impl])
            for impl, (cls, kwargs) in LAYERS.items()}
