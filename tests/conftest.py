"""Shared fixtures."""
import os

import pytest

# The cache as the session started (fixed at import): some tests point $SCTLIB_CACHE at a temporary folder
# for a while, and a session fixture first used inside one of them must not look there.
_SESSION_CACHE = os.environ.get("SCTLIB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sctlib")


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory):
    """A state dict with torch-fidelity's InceptionV3 layout and random values (He-normal convs, identity BN).

    For plumbing tests only: FIDs computed with it mean nothing.
    """
    from sctlib.pipeline import random_inception_weights as write_random

    return write_random(tmp_path_factory.mktemp("inception") / "random-inception.pth")


@pytest.fixture(scope="session")
def real_inception_file():
    """The FID InceptionV3 weights installed by ``python -m sctlib.metrics install-inception`` (``make setup``
    runs it, so CI always has them); skipped, saying how to install them, where they are absent."""
    from sctlib.metrics import inception_weights as W

    # the cache as the session started: some tests point $SCTLIB_CACHE at a temporary folder for a while
    p = W.installed_inception_path(_SESSION_CACHE)
    if not p.is_file():
        pytest.skip(f"FID InceptionV3 weights not installed at {p}: run `python -m sctlib.metrics install-inception` "
                    "(make setup does)")
    return p
