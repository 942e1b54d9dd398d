"""common.testing: the helper passes a correct batch norm written independently of the reference
and catches seeded bugs, naming the case, the quantity and the error; its hypothesis strategy
draws what it promises; and the README's example test file runs as written."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import testing
from common.reference import reduce_axes
from common.spec import BNSpec
from conftest import REPO, load_backend


def user_step(x, gamma, beta, running_mean, running_var, dy, *, training, eps, decay, unbiased,
              bug=None):
    """A user's batch norm, written out (not the reference's code), in the input's dtype;
    `bug` seeds one mistake."""
    dt = x.dtype
    axes = reduce_axes(x.ndim)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    n = x.size // x.shape[1]
    g, b = gamma.reshape(shape), beta.reshape(shape)
    if training:
        mean = x.mean(axis=axes, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
        norm_var = var * n / (n - 1) if bug == "unbiased normalisation" else var
        new_eps = 0.0 if bug == "no eps" else eps
        inv = 1 / np.sqrt(norm_var + new_eps)
        xhat = (x - mean) * inv
        dxhat = dy * g
        dx = inv / n * (n * dxhat - dxhat.sum(axis=axes, keepdims=True)
                        - xhat * (dxhat * xhat).sum(axis=axes, keepdims=True))
        stat = var.reshape(-1) * (n / (n - 1) if unbiased else 1)
        d = 1 - decay if bug == "momentum the wrong way" else decay
        new_rm = d * running_mean + (1 - d) * mean.reshape(-1)
        new_rv = d * running_var + (1 - d) * stat
    else:
        inv = 1 / np.sqrt(running_var.reshape(shape) + eps)
        xhat = (x - running_mean.reshape(shape)) * inv
        dx = dy * g * inv
        new_rm, new_rv = running_mean.copy(), running_var.copy()
        if bug == "stats move in inference":
            new_rm = new_rm + 1e-3
    out = dict(y=g * xhat + b, dx=dx, dgamma=(dy * xhat).sum(axis=axes), dbeta=dy.sum(axis=axes),
               running_mean=new_rm, running_var=new_rv)
    out = {k: np.asarray(v, dt) for k, v in out.items()}
    if bug == "float64 output":
        out["y"] = out["y"].astype(np.float64)
    if bug == "nan":
        out["dx"].flat[0] = np.nan
    return out


def seeded(bug):
    def step(*a, **k):
        with np.errstate(divide="ignore", invalid="ignore"):  # "no eps" on a constant channel: 0/0
            return user_step(*a, **k, bug=bug)
    return step


def test_a_correct_implementation_passes_every_standard_case_in_both_dtypes():
    testing.assert_matches_reference(user_step, dtypes=("float64", "float32"))
    testing.assert_matches_reference(user_step, conventions={"decay": 0.99, "unbiased": True, "eps": 1e-3})
    testing.assert_matches_reference(user_step, conventions=BNSpec(decay=0.5))


@pytest.mark.parametrize("bug, quantity", [
    ("unbiased normalisation", "y"),
    ("momentum the wrong way", "running_mean"),
    ("no eps", "y"),
    ("stats move in inference", "running_mean"),
    ("nan", "dx"),
])
def test_a_seeded_bug_fails_naming_the_case_quantity_and_error(bug, quantity):
    with pytest.raises(AssertionError) as info:
        testing.assert_matches_reference(seeded(bug), dtypes=("float64",))
    message = str(info.value)
    assert re.search(rf"case '[^']+' \((training|inference)[^)]*\): {quantity} differs from the reference: "
                     rf"max abs error (\d|nan)", message), message


def test_the_wrong_estimator_claim_and_a_changed_dtype_are_caught():
    def always_biased(*a, unbiased, **k):  # like Flax: no unbiased option
        return user_step(*a, unbiased=False, **k)

    with pytest.raises(AssertionError, match="case 'mine' .*running_var differs"):
        testing.assert_matches_reference(always_biased, conventions={"unbiased": True},
                                         cases=[testing.case("mine", _inputs())])
    with pytest.raises(AssertionError, match="y has dtype float64, expected float32"):
        testing.assert_matches_reference(seeded("float64 output"), dtypes=("float32",))


def _inputs(dtype=np.float64):
    from common.reference import random_case

    return random_case((8, 3), seed=1, dtype=dtype)


def test_a_step_that_raises_or_returns_too_little_is_a_named_failure():
    def broken(*a, **k):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(AssertionError, match="step_fn raised RuntimeError: CUDA out of memory"):
        testing.assert_matches_reference(broken)
    with pytest.raises(AssertionError, match="must return a dict with y, dx"):
        testing.assert_matches_reference(lambda *a, **k: {"y": a[0]})


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="unknown setting momentum"):
        testing.assert_matches_reference(user_step, conventions={"momentum": 0.1})
    with pytest.raises(ValueError, match="no case"):
        testing.assert_matches_reference(user_step, cases=[])
    with pytest.raises(ValueError, match="float32 or float64"):
        testing.standard_cases(("float16",))
    with pytest.raises(ValueError, match="inputs lack dy"):
        testing.case("x", {k: v for k, v in _inputs().items() if k != "dy"})


def test_conditioning_scales_tolerance_only_where_centring_loses_digits():
    plain = testing.standard_cases()[0]["inputs"]
    assert testing.conditioning(plain, 1e-5) < 5
    large = next(c for c in testing.standard_cases() if c["name"].startswith("large mean"))["inputs"]
    assert 50 < testing.conditioning(large, 1e-5) < 200  # mean 100, spread 1


@settings(max_examples=40, deadline=None, derandomize=True)
@given(testing.bn_cases())
def test_the_strategy_draws_what_it_promises_and_a_correct_impl_passes_it(c):
    x = c["inputs"]["x"]
    assert x.ndim in (2, 4) and x.shape[0] >= 2 and x.dtype.name in ("float32", "float64")
    assert c["eps"] is not None and 1e-8 <= c["eps"] <= 1.0
    testing.assert_matches_reference(user_step, cases=[c])


@settings(max_examples=30, deadline=None, derandomize=True)
@given(testing.bn_cases(), st.sampled_from(["unbiased normalisation", "momentum the wrong way"]))
def test_the_strategy_s_cases_catch_the_seeded_bugs(c, bug):
    n = c["inputs"]["x"].size // c["inputs"]["x"].shape[1]
    constant = np.ptp(c["inputs"]["x"].reshape(c["inputs"]["x"].shape[0], c["inputs"]["x"].shape[1], -1),
                      axis=(0, 2)).min() == 0
    if bug == "unbiased normalisation" and (constant or n > 50 or c["eps"] > 1e-2 * c["inputs"]["x"].var()):
        return  # the bug is invisible where the variance is 0, negligible vs eps, or n is large
    with pytest.raises(AssertionError):
        testing.assert_matches_reference(seeded(bug), cases=[c])


# -- the README's example --------------------------------------------------------------------
EXAMPLE = REPO / "docs" / "test_my_batchnorm.py"


def test_the_readme_shows_the_example_file_verbatim():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Test your own batch norm"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert block == EXAMPLE.read_text()


def test_the_example_test_file_runs_and_passes(tmp_path):
    load_backend("torch")
    copy = tmp_path / EXAMPLE.name  # as a user would: a copy outside this checkout
    copy.write_text(EXAMPLE.read_text())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(copy)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"\b3 passed\b", proc.stdout), proc.stdout[-1000:]
