"""A small residual MLP denoiser for 2-D (or any low-dimensional) toy data.

Used by the toy chapters and tests: same F(x_in, c_noise, class_labels) contract as the UNets, wrapped by
:class:`sctlib.precond.Precond` with the EDM coefficients (Karras et al. 2022, Eq. 7). The noise level
enters through the DDPM++ sinusoidal embedding of c_noise = ln(sigma)/4 (Vaswani et al. 2017, Sec. 3.5).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from .layers import Dropout, PositionalEmbedding

__all__ = ["ToyMLP"]


class ToyMLP(nn.Module):
    """Residual MLP: h = W_in x; h += W_k dropout(silu(h + e)) for each of ``num_blocks`` hidden layers,
    where e = MLP(sin/cos(c_noise)) (+ a label embedding); output W_out silu(h).

    ``data_dim`` is the input dimension D (NetConfig.img_resolution for arch 'mlp'), ``hidden`` the width
    (NetConfig.model_channels). The output layer starts at zero so the denoiser starts as c_skip x.
    """

    def __init__(self, data_dim: int = 2, hidden: int = 128, num_blocks: int = 3, label_dim: int = 0,
                 dropout: float = 0.0):
        super().__init__()
        if data_dim < 1 or hidden < 2 or num_blocks < 0:
            raise ValueError(f"bad ToyMLP sizes: data_dim={data_dim}, hidden={hidden}, num_blocks={num_blocks}")
        self.data_dim, self.hidden, self.label_dim = int(data_dim), int(hidden), int(label_dim)
        self.map_noise = PositionalEmbedding(hidden - hidden % 2, endpoint=True)
        self.map_layer0 = nn.Linear(hidden - hidden % 2, hidden)
        self.map_layer1 = nn.Linear(hidden, hidden)
        self.map_label = nn.Linear(label_dim, hidden, bias=False) if label_dim else None
        self.inp = nn.Linear(data_dim, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(num_blocks))
        self.dropouts = nn.ModuleList(Dropout(dropout) for _ in range(num_blocks))
        self.out = nn.Linear(hidden, data_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: Optional[torch.Tensor] = None):
        if x.ndim != 2 or x.shape[1] != self.data_dim:
            raise ValueError(f"ToyMLP expects inputs [B, {self.data_dim}], got {tuple(x.shape)}")
        emb = self.map_noise(c_noise.reshape(-1))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError(f"ToyMLP is class-conditional (label_dim={self.label_dim}); pass one-hot labels")
            emb = emb + self.map_label(class_labels.to(emb.dtype) * math.sqrt(self.label_dim))
        h = self.inp(x)
        for lin, drop in zip(self.blocks, self.dropouts):
            h = h + lin(drop(F.silu(h + emb)))
        return self.out(F.silu(h))
