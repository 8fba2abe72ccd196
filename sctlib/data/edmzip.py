"""EDM's image data set format: a reader, a writer, and image helpers.

The format (as written by EDM / EDM2 ``dataset_tool.py``, github.com/NVlabs/edm and
NVlabs/edm2) is an uncompressed ZIP (ZIP_STORED) of uncompressed PNGs named
``{idx // 1000:05d}/img{idx:08d}.png`` plus ``dataset.json`` at the root holding
``{"labels": [["00000/img00000000.png", 6], ...]}`` or ``{"labels": null}``. Images are square,
power-of-two sized, greyscale or RGB. Pixels map to [-1, 1] as uint8 / 127.5 - 1 (EDM training loop).

This module is written from that description; no EDM code is used.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import UserError

__all__ = [
    "IMAGE_EXTENSIONS",
    "EDMZipDataset",
    "EDMZipWriter",
    "write_edm_zip",
    "read_edm_zip_labels",
    "dataset_fingerprint",
    "to_uint8",
    "save_image_grid",
    "CONVERTER_HINT",
    "DataError",
    "MAX_MEMBER_BYTES",
    "MAX_IMAGE_PIXELS",
]

# Caps that keep a crafted zip or image from exhausting memory (a 64x64 RGB PNG is ~12 KB; the largest
# ImageNet JPEG is ~12 Mpx): a member's declared size, and the pixels of one image, both checked before
# anything is decompressed or decoded.
MAX_MEMBER_BYTES = 256 << 20
MAX_IMAGE_PIXELS = 1 << 26


class DataError(UserError, ValueError):
    """A data set file that cannot be read or written as asked; the message names the file and the problem."""


def open_image_checked(data_or_path, where: str):
    """``PIL.Image.open`` that refuses images over :data:`MAX_IMAGE_PIXELS` (from the header, before decoding)
    and turns PIL's decompression-bomb error into a :class:`DataError` naming ``where``."""
    from PIL import Image

    try:
        im = Image.open(data_or_path)
    except Image.DecompressionBombError as e:
        raise DataError(f"{where}: image refused as a decompression bomb ({e})") from None
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:
        im.close()
        raise DataError(f"{where}: image is {w}x{h} = {w * h:,} pixels, over the {MAX_IMAGE_PIXELS:,}-pixel cap; refused")
    return im


def _read_member(zf: zipfile.ZipFile, name: str, where: str, cap: int = MAX_MEMBER_BYTES) -> bytes:
    """``zf.read(name)`` after checking the declared (uncompressed) size against ``cap``; zipfile never
    returns more than the declared size, so this bounds a deflate bomb."""
    info = zf.getinfo(name)
    if info.file_size > cap:
        raise DataError(f"{where}: member {name!r} declares {info.file_size:,} bytes uncompressed, over the "
                        f"{cap:,}-byte cap; refused")
    return zf.read(info)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

CONVERTER_HINT = (
    "create one with the converter CLI, e.g.\n"
    "  python -m sctlib.data convert cifar10 cifar-10-python.tar.gz datasets/cifar10-32x32.zip\n"
    "  python -m sctlib.data convert imagenet64 <Imagenet64_train_part*.zip | npz folder | JPEG train folder> "
    "datasets/edm2-imagenet-64x64.zip"
)


