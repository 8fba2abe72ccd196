"""An embedded natural-image set: square crops of the colour photographs that ship inside scikit-image and
scikit-learn, cut by a fixed, seeded recipe and written as an EDM-format zip.

Nothing is downloaded: the eleven photographs are files inside the two installed packages. The set gives the
image-scale experiments (32x32 like CIFAR-10, 64x64 like ImageNet-64) real photographic statistics on a machine
without network access; it is *not* a substitute for CIFAR-10 or ImageNet (eleven scenes, heavily overlapping
crops), and FIDs on it are comparable only with other FIDs on it.

Recipe (``natural_images``; every number below is a parameter with this default):

* photographs, in this order (class label = position): scikit-image ``astronaut``, ``chelsea``, ``coffee``,
  ``rocket``, ``hubble_deep_field``, ``retina``, ``immunohistochemistry``, ``motorcycle_left`` and
  ``motorcycle_right`` (the two views of ``stereo_motorcycle``), scikit-learn ``china.jpg`` and ``flower.jpg``;
* ``crops_per_photo = 4608`` crops of each (11 x 4608 = 50,688 images);
* crop c of photograph p draws from ``numpy.random.RandomState([seed, p])`` (the legacy generator, whose
  stream numpy keeps fixed across versions), in this order for all crops at once: a scale k uniform in
  {1, ..., ``max_scale`` = 4}; the top row ``floor(u * (H - k R + 1))`` and left column
  ``floor(u * (W - k R + 1))`` with u uniform in [0, 1); a horizontal flip with probability 1/2;
* the k R x k R window is reduced to R x R by the mean of each k x k block, rounded half up in integers
  (exact, no resampling library involved), then flipped if drawn;
* the images of all photographs are put in one order by ``RandomState(seed).permutation``, so that any prefix
  of the zip holds every photograph in about equal numbers.

The SHA-256 of the result (resolution, the uint8 pixels [N, R, R, 3] and the int64 labels) is asserted for the
default recipe, and each photograph's pixels are checked first, so that a changed file in a future
scikit-image or scikit-learn (or a different JPEG decoder) is reported by name rather than as a wrong hash.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, List, Tuple, Union

import numpy as np

__all__ = [
    "NATURAL_PHOTOS",
    "DEFAULT_CROPS_PER_PHOTO",
    "DEFAULT_MAX_SCALE",
    "NATURAL_SHA256",
    "PHOTO_SHA256",
    "load_photo",
    "natural_images",
    "natural_hash",
    "build_natural",
]

NATURAL_PHOTOS: Tuple[str, ...] = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
    "motorcycle_left", "motorcycle_right", "china", "flower",
)
DEFAULT_CROPS_PER_PHOTO = 4608
DEFAULT_MAX_SCALE = 4

# SHA-256 of each photograph's uint8 [H, W, 3] pixels as loaded here (scikit-image 0.26.0, scikit-learn 1.9.1).
PHOTO_SHA256: Dict[str, str] = {
    "astronaut": "cc13a7e7c2b19ff34c7aff17db94da545bfc80592474d5a5f41b1282e0ab5ad5",  # 512x512
    "chelsea": "e1b0b0f590712c82ac3872c52e2a0a242e6e038a0ef9f7d0069457597f3a5d26",  # 451x300
    "coffee": "ec4931bdac7ec4cbfd851992dd820d9667b2b5e2956689a51731e87e24b55c85",  # 600x400
    "rocket": "e1da8815a6462eeb48832124b382cfe0b6a3fc2c0dd144ac481c0ca68d1b7c9d",  # 640x427
    "hubble_deep_field": "10380e0d4fc6db65e7243fed0fffa581739a480eacb8dcf329e607e20b3e7050",  # 1000x872
    "retina": "3eb9932c6f9184e86db20d850b58945df17c1cd4cab857529e33703d8dc5e5ad",  # 1411x1411
    "immunohistochemistry": "a7dc44bb62a2c30de43286e74af07aef0f8b4faa61e1d1f02042357da28f2468",  # 512x512
    "motorcycle_left": "035fa6a77319ebad134e296a8d9b9b72fda9360ab57fdd80ac05baf2eaf24d4c",  # 741x500
    "motorcycle_right": "46518f2ceb93a9841b8fd67ed2e2d9d514fbb6c4fefebf6a532516ea6ddfc094",  # 741x500
    "china": "752cd428fd56ca6f39f913798d3ea75fd152a08db8e6834417de25338bd72570",  # 640x427
    "flower": "6e0b7f5474ea8ef8fd735a998196b4eae7cb1946e0f9f8a284ea6d0763788096",  # 640x427
}
# SHA-256 (see natural_hash) of the default recipe's output, by resolution.
NATURAL_SHA256: Dict[int, str] = {
    32: "8c5b1436d72c7584806414b46cfc8180efcd6e80a12ba9756caf6a0b90da2e1e",  # 50,688 x 32x32x3, 8 s to cut
    64: "c0e15651342ed2b4fdd8ceb81dee2d98a26f1a1b71145b7b3373a4dcbac5bae6",  # 50,688 x 64x64x3, 37 s to cut
}


def load_photo(name: str) -> np.ndarray:
    """One of :data:`NATURAL_PHOTOS` as uint8 [H, W, 3], read from the installed package (no download)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        img = load_sample_image(f"{name}.jpg")
    else:
        try:
            import skimage.data as skd
        except ImportError as e:
            raise ImportError("the natural-image set needs scikit-image: pip install 'sctlib[data]'") from e
        if name in ("motorcycle_left", "motorcycle_right"):
            left, right, _disp = skd.stereo_motorcycle()
            img = left if name == "motorcycle_left" else right
        elif name in NATURAL_PHOTOS:
            img = getattr(skd, name)()
        else:
            raise ValueError(f"unknown photograph {name!r}; valid: {', '.join(NATURAL_PHOTOS)}")
    img = np.ascontiguousarray(np.asarray(img))
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"photograph {name!r}: expected uint8 [H, W, 3], got {img.dtype} {img.shape}")
    return img


