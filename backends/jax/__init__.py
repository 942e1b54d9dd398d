"""JAX/Flax backend: from-scratch and `flax.linen.BatchNorm` batch norm, LeNet-BN under
`jax.jit` with optax SGD. Channels-last inside; the contract's NCHW arrays are transposed at the
boundary. Importing it enables nothing globally: float64 work switches `jax_enable_x64` on only
for the call that asks for it."""
import flax  # noqa: F401  (a missing Flax must make the backend unavailable at import)
import jax  # noqa: F401
import optax  # noqa: F401

from backends.jax.bn import (IMPLS, BatchNorm, batch_norm, bn_step, conventions, make_layer,
                             precision_probe, textbook_batch_norm)
from backends.jax.lenet import LeNetBN, lenet_eval, lenet_layers, lenet_train
from backends.jax.sync import SYNC_IMPLS, SyncGroup, sync_bn_step, sync_lenet_train
from backends.jax.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from backends.jax.probe import experiment, observe
from backends.jax.train import exact_numerics, fit, speed, speed_timer, versions
from backends.jax.source import source_timer

# the contract (backends/contract.py), then this backend's own public names
__all__ = ["IMPLS", "make_layer", "bn_step", "conventions", "observe", "experiment",
           "lenet_train", "lenet_eval", "fit", "speed", "speed_timer", "source_timer",
           "exact_numerics", "versions", "textbook_batch_norm", "batch_norm", "BatchNorm",
           "LeNetBN", "SYNC_IMPLS", "SyncGroup", "sync_bn_step", "sync_lenet_train",
           "lenet_layers", "save_checkpoint", "load_checkpoint", "read_checkpoint", "precision_probe"]