# ------------------------------------------------------------------------------------------------
# Image helpers


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 via (x * 127.5 + 128).clamp(0, 255) (EDM's quantisation).

    The +128 with truncation towards zero equals round(x * 127.5 + 127.5), i.e. round-to-nearest.
    """
    return (x.detach().float() * 127.5 + 128.0).clamp(0, 255).to(torch.uint8)


def save_image_grid(images: torch.Tensor, path: Union[str, os.PathLike], nrow: Optional[int] = None, *, padding: int = 1) -> Path:
    """Save [B, C, H, W] images in [-1, 1] (C = 1 or 3) as one PNG grid with ``nrow`` images per row.

    ``nrow`` defaults to ceil(sqrt(B)). A ``padding``-pixel black border separates the tiles.
    """
    from PIL import Image

    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DataError(f"save_image_grid expects [B, 1 or 3, H, W] images, got shape {tuple(images.shape)}")
    B, C, H, W = images.shape
    if B == 0:
        raise DataError("save_image_grid got an empty batch")
    nrow = int(nrow) if nrow else int(math.ceil(math.sqrt(B)))
    ncol_rows = int(math.ceil(B / nrow))
    u8 = to_uint8(images.cpu()).permute(0, 2, 3, 1).numpy()  # [B, H, W, C]
    canvas = np.zeros((ncol_rows * (H + padding) + padding, nrow * (W + padding) + padding, C), dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        y0, x0 = padding + r * (H + padding), padding + c * (W + padding)
        canvas[y0 : y0 + H, x0 : x0 + W] = u8[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas[..., 0] if C == 1 else canvas, mode="L" if C == 1 else "RGB").save(path)
    return path


def _archive_name(idx: int) -> str:
    return f"{idx // 1000:05d}/img{idx:08d}.png"


def _png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# Writer


class EDMZipWriter:
    """Stream images into an EDM-format zip; atomic: nothing appears at ``path`` unless ``close()`` succeeds.

    Use as a context manager::

        with EDMZipWriter("out.zip") as w:
            w.add(img_uint8_hwc, label)

    The data go to a temporary file beside ``path`` that is renamed over it at the end; on an exception
    (or ``abort()``) the temporary file is deleted, so a failed conversion leaves no half-written output.
    Every image must have the same square, power-of-two size and 1 or 3 channels; labels are all ints
    or all None. ``source`` names the input in error messages.
    """

    def __init__(self, path: Union[str, os.PathLike], *, source: str = ""):
        self.path = Path(path)
        if self.path.suffix.lower() != ".zip":
            raise DataError(f"EDM data sets are .zip files; got destination {str(self.path)!r}")
        if self.path.is_dir():
            raise DataError(f"destination {str(self.path)!r} is a directory; give a .zip file path")
        # folders created for the output are removed again if the conversion fails
        self._made_dirs = []
        p = self.path.parent
        while not p.exists():
            self._made_dirs.append(p)
            p = p.parent
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix="." + self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        except OSError:
            self._remove_made_dirs()
            raise
        os.close(fd)
        self._tmp = Path(tmp)
        self._zip = zipfile.ZipFile(self._tmp, "w", compression=zipfile.ZIP_STORED)
        self._labels: List[Tuple[str, Optional[int]]] = []
        self._shape: Optional[Tuple[int, int, int]] = None
        self.source = source
        self._closed = False

    def __len__(self) -> int:
        return len(self._labels)

    def add(self, image: np.ndarray, label: Optional[int] = None, *, name: str = "") -> None:
        """Append one uint8 image ([H, W], [H, W, C] or [C, H, W] with C in {1, 3}) and its label."""
        where = f"{name or f'image {len(self._labels)}'}" + (f" of {self.source}" if self.source else "")
        img = np.asarray(image)
        if img.dtype != np.uint8:
            raise DataError(f"{where}: expected uint8 pixels, got {img.dtype}")
        if img.ndim == 2:
            img = img[:, :, None]
        elif img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[2] not in (1, 3):
            img = img.transpose(1, 2, 0)  # CHW -> HWC
        if img.ndim != 3 or img.shape[2] not in (1, 3):
            raise DataError(f"{where}: expected a greyscale or RGB image, got shape {tuple(np.asarray(image).shape)}")
        H, W, C = img.shape
        if H != W or H & (H - 1) != 0:
            raise DataError(f"{where}: EDM data sets need square power-of-two images, got {W}x{H}")
        if self._shape is None:
            self._shape = (H, W, C)
        elif self._shape != (H, W, C):
            raise DataError(f"{where}: size/mode {W}x{H}x{C} differs from the first image's "
                             f"{self._shape[1]}x{self._shape[0]}x{self._shape[2]}")
        if label is not None:
            label = int(label)
            if label < 0:
                raise DataError(f"{where}: labels must be >= 0, got {label}")
        if self._labels and (label is None) != (self._labels[0][1] is None):
            raise DataError(f"{where}: either every image has a label or none does")
        arc = _archive_name(len(self._labels))
        self._zip.writestr(arc, _png_bytes(np.ascontiguousarray(img)))
        self._labels.append((arc, label))

    def close(self) -> Path:
        """Write dataset.json, close, and atomically move the zip into place. Returns the final path."""
        if self._closed:
            return self.path
        try:
            if not self._labels:
                raise DataError(f"no images to write{' from ' + self.source if self.source else ''}")
            has_labels = self._labels[0][1] is not None
            meta = {"labels": [[a, l] for a, l in self._labels] if has_labels else None}
            self._zip.writestr("dataset.json", json.dumps(meta))
            self._zip.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Discard everything written so far (the destination is left untouched)."""
        try:
            self._zip.close()
        except Exception:
            pass
        self._tmp.unlink(missing_ok=True)
        self._closed = True
        self._remove_made_dirs()

    def _remove_made_dirs(self) -> None:
        for d in self._made_dirs:  # deepest first; only if still empty
            try:
                d.rmdir()
            except OSError:
                break

    def __enter__(self) -> "EDMZipWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_edm_zip(
    path: Union[str, os.PathLike],
    images: Union[torch.Tensor, np.ndarray, Iterable],
    labels: Optional[Sequence[int]] = None,
    *,
    progress: bool = False,
) -> Path:
    """Write images (uint8 [N, C, H, W] / [N, H, W, C], or float [-1, 1] [N, C, H, W], or an iterable of
    uint8 arrays) and optional integer labels to an EDM-format zip at ``path`` (atomically)."""
    if isinstance(images, torch.Tensor):
        if images.is_floating_point():
            images = to_uint8(images)
        images = images.cpu().numpy()
    n = len(images) if hasattr(images, "__len__") else None
    if labels is not None and n is not None and len(labels) != n:
        raise DataError(f"{len(labels)} labels for {n} images")
    it = images
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(images, total=n, desc=f"writing {Path(path).name}", unit="img")
    with EDMZipWriter(path) as w:
        for i, img in enumerate(it):
            w.add(img, None if labels is None else int(labels[i]))
        if labels is not None and len(labels) != len(w):
            raise DataError(f"{len(labels)} labels for {len(w)} images")
    return Path(path)


