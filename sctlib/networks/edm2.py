"""The EDM2 magnitude-preserving UNet, written from the paper's description.

References
----------
* Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2, 2024),
  Sec. 2-3 and App. B: magnitude-preserving layers, forced weight normalisation (Eq. 81 / Alg. 2),
  mp_sum (Eq. 88), mp_cat (Eq. 103), mp_silu (Eq. 81: SiLU / 0.596), Fourier embedding (Eq. 75).
* Geng et al., "Consistency Models Made Easy" (ECT, 2024), ImageNet-64 branch: dropout only at
  resolutions <= ``dropout_res`` and no forced renormalisation in the no-grad target pass.

State-dict keys, shapes and order match the published EDM2 / ECT-ImageNet checkpoints under the
``unet.`` prefix (NVlabs/edm2 ``training/networks_edm2.py``): 200 entries, no biases, the
MPFourier ``freqs``/``phases`` are persistent buffers (random at init, so they must be loaded).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .layers import Dropout, interleaved_attention

__all__ = ["normalize", "mp_silu", "mp_sum", "mp_cat", "resample", "MPFourier", "MPConv", "Block", "EDM2UNet"]


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """Scale each slice along ``dim`` (default: all but dim 0) to unit RMS: x / (eps + rms(x)) (EDM2 Eq. 81)."""
    if dim is None:
        dim = list(range(1, x.ndim))
    # the norm accumulates in fp32 at least (bf16 / fp16 inputs), in fp64 for fp64 inputs
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
    # ||x|| / sqrt(n) = rms over the reduced dims; eps keeps zero rows finite.
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU: silu(x) / 0.596, the divisor being E[silu(z)^2]^0.5 for z ~ N(0, 1)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving weighted sum ((1-t) a + t b) / sqrt((1-t)^2 + t^2) (EDM2 Eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation with balance t (EDM2 Eq. 103)."""
    Na, Nb = a.shape[dim], b.shape[dim]
    C = math.sqrt((Na + Nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (C / math.sqrt(Na) * (1 - t)), b * (C / math.sqrt(Nb) * t)], dim=dim)


