"""JAX/Flax backend: from-scratch and `flax.linen.BatchNorm` batch norm, LeNet-BN under
`jax.jit` with optax SGD. Channels-last inside; the contract's NCHW arrays are transposed at the
boundary. Importing it enables nothing globally: float64 work switches `jax_enable_x64` on only
for the call that asks for it."""
import flax  # noqa: F401  (a missing Flax must make the backend unavailable at import)
import jax  # noqa: F401
import optax  # noqa: F401

from backends.jax.bn import (IMPLS, BatchNorm, batch_norm, bn_step, conventions, make_layer,
                             precision_probe, probe, textbook_batch_norm)
from backends.jax.lenet import LeNetBN, lenet_eval, lenet_train
from backends.jax.train import exact_numerics, fit, speed, speed_timer, versions

# the contract (backends/contract.py), then this backend's own public names
__all__ = ["IMPLS", "make_layer", "bn_step", "conventions", "probe", "lenet_train",
           "lenet_eval", "fit", "speed", "speed_timer", "exact_numerics", "versions",
           "precision_probe", "textbook_batch_norm", "batch_norm", "BatchNorm", "LeNetBN"]
