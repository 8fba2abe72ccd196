"""Samplers: determinism, guidance, Heun accuracy on a Gaussian, phased / edge-skipping sampling, mid_t search."""
import math

import pytest
import torch

from sctlib.samplers import (guided, sample_heun, sample_multistep, sample_onestep, sample_phased,
                             search_mid_t)

MU, S = 0.3, 0.5  # data ~ N(MU, S^2 I)


def gaussian_denoiser(x, sigma, labels=None):
    """Exact E[x0 | x_sigma] for N(MU, S^2 I) data: MU + S^2/(S^2 + sigma^2) (x - MU)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def gaussian_consistency(x, t, labels=None):
    """Exact consistency function (PF-ODE to t = 0) for the same data: MU + S (x - MU) / sqrt(S^2 + t^2)."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return MU + S * (x - MU) / (S**2 + t**2).sqrt()


class Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, t, labels=None):
        self.calls.append(float(torch.as_tensor(t).reshape(-1)[0]))
        return self.fn(x, t, labels)


def test_multistep_determinism_and_structure():
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    f = gaussian_consistency
    kw = dict(t_steps=(80.0, 1.0, 0.3))
    a = sample_multistep(f, noise, generator=torch.Generator().manual_seed(1), **kw)
    b = sample_multistep(f, noise, generator=torch.Generator().manual_seed(1), **kw)
    c = sample_multistep(f, noise, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.dtype == torch.float32
    # the global RNG is not used when a generator is passed
    torch.manual_seed(5)
    before = torch.get_rng_state()
    sample_multistep(f, noise, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(before, torch.get_rng_state())
    # by hand: x0 = f(80 z, 80); x = x0 + 1.0 e1; x0 = f(x, 1.0); x = x0 + 0.3 e2; f(x, 0.3)
    g = torch.Generator().manual_seed(1)
    x = f(noise * 80.0, 80.0)
    x = f(x + 1.0 * torch.randn(noise.shape, generator=g), 1.0)
    x = f(x + 0.3 * torch.randn(noise.shape, generator=g), 0.3)
    assert torch.allclose(a, x, rtol=0, atol=1e-6)
    # callback after every evaluation
    seen = []
    sample_multistep(f, noise, callback=seen.append, generator=torch.Generator().manual_seed(1), **kw)
    assert [d["i"] for d in seen] == [0, 1, 2] and [d["t"] for d in seen] == [80.0, 1.0, 0.3]
    assert set(seen[0]) == {"i", "t", "x", "x0"}
    with pytest.raises(ValueError, match="decreasing"):
        sample_multistep(f, noise, t_steps=(1.0, 2.0))


def test_onestep_is_f_of_scaled_noise():
    noise = torch.randn(8, 3)
    f = Counting(gaussian_consistency)
    out = sample_onestep(f, noise, t_max=80.0)
    assert f.calls == [80.0]
    assert torch.equal(out, gaussian_consistency(noise * 80.0, 80.0))
    # exact consistency function -> exact data statistics: std S * 80 / sqrt(S^2 + 80^2) per unit noise
    big = torch.randn(20000, 2, generator=torch.Generator().manual_seed(3))
    x = sample_onestep(gaussian_consistency, big)
    assert abs(x.mean().item() - MU) < 0.02 and abs(x.std().item() - S) < 0.01


def test_guidance_w1_is_exact_and_w2_extrapolates():
    f = lambda x, t, labels=None: x * 0.5 + 1.0
    f_bad = Counting(lambda x, t, labels=None: x * 0.25)
    x = torch.randn(4, 3)
    g1 = guided(f, f_bad, 1.0)
    assert torch.equal(g1(x, 2.0), f(x, 2.0)) and f_bad.calls == []
    g2 = guided(f, f_bad, 2.0)
    assert torch.allclose(g2(x, 2.0), 2 * f(x, 2.0) - f_bad(x, 2.0))
    noise = torch.randn(8, 3)
    gen = lambda: torch.Generator().manual_seed(4)
    assert torch.equal(sample_multistep(guided(f, f_bad, 1.0), noise, generator=gen()),
                       sample_multistep(f, noise, generator=gen()))


def test_heun_reaches_gaussian_std_with_exact_denoiser():
    noise = torch.randn(8192, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # the exact PF-ODE map from t = 80 to 0 for Gaussian data: x0 - MU = (x_80 - MU) S / sqrt(S^2 + 80^2)
    exact = MU + (noise * 80.0 - MU) * S / math.sqrt(S**2 + 80.0**2)
    rel_err = {}
    for n in (18, 36, 72):
        x = sample_heun(gaussian_denoiser, noise, num_steps=n).double()
        rel_err[n] = ((x - MU).norm() / (exact - MU).norm() - 1).abs().item()
        assert abs(x.std().item() / exact.std().item() - 1) < 1.5 * rel_err[n] + 1e-6
        assert abs(x.std().item() - S) < 0.03 + S * rel_err[n] * 1.5
    # Measured: relative error of the sample scale 5.5e-2 (18 steps), 1.2e-2 (36), 2.9e-3 (72):
    # second order, ratio ~4.4 per doubling. The std at 18 steps is S * 1.055.
    assert rel_err[18] < 0.08 and rel_err[72] < 0.005, rel_err
    assert rel_err[18] / rel_err[36] > 3.5 and rel_err[36] / rel_err[72] > 3.5, rel_err
    seen = []
    sample_heun(Counting(gaussian_denoiser), noise[:4], num_steps=5, callback=seen.append)
    assert len(seen) == 2 * 5 - 1  # Heun correction on every step but the last


# ------------------------------------------------------------------------------------------------
# phased sampling and edge skipping

EDGES = [0.0, 0.5, 2.0]


def plain_phased(D, noise, edges, t_max):
    """PCM sampling by hand: from t in (s_m, s_{m+1}] jump to s_m with the DDIM form."""
    x, t = noise * t_max, t_max
    for s in reversed(edges):
        x0 = D(x, t)
        x = x0 if s == 0 else (s / t) * x + (1 - s / t) * x0
        t = s
    return x


def test_phased_eta0_matches_plain_phased_sampling():
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    D = Counting(gaussian_denoiser)
    x = sample_phased(D, noise, edges=EDGES, t_max=80.0, eta=0.0)
    assert D.calls == [80.0, 2.0, 0.5]  # stops exactly at each edge, M evaluations
    ref = plain_phased(gaussian_denoiser, noise, EDGES, 80.0)
    assert torch.allclose(x, ref, rtol=0, atol=1e-6)
    assert torch.equal(x, sample_phased(gaussian_denoiser, noise, edges=EDGES, eta=0.0, variant="scale"))
    # A perfect phased model (its DDIM step is the exact PF-ODE map to the lower edge) makes eta = 0
    # phased sampling the exact ODE solution.
    x_ideal = sample_phased(ideal_phased_denoiser(EDGES), noise.double(), edges=EDGES, eta=0.0)
    exact = gaussian_consistency(noise.double() * 80.0, 80.0)
    assert torch.allclose(x_ideal.double(), exact, rtol=0, atol=1e-5)


def ideal_phased_denoiser(edges):
    """D with (s/t) x + (1 - s/t) D(x, t) = x_s exactly, s = the edge below t (Gaussian PF-ODE map)."""
    def D(x, t, labels=None):
        t = float(t)
        s = max(e for e in edges if e < t)
        x_s = MU + (x - MU) * math.sqrt(S**2 + s**2) / math.sqrt(S**2 + t**2)
        return (x_s - (s / t) * x) / (1 - s / t)
    return D


def test_edge_skipping_lands_past_the_edges():
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    D = Counting(gaussian_denoiser)
    eta = 0.2
    x = sample_phased(D, noise, edges=EDGES, eta=eta, variant="interp")
    # interp: s' = s_m - eta (s_m - s_{m-1}): 2.0 -> 2.0 - 0.2 * 1.5 = 1.7; 0.5 -> 0.4
    assert D.calls == pytest.approx([80.0, 1.7, 0.4])
    D.calls.clear()
    sample_phased(D, noise, edges=EDGES, eta=eta, variant="scale")
    assert D.calls == pytest.approx([80.0, 1.6, 0.4])
    assert not torch.allclose(x, sample_phased(gaussian_denoiser, noise, edges=EDGES, eta=0.0))
    # renoise: deterministic under a seeded generator
    kw = dict(edges=EDGES, eta=eta, variant="renoise")
    a = sample_phased(gaussian_denoiser, noise, generator=torch.Generator().manual_seed(3), **kw)
    b = sample_phased(gaussian_denoiser, noise, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b)
    # a positive s_0 ends at s_0 rather than at a clean prediction
    D.calls.clear()
    sample_phased(D, noise, edges=[0.002, 1.0], eta=0.0)
    assert D.calls == pytest.approx([80.0, 1.0])
    with pytest.raises(ValueError, match="eta"):
        sample_phased(D, noise, edges=EDGES, eta=1.0)
    with pytest.raises(ValueError, match="variant"):
        sample_phased(D, noise, edges=EDGES, variant="ddpm")
    with pytest.raises(ValueError, match="t_max"):
        sample_phased(D, noise, edges=[0.0, 100.0])


# ------------------------------------------------------------------------------------------------
# mid_t search

def test_search_mid_t_golden_section_and_grid():
    # f returns t itself, so the 2-step sample equals mid_t; the metric is minimal at mid_t = 1.3
    f = lambda x, t, labels=None: torch.full_like(x, float(t))
    metric = lambda s: (math.log(s.mean().item()) - math.log(1.3)) ** 2
    noise = torch.randn(4, 2)
    best, hist = search_mid_t(f, noise, None, metric, bounds=(0.1, 5.0), iters=20)
    assert len(hist) == 20 and abs(best - 1.3) / 1.3 < 0.01, best
    best_g, hist_g = search_mid_t(f, noise, None, metric, grid=[0.5, 1.0, 1.5, 2.0])
    assert best_g == 1.5 and [m for m, _ in hist_g] == [0.5, 1.0, 1.5, 2.0]
    with pytest.raises(ValueError, match="bounds"):
        search_mid_t(f, noise, None, metric, bounds=(2.0, 1.0))


def test_phased_step_formulas_and_renoise_scale():
    """Each phased step lands where SCT Sec. 4.4 [RECON] says: the DDIM form (s'/t) x + (1 - s'/t) D for
    'interp', and D + s' * randn (from the caller's generator) for 'renoise'."""
    class Recorder:
        def __init__(self):
            self.inputs = []

        def __call__(self, x, t, labels=None):
            self.inputs.append((x.clone(), float(t)))
            return torch.full_like(x, 0.25)  # a fixed x0 prediction

    noise = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
    eta = 0.2
    D = Recorder()
    sample_phased(D, noise, edges=EDGES, eta=eta, variant="renoise", generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    (x1, t1), (x2, t2) = D.inputs[1], D.inputs[2]
    s1, s2 = t1, t2  # renoise lands at the 'interp' s': 1.7, then 0.4
    assert (s1, s2) == pytest.approx((1.7, 0.4))
    assert torch.allclose(x1, 0.25 + s1 * torch.randn(noise.shape, generator=g), atol=1e-6)
    assert torch.allclose(x2, 0.25 + s2 * torch.randn(noise.shape, generator=g), atol=1e-6)
    D = Recorder()
    sample_phased(D, noise, edges=EDGES, eta=eta, variant="interp")
    x_prev, t_prev = noise * 80.0, 80.0
    for x, s in D.inputs[1:]:
        assert torch.allclose(x, (s / t_prev) * x_prev + (1 - s / t_prev) * 0.25, atol=1e-5)
        x_prev, t_prev = x, s
