"""MXNet 1.9 (Gluon) backend: the from-scratch batch norm of the MXNet source, Gluon's native
`nn.BatchNorm`, LeNet-BN and its training loop. The contract is in `backends/contract.py`.

MXNet 1.9.1, the last release, still uses the `numpy.bool` alias that NumPy 1.24 removed; the
alias is restored here, once, before MXNet is imported (nowhere else in the project). Without
MXNet (or with a NumPy it cannot run on) the import below raises ImportError, which
`backends.load` reports as "unavailable, with the install hint".
"""
import numpy

if "bool" not in vars(numpy):  # hasattr would trigger NumPy 1.2x's FutureWarning
    numpy.bool = bool

import mxnet  # noqa: E402,F401  (fails here, not later, when MXNet is missing or broken)

from .bn import (IMPLS, BatchNorm, batch_norm, bn_step, conventions, make_layer,  # noqa: E402
                 precision_probe, textbook_batch_norm)
from .lenet import lenet_eval, lenet_layers, lenet_train  # noqa: E402
from .sync import SYNC_IMPLS, SyncGroup, sync_bn_step, sync_lenet_train  # noqa: E402
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint  # noqa: E402
from .probe import experiment, observe  # noqa: E402
from .train import exact_numerics, fit, speed, speed_timer, versions  # noqa: E402
from .source import source_timer  # noqa: E402

# the contract (backends/contract.py), then this backend's own public names
__all__ = ["IMPLS", "make_layer", "bn_step", "conventions", "observe", "experiment",
           "lenet_train", "lenet_eval", "fit", "speed", "speed_timer", "source_timer",
           "exact_numerics", "versions", "textbook_batch_norm", "batch_norm", "BatchNorm",
           "SYNC_IMPLS", "SyncGroup", "sync_bn_step", "sync_lenet_train", "lenet_layers",
           "save_checkpoint", "load_checkpoint", "read_checkpoint", "precision_probe"]
