"""Noise-level sampling, the t -> r mapping, the progress curriculum, loss weightings, EDM time steps, LR.

References
----------
* Karras et al. 2022 (EDM): log-normal training noise (Sec. 5, "P_mean, P_std"), the loss weight
  lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Table 1) and the sampling
  discretisation sigma_i (Eq. 5).
* Geng et al. 2024 (ECT, Sec. 3 / code facts Sec. 1.1-1.3): r = t (1 - q^{-a} n(t)),
  n(t) = 1 + k sigmoid(-b t), with the staircase exponent a = stage + 1, stage = floor(nimg / double).
* Wang et al. 2024 (SCT, arXiv 2410.18958, Sec. 4.2 "smoother schedule") [RECON]: a continuous exponent,
  a = max(1, nimg / double) (ends at ECT's final Delta t, ``smooth_end='ect'``) or 1 + nimg / double
  (one stage past it, ``'beyond'``); see the book's page *The paper*.
* Song & Dhariwal 2023 (iCT): lambda = 1 / (t - r).
* Karras et al. 2024 (EDM2): inverse square-root learning-rate decay.

All functions are pure (no module state); tensors keep the dtype / device of their inputs.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

__all__ = [
    "SCHEDULES",
    "SMOOTH_ENDS",
    "MAPPINGS",
    "WEIGHTINGS",
    "LR_SCHEDULES",
    "sample_t_lognormal",
    "stage_exponent",
    "mapping_r",
    "loss_weight",
    "karras_sigmas",
    "lr_at",
]

SMOOTH_ENDS = ("ect", "beyond")
SCHEDULES = ("staircase", "smooth")
MAPPINGS = ("sigmoid", "const")
WEIGHTINGS = ("inv_dt", "snrpk", "edm", "uniform")
LR_SCHEDULES = ("constant", "inv_sqrt")


def sample_t_lognormal(
    n: int,
    P_mean: float,
    P_std: float,
    *,
    device=None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Training noise levels t = exp(P_mean + P_std * n), n ~ N(0, 1)  (EDM Sec. 5; ECT Sec. 3).

    Not clamped (as in ECT): the mapping and the losses are valid for every t > 0.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if P_std < 0:
        raise ValueError(f"P_std must be >= 0, got {P_std}")
    z = torch.randn(n, device=device, generator=generator, dtype=torch.float32)
    return (P_mean + P_std * z).exp()


def stage_exponent(nimg: float, double_nimg: float, schedule: str = "staircase", smooth_end: str = "ect") -> float:
    """The exponent a of Delta t / t = q^{-a} n(t) after ``nimg`` training images.

    * ``'staircase'`` (ECT code): a = floor(nimg / double_nimg) + 1. ECT's exponent is stage + 1, so the
      pure-diffusion stage (a = 0, r = 0) is skipped when tuning from a pretrained model.
    * ``'smooth'`` (SCT Sec. 4.2 [RECON]): a continuous exponent, so Delta t shrinks geometrically every
      step instead of jumping by a factor q at stage boundaries. ``smooth_end`` fixes where it ends:

      - ``'ect'``: a = max(1, nimg / double_nimg). It equals the staircase at every stage END
        (nimg = (s + 1) * double_nimg) and a_stair(s) - 1 <= a_smooth <= a_stair(s) inside stage s, so a
        run of S stages ends at ECT's final exponent S (the same final Delta t as ECT).
      - ``'beyond'``: a = 1 + nimg / double_nimg. It equals the staircase at every stage START and
        a_stair(s) <= a_smooth < a_stair(s) + 1 inside stage s, so it ends one stage past ECT.
    """
    if not double_nimg > 0:
        raise ValueError(f"double_nimg must be > 0 (images per stage), got {double_nimg}")
    if nimg < 0:
        raise ValueError(f"nimg must be >= 0, got {nimg}")
    if schedule == "staircase":
        return float(math.floor(nimg / double_nimg) + 1)
    if schedule == "smooth":
        if smooth_end == "ect":
            return max(1.0, float(nimg) / float(double_nimg))
        if smooth_end == "beyond":
            return 1.0 + float(nimg) / float(double_nimg)
        raise ValueError(f"unknown smooth_end {smooth_end!r}; valid: {', '.join(SMOOTH_ENDS)}")
    raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")


def mapping_r(
    t: torch.Tensor,
    a: Union[float, torch.Tensor],
    *,
    q: float,
    k: float = 8.0,
    b: float = 1.0,
    mapping: str = "sigmoid",
) -> torch.Tensor:
    """ECT's t -> r mapping (ECT Sec. 3): r = clamp(t (1 - q^{-a} n(t)), min=0).

    n(t) = 1 + k sigmoid(-b t) for ``'sigmoid'`` and 1 for ``'const'``. Guarantees 0 <= r < t for t > 0:
    in float32 the product t (1 - q^{-a} n) rounds to t once q^{-a} n < 2^-24 (late stages), so r is
    capped at the next float below t; Delta t never collapses to 0, which would make 1/(t - r) infinite.
    """
    if mapping not in MAPPINGS:
        raise ValueError(f"unknown mapping {mapping!r}; valid: {', '.join(MAPPINGS)}")
    if not q > 1:
        raise ValueError(f"q must be > 1 so that Delta t shrinks with progress, got {q}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    t = torch.as_tensor(t)
    if not t.is_floating_point():
        t = t.to(torch.float32)
    # q^{-a}: a Python number stays one (a tensor made from it would be a blocking host-to-device copy)
    if isinstance(a, torch.Tensor):
        decay = torch.as_tensor(float(q), dtype=t.dtype, device=t.device).pow(-a.to(t.dtype))
    else:
        decay = float(q) ** (-float(a))
    n_t = 1 + k * torch.sigmoid(-b * t) if mapping == "sigmoid" else torch.ones_like(t)
    r = (t * (1 - decay * n_t)).clamp(min=0)
    below_t = torch.nextafter(t, torch.zeros_like(t))
    return torch.minimum(r, below_t).clamp(min=0)


def loss_weight(t: torch.Tensor, r, kind: str, sigma_data: float = 0.5) -> torch.Tensor:
    """Per-sample loss weight lambda(t, r).

    * ``'inv_dt'``  1 / (t - r)                          (iCT; ECT CIFAR-10 code)
    * ``'snrpk'``   1/t^2 + 1/sigma_data^2               (ECT ImageNet code: "SNR + k", k = 1/sigma_data^2)
    * ``'edm'``     (t^2 + sigma_data^2) / (t sigma_data)^2  (EDM Table 1 lambda(sigma))
    * ``'uniform'`` 1

    Note that 'edm' and 'snrpk' are algebraically the same function; both names are kept because the
    two codes write them differently. The 'edm' form is used for teachers, 'snrpk' for tuning.
    """
    t = torch.as_tensor(t)
    if kind == "inv_dt":
        return 1.0 / (t - torch.as_tensor(r, dtype=t.dtype, device=t.device))
    if kind == "snrpk":
        return 1.0 / t**2 + 1.0 / sigma_data**2
    if kind == "edm":
        return (t**2 + sigma_data**2) / (t * sigma_data) ** 2
    if kind == "uniform":
        return torch.ones_like(t)
    raise ValueError(f"unknown weighting {kind!r}; valid: {', '.join(WEIGHTINGS)}")


def karras_sigmas(
    num_steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    *,
    device=None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """EDM Eq. 5: sigma_i = (sigma_max^{1/rho} + i/(N-1) (sigma_min^{1/rho} - sigma_max^{1/rho}))^rho.

    Descending, with a trailing 0 appended (length num_steps + 1). Float64 by default, as EDM's sampler.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    frac = i / max(num_steps - 1, 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + frac * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)


