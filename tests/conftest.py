"""Shared fixtures."""
import math
import os
from unittest import mock

import pytest
import torch

_SESSION_CACHE = os.environ.get("SCTLIB_CACHE") or None


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory):
    """A state dict with torch-fidelity's InceptionV3 layout and random values (He-normal convs, identity BN).

    For plumbing tests only: FIDs computed with it mean nothing.
    """
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
         mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in net.state_dict().items():
        if k.endswith("conv.weight") or k == "fc.weight":
            fan_in = v[0].numel()
            v = torch.randn(v.shape, generator=g) * math.sqrt(2.0 / fan_in)
        sd[k] = v.clone()
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(sd, path)
    return path


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
