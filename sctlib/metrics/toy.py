"""Exact metrics for the 2-D toys, where the data density is known in closed form.

* Sliced Wasserstein-2 distance (Rabin et al. 2011; Bonneel et al. 2015):
      SW_2(P, Q)^2 = E_theta [ W_2^2(theta#P, theta#Q) ],  theta uniform on the unit circle,
  each 1-D W_2 computed exactly from sorted projections (quantile functions).
* Negative log-likelihood of samples under the true mixture density, in nats per sample: it rewards
  samples that land on the modes (but, unlike SW, not covering all of them).
* Mode coverage: the share of components whose region (samples assigned to the nearest mean within
  3 standard deviations) holds at least ``min_share`` of the weight-proportional count.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch

__all__ = ["sliced_wasserstein", "toy_nll", "mode_coverage", "toy_metrics"]


def _quantiles(sorted_proj: torch.Tensor, m: int) -> torch.Tensor:
    """Empirical quantile function of sorted 1-D samples [P, n] at the m mid-point levels (i + 0.5) / m."""
    n = sorted_proj.shape[1]
    if n == m:
        return sorted_proj
    pos = (torch.arange(m, dtype=sorted_proj.dtype) + 0.5) / m * n - 0.5  # fractional index
    pos = pos.clamp(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    w = pos - lo
    return sorted_proj[:, lo] * (1 - w) + sorted_proj[:, hi] * w


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, *, num_projections: int = 256,
                       generator: Optional[torch.Generator] = None) -> float:
    """SW_2 between the empirical distributions of x [N, D] and y [M, D] (float64 internally).

    Directions are ``num_projections`` random unit vectors (from ``generator``). With N == M each 1-D W_2 is
    the exact sorted matching; otherwise both quantile functions are compared on max(N, M) levels.
    """
    x = torch.as_tensor(x).detach().cpu().double()
    y = torch.as_tensor(y).detach().cpu().double()
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be [N, D] with the same D, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError("sliced_wasserstein needs non-empty sample sets")
    theta = torch.randn(num_projections, x.shape[1], generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=1, keepdim=True)
    px = (theta @ x.T).sort(dim=1).values  # [P, N]
    py = (theta @ y.T).sort(dim=1).values
    m = max(px.shape[1], py.shape[1])
    w2 = ((_quantiles(px, m) - _quantiles(py, m)) ** 2).mean(1)  # W_2^2 per direction
    return float(w2.mean().sqrt())


def toy_nll(x: torch.Tensor, mixture) -> float:
    """Mean negative log-likelihood -E log p(x) (nats) of samples x [N, 2] under the true mixture density."""
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"toy samples must be [N, 2], got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("toy samples contain NaN or inf")
    return float(-mixture.log_prob(x).mean())


def mode_coverage(x: torch.Tensor, mixture, *, num_std: float = 3.0, min_share: float = 0.1) -> Dict[str, float]:
    """{'covered': share of modes holding >= min_share of their expected count, 'on_mode': share of samples
    within ``num_std`` component std of some mean}."""
    x = torch.as_tensor(x).detach().cpu().double()
    d = torch.cdist(x, mixture.means)  # [N, K]
    dist, k = d.min(1)
    on = dist <= num_std * mixture.std
    counts = torch.bincount(k[on], minlength=mixture.num_components).double()
    expected = mixture.weights * x.shape[0]
    return {"covered": float((counts >= min_share * expected).double().mean()), "on_mode": float(on.double().mean())}


def toy_metrics(x: torch.Tensor, mixture, *, num_reference: int = 20_000, num_projections: int = 256, seed: int = 0) -> Dict[str, float]:
    """All toy metrics of samples x against the known mixture: SW_2 to a fresh exact sample of
    ``num_reference`` points (seeded), NLL, and mode coverage."""
    g = torch.Generator().manual_seed(seed)
    ref, _ = mixture.sample(num_reference, generator=g)
    out = {"sliced_wasserstein": sliced_wasserstein(x, ref, num_projections=num_projections, generator=g),
           "nll": toy_nll(x, mixture)}
    out.update(mode_coverage(x, mixture))
    return out
