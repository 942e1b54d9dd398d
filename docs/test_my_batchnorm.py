"""Check a batch-norm layer against bn-compare's float64 reference.

Copy this file into your tests and make `my_step` run one step of your layer. Needs bn-compare
importable (e.g. `pip install -e path/to/bn-compare`), pytest and hypothesis.
"""
import numpy as np
import torch
from hypothesis import given, settings

from common.spec import momentum_from_decay
from common.testing import assert_matches_reference, bn_cases


def my_step(x, gamma, beta, running_mean, running_var, dy, *, training, eps, decay, unbiased):
    """One training or inference step of the layer under test, here torch.nn.BatchNorm1d/2d.
    The settings arrive in canonical terms: `decay` is the weight kept on the OLD running value,
    while PyTorch's `momentum` weighs the NEW batch statistic, so it is translated."""
    dtype = torch.float64 if x.dtype == np.float64 else torch.float32
    cls = torch.nn.BatchNorm2d if x.ndim == 4 else torch.nn.BatchNorm1d
    layer = cls(x.shape[1], eps=eps, momentum=momentum_from_decay(decay, "torch-native"), dtype=dtype)
    with torch.no_grad():
        for name, value in (("weight", gamma), ("bias", beta),
                            ("running_mean", running_mean), ("running_var", running_var)):
            getattr(layer, name).copy_(torch.from_numpy(value))
    layer.train(training)
    xt = torch.from_numpy(x).requires_grad_(True)
    y = layer(xt)
    y.backward(torch.from_numpy(dy))
    return {"y": y.detach().numpy(), "dx": xt.grad.numpy(), "dgamma": layer.weight.grad.numpy(),
            "dbeta": layer.bias.grad.numpy(), "running_mean": layer.running_mean.numpy(),
            "running_var": layer.running_var.numpy()}


# What the layer claims beyond the canonical defaults (eps 1e-5, decay 0.9, biased): PyTorch
# feeds the unbiased (÷(m−1)) batch variance to running_var.
CLAIMS = {"unbiased": True}


def test_standard_cases():
    assert_matches_reference(my_step, conventions=CLAIMS, dtypes=("float64", "float32"))


def test_another_decay_and_eps():
    assert_matches_reference(my_step, conventions={**CLAIMS, "decay": 0.99, "eps": 1e-3})


# derandomize: the same inputs on every run (drop it to explore new ones each time)
@settings(max_examples=25, deadline=None, derandomize=True)
@given(bn_cases())
def test_random_inputs(case):
    assert_matches_reference(my_step, conventions=CLAIMS, cases=[case])
