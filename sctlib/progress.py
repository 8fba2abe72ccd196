"""Training progress as plain text lines (images seen, img/s, loss, ETA).

Text, not a widget: a line printed to stdout shows in a terminal, in a notebook cell, in papermill's
output notebook and in its ``--log-output`` log alike (a tqdm widget stays at 0 % in a saved notebook).
Lines are rate-limited (``every_s``), with the first and the last always printed.

Also :func:`phase`, the named ranges of a training step that the PyTorch profiler sees
(benchmarks/profile_step.py sums the kernel time launched inside each).
"""
from __future__ import annotations

import sys
import time
from typing import Optional

import torch

__all__ = ["TextProgress", "format_duration", "format_count", "iter_progress", "phase"]


def phase(name: str) -> "torch.profiler.record_function":
    """A profiler range ``sctlib.step/<name>`` (a few microseconds when no profiler runs)."""
    return torch.profiler.record_function(f"sctlib.step/{name}")


def format_duration(seconds: float) -> str:
    """'42s', '3m05s', '2h07m' (ETA-style; no fractions)."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def format_count(n: float) -> str:
    """Image counts: 950, 12.8k, 25.6M."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


class TextProgress:
    """Counts images; :meth:`tick` prints one line per training tick, at most one per ``every_s`` seconds."""

    def __init__(self, total: int, initial: int = 0, *, desc: str = "", every_s: float = 10.0, stream=None):
        self.total, self.n, self.start_n = int(total), int(initial), int(initial)
        self.desc, self.every_s = desc, float(every_s)
        self.stream = stream
        self.t0 = time.time()
        self.last_print: Optional[float] = None
        self._print(f"start at {format_count(self.n)} of {format_count(self.total)} images")

    def _print(self, text: str) -> None:
        print(f"[{self.desc}] {text}" if self.desc else text, file=self.stream or sys.stdout, flush=True)

    def update(self, nimg: int) -> None:
        self.n += int(nimg)

    def line(self, loss: Optional[float] = None, img_per_s: Optional[float] = None) -> str:
        elapsed = time.time() - self.t0
        done = self.n - self.start_n
        rate = done / elapsed if elapsed > 0 and done > 0 else None
        eta = (self.total - self.n) / rate if rate else None
        parts = [f"{format_count(self.n)}/{format_count(self.total)} img ({100 * self.n / max(self.total, 1):.1f}%)"]
        if img_per_s is not None:
            parts.append(f"{img_per_s:,.0f} img/s")
        if loss is not None:
            parts.append(f"loss {loss:.4g}")
        parts.append(f"elapsed {format_duration(elapsed)}")
        parts.append(f"ETA {format_duration(eta) if eta is not None else '?'}")
        return " | ".join(parts)

    def tick(self, loss: Optional[float] = None, img_per_s: Optional[float] = None, *, force: bool = False) -> bool:
        """Print a progress line if ``every_s`` has passed since the last one (or on the first/last tick)."""
        now = time.time()
        if force or self.last_print is None or now - self.last_print >= self.every_s or self.n >= self.total:
            self._print(self.line(loss, img_per_s))
            self.last_print = now
            return True
        return False

    def close(self) -> None:
        self._print(f"done: {format_count(self.n)} images in {format_duration(time.time() - self.t0)}")


def iter_progress(iterable, *, desc: str = "", total: Optional[int] = None, every_s: float = 10.0, stream=None):
    """Yield the batches of ``iterable`` unchanged, printing a text line (images done, rate, ETA when ``total``
    is known) at most every ``every_s`` seconds and once at the end: the same kind of line as the trainer's,
    so it reads the same in a saved notebook and in a papermill log (a tqdm widget does not)."""
    t0, last, n = time.time(), time.time(), 0
    out = stream or sys.stdout
    tag = f"[{desc}] " if desc else ""
    for batch in iterable:
        yield batch
        n += len(batch)
        now = time.time()
        if now - last >= every_s:
            rate = n / max(now - t0, 1e-9)
            eta = f" | ETA {format_duration((total - n) / rate)}" if total and rate > 0 else ""
            of = f"/{format_count(total)}" if total else ""
            print(f"{tag}{format_count(n)}{of} images | {rate:,.0f} img/s | elapsed {format_duration(now - t0)}{eta}",
                  file=out, flush=True)
            last = now
    print(f"{tag}done: {format_count(n)} images in {format_duration(time.time() - t0)}", file=out, flush=True)
