"""PyTorch backend: from-scratch batch norm (autograd and closed-form backward) and native
`nn.BatchNorm1d/2d`, LeNet-BN and its training loop. The contract is in backends/contract.py.

Importing this package imports torch (an ImportError if it is missing) and changes no global
torch state (threads, default dtype, RNG).
"""
import torch  # noqa: F401  (fail here, cleanly, when torch is missing)

from .bn import (IMPLS, BatchNorm, batch_norm, batch_norm_analytic, bn_step, conventions,
                 make_layer, precision_probe, probe, textbook_batch_norm)
from .lenet import lenet_eval, lenet_train
from .train import DeviceSteps, exact_numerics, fit, speed, speed_timer, versions

# the contract (backends/contract.py), then this backend's own public names
__all__ = ["IMPLS", "make_layer", "bn_step", "conventions", "probe", "lenet_train",
           "lenet_eval", "fit", "speed", "speed_timer", "exact_numerics", "versions",
           "precision_probe", "textbook_batch_norm", "batch_norm", "batch_norm_analytic", "BatchNorm",
           "DeviceSteps"]
