"""Embedded data sets that need no download: sklearn's digits and 2-D Gaussian-mixture toys.

Everything here follows the VE / EDM noise process (Karras et al. 2022, Eq. 1-3): x_t = x_0 + t * eps,
eps ~ N(0, I), so the noisy marginal is p_t = p_data * N(0, t^2 I). For a Gaussian mixture p_t is again a
mixture with every component variance grown by t^2, which gives closed forms for
* the density log p(x) and the score grad log p_t(x) (EDM Eq. 3 uses the score of p_t);
* the posterior mean E[x_0 | x_t] (Tweedie: E[x_0 | x_t] = x_t + t^2 grad log p_t(x_t); EDM's ideal
  denoiser D(x; sigma) is exactly this quantity, EDM Eq. 2 / Appendix B.3).
For a finite data set {x_i} the ideal denoiser is a softmax over all of it (EDM Appendix B.3, Eq. 57):
    E[x_0 | x_t] = sum_i w_i x_i,  w = softmax_i(-||x_t - x_i||^2 / (2 t^2)),
which is :func:`exact_posterior_mean`. SCT's stable target (SCT Sec. 4.1) estimates the same quantity
from a mini-batch; this exact version lets tests compare the two.

Data conventions: images float32 in [-1, 1], [C, H, W]; 2-D toys float32 [2]; scales are
chosen so the per-coordinate data std is about 0.5 (= sigma_data).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "DIGITS_RESOLUTIONS",
    "DIGITS_LAYOUTS",
    "TOY_MIXTURES",
    "load_digits_arrays",
    "digits_images",
    "DigitsDataset",
    "GaussianMixture2D",
    "make_mixture",
    "ToyDataset",
    "exact_posterior_mean",
]

DIGITS_RESOLUTIONS = (8, 16, 32)
DIGITS_LAYOUTS = ("resize", "pad")


# ------------------------------------------------------------------------------------------------
# sklearn digits


def load_digits_arrays() -> Tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 sklearn digits as (X uint-range float64 [N, 8, 8] with values 0..16, y int64 [N])."""
    from sklearn.datasets import load_digits  # local import: sklearn is slow to import

    d = load_digits()
    X = torch.as_tensor(d.images, dtype=torch.float64)
    y = torch.as_tensor(d.target, dtype=torch.int64)
    return X, y


