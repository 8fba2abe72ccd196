"""Tests for sctlib.metrics: Frechet/kernel distances, the digits classifier and its Frechet distance,
torch-fidelity registration, the Inception FID plumbing, and the exact 2-D toy metrics."""
import math
import os
import warnings
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch

import sctlib.metrics as M
from sctlib.data import digits_images, make_mixture, to_uint8, write_edm_zip
from sctlib.metrics import features as feat_mod
from sctlib.metrics import inception as inc_mod


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread (torch and BLAS) for every test here. On the shared 2-core machine, with other jobs
    running, InceptionV3 ran a 4-image forward in 1.2 s with one thread vs 8.3 s with two (OpenMP
    oversubscription), and the digits tests slowed the same way."""
    from threadpoolctl import threadpool_limits  # the same for BLAS: a 2048-d eigh took 27 s vs 2.8 s

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------
# Frechet and kernel distances


def _scipy_fd(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _random_gaussian_features(rng, n, dim, scale=1.0, shift=0.0):
    a = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return rng.normal(size=(n, dim)) @ a * scale + shift


@pytest.mark.parametrize("dim", [2, 16, 64])
def test_frechet_distance_matches_scipy_sqrtm_float64(dim):
    rng = np.random.default_rng(dim)
    f1 = _random_gaussian_features(rng, 4 * dim + 50, dim)
    f2 = _random_gaussian_features(rng, 4 * dim + 80, dim, scale=1.3, shift=0.2)
    mu1, s1 = M.feature_stats(f1)
    mu2, s2 = M.feature_stats(f2)
    ours, ref = M.frechet_distance(mu1, s1, mu2, s2), _scipy_fd(mu1, s1, mu2, s2)
    assert ref > 0.1
    assert ours == pytest.approx(ref, rel=1e-8, abs=1e-10)
    # symmetric, and torch inputs work the same
    assert M.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ours, rel=1e-9)
    assert M.frechet_distance(torch.from_numpy(mu1), torch.from_numpy(s1), mu2, s2) == pytest.approx(ours, rel=1e-12)


def test_frechet_distance_rank_deficient_matches_sample_space_formula():
    """Fewer samples than dimensions (both covariances singular, the Cholesky path fails): with centred
    features A1, A2, tr((S1 S2)^{1/2}) is the nuclear norm of A1 A2^T / sqrt((n1 - 1)(n2 - 1))."""
    rng = np.random.default_rng(5)
    f1, f2 = rng.normal(size=(6, 40)), rng.normal(size=(9, 40)) * 1.5 + 0.1
    a1, a2 = f1 - f1.mean(0), f2 - f2.mean(0)
    tr = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / np.sqrt(5 * 8)
    (mu1, s1), (mu2, s2) = M.feature_stats(f1), M.feature_stats(f2)
    expect = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expect, rel=1e-8)


def test_frechet_distance_closed_form_diagonal():
    a, b = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expect = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # ||dmu||^2 + sum (sqrt a - sqrt b)^2 = 5 + 2
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect, rel=1e-12)


def test_frechet_self_is_zero_and_noise_raises_it_monotonically():
    rng = np.random.default_rng(0)
    f = _random_gaussian_features(rng, 2000, 32)
    mu, s = M.feature_stats(f)
    assert M.frechet_distance(mu, s, mu, s) < 1e-9
    noise = rng.normal(size=f.shape)
    fds = [M.frechet_distance_from_features(f, f + a * noise) for a in (0.05, 0.1, 0.2, 0.4, 0.8)]
    assert fds[0] < 0.01 * fds[-1]
    assert all(x < y for x, y in zip(fds, fds[1:])), fds


def test_feature_stats_unbiased_and_errors():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(7, 3))
    mu, s = M.feature_stats(torch.from_numpy(f).float())
    assert mu.dtype == np.float64 and s.dtype == np.float64
    centred = f - f.mean(0)
    assert np.allclose(s, centred.T @ centred / 6, atol=1e-6)  # divides by N - 1
    with pytest.raises(ValueError, match="at least 2"):
        M.feature_stats(f[:1])
    with pytest.raises(ValueError, match=r"\[N, F\]"):
        M.feature_stats(f[0])
    with pytest.raises(ValueError, match="shape mismatch"):
        M.frechet_distance(mu, s, mu[:2], s[:2, :2])
    bad = s.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="sigma1 contains NaN"):
        M.frechet_distance(mu, bad, mu, s)


def test_kernel_distance_matches_torch_fidelity_and_detects_shift():
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = np.random.default_rng(2)
    f1 = rng.normal(size=(60, 8)).astype(np.float32)
    f2 = (rng.normal(size=(60, 8)) + 0.5).astype(np.float32)
    # with subset = whole set the subset draw is a permutation and MMD^2 is permutation invariant
    ours = M.kernel_distance(f1, f2, num_subsets=3, subset_size=60)
    tf = kid_features_to_metric(torch.from_numpy(f1), torch.from_numpy(f2), kid_subsets=3, kid_subset_size=60,
                                kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                kid_kernel_poly_coef0=1, rng_seed=0, verbose=False)
    assert ours[0] == pytest.approx(tf["kernel_inception_distance_mean"], rel=1e-5)
    same = M.kernel_distance(f1, rng.normal(size=(60, 8)), num_subsets=20, subset_size=50)[0]
    assert abs(same) < 0.2 * ours[0]


# ------------------------------------------------------------------------------------------------
# digits classifier and its Frechet distance


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    """A fresh cache: the classifier is trained once here (about 10 s), then loaded."""
    d = tmp_path_factory.mktemp("sctlib-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCTLIB_CACHE", str(d))
        feat_mod._LOADED.clear()
        feat_mod._REF_STATS.clear()
        yield d
        feat_mod._LOADED.clear()
        feat_mod._REF_STATS.clear()


def test_digits_classifier_trains_reproducibly_and_is_accurate(digits_cache):
    state = torch.random.get_rng_state()
    clf = M.digits_classifier()
    assert torch.equal(state, torch.random.get_rng_state())  # training does not disturb the global RNG
    # measured: 0.9775 held-out accuracy (400 digits), about 10 s on one core
    assert clf.held_out_accuracy > 0.95
    files = sorted(p.name for p in digits_cache.iterdir())
    assert any(f.endswith(".safetensors") for f in files) and any(f.endswith(".json") for f in files)
    import hashlib
    import json

    meta = json.loads(clf.path.with_suffix(".json").read_text())
    assert meta["sha256"] == hashlib.sha256(clf.path.read_bytes()).hexdigest() == clf.sha256
    # a fresh process-level load reads the file (no retraining) and gives the same weights
    feat_mod._LOADED.clear()
    with mock.patch.object(feat_mod, "_train", side_effect=AssertionError("should not retrain")):
        again = M.digits_classifier()
    assert again.sha256 == clf.sha256 and again.held_out_accuracy == clf.held_out_accuracy
    X, _ = digits_images(8)
    assert torch.equal(again(X[:16]), clf(X[:16]))


def test_digits_classifier_hash_mismatch_retrains(tmp_path):
    calls = []

    def fake_train(recipe):
        calls.append(1)
        return feat_mod.DigitsClassifier(recipe["width"], recipe["feature_dim"]).eval(), 0.5, 0.0

    with mock.patch.object(feat_mod, "_train", fake_train):
        feat_mod._LOADED.clear()
        first = M.digits_classifier(tmp_path)
        feat_mod._LOADED.clear()
        M.digits_classifier(tmp_path)
        assert len(calls) == 1  # second call loaded the verified file
        data = bytearray(first.path.read_bytes())
        data[-1] ^= 0xFF
        first.path.write_bytes(bytes(data))
        feat_mod._LOADED.clear()
        with pytest.warns(UserWarning, match="SHA-256 does not match"):
            M.digits_classifier(tmp_path)
        assert len(calls) == 2
    feat_mod._LOADED.clear()


def test_fd_digits_and_class_accuracy_on_real_and_corrupted_digits(digits_cache):
    X, y = digits_images(8)
    _, te = M.digits_split()
    assert M.fd_digits(X, ref="all") < 1e-6  # the reference set against itself
    fd_real = M.fd_digits(X[te])  # 400 held-out digits vs the 1,397 training digits
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(X[te].shape, generator=g)
    fds = [M.fd_digits((X[te] + s * noise).clamp(-1, 1)) for s in (0.1, 0.2, 0.4)]
    fd_uniform = M.fd_digits(torch.rand(400, 1, 8, 8, generator=g) * 2 - 1)
    # measured: real 12.6, noise 0.1/0.2/0.4 -> 14.9/22.3/50.9, uniform noise ~770
    assert fd_real < 25 and fd_uniform > 20 * fd_real
    assert fd_real < fds[0] < fds[1] < fds[2] < fd_uniform
    assert M.class_accuracy(X[te], y[te]) > 0.95
    assert M.class_accuracy(X[te], y[te].roll(1)) < 0.3  # labels shifted by one sample: mostly wrong
    for res in (16, 32):  # resized digits, brought back to 8x8
        Xr, _ = digits_images(res)
        assert M.fd_digits(Xr[te]) < 25
        assert M.class_accuracy(Xr[te], y[te]) > 0.95
        Xp, _ = digits_images(res, layout="pad")
        assert M.fd_digits(Xp[te], layout="pad") == pytest.approx(fd_real, rel=1e-5)
    ext = M.DigitsFeatures()
    assert ext(X[:4]).shape == (4, 128)
    u8 = to_uint8(X[:4])  # uint8 input is read as u / 127.5 - 1
    assert torch.allclose(ext(u8), ext(u8.float() / 127.5 - 1), atol=1e-5)
    with pytest.raises(ValueError, match="ref must be"):
        M.fd_digits(X, ref="test")
    with pytest.raises(ValueError, match="3 labels for 4 images"):
        M.class_accuracy(X[:4], y[:3])


def test_digits_extractor_registered_with_torch_fidelity(digits_cache):
    import torch_fidelity

    name = M.register_with_torch_fidelity()
    assert M.register_with_torch_fidelity() == name  # idempotent
    X, _ = digits_images(16)
    a, b = to_uint8(X[:300]).expand(-1, 3, -1, -1), to_uint8(X[300:700]).expand(-1, 3, -1, -1)

    class U8(torch.utils.data.Dataset):
        def __init__(self, t):
            self.t = t

        def __len__(self):
            return len(self.t)

        def __getitem__(self, i):
            return self.t[i]

    out = torch_fidelity.calculate_metrics(input1=U8(a), input2=U8(b), fid=True, kid=True, kid_subset_size=300,
                                           kid_subsets=2, feature_extractor=name, cuda=False, cache=False,
                                           verbose=False, batch_size=100)
    ref = M.compute_stats(M.extract_features(b, M.DigitsFeatures(), device="cpu"))
    ours = M.fid(a, ref, extractor=M.DigitsFeatures(), device="cpu")
    # the same features through torch-fidelity's FID formula and ours
    assert out["frechet_inception_distance"] == pytest.approx(ours, rel=1e-4)
    assert out["kernel_inception_distance_mean"] > 0


def test_streaming_stats_equal_batch_stats_and_workers(digits_cache, tmp_path):
    X, _ = digits_images(8)
    ext = M.DigitsFeatures()
    full = M.compute_stats(M.extract_features(X, ext, device="cpu"))
    st = M.streaming_stats(X, ext, batch_size=100, device="cpu")  # 18 uneven batches
    assert int(st["n"]) == 1797
    assert np.allclose(st["mu"], full["mu"], rtol=1e-9, atol=1e-9)
    assert np.allclose(st["sigma"], full["sigma"], rtol=1e-7, atol=1e-7 * np.abs(full["sigma"]).max())
    # an EDM zip read by 2 DataLoader workers gives the same statistics as the in-memory uint8 images
    zpath = write_edm_zip(tmp_path / "d.zip", X[:300])
    a = M.streaming_stats(zpath, ext, batch_size=64, device="cpu", num_workers=2)
    b = M.streaming_stats(to_uint8(X[:300]), ext, batch_size=64, device="cpu")
    assert np.allclose(a["mu"], b["mu"], rtol=1e-12) and np.allclose(a["sigma"], b["sigma"], rtol=1e-10, atol=1e-10)


def test_fid_multi_seed_with_a_generate_callable(digits_cache):
    """The FID-50k machinery, with the cheap digits extractor: disjoint seed sets, mean/sd/min."""
    X, _ = digits_images(8)
    ref = M.compute_stats(M.extract_features(X, M.DigitsFeatures(), device="cpu"))
    seen = []

    def generate(seeds):
        seen.append(seeds.clone())
        # one real digit per seed, picked by the seed (a deterministic stand-in for a sampler)
        idx = torch.tensor([int(torch.randint(0, 1797, (1,), generator=torch.Generator().manual_seed(int(s)))) for s in seeds])
        return to_uint8(X[idx])

    res = M.fid_multi_seed(generate, ref, num_images=60, seeds=(0, 1, 2), batch_size=25, extractor=M.DigitsFeatures(),
                           device="cpu", progress=False)
    allseeds = torch.cat(seen)
    assert allseeds.tolist() == list(range(180))  # set s = seeds s*60 .. s*60+59, in batches of <= 25
    assert max(len(s) for s in seen) == 25
    assert len(res["values"]) == 3 and res["min"] == min(res["values"])
    assert res["mean"] == pytest.approx(np.mean(res["values"])) and res["sd"] == pytest.approx(np.std(res["values"], ddof=1))
    assert res["sd"] > 0  # different seed sets give different images
    again = M.fid_multi_seed(generate, ref, num_images=60, seeds=(1,), batch_size=60, extractor=M.DigitsFeatures(),
                             device="cpu", progress=False)
    # same images, other batch size: equal up to float32 summation order (measured rel diff 6e-8)
    assert again["values"][0] == pytest.approx(res["values"][1], rel=1e-5) and again["sd"] == 0.0
    with pytest.raises(ValueError, match="one image per seed"):
        M.fid(lambda s: torch.zeros(1, 1, 8, 8, dtype=torch.uint8), ref, extractor=M.DigitsFeatures(),
              num_images=4, device="cpu")


# ------------------------------------------------------------------------------------------------
# Inception: weights resolution and an end-to-end run with random weights


def test_inception_weights_missing_says_where(tmp_path, monkeypatch):
    monkeypatch.delenv("SCTLIB_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setenv("SCTLIB_CACHE", str(tmp_path / "cache"))  # no installed copy here
    with pytest.raises(M.InceptionWeightsMissing) as e:
        M.resolve_inception_weights()
    msg = str(e.value)
    assert str(tmp_path / "th" / "hub" / "checkpoints" / M.INCEPTION_FILENAME) in msg
    assert str(M.installed_inception_path()) in msg and "install-inception" in msg
    assert M.INCEPTION_URL in msg and "SCTLIB_INCEPTION_WEIGHTS" in msg and "weights_path" in msg
    assert isinstance(e.value, FileNotFoundError)
    with pytest.raises(M.InceptionWeightsMissing, match="nope.pth \\(weights_path argument\\)"):
        M.resolve_inception_weights(tmp_path / "nope.pth")
    monkeypatch.setenv("SCTLIB_INCEPTION_WEIGHTS", str(tmp_path / "env.pth"))
    with pytest.raises(M.InceptionWeightsMissing, match="env.pth \\(\\$SCTLIB_INCEPTION_WEIGHTS\\)"):
        M.resolve_inception_weights()
    with pytest.raises(M.InceptionWeightsMissing):
        M.fid(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), {"mu": np.zeros(2048), "sigma": np.eye(2048)})


# random_inception_weights: see tests/conftest.py


@pytest.mark.slow  # ~5 s alone; measured 20 s on the 2-core machine under load (InceptionV3 at 299x299 on CPU)
def test_inception_plumbing_only_with_random_weights(random_inception_weights, tmp_path, monkeypatch):
    """Plumbing only: random weights, so the numbers mean nothing; checks shapes, caching, seeds, env var."""
    monkeypatch.setenv("SCTLIB_INCEPTION_WEIGHTS", str(random_inception_weights))
    ext = M.InceptionFeatures()
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (4, 3, 16, 16), generator=g, dtype=torch.uint8)
    f = ext(real)
    assert f.shape == (4, 2048) and bool(torch.isfinite(f).all()) and float(f.std()) > 0
    assert torch.allclose(ext(real[:2, :1]), ext(real[:2, :1].expand(-1, 3, -1, -1)))  # grey -> RGB
    zpath = write_edm_zip(tmp_path / "real.zip", real, [0, 1, 0, 1])
    cache = tmp_path / "refs"
    stats = M.inception_reference_stats(zpath, cache_dir=cache, extractor=ext, keep_features=True, device="cpu", progress=False)
    assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048) and int(stats["n"]) == 4
    assert np.allclose(stats["mu"], f.double().mean(0).numpy(), rtol=1e-4, atol=1e-6)  # zip pixels = the tensor's
    cached = list(cache.glob("inception-v3-compat-*.npz"))
    assert len(cached) == 1
    with mock.patch.object(inc_mod, "extract_features", side_effect=AssertionError("cache miss")):
        again = M.inception_reference_stats(zpath, cache_dir=cache, device="cpu")
    assert np.array_equal(again["mu"], stats["mu"])
    # the same images against their own statistics: ~0; against other images: > 0
    assert M.fid(real, stats, extractor=ext, device="cpu") < 1e-6 * max(1.0, float(np.trace(stats["sigma"])))
    calls = []

    def generate(seeds):
        calls.append(seeds.tolist())
        gg = torch.Generator().manual_seed(int(seeds[0]) + 1000)
        return torch.randint(0, 256, (len(seeds), 3, 16, 16), generator=gg, dtype=torch.uint8)

    res = M.fid_multi_seed(generate, cached[0], num_images=3, seeds=(0, 1), batch_size=2, device="cpu", progress=False)
    assert calls == [[0, 1], [2], [3, 4], [5]]
    assert all(v > 0 and math.isfinite(v) for v in res["values"]) and res["min"] <= res["mean"]
    k = M.kid(real[:3], stats, extractor=ext, num_subsets=2, subset_size=3, device="cpu")
    assert math.isfinite(k["mean"]) and math.isfinite(k["std"])


@pytest.mark.slow  # ~10-40 s (machine load): 64 images through InceptionV3 at 299x299 on the CPU
def test_fid_with_real_inception_weights(real_inception_file, monkeypatch):
    """The default FID network (installed weights, see tests/test_inception_weights.py) end to end on digits."""
    monkeypatch.delenv("SCTLIB_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("SCTLIB_CACHE", str(real_inception_file.parents[1]))  # the cache as the session began
    assert M.resolve_inception_weights() == real_inception_file  # the installed copy is the default source
    ext = M.InceptionFeatures()
    X, _ = digits_images(32)
    a = to_uint8(X[:16]).expand(-1, 3, -1, -1)
    b = to_uint8(X[40:56]).expand(-1, 3, -1, -1)
    noise = torch.randint(0, 256, a.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    fa, fb, fn = (M.extract_features(x, ext, device="cpu") for x in (a, b, noise))
    stats_b = M.compute_stats(fb)
    assert bool((fa >= 0).all())  # pool features of a ReLU network
    fid_digits = M.frechet_distance_from_features(fa, fb)
    fid_noise = M.frechet_distance_from_features(fn, fb)
    # fid() itself (streaming statistics) on the same images: equal up to summation order
    assert M.fid(a, stats_b, extractor=ext, device="cpu") == pytest.approx(fid_digits, rel=1e-3)
    assert M.frechet_distance_from_features(fb, fb) < 1e-3
    assert fid_noise > 2 * fid_digits


# ------------------------------------------------------------------------------------------------
# 2-D toys


def test_sliced_wasserstein_exact_for_a_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 2, generator=g)
    v = torch.tensor([0.3, -0.4])  # |v| = 0.5
    assert M.sliced_wasserstein(x, x) == 0.0
    # a shifted copy: W2 along theta is |v . theta| exactly, so SW_2^2 = E[(v.theta)^2] = |v|^2 / 2
    sw = M.sliced_wasserstein(x, x + v, num_projections=4096, generator=g)
    assert sw == pytest.approx(0.5 / math.sqrt(2), rel=0.03)
    # reproducible with a generator, and unequal sample sizes work
    a = M.sliced_wasserstein(x, x[:700] + v, generator=torch.Generator().manual_seed(1))
    b = M.sliced_wasserstein(x, x[:700] + v, generator=torch.Generator().manual_seed(1))
    assert a == b and a == pytest.approx(0.5 / math.sqrt(2), rel=0.15)


def test_sliced_wasserstein_ranks_samples():
    m = make_mixture("ring")
    g = torch.Generator().manual_seed(0)
    ref, _ = m.sample(4000, generator=g)
    good, _ = m.sample(4000, generator=g)
    blurred = good + 0.2 * torch.randn(good.shape, generator=g)
    gauss = torch.randn(4000, 2, generator=g) * 0.5
    sw = [M.sliced_wasserstein(ref, s, generator=torch.Generator().manual_seed(3)) for s in (good, blurred, gauss)]
    # measured: about 0.01, 0.06, 0.07
    assert sw[0] < 0.03 and sw[0] < 0.5 * sw[1] and sw[0] < 0.5 * sw[2]


def test_toy_nll_and_mode_coverage():
    g = torch.Generator().manual_seed(0)
    gauss = make_mixture("gauss")
    x, _ = gauss.sample(200_000, generator=g)
    # NLL of exact samples = differential entropy; for N(0, s^2 I) in 2-D that is log(2 pi e s^2)
    assert M.toy_nll(x, gauss) == pytest.approx(math.log(2 * math.pi * math.e * 0.25), abs=0.01)
    ring = make_mixture("ring")
    xr, comp = ring.sample(8000, generator=g)
    assert M.toy_nll(xr, ring) < M.toy_nll(xr + 0.1 * torch.randn(xr.shape, generator=g), ring)
    cov = M.mode_coverage(xr, ring)
    assert cov["covered"] == 1.0 and cov["on_mode"] > 0.98
    half = M.mode_coverage(xr[comp < 4], ring)
    assert half["covered"] == 0.5
    allm = M.toy_metrics(xr, ring, num_reference=4000)
    assert set(allm) == {"sliced_wasserstein", "nll", "covered", "on_mode"} and allm["sliced_wasserstein"] < 0.03
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        M.toy_nll(torch.zeros(3, 3), ring)


def test_metrics_import_does_not_need_torch_fidelity():
    """torch-fidelity is an optional extra: no module of sctlib/metrics imports it at module level
    (only inside the functions that use it)."""
    import ast
    from pathlib import Path

    files = sorted(Path(M.__file__).parent.glob("*.py"))
    assert len(files) >= 5
    for f in files:
        for node in ast.parse(f.read_text()).body:  # top-level statements only
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            assert not any(m.split(".")[0] == "torch_fidelity" for m in mods), f"{f.name} imports torch_fidelity at import time"
