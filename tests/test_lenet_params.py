"""Canonical LeNet-BN parameters: names, shapes, initialiser, validator."""
import numpy as np
import pytest

from common import lenet


def test_names_and_shapes():
    shapes = lenet.param_shapes()
    assert shapes["conv1.weight"] == (6, 1, 5, 5)
    assert shapes["conv2.weight"] == (16, 6, 5, 5)
    assert shapes["fc1.weight"] == (120, 16 * 4 * 4)  # 28 -> 24 -> 12 -> 8 -> 4
    assert shapes["fc3.weight"] == (10, 84)
    for bn, c in (("bn1", 6), ("bn2", 16), ("bn3", 120), ("bn4", 84)):
        for f in ("gamma", "beta", "running_mean", "running_var"):
            assert shapes[f"{bn}.{f}"] == (c,)
    assert len(shapes) == 5 * 2 + 4 * 4


def test_init_is_seeded_and_xavier_uniform():
    a, b, c = lenet.init_params(0), lenet.init_params(0), lenet.init_params(1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["conv1.weight"], c["conv1.weight"])
    # Xavier-uniform: bound sqrt(6 / (fan_in + fan_out)), fans include the receptive field.
    bounds = {"conv1.weight": np.sqrt(6 / (25 + 150)), "conv2.weight": np.sqrt(6 / (150 + 400)),
              "fc1.weight": np.sqrt(6 / (256 + 120))}
    for name, bound in bounds.items():
        w = a[name]
        assert np.abs(w).max() <= bound
        assert np.abs(w).max() > 0.9 * bound  # the whole range is used
        assert abs(w.std() - bound / np.sqrt(3)) < 0.15 * bound  # uniform's std
    assert np.all(a["bn1.gamma"] == 1) and np.all(a["bn1.running_var"] == 1)
    assert np.all(a["bn4.beta"] == 0) and np.all(a["bn4.running_mean"] == 0)
    assert np.all(a["fc3.bias"] == 0)
    assert all(v.dtype == np.float64 for v in a.values())
    lenet.validate_params(a)


def test_validator_names_every_problem():
    p = lenet.init_params(0)
    del p["bn2.running_var"]
    p["fc1.weight"] = np.zeros((120, 255))
    p["extra"] = np.zeros(1)
    p["conv1.bias"] = np.full(6, np.nan)
    with pytest.raises(ValueError) as e:
        lenet.validate_params(p)
    msg = str(e.value)
    for part in ("missing bn2.running_var", "fc1.weight has shape (120, 255)", "unexpected extra",
                 "conv1.bias contains non-finite"):
        assert part in msg


def test_reference_logits_against_an_explicit_loop():
    """The vectorised NumPy forward against a direct loop over one image's first conv output."""
    rng = np.random.default_rng(0)
    p = lenet.init_params(0)
    x = rng.uniform(0, 1, size=(2, 1, 28, 28))
    w, b = p["conv1.weight"], p["conv1.bias"]
    direct = np.array([[[sum(x[0, 0, i + a, j + c] * w[o, 0, a, c] for a in range(5) for c in range(5)) + b[o]
                         for j in range(24)] for i in range(24)] for o in range(6)])
    np.testing.assert_allclose(lenet._conv2d(x, w, b)[0], direct, atol=1e-12)
    z = rng.normal(size=(1, 2, 4, 4))
    np.testing.assert_array_equal(lenet._maxpool2(z)[0, 1, 0, 0], z[0, 1, :2, :2].max())
    logits = lenet.reference_logits(p, x)
    assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
    # running statistics are used: changing one changes the output
    p2 = dict(p, **{"bn3.running_mean": p["bn3.running_mean"] + 0.5})
    assert np.abs(lenet.reference_logits(p2, x) - logits).max() > 1e-3
