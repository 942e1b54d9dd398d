"""LeNet-BN checkpoints in PyTorch's own format: a state_dict written with `torch.save` (running
statistics and num_batches_tracked included) that `LeNetBN.load_state_dict(torch.load(path))`
takes as it is; eps and momentum in the sidecar (`common.checkpoint`). Loading also takes the
textbook `nn.Sequential` state_dict (`0.weight`, `1.running_mean`, ...)."""
from __future__ import annotations

import io

import torch

from common import checkpoint, convert

from .bn import IMPLS, check_impl, conventions


def save_checkpoint(params, path, *, impl, bn_config) -> None:
    """Write `params` (canonical, float32 or float64: the file keeps the dtype) as LeNetBN's
    state_dict for `impl`, and `bn_config` as the layer's settings, atomically."""
    check_impl(impl)
    cfg = convert.check_bn_config(bn_config)
    settings = convert.framework_settings("torch", impl, cfg)
    state = convert.to_flat("torch", params, impl,
                            num_batches_tracked=cfg.get("num_batches_tracked", 0))
    buf = io.BytesIO()  # not the path: torch.save names the archive after the file
    torch.save({k: torch.tensor(v) for k, v in state.items()}, buf)
    checkpoint.save(path, checkpoint.write_bytes(buf.getvalue()), framework="torch", impl=impl,
                    settings=settings, bn_config=cfg)


def read_checkpoint(path) -> dict:
    """{"params", "bn_config", "impl", "layout", "sidecar"} of a state_dict file; the impl from
    the BN names (and the sidecar), settings from the sidecar or PyTorch's layer defaults."""
    data = checkpoint.read_bytes(path)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for truncated or foreign files
        raise ValueError(f"{path} is not a PyTorch checkpoint ({checkpoint.reason(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state_dict of tensors")
    try:
        arrays = {k: v.detach().numpy() for k, v in state.items()}
    except TypeError as e:  # e.g. bfloat16, which NumPy has no type for
        raise ValueError(f"{path}: {checkpoint.reason(e)}") from None
    return checkpoint.resolve_flat(path, "torch", arrays, impls=IMPLS, conventions=conventions)


def load_checkpoint(path) -> tuple[dict, dict]:
    """(canonical params, bn_config) of a checkpoint file (see `read_checkpoint`)."""
    r = read_checkpoint(path)
    return r["params"], r["bn_config"]