def _sha256(*arrays: np.ndarray, prefix: str = "") -> str:
    h = hashlib.sha256(prefix.encode())
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def natural_hash(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 of a natural-image set: shapes, uint8 pixels [N, R, R, 3] and int64 labels [N]."""
    return _sha256(np.asarray(images, np.uint8), np.asarray(labels, np.int64), prefix="sctlib-natural-v1")


def _check_photo(name: str, img: np.ndarray) -> None:
    want = PHOTO_SHA256.get(name)
    if want is None:
        return
    got = _sha256(img)
    if got != want:
        import sklearn

        try:
            import skimage

            versions = f"scikit-image {skimage.__version__}, scikit-learn {sklearn.__version__}"
        except ImportError:
            versions = f"scikit-learn {sklearn.__version__}"
        raise ValueError(f"photograph {name!r} ({img.shape}) differs from the one the recipe was fixed with "
                         f"(SHA-256 {got[:16]}... != {want[:16]}...; installed: {versions}; fixed with scikit-image "
                         "0.26.0 and scikit-learn 1.9.1): the built set would not match its recorded hash")


def _crops_of(img: np.ndarray, n: int, resolution: int, rng: np.random.RandomState, max_scale: int) -> np.ndarray:
    H, W, _ = img.shape
    k = rng.randint(1, max_scale + 1, size=n)
    size = k * resolution
    if int(size.max()) > min(H, W):
        raise ValueError(f"a {int(size.max())}-pixel crop does not fit a {W}x{H} photograph; lower max_scale")
    top = np.floor(rng.random_sample(n) * (H - size + 1)).astype(np.int64)
    left = np.floor(rng.random_sample(n) * (W - size + 1)).astype(np.int64)
    flip = rng.randint(0, 2, size=n).astype(bool)
    out = np.empty((n, resolution, resolution, 3), np.uint8)
    for i in range(n):
        kk, s = int(k[i]), int(size[i])
        win = img[top[i]:top[i] + s, left[i]:left[i] + s].astype(np.uint32)
        # mean of each kk x kk block, rounded half up: (sum + kk^2 // 2) // kk^2, exact in integers
        blocks = win.reshape(resolution, kk, resolution, kk, 3).sum(axis=(1, 3))
        small = ((blocks + (kk * kk) // 2) // (kk * kk)).astype(np.uint8)
        out[i] = small[:, ::-1] if flip[i] else small
    return out


def natural_images(resolution: int = 32, *, seed: int = 0, crops_per_photo: int = DEFAULT_CROPS_PER_PHOTO,
                   max_scale: int = DEFAULT_MAX_SCALE, photos: Tuple[str, ...] = NATURAL_PHOTOS,
                   check_photos: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """The crops of the recipe in the module docstring: (uint8 [N, R, R, 3], int64 labels [N] = photograph index)."""
    if resolution not in (8, 16, 32, 64):
        raise ValueError(f"resolution must be 8, 16, 32 or 64 (power of two, crops at least 4x smaller than the "
                         f"smallest photograph), got {resolution}")
    if crops_per_photo < 1 or max_scale < 1:
        raise ValueError(f"crops_per_photo and max_scale must be >= 1, got {crops_per_photo}, {max_scale}")
    images: List[np.ndarray] = []
    labels: List[np.ndarray] = []
    for p, name in enumerate(photos):
        if name not in NATURAL_PHOTOS:
            raise ValueError(f"unknown photograph {name!r}; valid: {', '.join(NATURAL_PHOTOS)}")
        img = load_photo(name)
        if check_photos:
            _check_photo(name, img)
        rng = np.random.RandomState([int(seed), NATURAL_PHOTOS.index(name)])
        images.append(_crops_of(img, crops_per_photo, resolution, rng, max_scale))
        labels.append(np.full(crops_per_photo, NATURAL_PHOTOS.index(name), np.int64))
    x, y = np.concatenate(images), np.concatenate(labels)
    order = np.random.RandomState(int(seed)).permutation(len(x))
    return x[order], y[order]


def build_natural(dst: Union[str, os.PathLike], resolution: int = 32, *, seed: int = 0,
                  crops_per_photo: int = DEFAULT_CROPS_PER_PHOTO, max_scale: int = DEFAULT_MAX_SCALE,
                  labels: bool = True, verify: bool = True, progress: bool = False) -> Dict[str, object]:
    """Build the set and write it as an EDM-format zip at ``dst`` (atomically). Returns
    ``{'path', 'num_images', 'resolution', 'num_classes', 'sha256', 'photos'}``.

    For the default recipe (seed 0, default counts and scales) the hash must equal :data:`NATURAL_SHA256`
    (``verify``): a mismatch raises ValueError before anything is written. ``labels=False`` writes no labels
    (the hash still covers them, so it is the same set).
    """
    from .edmzip import write_edm_zip

    x, y = natural_images(resolution, seed=seed, crops_per_photo=crops_per_photo, max_scale=max_scale,
                          check_photos=verify)
    digest = natural_hash(x, y)
    default = (seed == 0 and crops_per_photo == DEFAULT_CROPS_PER_PHOTO and max_scale == DEFAULT_MAX_SCALE)
    want = NATURAL_SHA256.get(resolution) if default else None
    if verify and want is not None and digest != want:
        raise ValueError(f"natural-image set {resolution}x{resolution}: SHA-256 {digest} differs from the recorded "
                         f"{want}; the recipe or the photographs changed")
    path = write_edm_zip(dst, x, y.tolist() if labels else None, progress=progress)
    return {"path": str(Path(path)), "num_images": int(len(x)), "resolution": int(resolution),
            "num_classes": len(NATURAL_PHOTOS) if labels else 0, "sha256": digest, "verified": want is not None,
            "photos": list(NATURAL_PHOTOS)}
