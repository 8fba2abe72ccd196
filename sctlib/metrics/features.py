"""A small digits classifier as the feature extractor for the embedded digits (an "FID for 8x8 digits").

InceptionV3 is meaningless on 8x8 greyscale digits and far too slow on a CPU, so the digits experiments
measure a Frechet distance (FID's formula, Heusel et al. 2017 Eq. 6) in the penultimate-layer space of a
small CNN trained here, reproducibly, on a fixed train split of sklearn's digits, plus the class accuracy
of class-conditional samples (the classifier's agreement with the requested labels).

* Training: seed 0, fixed split (1,397 train / 400 held out, a seeded permutation), Adam, one-pixel shift
  and 8 -> 16/32 -> 8 resize round-trip augmentation, about 10 s on one CPU core; held-out accuracy is recorded (expect > 95%).
* Cache: ``$SCTLIB_CACHE`` (default ``~/.cache/sctlib``)/``digits-classifier-<recipe hash>.safetensors`` with
  a JSON sidecar holding the file's SHA-256 and the accuracy; a hash mismatch (corrupt or edited file)
  retrains. Changing the recipe changes the file name.
* Registered with torch-fidelity as ``'sctlib-digits'`` (:func:`register_with_torch_fidelity`).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.embedded import DIGITS_LAYOUTS, digits_images
from .frechet import feature_stats, frechet_distance
from .inception import default_cache_dir

__all__ = [
    "DigitsClassifier",
    "DigitsFeatures",
    "digits_classifier",
    "digits_split",
    "fd_digits",
    "class_accuracy",
    "register_with_torch_fidelity",
    "TORCH_FIDELITY_NAME",
    "RECIPE",
]

TORCH_FIDELITY_NAME = "sctlib-digits"
# Everything that determines the trained weights; its hash names the cache file.
RECIPE = dict(version=1, seed=0, num_test=400, epochs=40, batch_size=64, lr=2e-3, width=24, feature_dim=128, shift=1,
              roundtrip=(16, 32))


def _recipe_hash() -> str:
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]


class DigitsClassifier(nn.Module):
    """CNN on [B, 1, 8, 8] images in [-1, 1]: two 3x3 conv blocks, 2x2 average pool, a 128-d feature layer,
    then 10 logits. ``features(x)`` is the penultimate (post-ReLU) layer used for the Frechet distance."""

    def __init__(self, width: int = 24, feature_dim: int = 128):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 16, feature_dim)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.avg_pool2d(F.relu(self.conv2(h)), 2)  # 8x8 -> 4x4
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def digits_split(seed: int = 0, num_test: int = 400) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices) into the 1,797 digits: a permutation seeded with ``seed``."""
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(seed))
    return perm[num_test:].sort().values, perm[:num_test].sort().values


