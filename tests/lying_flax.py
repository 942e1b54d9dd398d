"""Flax modules that lie: subclasses of `flax.linen.BatchNorm` (so their claims are Flax's
documented facts and their own field defaults) that do one thing differently."""
import flax.linen as nn
import jax.numpy as jnp


class KeepsLess(nn.BatchNorm):
    """default_momentum: its `momentum` field says 0.99 (Flax's default); built with that
    default it keeps 0.9 of the old value."""

    @nn.compact
    def __call__(self, x, use_running_average=None):
        ura = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        momentum = 0.9 if self.momentum == 0.99 else self.momentum
        return nn.BatchNorm(momentum=momentum, epsilon=self.epsilon, axis=self.axis,
                            use_fast_variance=False, name="inner")(x, use_running_average=ura)


class UnbiasedRunningVar(nn.BatchNorm):
    """running_var: Flax documents a biased running variance; this one feeds the ÷(m−1)
    variance to it (as PyTorch does)."""

    @nn.compact
    def __call__(self, x, use_running_average=None):
        ura = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,))
        ra_var = self.variable("batch_stats", "var", jnp.ones, (c,))
        if ura:
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            mean, var = x.mean(axes), x.var(axes)
            if not self.is_initializing():
                n = x.size // c
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var * n / (n - 1)
        return (x - mean) / jnp.sqrt(var + self.epsilon) * scale + bias
