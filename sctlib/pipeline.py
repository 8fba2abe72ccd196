"""Plumbing shared by the papermill pipelines (``pipelines/*.ipynb``): plain-value parameters, the refusal
to start a GPU-scale preset on a CPU, and the smoke mode's tiny inputs.

Pipeline parameters are scalars so that each shows in ``papermill --help-notebook`` and takes a plain
``-p`` value: lists are comma-separated strings (``-p steps 1,2``) and config overrides one string of
space-separated ``key=value`` items (``-p overrides "total_nimg=64000 loss.q=4"``).
"""
from __future__ import annotations

import math
import os
import shlex
from pathlib import Path
from typing import List, Sequence

__all__ = ["parse_list", "parse_overrides", "is_gpu_scale", "check_device", "smoke_enabled", "smoke_inputs",
           "SMOKE_OVERRIDES", "GPUScaleOnCPU",
           "random_inception_weights"]

# A GPU-scale preset: more images than a CPU trains in an hour at this network size.
_GPU_SCALE_NIMG = 1_000_000


class GPUScaleOnCPU(RuntimeError):
    """A paper-scale preset was asked to start on a machine without a CUDA GPU."""


def parse_list(value, cast=int) -> list:
    """'1,2' -> [1, 2]; '' -> []; a list or tuple passes through (cast item by item)."""
    if isinstance(value, (list, tuple)):
        return [cast(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [cast(value)]
    items = [v.strip() for v in str(value).replace(";", ",").split(",")]
    try:
        return [cast(v) for v in items if v]
    except ValueError as exc:
        raise ValueError(f"cannot read {value!r} as a comma-separated list of {cast.__name__}: {exc}") from None


def parse_overrides(value) -> List[str]:
    """'a=1 loss.q=4' -> ['a=1', 'loss.q=4'] (shell-style quoting allowed); a list passes through."""
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        items = shlex.split(str(value or ""))
    bad = [v for v in items if "=" not in v]
    if bad:
        raise ValueError(f"overrides must be key=value items separated by spaces; not understood: {bad}")
    return items


def is_gpu_scale(cfg) -> bool:
    """True for presets meant for GPUs (the paper-scale CIFAR-10 and ImageNet-64 runs)."""
    return cfg.total_nimg >= _GPU_SCALE_NIMG and cfg.net.arch in ("ddpmpp", "edm2") and cfg.net.model_channels >= 64


def check_device(cfg, *, allow_cpu: bool = False) -> None:
    """Refuse a GPU-scale run on a machine without CUDA unless ``allow_cpu``; the message says what to do."""
    import torch

    if allow_cpu or not is_gpu_scale(cfg) or torch.cuda.is_available():
        return
    raise GPUScaleOnCPU(
        f"preset {cfg.name!r} trains {cfg.total_nimg / 1e6:.1f}M images of a {cfg.net.arch} network "
        f"({cfg.net.model_channels} channels): a GPU-scale run, and no CUDA GPU is visible here. "
        "Run on a GPU machine, or pass -p smoke True to run the whole pipeline in miniature on this CPU "
        "(minutes), or -p allow_cpu True to start the full run on the CPU anyway.")


def smoke_enabled(smoke) -> bool:
    """The ``smoke`` parameter, or ``$SCTLIB_SMOKE=1`` (how ``make test`` runs every pipeline through nbmake)."""
    if isinstance(smoke, str):
        smoke = smoke.strip().lower() in ("1", "true", "yes")
    return bool(smoke) or os.environ.get("SCTLIB_SMOKE", "").strip() in ("1", "true", "yes")


# Tiny networks and schedules that keep the code path of the paper-scale presets.
SMOKE_OVERRIDES = {
    "cifar10": ["device=cpu", "net.model_channels=16", "net.num_blocks=1", "net.channel_mult=1,1",
                "net.attn_resolutions=16", "batch_size=16", "total_nimg=64", "checkpoint_nimg=32", "tick_nimg=16",
                "eval.num_samples=8", "loss.double_nimg=32", "ema_halflife_nimg=64"],
    "imagenet64": ["device=cpu", "net.model_channels=16", "net.num_blocks=1", "net.channel_mult=1,1,1,1",
                   "net.attn_resolutions=8", "batch_size=16", "total_nimg=64", "checkpoint_nimg=32",
                   "tick_nimg=16", "eval.num_samples=8", "phema_stds=0.05", "loss.double_nimg=32",
                   "ema_halflife_nimg=64"],
}


def smoke_inputs(dataset: str, folder, *, num_images: int = 64) -> dict:
    """Inputs for a smoke run on a CPU, written under ``folder``: an EDM zip of sklearn's digits blown up to
    the dataset's resolution (RGB; labels for ImageNet-64), and the Inception weights for FID.

    The Inception weights are the real ones where they are installed (``$SCTLIB_INCEPTION_WEIGHTS`` or the
    cache); otherwise a network of the same layout with random weights is written, and ``fid_note`` says
    that those FIDs only exercise the code.
    """
    import torch

    from . import data as data_mod
    from .data import write_edm_zip
    from .metrics import inception

    if dataset not in SMOKE_OVERRIDES:
        raise ValueError(f"no smoke inputs for dataset {dataset!r}; valid: {sorted(SMOKE_OVERRIDES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    res = 32 if dataset == "cifar10" else 64
    digits = data_mod.load_dataset("digits", cond=True)
    X, y = digits.tensors()
    X, y = X[:num_images], y[:num_images]
    X = torch.nn.functional.interpolate(X.float(), size=(res, res), mode="nearest").repeat(1, 3, 1, 1)
    zip_path = write_edm_zip(folder / f"smoke-{dataset}.zip", X.clamp(-1, 1),
                             y.tolist() if dataset == "imagenet64" else None)
    try:
        weights, note = str(inception.resolve_inception_weights()), "real Inception weights"
    except inception.InceptionWeightsMissing:
        weights = str(random_inception_weights(folder / "random-inception.pth"))
        note = "random Inception weights (no real ones installed): these FIDs only exercise the code"
    return {"data_path": str(zip_path), "inception_weights": weights, "fid_note": note,
            "overrides": list(SMOKE_OVERRIDES[dataset])}


def random_inception_weights(path: Path) -> Path:
    """torch-fidelity's InceptionV3 layout with He-normal random convolutions (plumbing only)."""
    if path.exists():
        return path
    from unittest import mock

    import torch
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    # Build the module without its download (the weights are replaced below anyway).
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
         mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in net.state_dict().items():
        if k.endswith("conv.weight") or k == "fc.weight":
            v = torch.randn(v.shape, generator=g) * math.sqrt(2.0 / v[0].numel())
        sd[k] = v.clone()
    tmp = path.with_suffix(".tmp")
    torch.save(sd, tmp)
    os.replace(tmp, path)
    return path