def digits_images(resolution: int = 8, *, layout: str = "resize", scale: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """The digits as float32 images [N, 1, R, R] plus labels [N] (int64, 0..9).

    ``layout='resize'`` resizes 8x8 -> RxR (bilinear, no antialias: upsampling only), so the digit fills
    the frame; ``layout='pad'`` keeps the 8x8 pixels and pads the background around them (centred).
    ``scale=True`` maps the raw 0..16 intensities to [-1, 1] (x / 8 - 1); ``False`` gives [0, 1].
    """
    if resolution not in DIGITS_RESOLUTIONS:
        raise ValueError(f"digits resolution must be one of {DIGITS_RESOLUTIONS}, got {resolution!r}")
    if layout not in DIGITS_LAYOUTS:
        raise ValueError(f"digits layout must be one of {DIGITS_LAYOUTS}, got {layout!r}")
    X, y = load_digits_arrays()
    x = (X / 16.0).to(torch.float32).unsqueeze(1)  # [N, 1, 8, 8] in [0, 1]
    if resolution != 8:
        if layout == "resize":
            x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
        else:
            p = (resolution - 8) // 2
            x = F.pad(x, (p, p, p, p), value=0.0)  # 0 = background in [0, 1]
    x = x.clamp(0.0, 1.0)
    if scale:
        x = x * 2.0 - 1.0
    return x.contiguous(), y


class _InMemoryDataset(torch.utils.data.Dataset):
    """Shared base: tensors kept in memory, exposed with ``tensors()`` for direct indexing."""

    name: str
    label_dim: int
    shape: tuple

    def __init__(self, X: torch.Tensor, y: torch.Tensor):
        self._X = X
        self._y = y

    def __len__(self) -> int:
        return self._X.shape[0]

    def __getitem__(self, i: int):
        return self._X[i], int(self._y[i])

    def tensors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(X [N, ...] float32, y [N] int64); the same storage as the data set (do not modify)."""
        return self._X, self._y


class SyntheticImages(_InMemoryDataset):
    """Random images on the uint8 grid (values k / 127.5 - 1), held in memory on ``device``: the data of the
    benchmarks, which measure the training step, not a data pipeline. Labels are uniform over ``label_dim``
    classes, or, with ``classes`` > 0, cycle through that many classes (n / classes images each, the layout
    the class-restricted references need). Seeded: the same arguments give the same tensors."""

    name = "synthetic"

    def __init__(self, shape, n: int, label_dim: int = 0, device="cpu", classes: int = 0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        X = torch.randint(0, 256, (n, *shape), generator=g).float() / 127.5 - 1
        y = torch.arange(n) % classes if classes else torch.randint(0, max(label_dim, 1), (n,), generator=g)
        super().__init__(X.to(device), y.to(device))
        self.shape, self.label_dim = tuple(shape), label_dim

    @classmethod
    def for_config(cls, cfg, n: int, device=None, classes: int = 0) -> "SyntheticImages":
        """A set shaped for ``cfg`` (a TrainConfig): its image shape and, for a conditional model, its labels."""
        if device is None:  # the config's device, 'auto' resolved as the trainer resolves it
            device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        return cls((cfg.net.img_channels, cfg.net.img_resolution, cfg.net.img_resolution), n,
                   cfg.net.label_dim if cfg.cond else 0, device, classes)


class DigitsDataset(_InMemoryDataset):
    """sklearn's 1,797 labelled 8x8 digits as [-1, 1] images [1, R, R].

    Labels are always returned (0..9); ``label_dim`` is 10 when ``cond=True`` and 0 otherwise, which is
    what tells a trainer whether to condition on them. ``xflip`` is refused: a flipped digit is not a
    digit of the same class.
    """

    def __init__(self, resolution: int = 8, *, layout: str = "resize", cond: bool = False):
        X, y = digits_images(resolution, layout=layout)
        super().__init__(X, y)
        self.resolution = resolution
        self.layout = layout
        self.name = "digits" if layout == "resize" else "digits-pad"
        self.label_dim = 10 if cond else 0
        self.num_classes = 10
        self.shape = tuple(X.shape[1:])

    def __repr__(self) -> str:
        return f"DigitsDataset(n={len(self)}, shape={self.shape}, layout={self.layout!r}, label_dim={self.label_dim})"


# ------------------------------------------------------------------------------------------------
# 2-D Gaussian mixtures with closed-form density, score and posterior mean


def _as_t(t, x: torch.Tensor) -> torch.Tensor:
    """t as a [B] tensor (scalar or [B] accepted) in x's dtype/device."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    t = t.reshape(-1)
    if t.shape[0] != x.shape[0]:
        raise ValueError(f"t has {t.shape[0]} entries but x has batch size {x.shape[0]}")
    if bool((t < 0).any()):
        raise ValueError("t must be >= 0")
    return t


class GaussianMixture2D:
    """Isotropic 2-D Gaussian mixture p(x) = sum_k pi_k N(x; m_k, s^2 I) and its VE-noised marginals.

    ``means`` [K, 2], ``std`` s (same for all components), ``weights`` pi [K] (uniform by default).
    All methods accept float32 or float64 inputs and compute in float64 internally.
    """

    def __init__(self, means, std: float, weights=None, name: str = "mixture"):
        self.means = torch.as_tensor(means, dtype=torch.float64).reshape(-1, 2)
        K = self.means.shape[0]
        if std <= 0:
            raise ValueError(f"component std must be > 0, got {std}")
        self.std = float(std)
        w = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (K,) or bool((w <= 0).any()):
            raise ValueError(f"weights must be {K} positive numbers")
        self.weights = w / w.sum()
        self.name = name

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def data_std(self) -> float:
        """Per-coordinate standard deviation of p, averaged over the two coordinates (closed form)."""
        mean = (self.weights[:, None] * self.means).sum(0)
        second = (self.weights[:, None] * self.means**2).sum(0) + self.std**2
        return float((second - mean**2).mean().sqrt())

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """n samples (float32 [n, 2]) and their component indices (int64 [n])."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, 2, dtype=torch.float64, generator=generator)
        x = self.means[comp] + self.std * eps
        return x.to(torch.float32), comp

    def _log_resp(self, x: torch.Tensor, t) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-component log(pi_k N(x; m_k, v I)) with v = s^2 + t^2; returns (logits [B,K], v [B], x64)."""
        x64 = x.to(torch.float64).reshape(-1, 2)
        t = _as_t(t, x64)
        v = self.std**2 + t**2  # [B]: noisy component variance (VE process)
        d2 = ((x64[:, None, :] - self.means[None]) ** 2).sum(-1)  # [B, K]
        logits = self.weights.log()[None] - d2 / (2 * v[:, None]) - torch.log(2 * math.pi * v)[:, None]
        return logits, v, x64

    def log_prob(self, x: torch.Tensor, t=0.0) -> torch.Tensor:
        """log p_t(x) in nats, float64 [B]; t = 0 gives the data density."""
        logits, _, _ = self._log_resp(x, t)
        return torch.logsumexp(logits, dim=1)

    def score(self, x: torch.Tensor, t) -> torch.Tensor:
        """grad_x log p_t(x) of p_t = p * N(0, t^2 I), in x's dtype, [B, 2]."""
        logits, v, x64 = self._log_resp(x, t)
        gamma = torch.softmax(logits, dim=1)  # responsibilities under p_t
        mu = gamma @ self.means  # [B, 2]
        return ((mu - x64) / v[:, None]).to(x.dtype)

    def posterior_mean(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """Exact E[x_0 | x_t] (the ideal EDM denoiser), [B, 2] in x_t's dtype.

        Per component, x_0 | x_t, k is Gaussian with mean m_k + s^2 / (s^2 + t^2) (x_t - m_k);
        the mixture weights are the responsibilities of p_t. Equals x_t + t^2 score(x_t, t) (Tweedie).
        """
        logits, v, x64 = self._log_resp(x_t, t)
        gamma = torch.softmax(logits, dim=1)
        shrink = (self.std**2 / v)[:, None, None]  # [B,1,1]
        comp_means = self.means[None] + shrink * (x64[:, None, :] - self.means[None])  # [B, K, 2]
        return (gamma[:, :, None] * comp_means).sum(1).to(x_t.dtype)

    def __repr__(self) -> str:
        return f"GaussianMixture2D(name={self.name!r}, K={self.num_components}, std={self.std}, data_std={self.data_std():.3f})"


def _ring(num: int = 8, radius: float = 0.7, std: float = 0.05) -> GaussianMixture2D:
    # per-coordinate variance radius^2 / 2 + std^2 = 0.2475 -> data std 0.497, close to sigma_data = 0.5
    ang = torch.arange(num, dtype=torch.float64) * (2 * math.pi / num)
    return GaussianMixture2D(torch.stack([radius * ang.cos(), radius * ang.sin()], 1), std, name="ring")


def _grid(side: int = 5, spacing: float = 0.35, std: float = 0.03) -> GaussianMixture2D:
    # coordinates in spacing * {-2..2}: variance 2 spacing^2 + std^2 = 0.2459 -> data std 0.496
    c = (torch.arange(side, dtype=torch.float64) - (side - 1) / 2) * spacing
    gx, gy = torch.meshgrid(c, c, indexing="ij")
    return GaussianMixture2D(torch.stack([gx.reshape(-1), gy.reshape(-1)], 1), std, name="grid")


def _gauss() -> GaussianMixture2D:
    # a single N(0, 0.5^2 I): the case where every quantity is linear, handy as a sanity check
    return GaussianMixture2D(torch.zeros(1, 2), 0.5, name="gauss")


def _two(std: float = 0.1) -> GaussianMixture2D:
    # two well-separated modes on the x-axis with unequal weights: the mode-coverage check
    return GaussianMixture2D(torch.tensor([[-0.5, 0.0], [0.5, 0.0]]), std, weights=[0.3, 0.7], name="two")


TOY_MIXTURES = {"ring": _ring, "grid": _grid, "gauss": _gauss, "two": _two}


def make_mixture(name: str) -> GaussianMixture2D:
    """The named toy mixture: one of ``TOY_MIXTURES`` ('ring' 8 modes on a circle, 'grid' 5x5, ...)."""
    if name not in TOY_MIXTURES:
        raise ValueError(f"unknown toy mixture {name!r}; valid: {sorted(TOY_MIXTURES)} (use 'toy2d-<name>')")
    return TOY_MIXTURES[name]()


class ToyDataset(_InMemoryDataset):
    """A fixed finite sample (``num_points``, seeded) of a 2-D mixture, plus the analytic ``mixture``.

    Items are (x [2] float32, component index). ``label_dim`` is K when ``cond=True`` (train conditionally
    on the component), else 0.
    """

    def __init__(self, mixture: str = "ring", *, num_points: int = 50_000, seed: int = 0, cond: bool = False):
        self.mixture = make_mixture(mixture)
        g = torch.Generator().manual_seed(seed)
        X, comp = self.mixture.sample(num_points, generator=g)
        super().__init__(X, comp)
        self.name = f"toy2d-{mixture}"
        self.label_dim = self.mixture.num_components if cond else 0
        self.shape = (2,)

    def __repr__(self) -> str:
        return f"ToyDataset(name={self.name!r}, n={len(self)}, label_dim={self.label_dim}, mixture={self.mixture})"


# ------------------------------------------------------------------------------------------------
# Exact posterior mean of a finite (empirical) data set


def exact_posterior_mean(
    x_t: torch.Tensor,
    t,
    data: Union[torch.Tensor, "torch.utils.data.Dataset"],
    *,
    chunk_size: int = 4096,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """E[x_0 | x_t] under the empirical distribution of ``data`` (EDM App. B.3, Eq. 57).

    w_i(x_t) = softmax_i(-||x_t - x_i||^2 / (2 t^2)), result sum_i w_i x_i, in x_t's dtype and shape.
    ``t`` is a scalar or [B] (> 0). ``data`` is a tensor [N, ...] or a data set with ``tensors()``.
    The data are streamed in chunks of ``chunk_size`` rows with a running (online) log-sum-exp, so memory
    stays O(B * chunk_size). Distances use ||a||^2 - 2ab + ||b||^2 in float64 by default: in float32
    the cancellation error (~1e-7 ||x||^2) would swamp the 2 t^2 denominator at small t.
    """
    if hasattr(data, "tensors") and not isinstance(data, torch.Tensor):
        data = data.tensors()[0]
    if not isinstance(data, torch.Tensor):
        raise TypeError("data must be a tensor [N, ...] or a data set exposing tensors()")
    if data.ndim < 2 or data.shape[1:] != x_t.shape[1:]:
        raise ValueError(f"data items have shape {tuple(data.shape[1:])} but x_t items have {tuple(x_t.shape[1:])}")
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    B = x_t.shape[0]
    xq = x_t.reshape(B, -1).to(compute_dtype)
    t = _as_t(t, xq)
    if bool((t <= 0).any()):
        raise ValueError("exact_posterior_mean needs t > 0 (at t = 0 the posterior is a point mass)")
    inv_2t2 = 1.0 / (2.0 * t**2)  # [B]
    xq_sq = (xq**2).sum(1)  # [B]
    run_max = torch.full((B,), -math.inf, dtype=compute_dtype, device=xq.device)
    run_sum = torch.zeros(B, dtype=compute_dtype, device=xq.device)
    run_acc = torch.zeros_like(xq)
    for start in range(0, data.shape[0], chunk_size):
        ref = data[start : start + chunk_size].reshape(-1, xq.shape[1]).to(device=xq.device, dtype=compute_dtype)
        d2 = (xq_sq[:, None] - 2.0 * xq @ ref.T + (ref**2).sum(1)[None]).clamp_min(0.0)
        logit = -d2 * inv_2t2[:, None]  # [B, n]
        new_max = torch.maximum(run_max, logit.max(1).values)
        # rescale what was accumulated under the old max (online softmax)
        alpha = torch.exp(run_max - new_max)
        p = torch.exp(logit - new_max[:, None])
        run_sum = run_sum * alpha + p.sum(1)
        run_acc = run_acc * alpha[:, None] + p @ ref
        run_max = new_max
    return (run_acc / run_sum[:, None]).reshape(x_t.shape).to(x_t.dtype)