def resample(x: torch.Tensor, f: Sequence[float] = (1, 1), mode: str = "keep") -> torch.Tensor:
    """2x down/up-sampling with the separable filter f (f=[1,1]: average pooling / nearest upsampling)."""
    if mode == "keep":
        return x
    f = torch.as_tensor(list(f), dtype=torch.float32, device=x.device)
    f = torch.outer(f, f) / f.sum().square()
    C = x.shape[1]
    pad = (f.shape[-1] - 1) // 2
    w = f.to(x.dtype).expand(C, 1, -1, -1)
    if mode == "down":
        return F.conv2d(x, w, groups=C, stride=2, padding=pad)
    if mode == "up":
        return F.conv_transpose2d(x, w * 4, groups=C, stride=2, padding=pad)
    raise ValueError(f"resample mode must be 'keep', 'down' or 'up', got {mode!r}")


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier embedding sqrt(2) cos(2 pi (f c + phi)) with random f, phi (EDM2 Eq. 75).

    ``freqs`` = 2 pi N(0, 1) * bandwidth and ``phases`` = 2 pi U(0, 1) are persistent buffers.
    """

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 regardless of autocast: c_noise * freqs reaches ~100 and bf16 would lose the phase.
        y = torch.outer(x.to(torch.float32).reshape(-1), self.freqs.to(torch.float32))
        return (y + self.phases.to(torch.float32)).cos() * math.sqrt(2)


class MPConv(nn.Module):
    """Bias-free magnitude-preserving convolution / linear layer (EDM2 Sec. 3, Alg. 2).

    The effective weight is normalize(weight) * gain / sqrt(fan_in). *Forced* weight normalisation also
    writes normalize(weight) back into the parameter, but only when ``self.training`` and gradients are
    enabled: the ECT/SCT target pass runs under ``torch.no_grad()`` and must see (and leave) exactly the
    weights the student pass used (ECT ImageNet's ``disable_forced_wn``). NOTE: normalize() is not exactly
    idempotent (eps = 1e-4), so a second renormalisation would shift the target by ~1e-4 relative.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int] = ()):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain=1.0) -> torch.Tensor:
        wdtype = torch.promote_types(self.weight.dtype, torch.float32)
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight.to(wdtype)))
        # Read the weight *after* the in-place update (as EDM2 does through aliasing): a later no-grad
        # pass then computes exactly the same effective weight as this one.
        w = normalize(self.weight.to(wdtype))
        w = w * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(nn.Module):
    """EDM2 UNet block (encoder or decoder flavour), EDM2 Fig. 21.

    enc: resample -> conv_skip (if widths differ) -> pixel norm -> residual branch;
    dec: resample -> residual branch (conv_res0 takes the concatenated width) -> conv_skip;
    residual: conv_res1(dropout(mp_silu(conv_res0(mp_silu(x)) * (emb_linear(emb, gain=emb_gain) + 1)))),
    merged with mp_sum(x, y, res_balance); then optional attention with q/k pixel-normalised per head,
    merged with mp_sum(., attn_balance); then clip to +-clip_act.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, flavor: str = "enc",
                 resample_mode: str = "keep", resample_filter=(1, 1), attention: bool = False,
                 channels_per_head: int = 64, dropout: float = 0.0, res_balance: float = 0.3,
                 attn_balance: float = 0.3, clip_act: float = 256):
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"flavor must be 'enc' or 'dec', got {flavor!r}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.flavor, self.resample_mode = flavor, resample_mode
        self.resample_filter = tuple(resample_filter)
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.res_balance, self.attn_balance, self.clip_act = res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, [3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels)
        self.conv_res1 = MPConv(out_channels, out_channels, [3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, [1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, [1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, [1, 1]) if self.num_heads else None
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_filter, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm keeps the encoder's activations at unit magnitude
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c.unsqueeze(-1).unsqueeze(-1).to(y.dtype))
        y = self.conv_res1(self.dropout(y))
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, self.res_balance)
        if self.num_heads:
            a = interleaved_attention(self.attn_qkv(x), self.num_heads, qk_norm=lambda t: normalize(t, dim=2))
            x = mp_sum(x, self.attn_proj(a), self.attn_balance)
        if self.clip_act:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x


class EDM2UNet(nn.Module):
    """EDM2 UNet F(x_in, c_noise, class_labels) without the log-variance head (as ECT uses it).

    Widths per level model_channels * channel_mult; noise embedding width model_channels * mult[0],
    embedding width model_channels * max(channel_mult). ``dropout_res`` > 0 enables dropout only in
    blocks whose resolution is <= dropout_res (ECT ImageNet-64: 16, i.e. 16x16 and 8x8).
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), num_blocks: int = 3, attn_resolutions=(16, 8),
                 dropout: float = 0.0, dropout_res: int = 0, channels_per_head: int = 64,
                 label_balance: float = 0.5, concat_balance: float = 0.5):
        super().__init__()
        channel_mult = [int(m) for m in channel_mult]
        if not channel_mult:
            raise ValueError("channel_mult must list at least one level")
        if img_resolution % (2 ** (len(channel_mult) - 1)):
            raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^{len(channel_mult) - 1}")
        self.img_resolution, self.img_channels, self.label_dim = int(img_resolution), int(img_channels), int(label_dim)
        self.label_balance, self.concat_balance = float(label_balance), float(concat_balance)
        cblock = [model_channels * m for m in channel_mult]
        cnoise, cemb = cblock[0], max(cblock)
        attn_resolutions = {int(r) for r in attn_resolutions}

        def bk(res: int) -> dict:
            p = dropout if (dropout_res <= 0 or res <= dropout_res) else 0.0
            return dict(channels_per_head=channels_per_head, dropout=p)

        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb)
        self.emb_label = MPConv(label_dim, cemb) if label_dim else None

        self.enc = nn.ModuleDict()
        cout = img_channels + 1  # a constant-ones channel lets the first conv produce a bias
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, [3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, flavor="enc", resample_mode="down", **bk(res))
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, flavor="enc",
                                                            attention=res in attn_resolutions, **bk(res))
        skips = [m.out_channels for m in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True, **bk(res))
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **bk(res))
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, flavor="dec", resample_mode="up", **bk(res))
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, flavor="dec",
                                                            attention=res in attn_resolutions, **bk(res))
        self.out_conv = MPConv(cout, img_channels, [3, 3])

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: Optional[torch.Tensor] = None):
        emb = self.emb_noise(self.emb_fourier(c_noise))
        if self.emb_label is not None:
            if class_labels is None:
                raise ValueError(f"EDM2UNet is class-conditional (label_dim={self.label_dim}); pass one-hot labels")
            # one-hot * sqrt(label_dim) has unit RMS, like the other magnitude-preserving inputs
            lab = self.emb_label(class_labels.to(emb.dtype) * math.sqrt(class_labels.shape[1]))
            emb = mp_sum(emb, lab.to(emb.dtype), self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)
