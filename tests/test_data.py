"""Tests for sctlib.data: embedded digits and toys, exact posterior means, the EDM zip reader/writer."""
import io
import json
import math
import pickle
import zipfile

import numpy as np
import pytest
import torch

import sctlib.data as sd
from sctlib.data import edmzip


# ------------------------------------------------------------------------------------------------
# digits


@pytest.mark.parametrize("res", [8, 16, 32])
@pytest.mark.parametrize("name", ["digits", "digits-pad"])
def test_digits_shapes_range_labels(name, res):
    ds = sd.load_dataset(name, resolution=res, cond=True)
    X, y = ds.tensors()
    assert len(ds) == 1797 and X.shape == (1797, 1, res, res) and ds.shape == (1, res, res)
    assert X.dtype == torch.float32 and y.dtype == torch.int64
    assert X.min() == -1.0 and X.max() <= 1.0 and X.max() > 0.9
    assert ds.label_dim == 10 and set(y.tolist()) == set(range(10))
    x0, l0 = ds[5]
    assert torch.equal(x0, X[5]) and l0 == int(y[5])


def test_digits_pad_keeps_pixels_and_resize_matches_at_8():
    X8, y8 = sd.digits_images(8)
    Xp, yp = sd.digits_images(32, layout="pad")
    assert torch.equal(y8, yp)
    assert torch.equal(Xp[:, :, 12:20, 12:20], X8)  # the 8x8 block sits in the centre
    border = Xp.clone()
    border[:, :, 12:20, 12:20] = -1.0
    assert bool((border == -1.0).all())  # everything else is background
    # raw 0..16 intensities map exactly to [-1, 1]
    from sklearn.datasets import load_digits

    raw = torch.as_tensor(load_digits().images, dtype=torch.float32)
    assert torch.allclose(X8[:, 0], raw / 8.0 - 1.0, atol=1e-6)


def test_digits_unconditional_and_bad_args():
    assert sd.load_dataset("digits").label_dim == 0
    with pytest.raises(ValueError, match="resolution must be one of"):
        sd.load_dataset("digits", resolution=12)
    with pytest.raises(ValueError, match="xflip"):
        sd.load_dataset("digits", xflip=True)
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*digits"):
        sd.load_dataset("mnist")
    with pytest.raises(ValueError, match="valid:.*ring"):
        sd.load_dataset("toy2d-spiral")


# ------------------------------------------------------------------------------------------------
# 2-D toys


@pytest.mark.parametrize("mix", ["ring", "grid"])
def test_toy_dataset_scale_and_determinism(mix):
    ds = sd.load_dataset(f"toy2d-{mix}", seed=3)
    X, comp = ds.tensors()
    assert X.shape == (50_000, 2) and ds.shape == (2,) and ds.label_dim == 0
    std = X.std(0)
    # measured: ring 0.497, grid 0.496 per coordinate (closed form); sample within 0.01 of it
    assert torch.allclose(std, torch.full((2,), ds.mixture.data_std(), dtype=std.dtype), atol=0.01)
    assert 0.45 < ds.mixture.data_std() < 0.55
    assert torch.equal(X, sd.load_dataset(f"toy2d-{mix}", seed=3).tensors()[0])
    assert not torch.equal(X, sd.load_dataset(f"toy2d-{mix}", seed=4).tensors()[0])
    assert sd.load_dataset(f"toy2d-{mix}", cond=True).label_dim == ds.mixture.num_components
    # every component is represented in proportion to its weight
    freq = torch.bincount(comp, minlength=ds.mixture.num_components).double() / len(comp)
    assert torch.allclose(freq, ds.mixture.weights, atol=0.01)


