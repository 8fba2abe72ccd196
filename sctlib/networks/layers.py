"""Building blocks shared by the networks.

Shared dropout masks
--------------------
ECT (and so SCT) evaluates the student f_theta(x_t, t) and the stop-gradient target f_theta(x_r, r) with
*the same dropout mask*. The official code does it by saving and restoring the global CUDA RNG state,
which ties it to CUDA and to identical kernel order. Here each :class:`Dropout` records the masks it
draws inside :func:`record_dropout` and replays them, in call order, inside :func:`replay_dropout`:
device-independent, no global RNG rewinding, and checkable in a test.

Also here: the sinusoidal noise embedding (DDPM++ / toy MLP) and the self-attention on an interleaved
q/k/v projection that both UNets use (EDM and EDM2 lay the rows out as ``row = c*3 + {q, k, v}``).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Optional

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["Dropout", "record_dropout", "replay_dropout", "PositionalEmbedding", "interleaved_attention"]


class Dropout(nn.Module):
    """Inverted dropout whose masks can be recorded in one pass and replayed in the next."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must lie in [0, 1), got {p}")
        self.p = float(p)
        self._mode: str | None = None
        self._masks: list[torch.Tensor] = []
        self._cursor = 0

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self._mode == "replay":
            if self._cursor >= len(self._masks):
                raise RuntimeError("replay_dropout: this pass calls dropout more often than the recorded pass")
            keep = self._masks[self._cursor]
            self._cursor += 1
            if keep.shape != x.shape:
                raise RuntimeError(f"replay_dropout: recorded mask {tuple(keep.shape)} does not fit {tuple(x.shape)}")
        else:
            keep = torch.rand(x.shape, device=x.device) >= self.p
            if self._mode == "record":
                self._masks.append(keep)
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))


def _dropouts(module: nn.Module) -> list[Dropout]:
    module = getattr(module, "module", module)  # DistributedDataParallel / compiled wrappers
    return [m for m in module.modules() if isinstance(m, Dropout)]


@contextlib.contextmanager
def record_dropout(module: nn.Module) -> Iterator[None]:
    """Record every dropout mask drawn by ``module`` inside the block (masks are kept for a replay)."""
    layers = _dropouts(module)
    for m in layers:
        m._mode, m._masks, m._cursor = "record", [], 0
    try:
        yield
    finally:
        for m in layers:
            m._mode = None


@contextlib.contextmanager
def replay_dropout(module: nn.Module) -> Iterator[None]:
    """Replay the masks recorded by the last :func:`record_dropout`, then forget them."""
    layers = _dropouts(module)
    for m in layers:
        m._mode, m._cursor = "replay", 0
    try:
        yield
    finally:
        for m in layers:
            m._mode, m._masks, m._cursor = None, [], 0


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of c_noise as DDPM++ uses it (EDM ``PositionalEmbedding``).

    freqs_i = (1 / max_positions)^(i / (N/2 - 1)) with ``endpoint=True`` (DDPM++), i = 0..N/2-1; the
    output is ``[sin(c f), cos(c f)]``. (EDM computes [cos, sin] and then flips the halves; the result is
    the same [sin, cos] layout that the published weights expect.)
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = True):
        super().__init__()
        if num_channels < 2 or num_channels % 2:
            raise ValueError(f"num_channels must be even and >= 2, got {num_channels}")
        self.num_channels = int(num_channels)
        self.max_positions = int(max_positions)
        self.endpoint = bool(endpoint)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        denom = max(half - (1 if self.endpoint else 0), 1)
        # Frequencies and products in float32 even under autocast: c_noise*f reaches ~10 for large sigma.
        i = torch.arange(half, dtype=torch.float32, device=c_noise.device)
        freqs = (1.0 / self.max_positions) ** (i / denom)
        arg = c_noise.to(torch.float32).reshape(-1, 1) * freqs.reshape(1, -1)
        return torch.cat([arg.sin(), arg.cos()], dim=1)


def interleaved_attention(
    qkv: torch.Tensor,
    num_heads: int,
    qk_norm: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Self-attention over the pixels of ``qkv`` [B, 3C, H, W]; returns [B, C, H, W].

    Layout (EDM ``UNetBlock`` and EDM2 ``Block``): channel ``h*(3c) + j*3 + s`` holds component
    s in {0: q, 1: k, 2: v} of channel j of head h, i.e. q/k/v rows *interleaved* per channel rather than
    stacked [Q; K; V]. Published qkv weights only work with this reading.
    Attention weights softmax(q^T k / sqrt(c)) with c = C / num_heads (the SDPA default scale).
    ``qk_norm`` (EDM2) is applied to the [B, heads, c, 3, HW] tensor before splitting.
    """
    B, C3, H, W = qkv.shape
    if C3 % (3 * num_heads):
        raise ValueError(f"qkv has {C3} channels, not divisible by 3 x {num_heads} heads")
    c = C3 // (3 * num_heads)
    y = qkv.reshape(B, num_heads, c, 3, H * W)  # reshape (not view): channels-last inputs copy here
    if qk_norm is not None:
        y = qk_norm(y)
    q, k, v = (t.transpose(-1, -2) for t in y.unbind(3))  # each [B, heads, HW, c]
    a = F.scaled_dot_product_attention(q, k, v)  # fused kernel; softmax accumulates in fp32
    return a.transpose(-1, -2).reshape(B, num_heads * c, H, W)
