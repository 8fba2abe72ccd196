"""Converters from the official distribution formats to EDM-format zips (see :mod:`sctlib.data.edmzip`).

* CIFAR-10: the official ``cifar-10-python.tar.gz`` (or its extracted folder). Each batch file
  (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``) is a Python pickle of a dict with
  b'data' uint8 [10000, 3072] (row = 1024 R, then 1024 G, then 1024 B values, each row-major 32x32) and
  b'labels' (0..9). EDM's CIFAR zip holds the 50,000 training images in batch order with their labels.
* Downsampled ImageNet 64x64 (Chrabaszcz et al. 2017): ``train_data_batch_1..10`` (``.npz`` or pickle)
  with 'data' uint8 [N, 12288] in CHW-planar order (R plane, G plane, B plane) and 'labels' 1..1000; they
  ship inside ``Imagenet64_train_part1.zip`` / ``part2.zip``. Labels become 0..999.
* A folder of ImageNet JPEGs (``train/<synset>/<image>.JPEG``): labels = index of the sorted top-level
  folder names; each image goes through ADM's centre-crop resize (Dhariwal & Nichol 2021; EDM2's
  ``center-crop-dhariwal``): halve with a BOX filter while the short side >= 2 * res, BICUBIC so the short
  side is res, then centre crop.

Pickles are read with a restricted unpickler that only admits numpy arrays/scalars (the files come from
the internet; a plain ``pickle.load`` would execute whatever they name). Every converter writes through
:class:`EDMZipWriter`, so a failure leaves no half-written output.
"""
from __future__ import annotations

import io
import os
import pickle
import re
import tarfile
import zipfile
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import safepickle as _sp
from ..errors import UserError
from .edmzip import DataError, EDMZipWriter, open_image_checked

__all__ = [
    "safe_unpickle",
    "convert_cifar10",
    "convert_imagenet64",
    "convert_imagenet64_npz",
    "convert_image_folder",
    "center_crop_dhariwal",
    "ConversionError",
]

PathLike = Union[str, os.PathLike]

CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = ("test_batch",)
JPEG_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


class ConversionError(UserError, ValueError):
    """A source that cannot be converted; the message names the file and the problem."""


# Bounds on what a compressed member may expand to, checked from the archive's directory before anything is
# decompressed. A CIFAR-10 batch is 31 MB; a downsampled-ImageNet train batch is ~1.5 GB and compresses by
# less than 2x, while a decompression bomb expands by 100-1000x.
MAX_CIFAR_MEMBER_BYTES = 256 << 20
MAX_BATCH_BYTES = 4 << 30
MAX_RATIO = 50
RATIO_FROM_BYTES = 64 << 20  # the ratio check applies to members larger than this


def _check_member_size(name: str, size: int, compressed: int, where: str, cap: int = MAX_BATCH_BYTES) -> None:
    if size > cap:
        raise ConversionError(f"{where}: member {name!r} declares {size:,} bytes, over the {cap:,}-byte cap; refused")
    if size > RATIO_FROM_BYTES and size > MAX_RATIO * max(compressed, 1):
        raise ConversionError(f"{where}: member {name!r} would expand {size / max(compressed, 1):.0f}x "
                              f"({compressed:,} -> {size:,} bytes); refused as a decompression bomb")


def _check_zip_members(z: zipfile.ZipFile, where: str) -> None:
    for info in z.infolist():
        _check_member_size(info.filename, info.file_size, info.compress_size, where)


# ------------------------------------------------------------------------------------------------
# Safe reading of the pickled batches


