"""PyTorch layers that lie: each subclasses `nn.BatchNorm2d`, so its claims are torch's documented
facts and its own signature defaults, and each does ONE thing differently. The conventions
experiment must turn exactly that field ✗ and show the measured value (tests/test_probe.py).
`Written` spells batch norm out so that one piece at a time can be changed."""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DIMS = (0, 2, 3)


def _c(v):
    return v.reshape(1, -1, 1, 1)


class Written(nn.BatchNorm2d):
    """nn.BatchNorm2d's arithmetic written out (it measures like nn.BatchNorm2d)."""

    def applied_eps(self):
        return self.eps

    def applied_momentum(self):
        return self.momentum

    def scale(self):
        return self.weight

    def forward(self, x):
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.scale(), self.bias,
                                False, 0.0, self.applied_eps())
        mean, var = x.mean(DIMS), x.var(DIMS, unbiased=False)
        y = (x - _c(mean)) / torch.sqrt(_c(var) + self.applied_eps()) * _c(self.scale()) + _c(self.bias)
        self.num_batches_tracked += 1
        self.update(mean.detach(), var.detach() * self.n(x) / (self.n(x) - 1), y)
        return y

    @staticmethod
    def n(x):
        return x.numel() // x.shape[1]

    def update(self, mean, var_stat, y):
        m = self.applied_momentum()
        with torch.no_grad():
            self.running_mean.mul_(1 - m).add_(m * mean)
            self.running_var.mul_(1 - m).add_(m * var_stat)


class WeighsOld(Written):
    """momentum_weighs: applies `momentum` to the OLD value (the classic port bug)."""

    def update(self, mean, var_stat, y):
        m = 1.0 - self.momentum
        with torch.no_grad():
            self.running_mean.mul_(1 - m).add_(m * mean)
            self.running_var.mul_(1 - m).add_(m * var_stat)


class KeepsMore(Written):
    """default_momentum: its signature (and its `momentum` attribute) say 0.1; built with that
    default it keeps 0.8 of the old value (momentum 0.2)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, **kw):
        super().__init__(num_features, eps, momentum, **kw)
        self._default = momentum == 0.1

    def applied_momentum(self):
        return 0.2 if self._default else self.momentum


class LargerEps(Written):
    """default_eps: claims 1e-5, normalises with 1e-3."""

    def applied_eps(self):
        return 1e-3


class BiasedRunningVar(Written):
    """running_var: feeds the biased batch variance to the running variance."""

    def update(self, mean, var_stat, y):
        n = self._n
        super().update(mean, var_stat * (n - 1) / n, y)

    def forward(self, x):
        self._n = self.n(x)
        return super().forward(x)


class UpdatesInBackward(Written):
    """stats_update: the running statistics change only when the gradient flows back."""

    def update(self, mean, var_stat, y):
        if y.requires_grad:
            y.register_hook(lambda g: Written.update(self, mean, var_stat, y) or g)


class ChannelsLast(nn.BatchNorm2d):
    """layout: normalises per index of the LAST axis (an NHWC layer passed off as NCHW)."""

    def forward(self, x):
        return super().forward(x.transpose(1, 3)).transpose(1, 3)


class HalfInitialVar(nn.BatchNorm2d):
    """initial_running_var: starts its running variance at 0.5."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, **kw):
        super().__init__(num_features, eps, momentum, **kw)
        self.running_var.fill_(0.5)


class CumulativeAverage(Written):
    """running_stats: claims an EMA (momentum 0.1), keeps the cumulative average."""

    def applied_momentum(self):
        return 1.0 / float(self.num_batches_tracked)


class Erratic(Written):
    """running_stats: a decay that follows no rule (0.9, 0.5, 0.9, 0.5, ...)."""

    def applied_momentum(self):
        return 0.1 if int(self.num_batches_tracked) % 2 else 0.5


class IgnoresGamma(Written):
    """gamma: has a learnable weight, normalises as if it were 1."""

    def scale(self):
        return torch.ones_like(self.weight)


class Float32Momentum(Written):
    """momentum_dtype: applies its momentum rounded to float32."""

    def applied_momentum(self):
        return float(np.float32(self.momentum))


# field -> (lying class, the value the experiment must measure)
LIARS = {
    "momentum_weighs": (WeighsOld, "old running value"),
    "default_momentum": (KeepsMore, 0.2),
    "default_eps": (LargerEps, 1e-3),
    "running_var": (BiasedRunningVar, "biased"),
    "stats_update": (UpdatesInBackward, "backward"),
    "layout": (ChannelsLast, "NHWC"),
    "initial_running_var": (HalfInitialVar, 0.5),
    "running_stats": (CumulativeAverage, "cumulative average"),
    "gamma": (IgnoresGamma, "fixed to 1"),
    "momentum_dtype": (Float32Momentum, "float32"),
}


def hand_written(num_features=3):
    """A factory (not a class) of a hand-written layer with no documented family."""
    return Written(num_features)
