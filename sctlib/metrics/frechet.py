"""Feature-space distances between sample sets: Frechet distance (FID's formula) and kernel (KID) distance.

* Frechet distance between N(mu1, S1) and N(mu2, S2) (Dowson & Landau 1982; FID, Heusel et al. 2017, Eq. 6):
      d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).
  tr((S1 S2)^{1/2}) = tr((S1^{1/2} S2 S1^{1/2})^{1/2}) because S1 S2 is similar to the symmetric PSD matrix
  S1^{1/2} S2 S1^{1/2} (or to L^T S1 L with S2 = L L^T); we use these symmetric forms so that only symmetric
  eigensolvers are needed, which are stable and never produce the complex parts that scipy.linalg.sqrtm can.
* Kernel distance (KID, Binkowski et al. 2018, Sec. 3): unbiased MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3, averaged over random subsets.

Pure numpy (float64); features may be numpy arrays or torch tensors.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

__all__ = ["feature_stats", "frechet_distance", "frechet_distance_from_features", "kernel_distance"]


def _np64(a) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def feature_stats(features) -> Tuple[np.ndarray, np.ndarray]:
    """(mu [F], sigma [F, F]) of features [N, F], float64; sigma is the *unbiased* covariance (divides by N - 1),
    as in EDM's reference statistics (StyleGAN-ADA's metric code divides by N instead)."""
    f = _np64(features)
    if f.ndim != 2:
        raise ValueError(f"features must be [N, F], got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or inf")
    mu = f.mean(0)
    sigma = np.cov(f, rowvar=False, ddof=1).reshape(f.shape[1], f.shape[1])
    return mu, sigma


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr((S1 S2)^{1/2}) for symmetric PSD S1, S2.

    Fast path: if S2 = L L^T (Cholesky succeeds), S1 S2 is similar to the symmetric PSD L^T S1 L, whose
    eigenvalues need only ``eigvalsh`` (measured 2048-d: Cholesky 0.4 s + eigvalsh 1.1 s vs 2.8 s for the
    ``eigh`` of the general path, one thread). Rank-deficient pairs (fewer samples than dimensions) fall back
    to S1^{1/2} S2 S1^{1/2} with S1^{1/2} from ``eigh``.
    """
    for a, b in ((s1, s2), (s2, s1)):
        try:
            L = np.linalg.cholesky(b)
        except np.linalg.LinAlgError:
            continue
        return _sum_sqrt_eigvals(L.T @ a @ L)
    r = _psd_sqrt(s1)
    return _sum_sqrt_eigvals(r @ s2 @ r)


def _sum_sqrt_eigvals(m: np.ndarray) -> float:
    w = np.linalg.eigvalsh((m + m.T) / 2)
    # eigenvalues under the round-off level are zero; sqrt would blow their +-1e-16 noise up to 1e-8 each
    w[w < w.max(initial=0.0) * m.shape[0] * np.finfo(np.float64).eps] = 0.0
    return float(np.sqrt(w).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Frechet distance between two Gaussians (FID Eq. 6), float64. Returns max(d^2, 0): tiny negative
    values from round-off (e.g. a set against itself) are reported as 0."""
    mu1, mu2 = _np64(mu1).reshape(-1), _np64(mu2).reshape(-1)
    s1, s2 = _np64(sigma1), _np64(sigma2)
    F = mu1.shape[0]
    if mu2.shape != (F,) or s1.shape != (F, F) or s2.shape != (F, F):
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, sigma2 {s2.shape}")
    for name, m in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.isfinite(m).all():
            raise ValueError(f"{name} contains NaN or inf")
    tr_covmean = _trace_sqrt_product(s1, s2)
    diff = mu1 - mu2
    d2 = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(d2, 0.0)


def frechet_distance_from_features(feat1, feat2) -> float:
    """Frechet distance between the Gaussian fits of two feature sets [N1, F], [N2, F]."""
    return frechet_distance(*feature_stats(feat1), *feature_stats(feat2))


def kernel_distance(feat1, feat2, *, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> Tuple[float, float]:
    """KID: (mean, std) over ``num_subsets`` subsets of the unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3.

    ``subset_size`` is capped at the smaller set size. Subsets are drawn without replacement from a
    numpy Generator seeded with ``seed`` (reproducible).
    """
    x, y = _np64(feat1), _np64(feat2)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"features must be [N, F] with equal F, got {x.shape} and {y.shape}")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError("kernel_distance needs at least 2 samples per set")
    d = x.shape[1]
    rng = np.random.default_rng(seed)
    vals = np.empty(num_subsets)
    for i in range(num_subsets):
        a = x[rng.choice(x.shape[0], m, replace=False)]
        b = y[rng.choice(y.shape[0], m, replace=False)]
        kxx = (a @ a.T / d + 1) ** 3
        kyy = (b @ b.T / d + 1) ** 3
        kxy = (a @ b.T / d + 1) ** 3
        # unbiased: drop the diagonals of the within-set kernels
        vals[i] = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
    return float(vals.mean()), float(vals.std())