class _NumpyOnlyUnpickler(pickle.Unpickler):
    # numpy arrays pickle as numpy.(_)core.multiarray._reconstruct + ndarray + dtype (+ scalar for 0-d);
    # protocol-2 pickles written by Python 3 encode bytes through _codecs.encode. Each is replaced by a
    # guard (sctlib.safepickle) that checks declared sizes and refuses void/object dtypes, so a tiny file
    # cannot allocate gigabytes, and that the BUILD opcode cannot modify.
    _GUARDS = {k: v for k, v in _sp.numpy_globals().items() if k[0] != "builtins" and k[0] != "__builtin__"}

    def find_class(self, module, name):
        if (module, name) in self._GUARDS:
            return self._GUARDS[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected")


def safe_unpickle(data: bytes, *, source: str = "") -> object:
    """Unpickle bytes that may only contain builtins and numpy arrays (encoding='bytes' for Python-2 files).

    Arrays are filled only from bytes present in ``data`` (numpy checks the buffer length; the guards
    refuse any other allocation), so memory stays within a small multiple of ``len(data)``.
    """
    try:
        with _sp.use_budget(_sp.MemoryBudget(source or "pickle", len(data), cap=len(data) + (1 << 20))):
            return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except RecursionError:
        raise ConversionError(f"{source or 'pickle'}: cannot unpickle (nested too deeply)") from None
    except Exception as e:  # truncated data, unknown opcodes, refused classes, declared sizes ...
        raise ConversionError(f"{source or 'pickle'}: cannot unpickle ({type(e).__name__}: {e})") from None


def _get(d: dict, key: str):
    """d[key] for pickles written by Python 2 (bytes keys) or 3 (str keys)."""
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    raise KeyError(key)


def _planar_batch(obj, *, source: str, res: int, label_offset: int, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """Validate a {'data': [N, 3*res*res] uint8 planar, 'labels': [N]} batch; return (HWC uint8 [N,res,res,3], labels)."""
    if not isinstance(obj, dict) and not hasattr(obj, "files"):
        raise ConversionError(f"{source}: expected a dict with 'data' and 'labels', got {type(obj).__name__}")
    try:
        data = np.asarray(_get(obj, "data"))
        labels = np.asarray(_get(obj, "labels")).reshape(-1)
    except KeyError as e:
        raise ConversionError(f"{source}: missing key {e.args[0]!r} (expected 'data' and 'labels')") from None
    if data.dtype != np.uint8:
        raise ConversionError(f"{source}: 'data' has dtype {data.dtype}, expected uint8")
    if data.ndim != 2 or data.shape[1] != 3 * res * res:
        raise ConversionError(f"{source}: 'data' has shape {data.shape}, expected [N, {3 * res * res}] "
                              f"({res}x{res} RGB, channel-planar); is this the right data set/resolution?")
    if labels.shape[0] != data.shape[0]:
        raise ConversionError(f"{source}: {labels.shape[0]} labels for {data.shape[0]} images")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ConversionError(f"{source}: labels have dtype {labels.dtype}, expected integers")
    labels = labels.astype(np.int64) - label_offset
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConversionError(f"{source}: labels span {labels.min() + label_offset}..{labels.max() + label_offset}, "
                              f"expected {label_offset}..{num_classes - 1 + label_offset}")
    images = data.reshape(-1, 3, res, res).transpose(0, 2, 3, 1)  # planar CHW -> HWC
    return images, labels


def _progress(total: Optional[int], desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled)


def _check_src(src: PathLike, dst: Optional[PathLike] = None) -> Path:
    """The source as a Path; with ``dst``, also refuse a destination that would overwrite the source or is a
    directory - checked before anything is read, not after the whole conversion ran."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"conversion source {str(src)!r} does not exist")
    if dst is not None:
        dst = Path(dst)
        if dst.resolve() == src.resolve() or (dst.exists() and src.is_file() and dst.samefile(src)):
            raise ConversionError(f"destination {str(dst)!r} is the source itself; write the data set to another file")
        if dst.is_dir():
            raise ConversionError(f"destination {str(dst)!r} is a directory; give a .zip file path")
        if dst.suffix.lower() != ".zip":
            raise ConversionError(f"destination {str(dst)!r}: EDM data sets are .zip files")
    return src


# ------------------------------------------------------------------------------------------------
# CIFAR-10


def _cifar_batches(src: Path, names: Sequence[str]) -> Iterator[Tuple[str, bytes]]:
    """(source name, raw pickle bytes) of each batch, from the tar.gz or an extracted folder."""
    if src.is_dir():
        base = src / "cifar-10-batches-py" if (src / "cifar-10-batches-py").is_dir() else src
        for n in names:  # check all first: fail before converting anything
            if not (base / n).is_file():
                raise ConversionError(f"{str(base / n)!r} is missing: expected the extracted cifar-10-batches-py "
                                      f"folder with {', '.join(names)}")
        for n in names:
            yield str(base / n), (base / n).read_bytes()
        return
    try:
        tf = tarfile.open(src, "r:*")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ConversionError(f"{str(src)!r} is not a readable tar archive (corrupt or truncated?): {e}") from None
    with tf:
        try:
            members = {Path(m.name).name: m for m in tf.getmembers() if m.isfile()}
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ConversionError(f"{str(src)!r}: corrupt tar archive: {e}") from None
        for n in names:
            if n not in members:
                raise ConversionError(f"{str(src)!r} has no member {n!r}: expected cifar-10-batches-py/{n} "
                                      f"(the official cifar-10-python.tar.gz)")
            # a tar.gz member's size is only declared in its header: cap it before reading
            _check_member_size(members[n].name, members[n].size, 1 << 62, str(src), cap=MAX_CIFAR_MEMBER_BYTES)
            try:
                data = tf.extractfile(members[n]).read()
            except (tarfile.TarError, OSError, EOFError, zipfile.BadZipFile) as e:
                raise ConversionError(f"{str(src)!r} member {members[n].name!r}: cannot read ({e})") from None
            yield f"{src}:{members[n].name}", data


def convert_cifar10(src: PathLike, dst: PathLike, *, split: str = "train", progress: bool = True,
                    max_images: Optional[int] = None) -> Path:
    """CIFAR-10 python pickles (tar.gz or folder) -> EDM zip of 32x32 RGB PNGs with labels 0..9.

    ``split='train'`` takes data_batch_1..5 (50,000 images, the EDM/ECT training set), ``'test'`` the
    test_batch. ``max_images`` truncates (for smoke tests).
    """
    if split not in ("train", "test"):
        raise ConversionError(f"split must be 'train' or 'test', got {split!r}")
    src = _check_src(src, dst)
    names = CIFAR_TRAIN if split == "train" else CIFAR_TEST
    with EDMZipWriter(dst, source=str(src)) as w, _progress(len(names) * 10_000, f"cifar10 {split} -> {Path(dst).name}", progress) as bar:
        for source, raw in _cifar_batches(src, names):
            images, labels = _planar_batch(safe_unpickle(raw, source=source), source=source, res=32, label_offset=0, num_classes=10)
            for img, lab in zip(images, labels):
                if max_images is not None and len(w) >= max_images:
                    break
                w.add(img, int(lab), name=source)
                bar.update(1)
    return Path(dst)


# ------------------------------------------------------------------------------------------------
# Downsampled ImageNet 64x64 (npz / pickle batches)

_BATCH_RE = re.compile(r"(train|val)_data(?:_batch_(\d+))?(\.npz)?$")


def _load_batch_bytes(raw: bytes, source: str):
    if raw[:2] == b"PK":  # .npz (a zip of .npy files); allow_pickle off: 'data'/'labels' are plain arrays
        try:
            with zipfile.ZipFile(io.BytesIO(raw)) as zz:
                _check_zip_members(zz, source)
            with np.load(io.BytesIO(raw), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except ConversionError:
            raise
        except Exception as e:
            raise ConversionError(f"{source}: cannot read npz ({type(e).__name__}: {e})") from None
    return safe_unpickle(raw, source=source)


def _imagenet64_batches(src: Path, split: str) -> List[Tuple[str, Callable[[], bytes]]]:
    """(name, reader) of every batch file of ``split`` under src (folder, a batch file, or part*.zip archives)."""
    found = []  # (sort key, name, reader)

    def consider(name: str, reader: Callable[[], bytes]):
        m = _BATCH_RE.search(Path(name).name)
        if m and m.group(1) == split:
            found.append(((int(m.group(2) or 0), name), name, reader))

    def scan_zip(zpath: Path):
        try:
            zf = zipfile.ZipFile(zpath)
            infos = zf.infolist()
            _check_zip_members(zf, str(zpath))
        except (zipfile.BadZipFile, OSError) as e:
            raise ConversionError(f"{str(zpath)!r} is not a valid zip archive (corrupt or truncated?): {e}") from None
        for info in infos:
            if not info.is_dir():
                def read(zpath=zpath, member=info.filename):
                    try:
                        with zipfile.ZipFile(zpath) as z:
                            return z.read(member)
                    except (zipfile.BadZipFile, OSError, EOFError) as e:
                        raise ConversionError(f"{str(zpath)!r} member {member!r}: cannot read ({e})") from None
                consider(f"{zpath}:{info.filename}", read)
        zf.close()

    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    for f in files:
        if f.suffix.lower() == ".zip" and not _BATCH_RE.search(f.name):
            scan_zip(f)
        else:
            consider(str(f), f.read_bytes)
    found.sort(key=lambda item: item[0])
    return [(name, reader) for _, name, reader in found]


def convert_imagenet64_npz(src: PathLike, dst: PathLike, *, split: str = "train", progress: bool = True,
                           max_images: Optional[int] = None) -> Path:
    """Downsampled ImageNet 64x64 batches (npz or pickle; a folder, or the Imagenet64_*.zip archives) ->
    EDM zip of 64x64 RGB PNGs, labels shifted from 1..1000 to 0..999, batches in numeric order."""
    if split not in ("train", "val"):
        raise ConversionError(f"split must be 'train' or 'val', got {split!r}")
    src = _check_src(src, dst)
    batches = _imagenet64_batches(src, split)
    if not batches:
        want = "train_data_batch_<i>[.npz]" if split == "train" else "val_data[.npz]"
        raise ConversionError(f"no {want} files found in {str(src)!r} (nor in .zip archives there)")
    with EDMZipWriter(dst, source=str(src)) as w, _progress(None, f"imagenet64 {split} -> {Path(dst).name}", progress) as bar:
        for name, reader in batches:
            if max_images is not None and len(w) >= max_images:
                break
            images, labels = _planar_batch(_load_batch_bytes(reader(), name), source=name, res=64,
                                           label_offset=1, num_classes=1000)
            for img, lab in zip(images, labels):
                if max_images is not None and len(w) >= max_images:
                    break
                w.add(img, int(lab), name=name)
                bar.update(1)
    return Path(dst)


# ------------------------------------------------------------------------------------------------
# Folder of JPEGs with ADM's centre-crop resize


def center_crop_dhariwal(img, resolution: int):
    """ADM / EDM2 'center-crop-dhariwal' (Dhariwal & Nichol 2021, guided-diffusion): PIL image -> PIL image.

    Box-filter halving first keeps the final BICUBIC step a small (< 2x) resize, which avoids aliasing.
    """
    from PIL import Image

    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = resolution / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def convert_image_folder(src: PathLike, dst: PathLike, *, resolution: int = 64, progress: bool = True,
                         max_images: Optional[int] = None) -> Path:
    """A class-per-folder image tree (ImageNet ``train/<synset>/*.JPEG``) -> EDM zip at ``resolution``.

    Labels are the indices of the sorted top-level folder names; images are converted to RGB (ImageNet
    holds a few greyscale and CMYK JPEGs) and centre-crop-resized with :func:`center_crop_dhariwal`.
    """
    from PIL import Image, UnidentifiedImageError

    if resolution < 1 or resolution & (resolution - 1):
        raise ConversionError(f"resolution must be a power of two, got {resolution}")
    src = _check_src(src, dst)
    if not src.is_dir():
        raise ConversionError(f"{str(src)!r} is not a folder of class sub-folders")
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    if not classes:
        raise ConversionError(f"{str(src)!r} has no class sub-folders (expected e.g. train/n01440764/*.JPEG)")
    files = sorted(p for c in classes for p in (src / c).rglob("*") if p.is_file() and p.suffix.lower() in JPEG_EXTENSIONS)
    if not files:
        raise ConversionError(f"no images ({', '.join(JPEG_EXTENSIONS)}) under {str(src)!r}")
    if max_images is not None:
        files = files[:max_images]
    label_of = {c: i for i, c in enumerate(classes)}
    with EDMZipWriter(dst, source=str(src)) as w, _progress(len(files), f"images -> {Path(dst).name}", progress) as bar:
        for f in files:
            try:
                with open_image_checked(f, str(f)) as im:  # pixel cap checked from the header, before decoding
                    im = im.convert("RGB")
            except DataError as e:
                raise ConversionError(str(e)) from None
            except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
                raise ConversionError(f"{str(f)!r}: cannot decode image ({e})") from None
            img = np.asarray(center_crop_dhariwal(im, resolution), dtype=np.uint8)
            w.add(img, label_of[f.relative_to(src).parts[0]], name=str(f))
            bar.update(1)
    return Path(dst)


def _looks_like_batches(src: Path) -> bool:
    """True if src (a folder) holds downsampled-ImageNet batches or zips at the top level or one level down.

    Sub-folders are sniffed entry by entry and abandoned at the first image file, so a 1.28M-JPEG tree is
    not listed in full just to decide.
    """
    def is_batch(name: str) -> bool:
        return bool(_BATCH_RE.search(name)) or name.lower().endswith(".zip")

    subdirs = []
    for e in os.scandir(src):
        if e.is_file() and is_batch(e.name):
            return True
        if e.is_dir():
            subdirs.append(e.path)
    for d in subdirs:
        for e in os.scandir(d):
            if e.is_file():
                if is_batch(e.name):
                    return True
                if e.name.lower().endswith(JPEG_EXTENSIONS):
                    break
    return False


def convert_imagenet64(src: PathLike, dst: PathLike, *, split: str = "train", resolution: int = 64,
                       progress: bool = True, max_images: Optional[int] = None) -> Path:
    """ImageNet 64x64 from whichever source ``src`` is: a folder of class folders of JPEGs (centre-crop
    resize), or downsampled-ImageNet npz/pickle batches (a folder of them, one file, or the part*.zip files)."""
    src = _check_src(src, dst)
    if src.is_dir() and not _looks_like_batches(src):
        return convert_image_folder(src, dst, resolution=resolution, progress=progress, max_images=max_images)
    if resolution != 64:
        raise ConversionError("the downsampled-ImageNet batches are 64x64; resolution must be 64 for them")
    return convert_imagenet64_npz(src, dst, split=split, progress=progress, max_images=max_images)
