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
                 precision_probe, probe, textbook_batch_norm)
from .lenet import lenet_eval, lenet_train  # noqa: E402
from .train import exact_numerics, fit, speed, speed_timer, versions  # noqa: E402

# the contract (backends/contract.py), then this backend's own public names
__all__ = ["IMPLS", "make_layer", "bn_step", "conventions", "probe", "lenet_train",
           "lenet_eval", "fit", "speed", "speed_timer", "exact_numerics", "versions",
           "precision_probe", "textbook_batch_norm", "batch_norm", "BatchNorm"]