@pytest.mark.parametrize("mix", ["ring", "two"])
@pytest.mark.parametrize("t", [0.0, 0.3])
def test_mixture_density_integrates_to_one(mix, t):
    m = sd.make_mixture(mix)
    h = 0.01
    g = torch.arange(-2.5, 2.5, h, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    mass = m.log_prob(pts, t).exp().sum() * h * h
    assert abs(float(mass) - 1.0) < 1e-3


@pytest.mark.parametrize("mix", ["ring", "grid", "two"])
def test_mixture_score_is_gradient_of_log_density(mix):
    torch.manual_seed(0)
    m = sd.make_mixture(mix)
    x = (torch.randn(64, 2, dtype=torch.float64) * 0.6).requires_grad_(True)
    t = torch.rand(64, dtype=torch.float64) * 2 + 0.01
    (grad,) = torch.autograd.grad(m.log_prob(x, t).sum(), x)
    assert torch.allclose(m.score(x.detach(), t), grad, rtol=1e-9, atol=1e-9)


def test_mixture_posterior_mean_tweedie_and_gaussian_closed_form():
    torch.manual_seed(0)
    m = sd.make_mixture("ring")
    x = torch.randn(100, 2, dtype=torch.float64)
    for t in (0.01, 0.2, 1.0, 10.0):
        assert torch.allclose(m.posterior_mean(x, t), x + t**2 * m.score(x, t), atol=1e-10)
    g = sd.make_mixture("gauss")  # N(0, s^2): E[x0|xt] = s^2 / (s^2 + t^2) xt
    assert torch.allclose(g.posterior_mean(x, 0.7), x * 0.25 / (0.25 + 0.49), atol=1e-12)


def test_mixture_posterior_mean_is_the_mse_optimal_denoiser():
    """Monte Carlo: E[x0 | xt] beats shifted or shrunk estimators and has the right mean (tower rule)."""
    m = sd.make_mixture("ring")
    g = torch.Generator().manual_seed(1)
    x0, _ = m.sample(200_000, generator=g)
    x0 = x0.double()
    t = 0.4
    xt = x0 + t * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    pm = m.posterior_mean(xt, t)
    mse = ((pm - x0) ** 2).sum(1).mean()
    for other in (pm * 0.95, pm + 0.02, xt * 0.25 / (0.25 + t * t)):
        assert mse < ((other - x0) ** 2).sum(1).mean()
    assert torch.allclose(pm.mean(0), x0.mean(0), atol=5e-3)
    # orthogonality: the residual is uncorrelated with functions of xt
    resid = x0 - pm
    assert float((resid * xt).mean().abs()) < 5e-3


def test_mixture_sample_reproducible_with_generator():
    m = sd.make_mixture("grid")
    a = m.sample(10, generator=torch.Generator().manual_seed(7))
    b = m.sample(10, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# exact posterior mean of a finite set


def _brute_posterior_mean(xt, t, data):
    xt, data = xt.double().reshape(len(xt), -1), data.double().reshape(len(data), -1)
    d2 = ((xt[:, None, :] - data[None]) ** 2).sum(-1)
    w = torch.softmax(-d2 / (2 * torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1) ** 2), dim=1)
    return w @ data


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_exact_posterior_mean_matches_brute_force(chunk):
    torch.manual_seed(0)
    data = torch.rand(300, 1, 4, 4) * 2 - 1
    xt = data[:5] + 0.3 * torch.randn(5, 1, 4, 4)
    t = torch.tensor([0.05, 0.1, 0.3, 1.0, 5.0])
    out = sd.exact_posterior_mean(xt, t, data, chunk_size=chunk)
    assert out.shape == xt.shape and out.dtype == torch.float32
    ref = _brute_posterior_mean(xt, t, data).reshape(xt.shape)
    assert torch.allclose(out.double(), ref, atol=1e-6)


def test_exact_posterior_mean_limits_and_dataset_input():
    torch.manual_seed(0)
    ds = sd.load_dataset("digits")
    X, _ = ds.tensors()
    xt = X[:4] + 1e-3 * torch.randn_like(X[:4])
    # small t: the softmax collapses onto the (unique) nearest data point, i.e. the clean image
    assert torch.allclose(sd.exact_posterior_mean(xt, 0.005, ds, chunk_size=500), X[:4], atol=1e-5)
    # huge t: uniform weights, the data mean
    far = sd.exact_posterior_mean(torch.zeros(2, 1, 8, 8), 1e4, X)
    assert torch.allclose(far, X.mean(0, keepdim=True).expand(2, -1, -1, -1), atol=1e-5)
    with pytest.raises(ValueError, match="t > 0"):
        sd.exact_posterior_mean(xt, 0.0, X)
    with pytest.raises(ValueError, match="shape"):
        sd.exact_posterior_mean(torch.zeros(2, 1, 16, 16), 1.0, X)


def test_exact_posterior_mean_of_a_large_sample_approaches_the_mixture():
    ds = sd.load_dataset("toy2d-ring")
    g = torch.Generator().manual_seed(2)
    x0, _ = ds.mixture.sample(256, generator=g)
    t = 0.5
    xt = x0 + t * torch.randn(x0.shape, generator=g)
    emp = sd.exact_posterior_mean(xt, t, ds)
    ana = ds.mixture.posterior_mean(xt, t)
    # 50k-point empirical measure vs the exact density: measured max error ~0.01 at t = 0.5
    assert float((emp - ana).abs().max()) < 0.03


# ------------------------------------------------------------------------------------------------
# image helpers


def test_to_uint8_and_grid(tmp_path):
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 2.0, -3.0])
    assert to_list(sd.to_uint8(x)) == [0, 0, 128, 191, 255, 255, 0]
    from PIL import Image

    imgs = torch.rand(10, 3, 8, 8) * 2 - 1
    p = sd.save_image_grid(imgs, tmp_path / "g" / "grid.png", nrow=4)
    im = Image.open(p)
    assert im.mode == "RGB" and im.size == (4 * 9 + 1, 3 * 9 + 1)
    arr = np.asarray(im)
    assert np.array_equal(arr[1:9, 1:9], sd.to_uint8(imgs[0]).permute(1, 2, 0).numpy())
    p = sd.save_image_grid(torch.zeros(4, 1, 8, 8), tmp_path / "grey.png")
    assert Image.open(p).mode == "L" and Image.open(p).size == (19, 19)
    with pytest.raises(ValueError, match="1 or 3"):
        sd.save_image_grid(torch.zeros(2, 2, 8, 8), tmp_path / "bad.png")


