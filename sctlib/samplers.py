"""Samplers for consistency functions and denoisers.

References
----------
* Song et al. 2023 (CM, Algorithm 1) and ECT's ``generator_fn`` (code facts Sec. 1.5): multistep
  consistency sampling - denoise fully, then re-noise to the next t with t_next * randn.
* Wang et al. 2024 (PCM Sec. 3.1, Eq. 3) and SCT Sec. 4.3 [RECON]: phased sampling with the DDIM-form
  step x_s = (s/t) x_t + (1 - s/t) D(x_t, t); SCT's edge skipping lands past the phase edge
  (a reconstruction with three selectable variants; the book's page *The paper* lists them).
* Karras et al. 2024 (autoguidance) as adapted in SCT Sec. 4.4 [RECON]: f_w = f + (w - 1)(f - f_bad)
  with f_bad an earlier EMA of the same model.
* Karras et al. 2022 (EDM), Algorithm 1: deterministic Heun sampler with the Eq. 5 time steps.

Shared leading signature: ``sample_X(f, noise, labels=None, *, generator=None, callback=None, ...)``;
``noise`` is unit Gaussian and the first state is noise * t_max. Every sampler returns float32 x and
calls ``callback(dict(i=step, t=t_cur, x=x, x0=prediction))`` after every network evaluation.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from sctlib.losses import noise_like
from sctlib.schedules import karras_sigmas

__all__ = [
    "PHASED_VARIANTS",
    "sample_onestep",
    "sample_multistep",
    "sample_phased",
    "guided",
    "sample_heun",
    "search_mid_t",
]

PHASED_VARIANTS = ("interp", "scale", "renoise")
Callback = Optional[Callable[[dict], None]]


@torch.no_grad()
def sample_multistep(f, noise: torch.Tensor, labels=None, *, t_steps: Sequence[float] = (80.0, 0.821),
                     generator: Optional[torch.Generator] = None, callback: Callback = None) -> torch.Tensor:
    """CM multistep sampling (CM Algorithm 1; ECT generator_fn): x = f(x, t_i); x += t_{i+1} randn.

    ``t_steps`` = (t_max, mid_t_1, ...) strictly decreasing and positive; the re-noising is the VE form
    x0_hat + t_next eps, as ECT does. The randn draws come from ``generator`` when given.
    """
    t_steps = [float(t) for t in t_steps]
    if not t_steps or any(t <= 0 for t in t_steps) or any(b >= a for a, b in zip(t_steps, t_steps[1:])):
        raise ValueError(f"t_steps must be positive and strictly decreasing, got {t_steps}")
    x = noise * t_steps[0]
    for i, t_cur in enumerate(t_steps):
        x0 = f(x, t_cur, labels)
        x = x0
        if i + 1 < len(t_steps):
            x = x0 + t_steps[i + 1] * noise_like(x0, generator)
        if callback is not None:
            callback(dict(i=i, t=t_cur, x=x, x0=x0))
    return x.to(torch.float32)


def sample_onestep(f, noise: torch.Tensor, labels=None, *, t_max: float = 80.0,
                   generator: Optional[torch.Generator] = None, callback: Callback = None) -> torch.Tensor:
    """One-step generation x0 = f(noise * t_max, t_max) (CM Algorithm 1 with one step)."""
    return sample_multistep(f, noise, labels, t_steps=(t_max,), generator=generator, callback=callback)


def _skip_target(edges: Sequence[float], m: int, eta: float, variant: str) -> float:
    """s'(m, eta): where a step from phase m lands ([RECON], SCT Sec. 4.4 edge skipping)."""
    s_m = edges[m]
    if variant in ("interp", "renoise"):
        return s_m - eta * (s_m - edges[m - 1])
    return (1.0 - eta) * s_m  # 'scale'


@torch.no_grad()
def sample_phased(D, noise: torch.Tensor, labels=None, *, edges: Sequence[float], t_max: float = 80.0,
                  eta: float = 0.0, variant: str = "interp", generator: Optional[torch.Generator] = None,
                  callback: Callback = None) -> torch.Tensor:
    """Phased multistep sampling with edge skipping (PCM Sec. 3.1; SCT Sec. 4.4 [RECON]).

    From t in phase m (s_m < t <= s_{m+1}, the phase whose upper end t may be) one network evaluation
    moves to s' with the DDIM form x_{s'} = (s'/t) x + (1 - s'/t) D(x, t), where
      'interp':  s' = s_m - eta (s_m - s_{m-1}),   'scale': s' = (1 - eta) s_m,
      'renoise': x_{s'} = D(x, t) + s' randn with the 'interp' s' (MCM/aDDIM-like).
    eta = 0 stops exactly at each edge (plain PCM sampling); eta > 0 skips past it into phase m-1, away
    from the edge where an L-Lipschitz network cannot follow the jump of the phase-wise target. The last
    step lands at s_0 (at s_0 = 0 it returns D's x0 prediction). M phases cost M evaluations.
    """
    edges = [float(e) for e in edges]
    if not edges or edges[0] < 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"edges must be non-negative and strictly increasing, got {edges}")
    if not edges[-1] < t_max:
        raise ValueError(f"t_max ({t_max}) must lie above the top edge {edges[-1]}")
    if variant not in PHASED_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(PHASED_VARIANTS)}")
    if not 0.0 <= eta < 1.0:
        raise ValueError(f"eta must lie in [0, 1), got {eta}")
    x = noise * t_max
    t = float(t_max)
    i = 0
    while True:
        # phase of t: the largest edge strictly below t (t == s_{m+1} still belongs to phase m)
        m = max(j for j, e in enumerate(edges) if e < t)
        x0 = D(x, t, labels)
        if m == 0:
            s = edges[0]
            x = x0 if s == 0.0 else (s / t) * x + (1.0 - s / t) * x0
            if callback is not None:
                callback(dict(i=i, t=t, x=x, x0=x0))
            return x.to(torch.float32)
        s = _skip_target(edges, m, eta, variant)
        if variant == "renoise":
            x = x0 + s * noise_like(x0, generator)
        else:
            x = (s / t) * x + (1.0 - s / t) * x0
        if callback is not None:
            callback(dict(i=i, t=t, x=x, x0=x0))
        if s <= edges[0]:  # 'scale' may jump below s_0 (it cannot for eta < 1 and s_0 = 0)
            return x.to(torch.float32)
        t = s
        i += 1


