"""LeNet-BN checkpoints in Flax's own format: the variables {"params": ..., "batch_stats": ...}
as `flax.serialization.to_bytes` writes them (msgpack), which `flax.serialization.from_bytes`
restores into `LeNetBN.init(...)`'s variables; eps and momentum in the sidecar
(`common.checkpoint`)."""
from __future__ import annotations

import flax.serialization

from common import checkpoint, convert

from .bn import IMPLS, check_impl, conventions


def save_checkpoint(params, path, *, impl, bn_config) -> None:
    """Write `params` (canonical, float32 or float64: the file keeps the dtype) as `impl`'s Flax
    variables, and `bn_config` as the layer's settings, atomically."""
    check_impl(impl)
    cfg = convert.check_bn_config(bn_config)
    settings = convert.framework_settings("jax", impl, cfg)
    data = flax.serialization.to_bytes(convert.to_flax(params, impl))
    checkpoint.save(path, checkpoint.write_bytes(data), framework="jax", impl=impl,
                    settings=settings, bn_config=cfg)


def read_checkpoint(path) -> dict:
    """{"params", "bn_config", "impl", "layout", "sidecar"} of a msgpack variables file; the
    impl from the BN variable names (and the sidecar), settings from the sidecar or Flax's
    layer defaults."""
    data = checkpoint.read_bytes(path)
    try:
        variables = flax.serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several kinds for truncated or foreign bytes
        raise ValueError(
            f"{path} is not a Flax msgpack checkpoint ({checkpoint.reason(e)})") from None
    params = convert.from_flax(variables, what=str(path))
    fmt = {"layout": "lenet", "family": convert.flax_family(variables), "num_batches_tracked": None}
    return checkpoint.resolve(path, "jax", params, fmt, impls=IMPLS, conventions=conventions)


def load_checkpoint(path) -> tuple[dict, dict]:
    """(canonical params, bn_config) of a checkpoint file (see `read_checkpoint`)."""
    r = read_checkpoint(path)
    return r["params"], r["bn_config"]