# ------------------------------------------------------------------------------------------------
# Reader


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not path.exists():
        raise FileNotFoundError(f"data set {str(path)!r} does not exist; {CONVERTER_HINT}")
    try:
        return zipfile.ZipFile(path, "r")
    except zipfile.BadZipFile as e:
        raise DataError(f"{str(path)!r} is not a valid zip archive (corrupt or truncated?): {e}") from None


def read_edm_zip_labels(path: Union[str, os.PathLike]) -> Tuple[List[str], Optional[List[int]]]:
    """Sorted image member names of an EDM zip and their integer labels (None if unlabelled)."""
    path = Path(path)
    with _open_zip(path) as zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith(IMAGE_EXTENSIONS) and not n.endswith("/"))
        if not names:
            raise DataError(f"{str(path)!r} contains no images (expected PNGs like 00000/img00000000.png)")
        labels = None
        if "dataset.json" in zf.namelist():
            try:
                meta = json.loads(_read_member(zf, "dataset.json", str(path)))
            except (json.JSONDecodeError, UnicodeDecodeError, zipfile.BadZipFile) as e:
                raise DataError(f"{str(path)!r}: dataset.json is not valid JSON: {e}") from None
            raw = meta.get("labels") if isinstance(meta, dict) else None
            if raw is not None:
                try:
                    table = {str(fname): lab for fname, lab in raw}
                except (TypeError, ValueError):
                    raise DataError(f"{str(path)!r}: dataset.json 'labels' must be a list of [filename, label] pairs") from None
                if len(table) != len(names):
                    raise DataError(f"{str(path)!r}: dataset.json has {len(table)} labels but the zip has {len(names)} images")
                labels = []
                for n in names:
                    if n not in table:
                        raise DataError(f"{str(path)!r}: dataset.json has no label for {n!r}")
                    lab = table[n]
                    if isinstance(lab, bool) or not isinstance(lab, int) or lab < 0:
                        raise DataError(f"{str(path)!r}: label of {n!r} is {lab!r}; only non-negative integer labels are supported")
                    labels.append(lab)
    return names, labels