def to_list(t):
    return [int(v) for v in t]


# ------------------------------------------------------------------------------------------------
# EDM zip


def _random_images(n, c=3, res=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, res, res), generator=g, dtype=torch.uint8)


def test_edmzip_roundtrip_layout_and_labels(tmp_path):
    imgs = _random_images(1003)
    labels = torch.randint(0, 7, (1003,), generator=torch.Generator().manual_seed(1)).tolist()
    path = sd.write_edm_zip(tmp_path / "d.zip", imgs, labels)
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        assert "00000/img00000000.png" in names and "00001/img00001002.png" in names
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
        meta = json.loads(zf.read("dataset.json"))
        assert meta["labels"][1002] == ["00001/img00001002.png", labels[1002]]
    ds = sd.load_dataset("edmzip", path=str(path), cond=True)
    assert len(ds) == 1003 and ds.shape == (3, 8, 8) and ds.label_dim == max(labels) + 1
    for i in (0, 999, 1000, 1002):
        x, lab = ds[i]
        assert lab == labels[i]
        assert torch.equal(ds.image_uint8(i), imgs[i])
        assert torch.allclose(x, imgs[i].float() / 127.5 - 1)
        assert x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert torch.equal(ds.labels(), torch.tensor(labels))
    assert sd.load_dataset("edmzip", path=str(path)).label_dim == 0


