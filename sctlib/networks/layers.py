"""Building blocks shared by the networks.

Shared dropout masks
--------------------
ECT (and so SCT) evaluates the student f_theta(x_t, t) and the stop-gradient target f_theta(x_r, r) with
*the same dropout mask*. The official code does it by saving and restoring the global CUDA RNG state,
which ties it to CUDA and to identical kernel order. Here each :class:`Dropout` records the masks it
draws inside :func:`record_dropout` and replays them, in call order, inside :func:`replay_dropout`:
device-independent, no global RNG rewinding, and checkable in a test.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

__all__ = ["Dropout", "record_dropout", "replay_dropout"]


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