def guided(f, f_bad, w: float):
    """Autoguidance of a consistency function by a worse version of itself (SCT Sec. 4.4 [RECON]).

    f_w(x, t, labels) = f + (w - 1)(f - f_bad), with f_bad e.g. the EMA at 25/50/75 % of training.
    At w = 1 it returns f's output itself (f_bad is not evaluated).
    """
    w = float(w)

    def f_w(x, t, labels=None):
        out = f(x, t, labels)
        if w == 1.0:
            return out
        return out + (w - 1.0) * (out - f_bad(x, t, labels))

    if hasattr(f, "edges"):
        f_w.edges = f.edges
    return f_w


@torch.no_grad()
def sample_heun(D, noise: torch.Tensor, labels=None, *, num_steps: int = 18, sigma_min: float = 0.002,
                sigma_max: float = 80.0, rho: float = 7.0, generator: Optional[torch.Generator] = None,
                callback: Callback = None) -> torch.Tensor:
    """EDM Algorithm 1: deterministic Heun on dx/dt = (x - D(x, t)) / t over the Eq. 5 steps.

    The 2nd-order correction is skipped on the last step (to t = 0). The state is float64, as in EDM.
    ``generator`` is accepted for the shared signature; the sampler draws no random numbers.
    """
    t_steps = karras_sigmas(num_steps, sigma_min, sigma_max, rho, device=noise.device)
    x = noise.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x0 = D(x, t_cur, labels).to(torch.float64)
        d = (x - x0) / t_cur
        x_next = x + (t_next - t_cur) * d
        if callback is not None:
            callback(dict(i=i, t=float(t_cur), x=x_next, x0=x0))
        if t_next > 0:
            x0_next = D(x_next, t_next, labels).to(torch.float64)
            d_next = (x_next - x0_next) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d_next)
            if callback is not None:
                callback(dict(i=i, t=float(t_next), x=x_next, x0=x0_next))
        x = x_next
    return x.to(torch.float32)


def search_mid_t(f, noise: torch.Tensor, labels, metric: Callable[[torch.Tensor], float], *,
                 t_max: float = 80.0, bounds: Tuple[float, float] = (0.1, 5.0), iters: int = 12,
                 grid: Optional[Sequence[float]] = None, seed: int = 0) -> Tuple[float, List[Tuple[float, float]]]:
    """Pick the 2-step intermediate time mid_t that minimises ``metric(samples)`` (lower is better).

    Golden-section search in log t over ``bounds`` with ``iters`` metric evaluations in all, or the
    given ``grid``. Every candidate uses the same noise and the same re-noising draws (a generator
    seeded with ``seed``), so the comparison has common random numbers. Returns
    (best_mid_t, [(mid_t, value), ...] in evaluation order).
    """
    history: List[Tuple[float, float]] = []

    def evaluate(mid_t: float) -> float:
        gen = torch.Generator(device=noise.device).manual_seed(seed)
        x = sample_multistep(f, noise, labels, t_steps=(t_max, mid_t), generator=gen)
        value = float(metric(x))
        history.append((float(mid_t), value))
        return value

    if grid is not None:
        grid = [float(g) for g in grid]
        if not grid or any(not 0 < g < t_max for g in grid):
            raise ValueError(f"grid values must lie in (0, t_max={t_max}), got {grid}")
        for g in grid:
            evaluate(g)
    else:
        lo, hi = float(bounds[0]), float(bounds[1])
        if not 0 < lo < hi < t_max:
            raise ValueError(f"bounds must satisfy 0 < lo < hi < t_max={t_max}, got {bounds}")
        if iters < 2:
            raise ValueError(f"iters must be >= 2 (golden-section needs two interior points), got {iters}")
        inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
        a, b = math.log(lo), math.log(hi)
        c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
        fc, fd = evaluate(math.exp(c)), evaluate(math.exp(d))
        for _ in range(iters - 2):
            if fc <= fd:  # minimum in [a, d]
                b, d, fd = d, c, fc
                c = b - inv_phi * (b - a)
                fc = evaluate(math.exp(c))
            else:         # minimum in [c, b]
                a, c, fc = c, d, fd
                d = a + inv_phi * (b - a)
                fd = evaluate(math.exp(d))
    best = min(history, key=lambda mv: mv[1])
    return best[0], history
