"""Gluon blocks that lie: subclasses of `gluon.nn.BatchNorm` (so their claims are MXNet's
documented facts and their own signature defaults) whose operator runs with one setting changed."""
import backends.mxnet  # noqa: F401  (MXNet 1.9 needs the backend's numpy shim first)
from mxnet.gluon import nn


class LargerEps(nn.BatchNorm):
    """default_eps: its signature says epsilon=1e-5; the operator runs with 1e-3."""

    def __init__(self, momentum=0.9, epsilon=1e-5, in_channels=0, **kwargs):
        super().__init__(momentum=momentum, epsilon=epsilon, in_channels=in_channels, **kwargs)
        self._kwargs["eps"] = 1e-3


class FixedGamma(nn.BatchNorm):
    """gamma: scale=True (a learnable gamma) is claimed; the operator runs with fix_gamma=True."""

    def __init__(self, momentum=0.9, epsilon=1e-5, in_channels=0, **kwargs):
        super().__init__(momentum=momentum, epsilon=epsilon, in_channels=in_channels, **kwargs)
        self._kwargs["fix_gamma"] = True
