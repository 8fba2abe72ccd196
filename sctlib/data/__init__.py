"""Data: embedded sets (sklearn digits, 2-D Gaussian-mixture toys, crops of the photographs shipped with
scikit-image / scikit-learn), EDM-format zips, converters.

Every data set is a ``torch.utils.data.Dataset`` whose items are ``(x0, label)`` with x0 float32 in
[-1, 1] ([C, H, W]; toys [2]) and attributes ``label_dim`` (0 = unconditional), ``shape`` and ``name``.
In-memory sets (digits, toys) also expose ``tensors() -> (X, y)``. This package never imports
``sctlib.networks`` or ``sctlib.train`` (data sits below the models in the layering).
"""
from __future__ import annotations

from pathlib import Path

from .embedded import (
    DIGITS_LAYOUTS,
    DIGITS_RESOLUTIONS,
    TOY_MIXTURES,
    DigitsDataset,
    GaussianMixture2D,
    SyntheticImages,
    ToyDataset,
    digits_images,
    exact_posterior_mean,
    make_mixture,
)
from .natural import NATURAL_PHOTOS, build_natural, natural_images
from .edmzip import (
    CONVERTER_HINT,
    EDMZipDataset,
    EDMZipWriter,
    dataset_fingerprint,
    read_edm_zip_labels,
    save_image_grid,
    to_uint8,
    write_edm_zip,
)

__all__ = [
    "load_dataset",
    "DATASET_NAMES",
    "DigitsDataset",
    "SyntheticImages",
    "ToyDataset",
    "GaussianMixture2D",
    "make_mixture",
    "digits_images",
    "exact_posterior_mean",
    "EDMZipDataset",
    "EDMZipWriter",
    "write_edm_zip",
    "read_edm_zip_labels",
    "dataset_fingerprint",
    "to_uint8",
    "save_image_grid",
    "TOY_MIXTURES",
    "NATURAL_PHOTOS",
    "natural_images",
    "build_natural",
]

DATASET_NAMES = ("digits", "digits-pad", *(f"toy2d-{m}" for m in TOY_MIXTURES), "edmzip", "cifar10", "imagenet64")
_ZIP_RESOLUTION = {"cifar10": 32, "imagenet64": 64}


def load_dataset(name: str, *, path: str = "", resolution: int = 0, cond: bool = False, xflip: bool = False, seed: int = 0):
    """Build a data set by name (the trainer's entry point).

    * ``'digits'`` (resized to ``resolution`` in {8, 16, 32}; 0 = 8) or ``'digits-pad'`` (zero-padded);
    * ``'toy2d-<mixture>'`` with <mixture> in ``TOY_MIXTURES`` ('ring', 'grid', ...): 50,000 points drawn
      with ``seed``; ``.mixture`` is the analytic density;
    * ``'edmzip'`` / ``'cifar10'`` / ``'imagenet64'``: an EDM-format zip at ``path`` (cifar10 / imagenet64
      also check the 32 / 64 resolution).
    ``cond`` sets ``label_dim`` (0 when False); ``xflip`` doubles image sets with mirrored copies
    (refused for digits and toys, where a mirror changes the distribution).
    """
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string; valid: {DATASET_NAMES}")
    if name in ("digits", "digits-pad"):
        if xflip:
            raise ValueError("xflip is not supported for digits (a mirrored digit is not a digit)")
        return DigitsDataset(resolution or 8, layout="resize" if name == "digits" else "pad", cond=cond)
    if name.startswith("toy2d-"):
        if xflip:
            raise ValueError("xflip is not supported for 2-D toys")
        if resolution not in (0, 2):
            raise ValueError(f"2-D toys have no resolution (got {resolution}); leave it 0")
        return ToyDataset(name[len("toy2d-"):], seed=seed, cond=cond)
    if name in ("edmzip", "cifar10", "imagenet64"):
        if not path:
            raise FileNotFoundError(f"dataset {name!r} reads an EDM-format zip given by path=...; none was given. {CONVERTER_HINT}")
        p = Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"dataset {name!r}: {str(p)!r} does not exist; {CONVERTER_HINT}")
        want = resolution or _ZIP_RESOLUTION.get(name, 0)
        return EDMZipDataset(p, resolution=want, cond=cond, xflip=xflip, name=name)
    raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASET_NAMES)} (toys: 'toy2d-<name>')")
