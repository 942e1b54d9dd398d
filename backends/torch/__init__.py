"""PyTorch backend: from-scratch batch norm (autograd and closed-form backward) and native
`nn.BatchNorm1d/2d`, LeNet-BN and its training loop. The contract is in backends/contract.py.

Importing this package imports torch (an ImportError if it is missing) and changes no global
torch state (threads, default dtype, RNG).
"""
import torch  # noqa: F401  (fail here, cleanly, when torch is missing)

from .bn import (IMPLS, BatchNorm, batch_norm, batch_norm_analytic, bn_step, conventions,
                 make_layer, precision_probe, textbook_batch_norm)
from .lenet import lenet_eval, lenet_layers, lenet_train
from .sync import SYNC_IMPLS, SyncGroup, sync_bn_step, sync_lenet_train
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .probe import experiment, observe
from .train import DeviceSteps, exact_numerics, fit, speed, speed_timer, versions
from .source import source_timer

# the contract (backends/contract.py), then this backend's own public names
__all__ = ["IMPLS", "make_layer", "bn_step", "conventions", "observe", "experiment",
           "lenet_train", "lenet_eval", "fit", "speed", "speed_timer", "source_timer",
           "exact_numerics", "versions", "textbook_batch_norm", "batch_norm",
           "batch_norm_analytic", "BatchNorm", "DeviceSteps", "SYNC_IMPLS", "SyncGroup",
           "sync_bn_step", "sync_lenet_train", "lenet_layers", "save_checkpoint",
           "load_checkpoint", "read_checkpoint", "precision_probe"]
