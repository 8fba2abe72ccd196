"""DDPM++ as EDM configures it for CIFAR-10 (EDM's ``SongUNet``), written from the architecture description.

References
----------
* Song et al., "Score-Based Generative Modeling through SDEs" (2021), App. H: the DDPM++ UNet.
* Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models" (EDM, 2022),
  Table 7 / App. F.2: config F of DDPM++ (positional noise embedding, [1, 1] resampling filter, 128
  channels, multipliers [2, 2, 2], 4 blocks per resolution, attention at 16x16).
* Geng et al., "Consistency Models Made Easy" (ECT, 2024): tunes exactly this network (55.7M parameters).

Parameter and buffer names, shapes and registration order are those of the published EDM / ECT
checkpoints (NVlabs/edm ``training/networks.py``, ``SongUNet``), so their weights load by name under
the ``model.`` prefix of :class:`sctlib.precond.Precond`.

The raw network computes F(x_in, c_noise, class_labels) with ``x_in = c_in x`` and ``c_noise = ln(sigma)/4``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .layers import Dropout, PositionalEmbedding, interleaved_attention

__all__ = ["Linear", "Conv2d", "GroupNorm", "UNetBlock", "DDPMpp"]


def _xavier_uniform_(shape, fan_in: int, fan_out: int, gain: float = 1.0) -> torch.Tensor:
    """Glorot & Bengio (2010) uniform init scaled by ``gain`` (EDM's ``init_weight``)."""
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return (torch.rand(shape) * 2 - 1) * bound


class Linear(nn.Module):
    """Fully connected layer with EDM's parameter names (``weight`` [out, in], ``bias`` [out])."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_weight: float = 1.0):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = nn.Parameter(_xavier_uniform_([out_features, in_features], in_features, out_features, init_weight))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv2d(nn.Module):
    """Convolution with an optional built-in 2x resampling step (EDM ``Conv2d``, non-fused path).

    ``down``: depthwise stride-2 convolution with the normalised outer product of ``resample_filter``
    ([1, 1] gives 2x2 average pooling); ``up``: its transpose scaled by 4 ([1, 1] gives nearest
    upsampling). The filter is a persistent buffer ``resample_filter`` [1, 1, k, k] only when
    resampling, as in the published state dicts. ``kernel=0`` means resampling only (no weight).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[int] = (1, 1), init_weight: float = 1.0):
        super().__init__()
        if up and down:
            raise ValueError("Conv2d cannot both upsample and downsample")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.up, self.down = bool(up), bool(down)
        k = int(kernel)
        fan_in, fan_out = in_channels * k * k, out_channels * k * k
        self.weight = nn.Parameter(_xavier_uniform_([out_channels, in_channels, k, k], fan_in, fan_out,
                                                    init_weight)) if k else None
        self.bias = nn.Parameter(torch.zeros(out_channels)) if k and bias else None
        f = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        f = torch.outer(f, f).unsqueeze(0).unsqueeze(0) / f.sum().square()
        self.register_buffer("resample_filter", f if (up or down) else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.resample_filter
        if f is not None:
            C = x.shape[1]
            pad = (f.shape[-1] - 1) // 2
            f = f.to(x.dtype)
            if self.up:
                # the transpose of average pooling, times 4 so that a constant image stays constant
                x = F.conv_transpose2d(x, (f * 4).expand(C, 1, -1, -1), groups=C, stride=2, padding=pad)
            else:
                x = F.conv2d(x, f.expand(C, 1, -1, -1), groups=C, stride=2, padding=pad)
        if self.weight is not None:
            x = F.conv2d(x, self.weight.to(x.dtype), padding=self.weight.shape[-1] // 2)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with min(32, C / 4) groups (EDM ``GroupNorm``: at least 4 channels a group)."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = max(1, min(num_groups, num_channels // min_channels_per_group))
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class UNetBlock(nn.Module):
    """DDPM++ residual block (EDM ``UNetBlock`` with adaptive_scale=False, resample_proj=True, 1 head).

    x -> conv0(silu(norm0(x)))  [resampling inside conv0]
      -> silu(norm1(. + affine(emb)))   (the embedding enters as a per-channel bias)
      -> conv1(dropout(.)) -> (. + skip(x)) * sqrt(1/2)
    and, for attention blocks, (proj(attn(qkv(norm2(x)))) + x) * sqrt(1/2).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int = 1, dropout: float = 0.0,
                 skip_scale: float = math.sqrt(0.5), eps: float = 1e-6, resample_filter=(1, 1)):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.num_heads = int(num_heads) if attention else 0
        self.skip_scale = float(skip_scale)
        # Init as in DDPM++: xavier everywhere, ~0 for the layers that end a residual branch so each
        # block starts as (nearly) the identity, sqrt(0.2) for the attention projection.
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = Linear(emb_channels, out_channels)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, init_weight=1e-5)
        self.skip = None
        if out_channels != in_channels or up or down:
            self.skip = Conv2d(in_channels, out_channels, 1, up=up, down=down, resample_filter=resample_filter)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, init_weight=math.sqrt(0.2))
            self.proj = Conv2d(out_channels, out_channels, 1, init_weight=1e-5)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        x = F.silu(self.norm1(x + self.affine(emb).to(x.dtype).unsqueeze(-1).unsqueeze(-1)))
        x = self.conv1(self.dropout(x))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            a = interleaved_attention(self.qkv(self.norm2(x)), self.num_heads)
            x = (self.proj(a) + x) * self.skip_scale
        return x


class DDPMpp(nn.Module):
    """DDPM++ UNet F(x_in, c_noise, class_labels) (EDM ``SongUNet``: standard encoder/decoder, positional
    embedding, channel_mult_noise=1, channel_mult_emb=4, resample_filter [1, 1]).

    Parameters follow :class:`sctlib.config.NetConfig`. ``augment_dim`` is not supported: EDM skips
    ``map_augment`` when no augmentation labels are given (always the case at sampling and tuning time),
    so :mod:`sctlib.convert` drops that key and records it instead.
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, model_channels: int = 128,
                 channel_mult: Sequence[int] = (2, 2, 2), num_blocks: int = 4, attn_resolutions=(16,),
                 dropout: float = 0.0, dropout_res: int = 0, channel_mult_emb: int = 4):
        super().__init__()
        channel_mult = [int(m) for m in channel_mult]
        if not channel_mult:
            raise ValueError("channel_mult must list at least one level")
        if img_resolution % (2 ** (len(channel_mult) - 1)):
            raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^{len(channel_mult) - 1} "
                             f"(one halving per extra level of channel_mult={channel_mult})")
        self.img_resolution, self.img_channels = int(img_resolution), int(img_channels)
        self.label_dim = int(label_dim)
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels
        attn_resolutions = {int(r) for r in attn_resolutions}

        def drop(res: int) -> float:  # ECT's dropout-by-resolution option (0 = everywhere)
            return dropout if (dropout_res <= 0 or res <= dropout_res) else 0.0

        # Mapping network: c_noise -> positional embedding (+ labels) -> 2-layer MLP with SiLU.
        self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        self.map_label = Linear(label_dim, noise_channels) if label_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)

        block = dict(emb_channels=emb_channels, num_heads=1, skip_scale=math.sqrt(0.5), eps=1e-6)
        self.enc = nn.ModuleDict()
        cout = img_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, dropout=drop(res), **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                dropout=drop(res), **block)
        skips = [m.out_channels for m in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, dropout=drop(res), **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, dropout=drop(res), **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, dropout=drop(res), **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, dropout=drop(res), **block)
            if level == 0:
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, img_channels, 3, init_weight=1e-5)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: Optional[torch.Tensor] = None):
        emb = self.map_noise(c_noise.reshape(-1))  # [B or 1, noise_channels]; broadcasts over the batch
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError(f"DDPMpp is class-conditional (label_dim={self.label_dim}); pass one-hot labels")
            # EDM scales the one-hot rows by sqrt(label_dim) so the label term has unit-scale entries.
            emb = emb + self.map_label(class_labels.to(emb.dtype) * math.sqrt(self.map_label.in_features))
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        skips = []
        for name, block in self.enc.items():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)

        out = None
        for name, block in self.dec.items():
            if name.endswith("aux_norm"):
                out = block(x)
            elif name.endswith("aux_conv"):
                out = block(F.silu(out))
            else:
                # a block whose input width differs from x consumes the matching encoder skip
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return out
