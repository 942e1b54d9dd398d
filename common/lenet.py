"""Canonical LeNet-BN parameters: the one description every backend converts from and to.

Architecture (the seeds'): conv(1→6, 5) → BN → sigmoid → max-pool 2 → conv(6→16, 5) → BN →
sigmoid → max-pool 2 → flatten (C×H×W order) → linear(256→120) → BN → sigmoid →
linear(120→84) → BN → sigmoid → linear(84→10). Layouts are PyTorch's: conv weights O×I×kH×kW,
linear weights out×in.
"""
from __future__ import annotations

import numpy as np

DEFAULT_LR = 1.0  # the seeds' learning rate for LeNet-BN (d2l: lr, num_epochs, batch_size = 1.0, 10, 256)
DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 256

CONV_LAYERS = {"conv1": (6, 1, 5, 5), "conv2": (16, 6, 5, 5)}
FC_LAYERS = {"fc1": (120, 256), "fc2": (84, 120), "fc3": (10, 84)}
BN_LAYERS = {"bn1": 6, "bn2": 16, "bn3": 120, "bn4": 84}  # 4-D, 4-D, 2-D, 2-D
BN_FIELDS = ("gamma", "beta", "running_mean", "running_var")
RUNNING_FIELDS = ("running_mean", "running_var")
IMAGE_SHAPE = (1, 28, 28)
# Every layer of the forward pass in order, with its output shape per example (NCHW / features;
# "flatten" in C×H×W order): the names per-layer activations are reported under.
LAYER_SHAPES = {
    "conv1": (6, 24, 24), "bn1": (6, 24, 24), "sigmoid1": (6, 24, 24), "pool1": (6, 12, 12),
    "conv2": (16, 8, 8), "bn2": (16, 8, 8), "sigmoid2": (16, 8, 8), "pool2": (16, 4, 4),
    "flatten": (256,), "fc1": (120,), "bn3": (120,), "sigmoid3": (120,), "fc2": (84,),
    "bn4": (84,), "sigmoid4": (84,), "fc3": (10,),
}
LAYERS = tuple(LAYER_SHAPES)


def param_shapes() -> dict[str, tuple[int, ...]]:
    """Every canonical name and its shape, in forward order."""
    shapes = {}
    order = ("conv1", "bn1", "conv2", "bn2", "fc1", "bn3", "fc2", "bn4", "fc3")
    for layer in order:
        if layer in BN_LAYERS:
            for f in BN_FIELDS:
                shapes[f"{layer}.{f}"] = (BN_LAYERS[layer],)
        else:
            w = CONV_LAYERS.get(layer) or FC_LAYERS[layer]
            shapes[f"{layer}.weight"] = w
            shapes[f"{layer}.bias"] = (w[0],)
    return shapes


def input_shape(layer: str) -> tuple[int, ...]:
    """Per-example shape of `layer`'s input (the previous layer's output, or the image)."""
    i = LAYERS.index(layer)
    return LAYER_SHAPES[LAYERS[i - 1]] if i else IMAGE_SHAPE


def run_layers(steps, x, inputs=None) -> dict:
    """Run `steps` ((layer name, function) in LAYERS order) from `x`; returns every layer's
    output by name. A layer named in `inputs` gets that array as its input instead of the
    previous output (isolated mode). Framework-free: the functions and arrays are the caller's."""
    inputs = inputs or {}
    out = {}
    for name, fn in steps:
        x = fn(inputs[name] if name in inputs else x)
        out[name] = x
    return out


def check_layer_inputs(inputs, n: int) -> dict:
    """`inputs` ({layer: array}) validated for a batch of `n`: known layer names and each
    layer's input shape (NCHW / C×H×W-ordered features); ValueError naming the layer."""
    inputs = dict(inputs or {})
    for name, a in inputs.items():
        if name not in LAYER_SHAPES:
            raise ValueError(f"unknown layer {name!r} in inputs; layers: {', '.join(LAYERS)}")
        want = (n,) + input_shape(name)
        if tuple(np.shape(a)) != want:
            raise ValueError(f"input for layer {name} has shape {tuple(np.shape(a))}, "
                             f"expected {want}")
    return inputs


