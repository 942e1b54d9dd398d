"""LeNet-BN checkpoints in Gluon's own format: the parameter file of `save_parameters` (names
`conv1.weight`, `bn1.gamma`, `bn1.running_var`, ...), which `LeNet.load_parameters(path)` takes
as it is; eps, momentum and fix_gamma in the sidecar (`common.checkpoint`). Loading also takes
the textbook Gluon `nn.Sequential` names (`0.weight`, `1.gamma`, ...). Both impls use the same
names, so a file without a sidecar loads as the native layer's."""
from __future__ import annotations

import mxnet as mx

from common import checkpoint, convert

from .bn import IMPLS, check_impl, conventions


def save_checkpoint(params, path, *, impl, bn_config) -> None:
    """Write `params` (canonical, float32 or float64: the file keeps the dtype) as LeNet's Gluon
    parameters, and `bn_config` as the layer's settings, atomically."""
    check_impl(impl)
    cfg = convert.check_bn_config(bn_config)
    settings = convert.framework_settings("mxnet", impl, cfg)
    arrays = {k: mx.nd.array(v, dtype=v.dtype)
              for k, v in convert.to_flat("mxnet", params, impl).items()}
    checkpoint.save(path, lambda tmp: mx.nd.save(tmp, arrays), framework="mxnet", impl=impl,
                    settings=settings, bn_config=cfg)


def read_checkpoint(path) -> dict:
    """{"params", "bn_config", "impl", "layout", "sidecar"} of a Gluon parameter file; impl and
    settings from the sidecar, else the native layer's defaults. A sidecar with fix_gamma=true
    gives every gamma 1, as that layer computes."""
    checkpoint.read_bytes(path)  # missing, unreadable or empty: the same errors as elsewhere
    try:
        loaded = mx.nd.load(str(path))
    except mx.base.MXNetError as e:
        raise ValueError(
            f"{path} is not an MXNet parameter file ({checkpoint.reason(e)})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} holds {len(loaded)} unnamed arrays, not named parameters")
    arrays = {k: v.asnumpy() for k, v in loaded.items()}
    return checkpoint.resolve_flat(path, "mxnet", arrays, impls=IMPLS, conventions=conventions)


def load_checkpoint(path) -> tuple[dict, dict]:
    """(canonical params, bn_config) of a checkpoint file (see `read_checkpoint`)."""
    r = read_checkpoint(path)
    return r["params"], r["bn_config"]
