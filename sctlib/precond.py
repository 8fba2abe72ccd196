"""EDM preconditioning and the consistency-function forms used by ECT and SCT.

References
----------
* Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models" (EDM, 2022),
  Table 1 / Eq. 7: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise).
* Geng et al., "Consistency Models Made Easy" (ECT, 2024): the CIFAR-10 wrapper evaluates with the
  boundary form c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2), c_out = (sigma - sigma_min) sd / sqrt(sigma^2 + sd^2),
  so that f(x, sigma_min) = x exactly; it *trains* with the plain EDM coefficients.
* Wang et al., "Phased Consistency Models" (PCM, 2024), Eq. 3, and SCT Sec. 4.3: the phased form
  f^m(x_t, t) = (s_m / t) x_t + (1 - s_m / t) D(x_t, t) for t in [s_m, s_{m+1}) (EDM/VE algebra of the
  DDIM step; a reconstruction, see the book's page *The paper*).

The protocols (the same for every sampler, loss and network of the library):
* denoiser ``D(x, sigma, labels=None) -> x0_hat``;
* consistency function ``f(x, t, labels=None) -> x0_hat``.
Here ``sigma`` and ``t`` are the same quantity (VE process, sigma(t) = t).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

__all__ = [
    "as_sigma",
    "edm_scalings",
    "boundary_scalings",
    "Precond",
    "phase_lower_edge",
    "phased",
    "consistency_function",
    "Denoiser",
    "ConsistencyFn",
]

Denoiser = Callable[..., torch.Tensor]
ConsistencyFn = Callable[..., torch.Tensor]

BOUNDARY_MODES = ("never", "eval", "always")


def as_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """Return sigma as a float32 tensor of shape [B, 1, ..., 1] that broadcasts against ``x``.

    Accepts a Python number, a 0-d tensor, a [B] tensor or an already broadcastable [B, 1, ...] tensor.
    Computing the coefficients in float32 keeps them exact under bf16 autocast.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    sigma = sigma.reshape(sigma.shape[0], *([1] * (x.ndim - 1)))
    if sigma.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"sigma has batch size {sigma.shape[0]} but x has {x.shape[0]}")
    return sigma.expand(x.shape[0], *([1] * (x.ndim - 1)))


def edm_scalings(sigma: torch.Tensor, sigma_data: float = 0.5):
    """EDM coefficients (Karras et al. 2022, Table 1): c_skip, c_out, c_in, c_noise = ln(sigma)/4."""
    s2 = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / s2
    c_out = sigma * sigma_data / s2.sqrt()
    c_in = 1 / s2.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def boundary_scalings(sigma: torch.Tensor, sigma_data: float = 0.5, sigma_min: float = 0.002):
    """Boundary-condition c_skip, c_out of ECT's evaluation wrapper: c_skip(sigma_min)=1, c_out(sigma_min)=0.

    c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2),  c_out = (sigma - sigma_min) sd / sqrt(sigma^2 + sd^2).
    """
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out