def lr_at(
    nimg: float,
    *,
    lr: float,
    schedule: str = "constant",
    ref_nimg: Optional[float] = None,
    rampup_nimg: float = 0,
) -> float:
    """Learning rate after ``nimg`` images.

    ``'constant'``: lr (ECT CIFAR-10). ``'inv_sqrt'``: lr / sqrt(max(nimg / ref_nimg, 1)) (EDM2 Eq. 67-like;
    ECT ImageNet with ref_nimg = 2000 batches x batch size). An optional linear warm-up multiplies by
    min(nimg / rampup_nimg, 1).
    """
    if nimg < 0:
        raise ValueError(f"nimg must be >= 0, got {nimg}")
    if schedule == "constant":
        out = float(lr)
    elif schedule == "inv_sqrt":
        if ref_nimg is None or not ref_nimg > 0:
            raise ValueError(f"schedule 'inv_sqrt' needs ref_nimg > 0, got {ref_nimg}")
        out = float(lr) / math.sqrt(max(nimg / ref_nimg, 1.0))
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}; valid: {', '.join(LR_SCHEDULES)}")
    if rampup_nimg < 0:
        raise ValueError(f"rampup_nimg must be >= 0, got {rampup_nimg}")
    if rampup_nimg > 0:
        out *= min(nimg / rampup_nimg, 1.0)
    return out
