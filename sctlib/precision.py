"""The precision rule: which number format the training step uses now (one format, or a switch by stage).

Why a rule and not a flag: the consistency loss trains on the small difference D(x_t, t) - D(x_r, r), and
that difference shrinks as the schedule tightens (Delta t / t = q^-a n(t), ECT Sec. 3). Rounding that is
harmless at stage a = 1 may swamp the signal at a = 8, so a cheap format early and an exact one late is a
reasonable policy. The step asks :meth:`PrecisionRule.format_at` with the current stage exponent a
(``loss.stage(nimg)``) and gets one of :data:`FORMATS`:

* ``'fp32'`` - float32 everywhere, TF32 off (ECT's CIFAR-10 default: ``torch.backends.*.allow_tf32 = False``).
* ``'tf32'`` - float32 tensors, matmuls / convolutions on TF32 tensor cores (10-bit mantissa inputs);
  on the CPU it is the same as 'fp32' (there is no TF32 there).
* ``'bf16'`` - autocast to bfloat16 (8-bit mantissa); float32 weights and optimizer.
* ``'fp16'`` - autocast to float16 (11-bit mantissa, narrow range) with a gradient scaler: the loss is
  multiplied by a scale before backward, gradients are unscaled, and steps whose gradients overflow are
  skipped while the scale halves (ECT's fp16 branch added one after NaNs; EDM2 uses loss scaling too).

Syntax of the ``precision`` config string::

    auto                      bf16 on CUDA, fp32 on the CPU (the behaviour before the rule existed)
    FORMAT                    one format throughout, e.g. 'tf32'
    FORMAT,FORMAT@stage>=A... switch by stage exponent, e.g. 'bf16,tf32@stage>=6' or
                              'bf16,tf32@stage>=5,fp32@stage>=8' (thresholds strictly increasing, A >= 0)

The first item has no condition (it applies below the first threshold). The stage exponent is the one of
``sctlib.schedules.stage_exponent``: ECT's staircase a = floor(nimg / double_nimg) + 1 or SCT's smooth
a = 1 + nimg / double_nimg, so 'stage>=6' switches when Delta t / t first reaches q^-6 n(t).

Under bf16 / fp16 the ``tf32`` config flag still governs the float32 matmuls that autocast leaves alone.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Tuple

import torch

from .config import ConfigError

__all__ = ["FORMATS", "PrecisionRule", "PrecisionError", "autocast", "set_tf32", "schedule_mix", "switch_stage"]

FORMATS = ("fp32", "tf32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_ITEM_RE = re.compile(r"^(?P<fmt>[a-z0-9]+)@stage>=(?P<a>[0-9.eE+-]+)$")
_SYNTAX = ("one of auto, fp32, tf32, bf16, fp16, or a stage rule FORMAT[,FORMAT@stage>=A]... with increasing "
           "A, e.g. 'bf16,tf32@stage>=6' or 'auto,tf32@stage>=4' (auto first: bf16 on CUDA, fp32 elsewhere)")


class PrecisionError(ConfigError):
    """A precision string that does not parse; the message names the string and the valid syntax."""


@dataclass(frozen=True)
class PrecisionRule:
    """A parsed precision string: ``formats[i]`` applies for stage exponents a >= ``thresholds[i]``.

    ``thresholds[0]`` is -inf (the first format has no condition). Build it with :meth:`parse`.
    """

    spec: str
    formats: Tuple[str, ...]
    thresholds: Tuple[float, ...]

    @classmethod
    def parse(cls, spec: str, device_type: str = "cpu") -> "PrecisionRule":
        """Parse a ``precision`` string; 'auto' resolves by ``device_type`` ('cuda' -> bf16, else fp32)."""
        if not isinstance(spec, str):
            raise PrecisionError(f"precision must be a string ({_SYNTAX}), got {spec!r}")
        s = spec.strip().lower().replace(" ", "")
        # 'auto' (alone or as the first item) is bf16 on CUDA and fp32 elsewhere, so that a stage rule such as
        # 'auto,tf32@stage>=4' runs in float32 on a CPU (where bf16 autocast only slows a run down).
        head, sep, rest = s.partition(",")
        if head == "auto":
            s = ("bf16" if device_type == "cuda" else "fp32") + sep + rest
        if not s:
            raise PrecisionError(f"precision is empty; expected {_SYNTAX}")
        items = s.split(",")
        formats, thresholds = [], []
        for i, item in enumerate(items):
            if i == 0:
                fmt, a = item, -math.inf
                if "@" in item:
                    raise PrecisionError(f"precision {spec!r}: the first item {item!r} must be a bare format (it "
                                         f"applies before any threshold); expected {_SYNTAX}")
            else:
                m = _ITEM_RE.match(item)
                if m is None:
                    raise PrecisionError(f"precision {spec!r}: cannot read item {item!r} (want FORMAT@stage>=A); "
                                         f"expected {_SYNTAX}")
                fmt = m.group("fmt")
                try:
                    a = float(m.group("a"))
                except ValueError:
                    raise PrecisionError(f"precision {spec!r}: threshold {m.group('a')!r} is not a number; "
                                         f"expected {_SYNTAX}") from None
                if not (math.isfinite(a) and a >= 0):
                    raise PrecisionError(f"precision {spec!r}: threshold {a:g} must be a finite number >= 0; "
                                         f"expected {_SYNTAX}")
                if a <= thresholds[-1]:
                    raise PrecisionError(f"precision {spec!r}: thresholds must increase strictly "
                                         f"({a:g} follows {thresholds[-1]:g}); expected {_SYNTAX}")
            if fmt not in FORMATS:
                raise PrecisionError(f"precision {spec!r}: unknown format {fmt!r}; expected {_SYNTAX}")
            formats.append(fmt)
            thresholds.append(a)
        return cls(spec=spec, formats=tuple(formats), thresholds=tuple(thresholds))

    def format_at(self, stage: float) -> str:
        """The format for stage exponent ``stage`` (the last item whose threshold it reaches)."""
        fmt = self.formats[0]
        for f, a in zip(self.formats, self.thresholds):
            if stage >= a:
                fmt = f
        return fmt

    @property
    def uses_fp16(self) -> bool:
        """True when some stage runs in fp16, so the run needs (and checkpoints) a gradient scaler."""
        return "fp16" in self.formats

    @property
    def is_switch(self) -> bool:
        return len(self.formats) > 1

    def describe(self) -> str:
        """A readable form, e.g. 'bf16 for a < 6, tf32 for a >= 6'."""
        if not self.is_switch:
            return self.formats[0]
        parts = []
        for i, f in enumerate(self.formats):
            lo = self.thresholds[i]
            hi = self.thresholds[i + 1] if i + 1 < len(self.formats) else None
            if i == 0:
                parts.append(f"{f} for a < {hi:g}")
            elif hi is None:
                parts.append(f"{f} for a >= {lo:g}")
            else:
                parts.append(f"{f} for {lo:g} <= a < {hi:g}")
        return ", ".join(parts)


def autocast(fmt: str, device_type: str):
    """The autocast context of a format: bf16 / fp16 autocast, a null context for fp32 / tf32."""
    if fmt not in FORMATS:
        raise PrecisionError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt in _AUTOCAST_DTYPES:
        return torch.autocast(device_type, dtype=_AUTOCAST_DTYPES[fmt])
    return contextlib.nullcontext()


def set_tf32(fmt: str, tf32_under_autocast: bool = True) -> bool:
    """Set the global TF32 switches for ``fmt`` and return the value set.

    'fp32' turns TF32 off, 'tf32' on; under 'bf16' / 'fp16' the float32 ops that autocast does not lower
    follow ``tf32_under_autocast`` (the config's ``tf32`` flag). The flags only matter on CUDA.
    """
    on = {"fp32": False, "tf32": True}.get(fmt, bool(tf32_under_autocast))
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    return on


def schedule_mix(cfg, rates: dict, *, points: int = 2000) -> dict:
    """The training speed of a config's precision rule over its whole schedule, from per-format speeds.

    ``cfg`` is a TrainConfig (its ``precision``, ``total_nimg`` and loss schedule: ``loss.double_nimg``,
    ``loss.schedule``, ``loss.smooth_end``); ``rates`` maps formats ('bf16', 'tf32', 'fp32', 'fp16') to
    images per second measured for each. The schedule is cut into ``points`` equal slices of images; each
    slice runs in the format the rule gives at its midpoint's stage exponent. Returns
    ``{'img_per_s': total images / total seconds, 'fraction': {format: share of the images},
    'seconds': {format: time}}``; the wall time a run spends in each format is what the mix costs.
    ``'auto'`` is resolved as on CUDA (bf16). A format the rule uses but ``rates`` lacks is an error."""
    from .schedules import stage_exponent

    rule = PrecisionRule.parse(cfg.precision, device_type="cuda")
    total = float(cfg.total_nimg)
    if total <= 0 or points < 1:
        raise ValueError(f"schedule_mix needs total_nimg > 0 and points >= 1, got {total}, {points}")
    missing = sorted(set(rule.formats) - set(rates))
    if missing:
        raise ValueError(f"schedule_mix: no speed for format(s) {missing} used by precision {cfg.precision!r}")
    lo = cfg.loss
    share, secs = {}, {}
    for i in range(points):
        nimg = (i + 0.5) * total / points
        a = stage_exponent(nimg, lo.double_nimg, lo.schedule, getattr(lo, "smooth_end", "ect"))
        f = rule.format_at(a)
        share[f] = share.get(f, 0.0) + 1.0 / points
        secs[f] = secs.get(f, 0.0) + (total / points) / float(rates[f])
    return {"img_per_s": total / sum(secs.values()), "fraction": share, "seconds": secs}


def switch_stage(diff_error_by_stage: dict, *, threshold: float = 1.0):
    """The first stage exponent at which a format's rounding swamps the consistency signal, from a precision
    benchmark: ``diff_error_by_stage`` maps a stage a to the worst-t relative error of
    D(x_t, t) - D(x_r, r) in that format against a float64 reference (``benchmarks/precision.py``'s
    'diff rel. error (max over t)'). Returns the smallest a whose error exceeds ``threshold``, or None when
    none does (the format is fine at every stage measured).

    The presets' rule is 'auto,tf32@stage>=A' with A = switch_stage(bf16's errors): bf16 while its rounding
    error is smaller than the difference it rounds (threshold 1: the error is as large as the signal), TF32
    from there. On one H200 this gives A = 4 for DDPM++ (errors 0.49 at a = 3, 1.18 at a = 4) and for EDM2-S
    (0.87, 3.15). A stage whose error is missing or not finite counts as exceeding.
    """
    # A stage without a finite error (None, NaN, inf: the difference was lost or could not be measured) counts
    # as exceeding the threshold, never as fine.
    bad = sorted(float(a) for a, err in diff_error_by_stage.items()
                 if err is None or not (float(err) <= threshold))
    return bad[0] if bad else None