class Precond(nn.Module):
    """Wrap a raw network F(x_in, c_noise, class_labels) into the EDM denoiser D(x, sigma, labels).

    The raw network is registered under ``inner_name`` so that state-dict keys match the published
    checkpoints: ``model.`` for EDM / ECT (``EDMPrecond``, ``ECMPrecond``) and ``unet.`` for EDM2.

    ``boundary`` selects where the consistency boundary form (:func:`boundary_scalings`) replaces the
    plain EDM c_skip / c_out:
    * ``"never"``  - EDM2 and ECT-ImageNet (``networks_edm2.Precond``), and diffusion teachers;
    * ``"eval"``   - ECT CIFAR-10's ``ECMPrecond``: EDM form while training, boundary form in eval mode;
    * ``"always"`` - boundary form in both modes.

    Labels may be integer class indices [B] or one-hot / soft rows [B, label_dim]; the raw network
    always receives float rows (EDM convention), or ``None`` for an unconditional model.
    """

    def __init__(
        self,
        inner: nn.Module,
        *,
        inner_name: str = "model",
        label_dim: int = 0,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        boundary: str = "never",
    ):
        super().__init__()
        if boundary not in BOUNDARY_MODES:
            raise ValueError(f"boundary must be one of {BOUNDARY_MODES}, got {boundary!r}")
        self.inner_name = inner_name
        self.add_module(inner_name, inner)
        self.label_dim = int(label_dim)
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.boundary = boundary

    @property
    def inner(self) -> nn.Module:
        return getattr(self, self.inner_name)

    def _label_rows(self, labels, x: torch.Tensor) -> Optional[torch.Tensor]:
        if self.label_dim == 0:
            return None
        if labels is None:
            raise ValueError(f"this model is class-conditional (label_dim={self.label_dim}); pass labels")
        labels = torch.as_tensor(labels)
        if labels.ndim == 1 and not labels.is_floating_point():
            # Range-check only host tensors: on a GPU the check would be a host sync every step.
            if labels.device.type == "cpu" and labels.numel() and (
                    int(labels.min()) < 0 or int(labels.max()) >= self.label_dim):
                raise ValueError(f"class labels must lie in [0, {self.label_dim}), got {labels.min()}..{labels.max()}")
            return nn.functional.one_hot(labels.to(x.device).long(), self.label_dim).to(torch.float32)
        labels = labels.to(x.device)
        if labels.ndim != 2 or labels.shape[1] != self.label_dim:
            raise ValueError(f"label rows must have shape [B, {self.label_dim}], got {tuple(labels.shape)}")
        return labels.to(torch.float32)

    def use_boundary(self) -> bool:
        return self.boundary == "always" or (self.boundary == "eval" and not self.training)

    def forward(self, x: torch.Tensor, sigma, class_labels=None, labels=None) -> torch.Tensor:
        if labels is None:
            labels = class_labels
        x = x.to(torch.float32)
        sigma = as_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
        if self.use_boundary():
            c_skip, c_out = boundary_scalings(sigma, self.sigma_data, self.sigma_min)
        F_x = self.inner(c_in * x, c_noise.reshape(-1), self._label_rows(labels, x))
        return c_skip * x + c_out * F_x.to(torch.float32)


def phase_lower_edge(t: torch.Tensor, edges: Sequence[float]) -> torch.Tensor:
    """s_m for each t: the largest edge <= t (PCM Sec. 3.1). ``edges`` ascend and start with s_0."""
    e = torch.as_tensor(list(edges), dtype=t.dtype, device=t.device)
    if e.ndim != 1 or e.numel() == 0 or bool((e[1:] <= e[:-1]).any()):
        raise ValueError(f"edges must be a non-empty strictly increasing sequence, got {list(edges)}")
    idx = torch.searchsorted(e, t.contiguous(), right=True) - 1
    return e[idx.clamp(min=0)]


def phased(D: Denoiser, edges: Sequence[float]) -> ConsistencyFn:
    """Phased consistency function f^m(x_t, t) = (s_m/t) x_t + (1 - s_m/t) D(x_t, t)  (PCM Eq. 3, VE form).

    With edges = [0] this is f = D (one phase, ECT/SCT). With edges = [sigma_min] it is a consistency
    function of any denoiser with the exact boundary f(x, sigma_min) = x. At t == s_m the output is x_t
    exactly, for every edge.
    """
    edges = [float(e) for e in edges]

    def f(x: torch.Tensor, t, labels=None) -> torch.Tensor:
        t = as_sigma(t, x)
        s = phase_lower_edge(t, edges)
        ratio = s / t
        return ratio * x + (1 - ratio) * D(x, t, labels)

    f.edges = edges  # samplers read the phase edges from here
    return f


def consistency_function(D: Denoiser, *, edges: Optional[Sequence[float]] = None) -> ConsistencyFn:
    """Return f(x, t, labels) built from a denoiser: D itself (single phase, s_0 = 0) or its phased form."""
    if edges is None or list(edges) == [0.0] or list(edges) == [0]:
        def f(x, t, labels=None):
            return D(x, t, labels)

        f.edges = [0.0]
        return f
    return phased(D, edges)


