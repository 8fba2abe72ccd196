"""EMA and EDM2 power-function EMA."""
import math

import pytest
import torch
from torch import nn

from sctlib.ema import EMA, PowerFunctionEMA, gamma_to_sigma_rel, halflife_to_beta, sigma_rel_to_gamma


def test_sigma_rel_gamma_round_trip_matches_ect_exponents():
    # ECT's imgnet branch: stds [0.010, 0.050, 0.100] <-> gamma ~ 97.0, 17.0, 6.94 (ect-edm-code-facts 1.6)
    for s, g_expected in [(0.010, 97.0), (0.050, 17.0), (0.100, 6.94)]:
        g = sigma_rel_to_gamma(s)
        assert abs(g - g_expected) < 0.05 * g_expected
        assert abs(gamma_to_sigma_rel(g) - s) < 1e-10
    with pytest.raises(ValueError):
        sigma_rel_to_gamma(0.5)


def test_halflife_beta():
    assert abs(halflife_to_beta(math.log(0.5) / math.log(0.9999) * 128, 128) - 0.9999) < 1e-12
    assert halflife_to_beta(0, 128) == 0.0


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1))


def test_ema_tracks_weights_and_stays_in_eval_mode():
    net = _net().train()
    ema = EMA(net, halflife_nimg=100, rampup_ratio=0.0)
    assert not ema.model.training and all(not p.requires_grad for p in ema.model.parameters())
    start = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net, nimg=100, batch_size=100)  # one half-life -> halfway
    for p_e, p0 in zip(ema.model.parameters(), start):
        assert torch.allclose(p_e, p0 + 0.5, atol=1e-6)
    assert not ema.model.training


def test_power_function_ema_equals_weighted_average():
    """theta_hat(t) = sum_i w_i theta_i with w_i proportional to the integral of tau^gamma over step i."""
    net = nn.Linear(1, 1, bias=False)
    pf = PowerFunctionEMA(net, [0.05])
    gamma = pf.gammas[0]
    values, B = [], 10
    for step in range(1, 21):
        with torch.no_grad():
            net.weight.fill_(float(step))
        values.append(float(step))
        pf.update(net, nimg=step * B, batch_size=B)
    t = torch.arange(0, 21, dtype=torch.float64) * B
    w = (t[1:] ** (gamma + 1) - t[:-1] ** (gamma + 1))
    expected = float((w * torch.tensor(values, dtype=torch.float64)).sum() / w.sum())
    assert abs(pf.models[0].weight.item() - expected) < 1e-3 * expected


def test_ema_rampup_caps_the_halflife_at_ratio_times_images_seen():
    """EDM's ramp-up: half-life = min(halflife, ratio * nimg), so early averages forget the init fast."""
    from sctlib.ema import EMA, halflife_to_beta

    net = torch.nn.Linear(2, 1)
    ema = EMA(net, halflife_nimg=10_000, rampup_ratio=0.05)
    assert ema.beta(1000, 100) == pytest.approx(halflife_to_beta(50, 100))      # 0.05 * 1000 = 50 < 10,000
    assert ema.beta(10**6, 100) == pytest.approx(halflife_to_beta(10_000, 100))  # capped by the half-life
    assert EMA(net, 10_000, 0.0).beta(1000, 100) == pytest.approx(halflife_to_beta(10_000, 100))
    # and update() uses it: after one step at nimg = 1000 the EMA moved by 1 - beta towards the weights
    with torch.no_grad():
        net.weight.add_(1.0)
    before = ema.model.weight.clone()
    ema.update(net, 1000, 100)
    beta = halflife_to_beta(50, 100)
    assert torch.allclose(ema.model.weight, beta * before + (1 - beta) * net.weight)