def dataset_fingerprint(path: Union[str, os.PathLike]) -> str:
    """A content hash of a zip data set, cheap to compute: SHA-256 over every member's name, size and CRC-32
    (read from the central directory, so no image is decoded). Any changed pixel changes a CRC."""
    path = Path(path)
    h = hashlib.sha256()
    with _open_zip(path) as zf:
        for info in sorted(zf.infolist(), key=lambda i: i.filename):
            h.update(f"{info.filename}\0{info.file_size}\0{info.CRC:08x}\n".encode())
    return h.hexdigest()[:16]


class EDMZipDataset(torch.utils.data.Dataset):
    """Random-access reader of an EDM-format zip: items are (x float32 [C, H, W] in [-1, 1], label int).

    * ``use_labels``: read dataset.json labels (label -1 is returned for unlabelled sets); ``label_dim``
      is max label + 1 when ``cond=True`` and the set is labelled, else 0.
    * ``xflip``: doubles the index set; indices >= N return the horizontally flipped image (EDM option).
    * ``cache``: keep decoded uint8 images in a per-process dict (what EDM does per DataLoader worker);
      ``preload()`` decodes everything into one uint8 tensor instead.
    * ``resolution``: if > 0, the stored images must have this size (checked on open).
    * DataLoader-friendly: the zip handle is opened lazily per process and dropped when pickled, so
      worker processes each open their own.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],
        *,
        resolution: int = 0,
        cond: bool = False,
        use_labels: bool = True,
        xflip: bool = False,
        cache: bool = True,
        max_size: Optional[int] = None,
        name: str = "edmzip",
    ):
        self.path = Path(path)
        self._names, labels = read_edm_zip_labels(self.path)
        if max_size is not None:
            self._names = self._names[:max_size]
            labels = None if labels is None else labels[:max_size]
        self._labels = labels if use_labels else None
        self._zip: Optional[zipfile.ZipFile] = None
        self._zip_pid: Optional[int] = None
        self._use_cache = bool(cache)
        self._cache = {} if cache else None
        self._preloaded: Optional[torch.Tensor] = None
        self.xflip = bool(xflip)
        self.name = name
        first = self._decode(0)
        self.shape = (first.shape[0], first.shape[1], first.shape[2])
        if self.shape[0] not in (1, 3):
            raise DataError(f"{self._where(0)}: expected 1 or 3 channels, got {self.shape[0]}")
        if self.shape[1] != self.shape[2]:
            raise DataError(f"{self._where(0)}: images must be square, got {self.shape[2]}x{self.shape[1]}")
        if resolution and self.shape[1] != resolution:
            raise DataError(f"{str(self.path)!r} holds {self.shape[1]}x{self.shape[2]} images but resolution={resolution} was asked for")
        self.resolution = self.shape[1]
        self.num_classes = (max(self._labels) + 1) if self._labels else 0
        self.label_dim = self.num_classes if cond else 0

    # -- pickling for DataLoader workers: drop the open handle
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_zip"] = None
        state["_zip_pid"] = None
        return state

    def _where(self, i: int) -> str:
        return f"{str(self.path)!r} member {self._names[i]!r}"

    def _get_zip(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = _open_zip(self.path)
            self._zip_pid = os.getpid()
        return self._zip

    def _decode(self, i: int) -> np.ndarray:
        """uint8 [C, H, W] of raw image i (no flip), checked against the data set's size and mode."""
        from PIL import Image, UnidentifiedImageError

        try:
            data = _read_member(self._get_zip(), self._names[i], self._where(i), cap=MAX_MEMBER_BYTES)
            with open_image_checked(io.BytesIO(data), self._where(i)) as im:
                mode = im.mode
                if mode not in ("L", "RGB"):
                    raise DataError(f"{self._where(i)}: image mode {mode!r}; EDM data sets hold 'L' (grey) or 'RGB' images")
                arr = np.array(im, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on read-only)
        except (zipfile.BadZipFile, UnidentifiedImageError, OSError, KeyError) as e:
            raise DataError(f"{self._where(i)}: cannot read image ({type(e).__name__}: {e})") from None
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if hasattr(self, "shape") and tuple(arr.shape) != self.shape:
            raise DataError(f"{self._where(i)}: image is {arr.shape[2]}x{arr.shape[1]} with {arr.shape[0]} channel(s), "
                             f"expected {self.shape[2]}x{self.shape[1]} with {self.shape[0]} like the rest of the data set")
        return arr

    @property
    def num_images(self) -> int:
        """Stored images (without the x-flip doubling)."""
        return len(self._names)

    def __len__(self) -> int:
        return len(self._names) * (2 if self.xflip else 1)

    def image_uint8(self, i: int) -> torch.Tensor:
        """uint8 [C, H, W] image for index i (flipped for i >= N when xflip)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        i %= len(self)
        j, flip = i % len(self._names), i >= len(self._names)
        if self._preloaded is not None:
            img = self._preloaded[j]
        else:
            arr = self._cache.get(j) if self._cache is not None else None
            if arr is None:
                arr = self._decode(j)
                if self._cache is not None:
                    self._cache[j] = arr
            img = torch.from_numpy(arr)
        return img.flip(-1) if flip else img

    def label(self, i: int) -> int:
        if self._labels is None:
            return -1
        return int(self._labels[i % len(self._names)])

    def __getitem__(self, i: int):
        x = self.image_uint8(i).to(torch.float32) / 127.5 - 1.0
        return x, self.label(i)

    def labels(self) -> Optional[torch.Tensor]:
        """int64 [N] labels of the stored images (None if unlabelled)."""
        return None if self._labels is None else torch.tensor(self._labels, dtype=torch.int64)

    def preload(self, progress: bool = False) -> "EDMZipDataset":
        """Decode every image once into one uint8 tensor [N, C, H, W] (fast random access afterwards)."""
        idx = range(len(self._names))
        if progress:
            from tqdm.auto import tqdm

            idx = tqdm(idx, desc=f"loading {self.path.name}", unit="img")
        out = torch.empty((len(self._names),) + self.shape, dtype=torch.uint8)
        for j in idx:
            out[j] = torch.from_numpy(self._decode(j))
        self._preloaded = out
        self._cache = None
        return self

    def stored_uint8(self, device="cpu") -> Tuple[torch.Tensor, torch.Tensor]:
        """(uint8 [N, C, H, W] stored images, int64 [N] labels, -1 where unlabelled) on ``device``, preloading first.

        The N stored images only: with ``xflip`` the items i >= N are image i - N flipped, which a caller
        gathering batches itself applies (``gather_batch``). On another device than the CPU the host copy is
        released afterwards (ImageNet-64: 15.7 GB per process); the data set then decodes on use again.
        """
        if self._preloaded is None:
            self.preload()
        n = len(self._names)
        lab = torch.full((n,), -1, dtype=torch.int64) if self._labels is None else \
            torch.as_tensor(np.asarray(self._labels[:n]), dtype=torch.int64)
        out = self._preloaded.to(device)
        if out.device.type != "cpu":
            self._preloaded, self._cache = None, ({} if getattr(self, "_use_cache", True) else None)
        return out, lab.to(device)

    def fingerprint(self) -> str:
        return dataset_fingerprint(self.path)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __repr__(self) -> str:
        return (f"EDMZipDataset({str(self.path)!r}, n={self.num_images}, shape={self.shape}, "
                f"labelled={self._labels is not None}, label_dim={self.label_dim}, xflip={self.xflip})")