def test_edmzip_xflip_preload_greyscale_unlabelled(tmp_path):
    imgs = _random_images(5, c=1, res=4)
    path = sd.write_edm_zip(tmp_path / "g.zip", imgs)
    ds = sd.EDMZipDataset(path, xflip=True, cache=False)
    assert len(ds) == 10 and ds.shape == (1, 4, 4) and ds.label_dim == 0 and ds[0][1] == -1
    assert torch.equal(ds.image_uint8(7), imgs[2].flip(-1))
    pre = sd.EDMZipDataset(path, xflip=True).preload()
    assert all(torch.equal(pre.image_uint8(i), ds.image_uint8(i)) for i in range(10))


def test_edmzip_dataloader_workers(tmp_path):
    imgs = _random_images(24, res=4)
    path = sd.write_edm_zip(tmp_path / "w.zip", imgs, list(range(24)))
    ds = sd.EDMZipDataset(path)
    _ = ds[0]  # opens the handle in this process; it must not be pickled to workers
    pickle.dumps(ds)
    dl = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, shuffle=False)
    xs, ys = zip(*dl)
    assert torch.equal(torch.cat(ys), torch.arange(24))
    assert torch.allclose(torch.cat(xs), imgs.float() / 127.5 - 1)


def test_edmzip_writer_is_atomic_and_validates(tmp_path):
    dst = tmp_path / "a.zip"
    with pytest.raises(ValueError, match="size/mode 4x4x3 differs"):
        with sd.EDMZipWriter(dst) as w:
            w.add(np.zeros((8, 8, 3), np.uint8), 0)
            w.add(np.zeros((4, 4, 3), np.uint8), 0)
    assert not dst.exists() and list(tmp_path.iterdir()) == []  # no output, no temp file
    with pytest.raises(ValueError, match="power-of-two"):
        sd.write_edm_zip(dst, np.zeros((2, 6, 6, 3), np.uint8))
    with pytest.raises(ValueError, match="every image has a label or none"):
        with sd.EDMZipWriter(dst) as w:
            w.add(np.zeros((4, 4), np.uint8), 1)
            w.add(np.zeros((4, 4), np.uint8), None)
    with pytest.raises(ValueError, match="3 labels for 2 images"):
        sd.write_edm_zip(dst, np.zeros((2, 4, 4, 3), np.uint8), [0, 1, 2])
    assert list(tmp_path.iterdir()) == []
    # an existing destination survives a failed rewrite untouched
    sd.write_edm_zip(dst, np.zeros((2, 4, 4, 3), np.uint8), [0, 1])
    before = dst.read_bytes()
    with pytest.raises(RuntimeError):
        with sd.EDMZipWriter(dst) as w:
            w.add(np.ones((4, 4, 3), np.uint8), 0)
            raise RuntimeError("interrupted")
    assert dst.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["a.zip"]


def _zip_with(tmp_path, members, name="bad.zip"):
    p = tmp_path / name
    with zipfile.ZipFile(p, "w") as zf:
        for k, v in members.items():
            zf.writestr(k, v)
    return p