def _random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels (background -1 fills in): cheap robustness to the
    slightly off-centre digits a generator makes."""
    B, _, H, W = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    dy = torch.randint(0, 2 * p + 1, (B,), generator=g)
    dx = torch.randint(0, 2 * p + 1, (B,), generator=g)
    rows = (dy[:, None] + torch.arange(H)[None])[:, :, None].expand(B, H, W)
    cols = (dx[:, None] + torch.arange(W)[None])[:, None, :].expand(B, H, W)
    return padded[torch.arange(B)[:, None, None], 0, rows, cols].unsqueeze(1)


def _random_roundtrip(x: torch.Tensor, g: torch.Generator, sizes) -> torch.Tensor:
    """Send a random part of the batch through 8 -> R -> 8 (the resize of ``load_dataset('digits',
    resolution=R)`` and back, as :class:`DigitsFeatures` does): the classifier then sees at training time the
    slight blur that samples made at 16x16 or 32x32 carry (without it, held-out accuracy on round-tripped
    real digits dropped to 95.7%)."""
    which = torch.randint(0, len(sizes) + 1, (x.shape[0],), generator=g)  # 0 = native 8x8
    out = x.clone()
    for j, r in enumerate(sizes, start=1):
        sel = which == j
        if bool(sel.any()):
            up = F.interpolate(x[sel], size=(r, r), mode="bilinear", align_corners=False)
            out[sel] = _to_8x8(up.clamp(-1, 1), "resize")
    return out


def _train(recipe: dict) -> Tuple[DigitsClassifier, float, float]:
    """Train from scratch; returns (model, held-out accuracy, seconds). Isolated from the global RNG."""
    X, y = digits_images(8)
    tr, te = digits_split(recipe["seed"], recipe["num_test"])
    t0 = time.time()
    threads = torch.get_num_threads()
    # NOTE: one thread. On 2 busy cores this tiny net trained 10x slower with 2 intra-op threads (measured
    # 97 s vs 10 s at width 32); one thread also makes the float summation order machine-independent.
    torch.set_num_threads(1)
    try:
        model = _train_loop(recipe, X[tr], y[tr])
    finally:
        torch.set_num_threads(threads)
    model.eval().requires_grad_(False)
    with torch.no_grad():
        acc = float((model(X[te]).argmax(1) == y[te]).float().mean())
    return model, acc, time.time() - t0


def _train_loop(recipe: dict, Xtr: torch.Tensor, ytr: torch.Tensor) -> DigitsClassifier:
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(recipe["seed"])
        model = DigitsClassifier(recipe["width"], recipe["feature_dim"])
        g = torch.Generator().manual_seed(recipe["seed"] + 1)
        opt = torch.optim.Adam(model.parameters(), lr=recipe["lr"])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, recipe["epochs"])
        for _ in range(recipe["epochs"]):
            perm = torch.randperm(len(Xtr), generator=g)
            for s in range(0, len(Xtr), recipe["batch_size"]):
                idx = perm[s : s + recipe["batch_size"]]
                xb = _random_shift(Xtr[idx], g, recipe["shift"])
                xb = _random_roundtrip(xb, g, recipe["roundtrip"])
                loss = F.cross_entropy(model(xb), ytr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
    return model


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_LOADED: Dict[str, DigitsClassifier] = {}


def digits_classifier(cache_dir: Optional[Union[str, os.PathLike]] = None, *, retrain: bool = False) -> DigitsClassifier:
    """The project's digits classifier (eval mode, frozen): loaded from the cache if its SHA-256 checks out,
    else trained (about 10 s on one CPU core) and saved. Attributes: ``held_out_accuracy``, ``sha256``,
    ``path``. Loaded models are memoised per process."""
    from safetensors.torch import load_file, save_file

    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    weights = cache_dir / f"digits-classifier-{_recipe_hash()}.safetensors"
    meta_path = weights.with_suffix(".json")
    key = str(weights)
    if not retrain and key in _LOADED:
        return _LOADED[key]
    model = None
    if not retrain and weights.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("sha256") == _sha256(weights):
                model = DigitsClassifier(RECIPE["width"], RECIPE["feature_dim"])
                model.load_state_dict(load_file(str(weights)))
                model.eval().requires_grad_(False)
                acc = float(meta["held_out_accuracy"])
            else:
                warnings.warn(f"{weights}: SHA-256 does not match {meta_path.name}; retraining the digits classifier")
        except (ValueError, KeyError, RuntimeError, OSError) as e:
            warnings.warn(f"{weights}: cannot load ({e}); retraining the digits classifier")
            model = None
    if model is None:
        model, acc, secs = _train(RECIPE)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = weights.with_suffix(f".{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        digest = _sha256(tmp)
        os.replace(tmp, weights)
        meta_tmp = meta_path.with_suffix(f".{os.getpid()}.tmp")
        meta_tmp.write_text(json.dumps({"sha256": digest, "held_out_accuracy": acc, "train_seconds": round(secs, 2),
                                        "recipe": RECIPE, "torch": torch.__version__}, indent=1))
        os.replace(meta_tmp, meta_path)
    model.held_out_accuracy = acc
    model.sha256 = _sha256(weights)
    model.path = weights
    _LOADED[key] = model
    return model


def _to_8x8(images: torch.Tensor, layout: str) -> torch.Tensor:
    """[-1, 1] (or uint8) images [B, 1|3, H, W] -> [B, 1, 8, 8] in [-1, 1]."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B, 1 or 3, H, W], got shape {tuple(images.shape)}")
    if layout not in DIGITS_LAYOUTS:
        raise ValueError(f"layout must be one of {DIGITS_LAYOUTS}, got {layout!r}")
    x = images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()
    if x.shape[1] == 3:
        x = x.mean(1, keepdim=True)
    H, W = x.shape[-2:]
    if (H, W) == (8, 8):
        return x
    if layout == "pad":  # padded digits: the 8x8 digit sits in the centre
        if H < 8 or W < 8:
            raise ValueError(f"layout='pad' needs images of at least 8x8, got {H}x{W}")
        top, left = (H - 8) // 2, (W - 8) // 2
        return x[:, :, top : top + 8, left : left + 8]
    # antialiased bilinear: area-like averaging when shrinking, plain bilinear when growing
    return F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)