def is_running_stat(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in RUNNING_FIELDS


def xavier_bound(shape: tuple[int, ...]) -> float:
    """Xavier-uniform bound as torch.nn.init.xavier_uniform_ computes it (the seeds' init)."""
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    return float(np.sqrt(6.0 / (fan_in + fan_out)))


def init_params(seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded float64 parameters: Xavier-uniform weights, zero biases, gamma 1, beta 0,
    running mean 0, running variance 1."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes().items():
        field = name.rsplit(".", 1)[-1]
        if field == "weight":
            b = xavier_bound(shape)
            params[name] = rng.uniform(-b, b, size=shape)
        elif field in ("gamma", "running_var"):
            params[name] = np.ones(shape)
        else:
            params[name] = np.zeros(shape)
    return params


def param_problems(params, *, finite=True) -> list[str]:
    """Every missing, unexpected or mis-shaped entry (and non-finite one if `finite`), in words."""
    expected = param_shapes()
    problems = [f"missing {n} (shape {s})" for n, s in expected.items() if n not in params]
    problems += [f"unexpected {n}" for n in params if n not in expected]
    problems += [
        f"{n} has shape {tuple(np.shape(params[n]))}, expected {s}"
        for n, s in expected.items() if n in params and tuple(np.shape(params[n])) != s
    ]
    if finite:
        problems += [f"{n} contains non-finite values" for n in expected
                     if n in params and not np.all(np.isfinite(params[n]))]
    return problems


def validate_params(params) -> None:
    """Raise ValueError naming every missing, unexpected, mis-shaped or non-finite entry."""
    problems = param_problems(params)
    if problems:
        raise ValueError("invalid LeNet-BN parameters: " + "; ".join(problems))


def cast(params, dtype) -> dict[str, np.ndarray]:
    """A copy of `params` as contiguous arrays of `dtype`."""
    return {k: np.ascontiguousarray(v, dtype=dtype) for k, v in params.items()}


def max_abs_diff(a, b) -> dict[str, float]:
    """Per-parameter max absolute difference between two canonical parameter dicts."""
    return {k: float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64))))
            for k in param_shapes()}


def _conv2d(x, w, b):
    windows = np.lib.stride_tricks.sliding_window_view(x, w.shape[2:], axis=(2, 3))  # N,C,H',W',kh,kw
    # optimize=True contracts through BLAS (4-10x faster than einsum's own loop at batch 256)
    return np.einsum("nchwij,ocij->nohw", windows, w, optimize=True) + b.reshape(1, -1, 1, 1)


def _maxpool2(x):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def _bn_inference(x, params, layer, eps):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    g, b, m, v = (params[f"{layer}.{f}"].reshape(shape) for f in BN_FIELDS)
    return g * (x - m) / np.sqrt(v + eps) + b


def reference_logits(params, x, *, eps=1e-5) -> np.ndarray:
    """Float64 NumPy LeNet-BN forward in inference mode (running statistics): the reference for
    every backend's `lenet_eval`."""
    p = cast(params, np.float64)
    sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    h = np.asarray(x, np.float64)
    for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
        h = _maxpool2(sigmoid(_bn_inference(_conv2d(h, p[f"{conv}.weight"], p[f"{conv}.bias"]), p, bn, eps)))
    h = h.reshape(h.shape[0], -1)
    for fc, bn in (("fc1", "bn3"), ("fc2", "bn4")):
        h = sigmoid(_bn_inference(h @ p[f"{fc}.weight"].T + p[f"{fc}.bias"], p, bn, eps))
    return h @ p["fc3.weight"].T + p["fc3.bias"]
