"""PyTorch backend: from-scratch batch norm (autograd and closed-form backward) and native
`nn.BatchNorm1d/2d`, LeNet-BN and its training loop. The contract is in backends/__init__.py.

Importing this package imports torch (an ImportError if it is missing) and changes no global
torch state (threads, default dtype, RNG).
"""
import torch  # noqa: F401  (fail here, cleanly, when torch is missing)

from .bn import IMPLS, BatchNorm, batch_norm, batch_norm_analytic, bn_step, conventions
from .lenet import lenet_eval, lenet_train
from .probe import experiment, observe
from .train import DeviceSteps, exact_numerics, fit, speed, speed_timer, versions

__all__ = ["IMPLS", "BatchNorm", "batch_norm", "batch_norm_analytic", "bn_step", "conventions",
           "observe", "experiment", "lenet_train", "lenet_eval", "fit", "speed", "speed_timer",
           "exact_numerics", "DeviceSteps", "versions"]
