"""Networks wrapped as EDM denoisers D(x, sigma, labels) (Karras et al. 2022, Eq. 7).

* ``ddpmpp`` - DDPM++ as EDM/ECT use it on CIFAR-10 (:class:`DDPMpp`, inner name ``model``);
* ``edm2``   - the EDM2 magnitude-preserving UNet (:class:`EDM2UNet`, inner name ``unet``);
* ``mlp``    - a residual MLP for 2-D toys (:class:`ToyMLP`, inner name ``model``).

:func:`build_network` turns a :class:`sctlib.config.NetConfig` into a :class:`sctlib.precond.Precond`
whose state-dict keys match the published checkpoints. ``NET_PRESETS`` holds the paper networks and
small CPU presets that run the same code path.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Union

from torch import nn

from ..config import ConfigError, NetConfig, from_dict
from ..precond import Precond
from .ddpmpp import DDPMpp
from .edm2 import EDM2UNet
from .layers import Dropout, record_dropout, replay_dropout
from .toy import ToyMLP

__all__ = ["build_network", "build_inner", "NET_PRESETS", "ARCHS", "count_params", "DDPMpp", "EDM2UNet",
           "ToyMLP", "Dropout", "record_dropout", "replay_dropout"]

ARCHS = ("ddpmpp", "edm2", "mlp")
INNER_NAMES = {"ddpmpp": "model", "edm2": "unet", "mlp": "model"}


def _edm2_img64(channels: int, dropout: float) -> NetConfig:
    # ECT's ImageNet-64 presets (ct_train.py): EDM2 UNet, dropout only at res <= 16, no boundary.
    return NetConfig(arch="edm2", img_resolution=64, img_channels=3, label_dim=1000, model_channels=channels,
                     channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(16, 8), dropout=dropout,
                     dropout_res=16, boundary="never")


NET_PRESETS: dict = {
    # paper scale
    "ddpmpp-cifar10": NetConfig(arch="ddpmpp", img_resolution=32, img_channels=3, label_dim=0, model_channels=128,
                                channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,), dropout=0.2,
                                sigma_min=0.003, boundary="eval"),                         # 55,732,739 params
    "edm2-img64-s": _edm2_img64(192, 0.40),                                                # 280,209,253
    "edm2-img64-m": _edm2_img64(256, 0.50),                                                # 497,803,045
    "edm2-img64-l": _edm2_img64(320, 0.50),                                                # 777,492,197
    "edm2-img64-xl": _edm2_img64(384, 0.50),                                               # 1,119,276,709
    # CPU presets on the same code paths (attention, resampling, dropout, labels all exercised)
    "ddpmpp-tiny": NetConfig(arch="ddpmpp", img_resolution=16, img_channels=3, label_dim=0, model_channels=16,
                             channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.1),
    "edm2-tiny": NetConfig(arch="edm2", img_resolution=16, img_channels=3, label_dim=10, model_channels=32,
                           channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.1, dropout_res=8),
    "mlp-toy": NetConfig(arch="mlp", img_resolution=2, img_channels=1, model_channels=64, channel_mult=(),
                         num_blocks=2, attn_resolutions=(), dropout=0.0),
}


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (buffers such as MPFourier freqs are not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _as_config(cfg: Union[NetConfig, dict, str]) -> NetConfig:
    if isinstance(cfg, str):
        if cfg not in NET_PRESETS:
            raise ConfigError(f"unknown network preset {cfg!r}; valid presets: {', '.join(sorted(NET_PRESETS))}")
        return NET_PRESETS[cfg]
    if isinstance(cfg, dict):
        return from_dict(NetConfig, cfg)
    if not isinstance(cfg, NetConfig):
        raise ConfigError(f"expected a NetConfig, dict or preset name, got {type(cfg).__name__}")
    return cfg


def build_inner(cfg: Union[NetConfig, dict, str]) -> nn.Module:
    """The raw network F(x_in, c_noise, class_labels) for ``cfg`` (no preconditioning)."""
    cfg = _as_config(cfg)
    if cfg.arch not in ARCHS:
        raise ConfigError(f"unknown network arch {cfg.arch!r}; valid choices: {', '.join(ARCHS)}")
    if cfg.arch == "mlp":
        return ToyMLP(data_dim=cfg.img_resolution, hidden=cfg.model_channels, num_blocks=cfg.num_blocks,
                      label_dim=cfg.label_dim, dropout=cfg.dropout)
    common = dict(img_resolution=cfg.img_resolution, img_channels=cfg.img_channels, label_dim=cfg.label_dim,
                  model_channels=cfg.model_channels, channel_mult=tuple(cfg.channel_mult), num_blocks=cfg.num_blocks,
                  attn_resolutions=tuple(cfg.attn_resolutions), dropout=cfg.dropout, dropout_res=cfg.dropout_res)
    return DDPMpp(**common) if cfg.arch == "ddpmpp" else EDM2UNet(**common)


def build_network(cfg: Union[NetConfig, dict, str]) -> Precond:
    """Build the denoiser D(x, sigma, labels) = Precond(F) described by a NetConfig (or preset name / dict).

    The raw network sits under ``model`` (ddpmpp, mlp) or ``unet`` (edm2), as in the published
    checkpoints. The module is returned in train mode, like any fresh nn.Module.
    """
    cfg = _as_config(cfg)
    inner = build_inner(cfg)
    return Precond(inner, inner_name=INNER_NAMES[cfg.arch], label_dim=cfg.label_dim, sigma_data=cfg.sigma_data,
                   sigma_min=cfg.sigma_min, boundary=cfg.boundary)
