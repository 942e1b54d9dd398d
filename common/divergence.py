"""Per-layer divergence between two runs of LeNet-BN (framework-free): given two dicts of
activations {layer: array} in canonical layouts (each backend's `lenet_layers`), the error after
every layer and the first layer whose error exceeds the tolerance.

Two ways to get the target's activations (what nobuco's per-node validation does for the
second): cascaded, each framework runs its own forward, so an error propagates to every later
layer; isolated, each target layer is fed the source's input to that layer
(`isolated_inputs`), so each layer's error is its own.
"""
from __future__ import annotations

import math

import numpy as np

from common.lenet import LAYERS

# Tolerances for activations and logits, as for logits of a correct port: float32 differences
# of summation order grow with depth to ~1e-6 on LeNet-BN; float64's stay ~1e-14.
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}


def isolated_inputs(source: dict) -> dict:
    """{layer: the source's input to it} (the previous layer's output) for every layer but the
    first, whose input is the image both runs are given."""
    return {layer: source[prev] for prev, layer in zip(LAYERS, LAYERS[1:])}


def layer_errors(source: dict, target: dict, layers=LAYERS) -> dict[str, float]:
    """Max absolute difference per layer; NaN where either side has a non-finite value (so no
    tolerance passes it). A missing layer or a shape mismatch is a ValueError naming it."""
    out = {}
    for layer in layers:
        for name, acts in (("source", source), ("target", target)):
            if layer not in acts:
                raise ValueError(f"{name} activations lack layer {layer!r}")
        a, b = np.asarray(source[layer], np.float64), np.asarray(target[layer], np.float64)
        if a.shape != b.shape:
            raise ValueError(f"layer {layer}: source shape {a.shape} != target shape {b.shape}")
        finite = np.all(np.isfinite(a)) and np.all(np.isfinite(b))
        out[layer] = float(np.max(np.abs(a - b), initial=0.0)) if finite else math.nan
    return out


def first_divergent(errors: dict, tol: float) -> str | None:
    """The first layer (in `errors`' order) whose error is not within `tol`; NaN counts as
    divergent. None when every layer is within."""
    if not (tol >= 0):
        raise ValueError(f"tolerance must be a number >= 0, got {tol!r}")
    return next((layer for layer, err in errors.items() if not (err <= tol)), None)


def compare(source: dict, target: dict, *, tol: float, layers=LAYERS) -> dict:
    """{"errors": {layer: max abs error}, "first_divergent_layer": name or None, "tol"}."""
    errors = layer_errors(source, target, layers)
    return {"errors": errors, "first_divergent_layer": first_divergent(errors, tol), "tol": tol}
