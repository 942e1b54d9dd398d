"""Shared fixtures: the real Fashion-MNIST sample that sits beside the checkout; loading a backend
for its tests; the cases every backend's tuned kernels are held to its textbook formulation on."""
import os
import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SAMPLE_DIR = pathlib.Path(
    os.environ.get("BN_COMPARE_SAMPLE_DIR", REPO.parent / "shared" / "data" / "fashion-mnist-sample")
)


@pytest.fixture(scope="session")
def sample_dir():
    if not (SAMPLE_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"Fashion-MNIST sample not found at {SAMPLE_DIR}; set BN_COMPARE_SAMPLE_DIR")
    return SAMPLE_DIR


import backends  # noqa: E402  (imports no framework)

# pyproject installs all three frameworks, so by default an unavailable backend FAILS (a broken
# install never passes as skipped tests). BN_COMPARE_ALLOW_MISSING=mxnet (comma-separated, or
# "all") lets a machine without a framework skip its tests, with the reason.
_ALLOWED = {n for n in os.environ.get("BN_COMPARE_ALLOW_MISSING", "").split(",") if n}
REQUIRED = set() if "all" in _ALLOWED else set(backends.names()) - _ALLOWED


def load_backend(name, skip=True):
    """The backend module; skip (with the reason) if unavailable, unless CI requires it."""
    try:
        return backends.load(name)
    except backends.BackendUnavailable as e:
        if name in REQUIRED or not skip:
            pytest.fail(str(e))
        pytest.skip(str(e), allow_module_level=True)


def backend_impls():
    """(backend, impl) pairs for parametrisation; an unavailable backend gives one pair that skips."""
    pairs = []
    for name in backends.names():
        try:
            pairs += [(name, impl) for impl in backends.load(name).IMPLS]
        except backends.BackendUnavailable:
            pairs.append((name, "unavailable"))
    return pairs


# Every backend's bn.py opens with the textbook formulation of its source; its speed-tuned
# from-scratch kernels must compute the same. Cases: (x shape, input mean), std 1, float64.
TEXTBOOK_CASES = {"2d": ((16, 5), 1.5), "4d": ((6, 4, 5, 3), 1.5),
                  "2d-mean1e4": ((16, 5), 1e4), "4d-mean1e4": ((6, 4, 5, 3), 1e4)}
# Error relative to max(1, |textbook|) (common.reference.error). The tuned kernels, and the
# reference the textbook itself is checked against, regroup the same arithmetic (other summation
# orders, rsqrt times gamma, sums as matrix products), so they differ by a few roundings:
# measured <= 6e-16 at mean 1.5. At mean 1e4 the roundings are of the mean: summed in another
# order over m <= 90 values it is off by up to ~log2(90) = 7 ulps of 1e4, and centring exposes
# that at the scale of x - mean (std 1), in y, dx and dgamma = sum(dy * x_hat): the bound is
# 7 * eps * 1e4 = 1.6e-11, twice that is the tolerance; measured up to 7.8e-12 (torch, dgamma).
TEXTBOOK_TOL = {1.5: 1e-13, 1e4: 2 * 7 * float(np.finfo(np.float64).eps) * 1e4}


def assert_matches_textbook(runs: dict, want: dict, mean: float) -> None:
    """Every run {name: {quantity: array}} equals the textbook's `want` within TEXTBOOK_TOL."""
    from common.reference import RESULT_KEYS, error

    worst = {}
    for name, got in runs.items():
        for k in RESULT_KEYS:
            rel = error(got[k], want[k])[1]  # inf when the shapes differ
            worst[f"{name} {k}"] = rel
            assert rel <= TEXTBOOK_TOL[mean], f"{name} {k}: relative error {rel:.3g} vs the textbook"
    print(f"max relative error {max(worst.values()):.3g} ({max(worst, key=worst.get)})")
