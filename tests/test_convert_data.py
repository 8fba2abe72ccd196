"""Converters on fixtures written in the real on-disk formats: CIFAR-10 python tar.gz, downsampled
ImageNet-64 npz batches (and their part*.zip archives), a folder of JPEGs; plus the failure modes."""
import io
import pickle
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import sctlib.data as sd
from sctlib.data import convert as cv
from sctlib.data.__main__ import main as cli


# ------------------------------------------------------------------------------------------------
# fixtures in the official formats


def _cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    # official layout: dict with bytes keys (the files were written by Python 2 cPickle)
    return {b"batch_label": b"fixture", b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}


def _write_cifar_tree(root, n=3, corrupt=None):
    """cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}; returns the batches in order."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batches[name] = _cifar_batch(n, i)
        raw = pickle.dumps(batches[name], protocol=2)
        (d / name).write_bytes(raw[: len(raw) // 2] if name == corrupt else raw)
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"] * 10, b"num_cases_per_batch": n}, protocol=2))
    return batches


@pytest.fixture
def cifar_tgz(tmp_path):
    src = tmp_path / "src"
    batches = _write_cifar_tree(src)
    tgz = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return tgz, src, batches


def _expected_cifar(batches, names):
    imgs = np.concatenate([batches[n][b"data"] for n in names]).reshape(-1, 3, 32, 32)
    labels = sum((batches[n][b"labels"] for n in names), [])
    return torch.from_numpy(imgs), labels


def _check_zip(path, imgs, labels, shape):
    ds = sd.EDMZipDataset(path, cond=True)
    assert ds.num_images == len(imgs) and ds.shape == shape
    got = torch.stack([ds.image_uint8(i) for i in range(ds.num_images)])
    assert torch.equal(got, imgs)
    assert ds.labels().tolist() == list(labels)


def test_cifar10_tgz_and_folder_convert_with_labels(cifar_tgz, tmp_path):
    tgz, src, batches = cifar_tgz
    imgs, labels = _expected_cifar(batches, [f"data_batch_{k}" for k in range(1, 6)])
    out = cv.convert_cifar10(tgz, tmp_path / "c.zip", progress=False)
    _check_zip(out, imgs, labels, (3, 32, 32))
    # pixel (c, y, x) of image n is row n, column c*1024 + y*32 + x of the official array
    ds = sd.load_dataset("cifar10", path=str(out))
    assert int(ds.image_uint8(4)[2, 5, 7]) == int(batches["data_batch_2"][b"data"][1, 2 * 1024 + 5 * 32 + 7])
    # the extracted folder (either the parent or cifar-10-batches-py itself) gives the same zip content
    for folder in (src, src / "cifar-10-batches-py"):
        out2 = cv.convert_cifar10(folder, tmp_path / "c2.zip", progress=False)
        _check_zip(out2, imgs, labels, (3, 32, 32))
    timgs, tlabels = _expected_cifar(batches, ["test_batch"])
    _check_zip(cv.convert_cifar10(tgz, tmp_path / "t.zip", split="test", progress=False), timgs, tlabels, (3, 32, 32))


def test_cli_converts_cifar10(cifar_tgz, tmp_path, capsys):
    tgz, _, batches = cifar_tgz
    assert cli(["convert", "cifar10", str(tgz), str(tmp_path / "cli.zip"), "--no-progress"]) == 0
    assert "15 images of shape (3, 32, 32), " in capsys.readouterr().out
    imgs, labels = _expected_cifar(batches, [f"data_batch_{k}" for k in range(1, 6)])
    _check_zip(tmp_path / "cli.zip", imgs, labels, (3, 32, 32))
    # the real entry point, with its progress bar on stderr
    r = subprocess.run([sys.executable, "-m", "sctlib.data", "convert", "cifar10", str(tgz), str(tmp_path / "m.zip"),
                        "--max-images", "4"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "img" in r.stderr  # tqdm bar
    assert sd.EDMZipDataset(tmp_path / "m.zip").num_images == 4
    assert cli(["convert", "cifar10", str(tmp_path / "nope.tar.gz"), str(tmp_path / "n.zip")]) == 2
    err = capsys.readouterr().err
    assert "nope.tar.gz" in err and "does not exist" in err and not (tmp_path / "n.zip").exists()


def test_cifar10_bad_inputs_leave_no_output(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.tar.gz"):
        cv.convert_cifar10(tmp_path / "missing.tar.gz", tmp_path / "o.zip", progress=False)
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x1f\x8b\x08\x00 definitely not gzip data")
    with pytest.raises(cv.ConversionError, match="junk.tar.gz.*corrupt"):
        cv.convert_cifar10(junk, tmp_path / "o.zip", progress=False)
    # batch 3 is truncated: batches 1-2 were already written, yet nothing may remain
    src = tmp_path / "trunc"
    _write_cifar_tree(src, corrupt="data_batch_3")
    with pytest.raises(cv.ConversionError, match="data_batch_3.*cannot unpickle"):
        cv.convert_cifar10(src, tmp_path / "o.zip", progress=False)
    # a batch with mismatched labels
    src = tmp_path / "mism"
    _write_cifar_tree(src)
    b = _cifar_batch(3, 9)
    b[b"labels"] = b[b"labels"][:2]
    (src / "cifar-10-batches-py" / "data_batch_4").write_bytes(pickle.dumps(b, protocol=2))
    with pytest.raises(cv.ConversionError, match="data_batch_4: 2 labels for 3 images"):
        cv.convert_cifar10(src, tmp_path / "o.zip", progress=False)
    # wrong image size (a 3x16x16 batch)
    b = _cifar_batch(3, 9)
    b[b"data"] = b[b"data"][:, :768]
    (src / "cifar-10-batches-py" / "data_batch_4").write_bytes(pickle.dumps(b, protocol=2))
    with pytest.raises(cv.ConversionError, match=r"data_batch_4: 'data' has shape \(3, 768\)"):
        cv.convert_cifar10(src, tmp_path / "o.zip", progress=False)
    (src / "cifar-10-batches-py" / "data_batch_4").write_bytes(pickle.dumps(_cifar_batch(3, 9), protocol=2))
    (src / "cifar-10-batches-py" / "data_batch_5").unlink()
    with pytest.raises(cv.ConversionError, match="data_batch_5.*is missing"):
        cv.convert_cifar10(src, tmp_path / "o.zip", progress=False)
    assert not (tmp_path / "o.zip").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("o.zip")]  # no temp files either


class _Evil:
    def __reduce__(self):
        return (print, ("owned",))


def test_pickles_may_only_hold_numpy_arrays():
    with pytest.raises(cv.ConversionError, match="refusing to load builtins.print"):
        cv.safe_unpickle(pickle.dumps({b"data": _Evil()}), source="evil")
    ok = cv.safe_unpickle(pickle.dumps({"data": np.arange(3, dtype=np.uint8)}, protocol=4))
    assert ok["data"].tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------------------------
# downsampled ImageNet 64x64


def _in64_batch(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 12288), dtype=np.uint8), rng.integers(1, 1001, n)


@pytest.fixture
def in64(tmp_path):
    """Batches 1, 2 and 10 (numeric order matters: 10 comes last) as npz, plus the part zips."""
    folder = tmp_path / "Imagenet64_train_part1_npz"
    folder.mkdir()
    batches = {}
    for k in (10, 1, 2):
        data, labels = _in64_batch(2 + k % 3, k)
        labels[0] = 1000 if k == 10 else 1  # both label ends
        batches[k] = (data, labels)
        np.savez(folder / f"train_data_batch_{k}.npz", data=data, labels=labels, mean=np.zeros(12288))
    part1, part2 = tmp_path / "Imagenet64_train_part1.zip", tmp_path / "Imagenet64_train_part2.zip"
    with zipfile.ZipFile(part1, "w") as z1, zipfile.ZipFile(part2, "w") as z2:
        for k in (1, 2):
            z1.write(folder / f"train_data_batch_{k}.npz", f"Imagenet64_train_part1_npz/train_data_batch_{k}.npz")
        z2.write(folder / "train_data_batch_10.npz", "Imagenet64_train_part2_npz/train_data_batch_10.npz")
    zips = tmp_path / "zips"
    zips.mkdir()
    part1.rename(zips / part1.name)
    part2.rename(zips / part2.name)
    data = np.concatenate([batches[k][0] for k in (1, 2, 10)])
    labels = np.concatenate([batches[k][1] for k in (1, 2, 10)]) - 1
    return folder, zips, torch.from_numpy(data.reshape(-1, 3, 64, 64)), labels.tolist()


def test_imagenet64_npz_folder_and_zips(in64, tmp_path):
    folder, zips, imgs, labels = in64
    assert min(labels) == 0 and max(labels) == 999
    _check_zip(cv.convert_imagenet64(folder, tmp_path / "a.zip", progress=False), imgs, labels, (3, 64, 64))
    _check_zip(cv.convert_imagenet64(zips, tmp_path / "b.zip", progress=False), imgs, labels, (3, 64, 64))
    _check_zip(cv.convert_imagenet64(zips / "Imagenet64_train_part1.zip", tmp_path / "c.zip", progress=False),
               imgs[:7], labels[:7], (3, 64, 64))  # part1 = batches 1 (3 images) and 2 (4)
    # CHW-planar: the G value of pixel (y=3, x=9) of the first image sits at column 4096 + 3*64 + 9
    raw = np.load(folder / "train_data_batch_1.npz")["data"]
    assert int(sd.EDMZipDataset(tmp_path / "a.zip").image_uint8(0)[1, 3, 9]) == int(raw[0, 4096 + 3 * 64 + 9])
    assert cli(["convert", "imagenet64", str(zips), str(tmp_path / "cli.zip"), "--no-progress"]) == 0
    _check_zip(tmp_path / "cli.zip", imgs, labels, (3, 64, 64))


def test_imagenet64_pickle_batches(tmp_path):
    data, labels = _in64_batch(3, 0)
    (tmp_path / "train_data_batch_1").write_bytes(pickle.dumps({"data": data, "labels": labels.tolist(), "mean": np.zeros(3)}))
    out = cv.convert_imagenet64(tmp_path, tmp_path / "p.zip", progress=False)
    _check_zip(out, torch.from_numpy(data.reshape(-1, 3, 64, 64)), (labels - 1).tolist(), (3, 64, 64))


def test_imagenet64_bad_inputs(in64, tmp_path):
    folder, zips, _, _ = in64
    data, labels = _in64_batch(3, 5)
    np.savez(folder / "train_data_batch_3.npz", data=data, labels=labels[:2])
    with pytest.raises(cv.ConversionError, match="train_data_batch_3.npz: 2 labels for 3 images"):
        cv.convert_imagenet64(folder, tmp_path / "o.zip", progress=False)
    np.savez(folder / "train_data_batch_3.npz", data=data[:, :3072], labels=labels)
    with pytest.raises(cv.ConversionError, match=r"train_data_batch_3.npz: 'data' has shape \(3, 3072\)"):
        cv.convert_imagenet64(folder, tmp_path / "o.zip", progress=False)
    np.savez(folder / "train_data_batch_3.npz", data=data, labels=labels - 1)  # 0-based: not the official range
    labels0 = labels - 1
    labels0[0] = 0
    np.savez(folder / "train_data_batch_3.npz", data=data, labels=labels0)
    with pytest.raises(cv.ConversionError, match="labels span 0..*expected 1..1000"):
        cv.convert_imagenet64(folder, tmp_path / "o.zip", progress=False)
    (folder / "train_data_batch_3.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(cv.ConversionError, match="train_data_batch_3.npz: cannot read npz"):
        cv.convert_imagenet64(folder, tmp_path / "o.zip", progress=False)
    (zips / "Imagenet64_train_part2.zip").write_bytes(b"truncated download")
    with pytest.raises(cv.ConversionError, match="Imagenet64_train_part2.zip.*not a valid zip"):
        cv.convert_imagenet64(zips, tmp_path / "o.zip", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("nothing")
    with pytest.raises(cv.ConversionError, match="no train_data_batch"):
        cv.convert_imagenet64_npz(empty, tmp_path / "o.zip", progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("o.zip")]


# ------------------------------------------------------------------------------------------------
# folder of JPEGs with ADM's centre-crop resize


def _jpeg(path, img):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=95)


@pytest.fixture
def jpeg_tree(tmp_path):
    root = tmp_path / "train"
    rng = np.random.default_rng(0)
    _jpeg(root / "n01440764" / "a.JPEG", Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)))
    _jpeg(root / "n01440764" / "b.JPEG", Image.fromarray(rng.integers(0, 256, (70, 64, 3), dtype=np.uint8)))
    _jpeg(root / "n02102040" / "c.JPEG", Image.fromarray(rng.integers(0, 256, (500, 400), dtype=np.uint8), "L"))
    cmyk = Image.fromarray(rng.integers(0, 256, (130, 140, 4), dtype=np.uint8), "CMYK")
    _jpeg(root / "n02102040" / "d.JPEG", cmyk)
    return root


def test_center_crop_dhariwal_properties():
    # size, constant colour preserved, and the centre third of a wide image is what survives
    assert center(Image.new("RGB", (1000, 333), (10, 200, 30))).getpixel((31, 31)) == (10, 200, 30)
    wide = np.zeros((128, 384, 3), np.uint8)
    wide[:, :128] = (255, 0, 0)
    wide[:, 128:256] = (0, 255, 0)
    wide[:, 256:] = (0, 0, 255)
    out = np.asarray(center(Image.fromarray(wide))).astype(int)
    assert out.shape == (64, 64, 3)
    assert (out[:, 2:-2, 1] > 240).all() and (out[:, 2:-2, [0, 2]] < 15).all()
    # the BOX halving runs while the short side is >= 2 * 64: 512 -> 256 -> 128 -> 64 is exact 8x8 block means
    tile = np.random.default_rng(1).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    box = tile.reshape(64, 8, 64, 8, 3).astype(np.float64).mean((1, 3))
    out = np.asarray(center(Image.fromarray(tile))).astype(np.float64)
    # measured: max 2.55, mean 1.3 (three rounded halvings); a direct BICUBIC 512 -> 64 is off by up to 20 (mean 3.7)
    assert np.abs(out - box).max() <= 3.0 and np.abs(out - box).mean() < 2.0


def center(img):
    return cv.center_crop_dhariwal(img, 64)


def test_jpeg_folder_converts_with_sorted_synset_labels(jpeg_tree, tmp_path):
    out = cv.convert_imagenet64(jpeg_tree, tmp_path / "j.zip", progress=False)
    files = sorted(jpeg_tree.rglob("*.JPEG"))
    expect = torch.stack([torch.from_numpy(np.array(center(Image.open(f).convert("RGB")))).permute(2, 0, 1) for f in files])
    _check_zip(out, expect, [0, 0, 1, 1], (3, 64, 64))
    assert cli(["convert", "folder", str(jpeg_tree), str(tmp_path / "f32.zip"), "--resolution", "32", "--no-progress"]) == 0
    assert sd.EDMZipDataset(tmp_path / "f32.zip").shape == (3, 32, 32)


def test_jpeg_folder_bad_inputs(jpeg_tree, tmp_path):
    (jpeg_tree / "n02102040" / "e.JPEG").write_bytes(b"\xff\xd8 truncated jpeg")
    with pytest.raises(cv.ConversionError, match="e.JPEG.*cannot decode"):
        cv.convert_imagenet64(jpeg_tree, tmp_path / "o.zip", progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("o.zip")]
    flat = tmp_path / "flat"
    flat.mkdir()
    with pytest.raises(cv.ConversionError, match="no class sub-folders"):
        cv.convert_image_folder(flat, tmp_path / "o.zip", progress=False)
    with pytest.raises(ValueError, match="power of two"):
        cv.convert_image_folder(jpeg_tree, tmp_path / "o.zip", resolution=48, progress=False)
