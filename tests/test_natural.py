"""The embedded natural-image set: crop geometry and rounding, the recipe's determinism and balance, the zip
round trip, the hash checks, and the full default build with its recorded hash."""
import numpy as np
import pytest

from sctlib.data import EDMZipDataset, natural as N
from sctlib.data.__main__ import main as data_main


def _ramp_photo(H=200, W=230):
    """Channel 0 = row, channel 1 = column, channel 2 = 7: a crop's pixels reveal where it was cut."""
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([y, x, np.full_like(y, 7)], -1).astype(np.uint8)


def test_crops_are_block_means_of_a_window_rounded_half_up():
    R, n = 8, 400
    img = _ramp_photo()
    out = N._crops_of(img, n, R, np.random.RandomState(0), max_scale=4)
    assert out.shape == (n, R, R, 3) and out.dtype == np.uint8
    ks, flips = [], []
    for c in out:
        rows, cols = c[:, :, 0].astype(int), c[:, :, 1].astype(int)
        assert (rows == rows[:, :1]).all() and (c[:, :, 2] == 7).all()
        k = rows[1, 0] - rows[0, 0]
        assert 1 <= k <= 4 and (np.diff(rows[:, 0]) == k).all()
        flip = cols[0, 0] > cols[0, -1]
        if flip:
            cols = cols[:, ::-1]
        assert (np.diff(cols[0]) == k).all()
        # block mean of a ramp over k pixels starting at p: p + (k - 1) / 2, rounded half up = p + k // 2
        top, left = rows[0, 0] - k // 2, cols[0, 0] - k // 2
        assert 0 <= top and top + k * R <= img.shape[0] and 0 <= left and left + k * R <= img.shape[1]
        ks.append(k)
        flips.append(flip)
    assert set(ks) == {1, 2, 3, 4} and 0.4 < np.mean(flips) < 0.6
    with pytest.raises(ValueError, match="does not fit"):
        N._crops_of(img[:20, :20], 2, R, np.random.RandomState(0), max_scale=4)


def test_recipe_is_seeded_balanced_and_shuffled():
    x, y = N.natural_images(16, crops_per_photo=20)
    assert x.shape == (220, 16, 16, 3) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [20] * 11
    assert len(set(y[:44].tolist())) >= 8  # one permutation over all photographs
    x2, y2 = N.natural_images(16, crops_per_photo=20)
    assert np.array_equal(x, x2) and np.array_equal(y, y2) and N.natural_hash(x, y) == N.natural_hash(x2, y2)
    x3, _ = N.natural_images(16, crops_per_photo=20, seed=1)
    assert not np.array_equal(x, x3)
    # a photograph's crops do not depend on which other photographs are cut (stream per photograph)
    xa, ya = N.natural_images(16, crops_per_photo=20, photos=("coffee",))
    assert np.array_equal(np.sort(xa.reshape(20, -1), 0), np.sort(x[y == 2].reshape(20, -1), 0)) and (ya == 2).all()
    assert N.natural_hash(x, y) != N.natural_hash(x, (y + 1) % 11)  # the hash covers the labels
    with pytest.raises(ValueError, match="resolution must be"):
        N.natural_images(48)
    with pytest.raises(ValueError, match="unknown photograph 'lena'"):
        N.natural_images(16, crops_per_photo=2, photos=("lena",))


def test_build_writes_an_edm_zip_that_reads_back(tmp_path):
    info = N.build_natural(tmp_path / "nat.zip", 32, crops_per_photo=6)
    x, y = N.natural_images(32, crops_per_photo=6)
    assert info["num_images"] == 66 and info["num_classes"] == 11 and info["sha256"] == N.natural_hash(x, y)
    assert not info["verified"]  # no recorded hash for a non-default recipe
    ds = EDMZipDataset(tmp_path / "nat.zip", cond=True)
    assert ds.num_images == 66 and ds.num_classes == 11 and ds.shape == (3, 32, 32)
    for i in (0, 17, 65):
        assert np.array_equal(ds.image_uint8(i).numpy(), x[i].transpose(2, 0, 1))
        assert int(ds.labels()[i]) == int(y[i])
    N.build_natural(tmp_path / "nolab.zip", 32, crops_per_photo=2, labels=False)
    assert EDMZipDataset(tmp_path / "nolab.zip").num_classes == 0


def test_a_wrong_hash_or_a_changed_photograph_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(N, "DEFAULT_CROPS_PER_PHOTO", 3)  # make a tiny recipe count as "the default"
    monkeypatch.setitem(N.NATURAL_SHA256, 32, "0" * 64)
    with pytest.raises(ValueError, match="differs from the recorded"):
        N.build_natural(tmp_path / "bad.zip", 32, crops_per_photo=3)
    assert not (tmp_path / "bad.zip").exists() and not list(tmp_path.iterdir())
    monkeypatch.setitem(N.PHOTO_SHA256, "rocket", "f" * 64)
    with pytest.raises(ValueError, match="photograph 'rocket'"):
        N.natural_images(16, crops_per_photo=2)


@pytest.mark.slow  # ~20-30 s: cut 50,688 crops and write them as PNGs
def test_full_default_build_at_32_matches_its_recorded_hash(tmp_path, capsys):
    dst = tmp_path / "natural-32.zip"
    assert data_main(["natural", str(dst), "--resolution", "32", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert N.NATURAL_SHA256[32] in out and "(verified)" in out and "50688 images" in out
    ds = EDMZipDataset(dst, cond=True)
    assert ds.num_images == 50_688 >= 50_000 and ds.num_classes == 11
    assert np.bincount(ds.labels().numpy()).tolist() == [4608] * 11


@pytest.mark.slow  # ~40 s: 50,688 crops of up to 256x256 pixels reduced to 64x64
def test_default_recipe_at_64_matches_its_recorded_hash():
    x, y = N.natural_images(64)
    assert x.shape == (50_688, 64, 64, 3)
    assert N.natural_hash(x, y) == N.NATURAL_SHA256[64]
