"""Momentum translations through the canonical decay."""
import numpy as np
import pytest

from common import spec


@pytest.mark.parametrize("decay", [0.0, 0.1, 0.9, 0.99])
def test_translations_follow_each_formula(decay):
    # Apply each convention's own formula with the translated momentum; all must equal canonical.
    running, batch = 2.0, -3.0
    canonical = decay * running + (1 - decay) * batch
    formulas = {
        "torch-native": lambda m: (1 - m) * running + m * batch,
        "torch-source": lambda m: m * running + (1 - m) * batch,
        "mxnet-source": lambda m: (1 - m) * running + m * batch,
        "mxnet-native": lambda m: m * running + (1 - m) * batch,
        "flax-native": lambda m: m * running + (1 - m) * batch,
        "jax-source": lambda m: m * running + (1 - m) * batch,
    }
    for convention, formula in formulas.items():
        m = spec.momentum_from_decay(decay, convention)
        assert formula(m) == pytest.approx(canonical, abs=1e-15), convention
        assert spec.decay_from_momentum(m, convention) == pytest.approx(decay, abs=1e-15)
    assert spec.running_update(running, batch, decay) == pytest.approx(canonical, abs=1e-15)


def test_worked_translation_between_the_sources():
    assert spec.translate_momentum(0.9, "mxnet-source", "torch-source") == pytest.approx(0.1)
    assert spec.translate_momentum(0.1, "torch-native", "mxnet-native") == pytest.approx(0.9)
    assert spec.translate_momentum(0.9, "torch-source", "flax-native") == pytest.approx(0.9)


def test_bnspec_validates_and_translates():
    s = spec.BNSpec(eps=1e-3, decay=0.99)
    assert s.momentum("torch-native") == pytest.approx(0.01)
    with pytest.raises(ValueError, match="decay"):
        spec.BNSpec(decay=1.1)
    with pytest.raises(ValueError, match="eps"):
        spec.BNSpec(eps=-1.0)
    with pytest.raises(ValueError, match="unknown momentum convention"):
        spec.momentum_from_decay(0.9, "caffe")


def test_sources_use_opposite_meanings_of_the_same_literal():
    torch_src, mx_src = spec.SOURCES["torch-source"], spec.SOURCES["mxnet-source"]
    assert torch_src["default_momentum"] == mx_src["default_momentum"] == 0.9
    kept = [spec.decay_from_momentum(0.9, name) for name in ("torch-source", "mxnet-source")]
    np.testing.assert_allclose(kept, [0.9, 0.1])
