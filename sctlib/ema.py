"""Exponential moving averages of network weights.

* :class:`EMA` - the traditional EMA with its decay given as a half-life in images (EDM, Karras et al. 2022,
  Sec. C.2: beta = 0.5 ** (batch / halflife), optionally ramped up as halflife <= ratio * nimg).
  ECT's beta = 0.9999 at batch 128 is a half-life of ln(0.5)/ln(0.9999) * 128 ~= 0.887 Mimg.
* :class:`PowerFunctionEMA` - EDM2's power-function EMA (Karras et al. 2024, "Analyzing and Improving the
  Training Dynamics of Diffusion Models", Sec. 3.1): the averaged weights are
  theta_hat(t) = int_0^t tau^gamma theta(tau) dtau / int_0^t tau^gamma dtau, realised per step with
  beta = (1 - delta / t) ** (gamma + 1), and parameterised by its relative standard deviation sigma_rel,
  sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))   (EDM2 Eq. 3 / appendix Eq. 123 form).

EMA copies always stay in eval mode and never require gradients; buffers are copied, not averaged.
"""
from __future__ import annotations

import copy
import math
from typing import Dict, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["EMA", "PowerFunctionEMA", "sigma_rel_to_gamma", "gamma_to_sigma_rel", "halflife_to_beta"]


def halflife_to_beta(halflife_nimg: float, batch_size: int) -> float:
    """Per-step decay for a half-life given in images."""
    if halflife_nimg <= 0:
        return 0.0
    return 0.5 ** (batch_size / halflife_nimg)


def gamma_to_sigma_rel(gamma: float) -> float:
    """sigma_rel of a power-function EMA with exponent gamma (EDM2)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


# The largest sigma_rel a power function can have (its maximum over gamma > -1, reached near gamma ~ 0).
_SIGMA_REL_MAX = max(gamma_to_sigma_rel(g / 1000) for g in range(-999, 2000))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Invert :func:`gamma_to_sigma_rel`: the real root gamma > -1 of (g+2)^2 (g+3) s^2 - (g+1) = 0."""
    if not 0 < sigma_rel < _SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must lie in (0, {_SIGMA_REL_MAX:.4f}), got {sigma_rel}")
    s2 = sigma_rel**2
    # Expand: s2 (g^3 + 7 g^2 + 16 g + 12) - g - 1 = 0.
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    real = [r.real for r in roots if abs(r.imag) < 1e-9 and r.real > -1]
    return float(max(real))


def _copy_eval(net: nn.Module) -> nn.Module:
    ema = copy.deepcopy(net).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def _lerp_(ema: nn.Module, net: nn.Module, beta: float) -> None:
    ema_p = [p for p in ema.parameters()]
    net_p = [p.detach() for p in net.parameters()]
    if beta == 0.0:
        torch._foreach_copy_(ema_p, net_p)
    else:
        # p_ema <- beta p_ema + (1 - beta) p_net
        torch._foreach_lerp_(ema_p, net_p, 1.0 - beta)
    for b_ema, b_net in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b_net)


class EMA:
    """Traditional EMA with a half-life in images (EDM / ECT ``--ema_beta``)."""

    kind = "ema"

    def __init__(self, net: nn.Module, halflife_nimg: float, rampup_ratio: float = 0.0):
        if halflife_nimg < 0:
            raise ValueError("halflife_nimg must be >= 0")
        self.halflife_nimg = float(halflife_nimg)
        self.rampup_ratio = float(rampup_ratio)
        self.model = _copy_eval(net)

    def beta(self, nimg: int, batch_size: int) -> float:
        halflife = self.halflife_nimg
        if self.rampup_ratio > 0:
            halflife = min(halflife, nimg * self.rampup_ratio)
        return halflife_to_beta(halflife, batch_size)

    def update(self, net: nn.Module, nimg: int, batch_size: int) -> None:
        """Fold in the weights after the step that brought the count to ``nimg`` images."""
        _lerp_(self.model, net, self.beta(nimg, batch_size))

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)


class PowerFunctionEMA:
    """EDM2 power-function EMA for several sigma_rel at once; ``models[i]`` tracks ``stds[i]``."""

    kind = "phema"

    def __init__(self, net: nn.Module, stds: Sequence[float]):
        self.stds = [float(s) for s in stds]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.stds]
        self.models = [_copy_eval(net) for _ in self.stds]

    def update(self, net: nn.Module, nimg: int, batch_size: int) -> None:
        # beta = (1 - delta/t)^(gamma+1) with t the images seen *after* this step; the first step gives beta = 0.
        for gamma, model in zip(self.gammas, self.models):
            beta = (1.0 - batch_size / nimg) ** (gamma + 1) if nimg > 0 else 0.0
            _lerp_(model, net, beta)

    def state_dict(self) -> Dict[str, Dict[str, torch.Tensor]]:
        return {f"{s:.3f}": m.state_dict() for s, m in zip(self.stds, self.models)}

    def load_state_dict(self, state: Dict[str, Dict[str, torch.Tensor]]) -> None:
        for s, m in zip(self.stds, self.models):
            m.load_state_dict(state[f"{s:.3f}"])
