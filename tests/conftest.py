"""Shared fixtures: the real Fashion-MNIST sample that sits beside the checkout."""
import os
import pathlib

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