class DigitsFeatures(nn.Module):
    """Images [-1, 1] (or uint8) [B, 1, H, W], any H -> classifier features [B, 128].

    Images are brought to 8x8 first: resized (``layout='resize'``, the default for ``load_dataset('digits',
    resolution=R)``) or centre-cropped (``layout='pad'``, for ``'digits-pad'``).
    """

    name = TORCH_FIDELITY_NAME

    def __init__(self, classifier: Optional[DigitsClassifier] = None, *, layout: str = "resize", cache_dir=None):
        super().__init__()
        if layout not in DIGITS_LAYOUTS:
            raise ValueError(f"layout must be one of {DIGITS_LAYOUTS}, got {layout!r}")
        self.classifier = classifier if classifier is not None else digits_classifier(cache_dir)
        self.layout = layout

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = _to_8x8(images, self.layout).to(next(self.classifier.parameters()).device)
        return self.classifier.features(x)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(_to_8x8(images, self.layout).to(next(self.classifier.parameters()).device))


_REF_STATS: Dict[tuple, Tuple[np.ndarray, np.ndarray]] = {}


@torch.no_grad()
def _features(images: torch.Tensor, layout: str, batch_size: int = 1024) -> torch.Tensor:
    ext = DigitsFeatures(layout=layout)
    return torch.cat([ext(images[s : s + batch_size].cpu()) for s in range(0, images.shape[0], batch_size)])


def _digits_ref_stats(ref: str, resolution: int, layout: str):
    key = (ref, resolution, layout, digits_classifier().sha256)
    if key not in _REF_STATS:
        X, _ = digits_images(resolution, layout=layout)
        if ref == "train":
            X = X[digits_split(RECIPE["seed"], RECIPE["num_test"])[0]]
        _REF_STATS[key] = feature_stats(_features(X, layout))
    return _REF_STATS[key]


def fd_digits(images: torch.Tensor, ref: str = "train", *, layout: str = "resize") -> float:
    """Frechet distance in the digits classifier's feature space between ``images`` ([-1, 1], [B, 1, H, W])
    and the real digits: ``ref='train'`` (the classifier's 1,397 training digits) or ``'all'`` (1,797).

    The real digits go through the same path as the samples (made at the samples' resolution with the same
    ``layout``, then brought back to 8x8), so the resize itself adds no distance. Sample sizes matter
    (FD is biased upwards for small N): compare numbers computed with the same N.
    """
    if ref not in ("train", "all"):
        raise ValueError(f"ref must be 'train' or 'all', got {ref!r}")
    if images.ndim != 4 or images.shape[1] != 1 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"fd_digits expects square greyscale images [B, 1, H, H], got {tuple(images.shape)}")
    res = images.shape[-1]
    if res not in (8, 16, 32):
        raise ValueError(f"digits images are 8, 16 or 32 pixels wide, got {res}")
    mu_r, s_r = _digits_ref_stats(ref, res, layout)
    mu, s = feature_stats(_features(images, layout))
    return frechet_distance(mu, s, mu_r, s_r)


@torch.no_grad()
def class_accuracy(images: torch.Tensor, labels: torch.Tensor, *, layout: str = "resize") -> float:
    """Fraction of ``images`` that the digits classifier assigns to the requested ``labels`` (int64 [B])."""
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {images.shape[0]} images")
    ext = DigitsFeatures(layout=layout)
    pred = torch.cat([ext.logits(images[s : s + 1024].cpu()).argmax(1) for s in range(0, images.shape[0], 1024)])
    return float((pred == labels).float().mean())


def register_with_torch_fidelity(name: str = TORCH_FIDELITY_NAME) -> str:
    """Register the digits extractor with torch-fidelity (idempotent); returns the name to pass as
    ``feature_extractor=``. Provides features ``'features'`` (128-d, default for FID/KID/PRC) and ``'logits'``
    (default for ISC). torch-fidelity feeds uint8 [B, 3, H, W]; channels are averaged to grey."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if name in FEATURE_EXTRACTORS_REGISTRY:
        return name

    class DigitsFidelityExtractor(FeatureExtractorBase):
        def __init__(self, name, features_list, layout: str = "resize", **kwargs):
            super().__init__(name, features_list)
            self.digits = DigitsFeatures(layout=layout)

        @staticmethod
        def get_provided_features_list():
            return ("features", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

        def forward(self, x):
            x8 = _to_8x8(x, self.digits.layout)
            feats = self.digits.classifier.features(x8)
            out = {"features": feats, "logits": self.digits.classifier.head(feats)}
            return tuple(out[f] for f in self.features_list)

    register_feature_extractor(name, DigitsFidelityExtractor)
    return name