def _png(arr, mode=None):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_edmzip_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m sctlib.data convert cifar10"):
        sd.load_dataset("cifar10", path=str(tmp_path / "missing.zip"))
    with pytest.raises(FileNotFoundError, match="python -m sctlib.data convert"):
        sd.load_dataset("edmzip")
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(ValueError, match="corrupt.zip.*not a valid zip"):
        sd.EDMZipDataset(corrupt)
    rgb = np.zeros((4, 4, 3), np.uint8)
    p = _zip_with(tmp_path, {"00000/img00000000.png": _png(rgb), "00000/img00000001.png": _png(rgb),
                             "dataset.json": json.dumps({"labels": [["00000/img00000000.png", 1]]})})
    with pytest.raises(ValueError, match="1 labels but the zip has 2 images"):
        sd.EDMZipDataset(p)
    p = _zip_with(tmp_path, {"00000/img00000000.png": _png(rgb), "00000/img00000001.png": _png(np.zeros((8, 8, 3), np.uint8))}, "size.zip")
    ds = sd.EDMZipDataset(p)
    with pytest.raises(ValueError, match="img00000001.png.*8x8.*expected 4x4"):
        ds[1]
    p = _zip_with(tmp_path, {"00000/img00000000.png": _png(np.zeros((4, 4, 4), np.uint8), "RGBA")}, "mode.zip")
    with pytest.raises(ValueError, match="img00000000.png.*mode 'RGBA'"):
        sd.EDMZipDataset(p)
    p = _zip_with(tmp_path, {"00000/img00000000.png": b"not a png"}, "junk.zip")
    with pytest.raises(ValueError, match="img00000000.png.*cannot read image"):
        sd.EDMZipDataset(p)
    p = sd.write_edm_zip(tmp_path / "ok32.zip", np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="8x8 images but resolution=32"):
        sd.load_dataset("cifar10", path=str(p))


def test_dataset_fingerprint_tracks_content(tmp_path):
    imgs = _random_images(4, res=4)
    a = sd.write_edm_zip(tmp_path / "a.zip", imgs, [0, 1, 2, 3])
    b = sd.write_edm_zip(tmp_path / "b.zip", imgs, [0, 1, 2, 3])
    imgs2 = imgs.clone()
    imgs2[2, 0, 1, 1] ^= 1
    c = sd.write_edm_zip(tmp_path / "c.zip", imgs2, [0, 1, 2, 3])
    d = sd.write_edm_zip(tmp_path / "d.zip", imgs, [0, 1, 2, 2])
    fa = sd.dataset_fingerprint(a)
    assert fa == sd.dataset_fingerprint(b)
    assert fa != sd.dataset_fingerprint(c) and fa != sd.dataset_fingerprint(d)


def test_data_package_does_not_import_networks_or_train():
    """The layering (data below models), checked on the source: no module of sctlib/data imports networks or train
    (absolute or relative, at any depth). (``import sctlib`` itself loads every module, so a runtime
    sys.modules check would test the package's __init__, not this package.)"""
    import ast
    from pathlib import Path

    import sctlib.data

    offenders = []
    for f in sorted(Path(sctlib.data.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ("." * node.level) + (node.module or "")
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for n in names:
                if any(seg in ("networks", "train") for seg in n.replace("..", ".").split(".")):
                    offenders.append(f"{f.name}: {n}")
    assert not offenders, offenders
    assert len(list(Path(sctlib.data.__file__).parent.glob("*.py"))) >= 5


def test_synthetic_images_are_seeded_uint8_grid_images_with_labels_or_class_cycles():
    from sctlib.config import get_preset
    from sctlib.data import SyntheticImages

    a, b = SyntheticImages((3, 4, 4), 12, 10), SyntheticImages((3, 4, 4), 12, 10)
    X, y = a.tensors()
    assert X.shape == (12, 3, 4, 4) and torch.equal(X, b.tensors()[0]) and torch.equal(y, b.tensors()[1])
    k = (X + 1) * 127.5                                                   # the uint8 level of each value
    assert (k - k.round()).abs().max() < 1e-4 and X.min() >= -1 and X.max() <= 1
    assert int(y.max()) < 10 and len(set(y.tolist())) > 1
    assert SyntheticImages((3, 4, 4), 12, 10, classes=4).tensors()[1].tolist() == [0, 1, 2, 3] * 3
    assert not SyntheticImages((3, 4, 4), 6).tensors()[1].any()          # unconditional: label 0
    cfg = get_preset("digits-sct")
    ds = SyntheticImages.for_config(cfg, 5)
    assert ds.shape == (1, 8, 8) and ds.label_dim == (10 if cfg.cond else 0) and len(ds) == 5
