"""Schedules: t sampling, the t -> r mapping, the staircase / smooth curriculum, weights, EDM steps, LR."""
import math

import pytest
import torch

from sctlib.schedules import (karras_sigmas, loss_weight, lr_at, mapping_r, sample_t_lognormal,
                              stage_exponent)


def test_lognormal_moments_and_generator():
    torch.manual_seed(0)
    t = sample_t_lognormal(200_000, -1.1, 2.0)
    assert t.shape == (200_000,) and t.dtype == torch.float32 and bool((t > 0).all())
    log_t = t.log().double()
    assert abs(log_t.mean().item() - (-1.1)) < 0.02
    assert abs(log_t.std().item() - 2.0) < 0.02
    g1 = torch.Generator().manual_seed(3)
    g2 = torch.Generator().manual_seed(3)
    assert torch.equal(sample_t_lognormal(5, 0.0, 1.0, generator=g1), sample_t_lognormal(5, 0.0, 1.0, generator=g2))


def test_stage_exponent_staircase_and_smooth():
    d = 1000
    assert stage_exponent(0, d, "staircase") == 1.0
    assert stage_exponent(999, d, "staircase") == 1.0
    assert stage_exponent(1000, d, "staircase") == 2.0
    assert stage_exponent(2500, d, "staircase") == 3.0
    # smooth_end='beyond' equals the staircase at every stage start and lies in [a_s, a_s + 1) in between
    for s in range(6):
        assert stage_exponent(s * d, d, "smooth", "beyond") == stage_exponent(s * d, d, "staircase")
    for nimg in torch.linspace(0, 5999, 97).tolist():
        a_st, a_sm = stage_exponent(nimg, d, "staircase"), stage_exponent(nimg, d, "smooth", "beyond")
        assert a_st <= a_sm < a_st + 1
    # smooth_end='ect' (the default) equals the staircase at every stage end and lies in [a_s - 1, a_s]:
    # a run of S stages ends at ECT's final exponent S, 'beyond' at S + 1 (CIFAR-10: 2^-8 vs 2^-9)
    for s in range(6):
        assert stage_exponent((s + 1) * d, d, "smooth") == stage_exponent((s + 1) * d - 1, d, "staircase")
    for nimg in torch.linspace(0, 5999, 97).tolist():
        a_st, a_sm = stage_exponent(nimg, d, "staircase"), stage_exponent(nimg, d, "smooth")
        assert a_st - 1 <= a_sm <= a_st
    total = 8 * d
    assert stage_exponent(total, d, "smooth", "ect") == stage_exponent(total - 1, d, "staircase") == 8.0
    assert stage_exponent(total, d, "smooth", "beyond") == 9.0
    # continuity of the smooth exponent: a tiny step in nimg gives a tiny change
    for end in ("ect", "beyond"):
        assert abs(stage_exponent(1000.5, d, "smooth", end) - stage_exponent(999.5, d, "smooth", end)) < 2e-3
    # the staircase jumps by 1 at the boundary
    assert stage_exponent(1000, d, "staircase") - stage_exponent(999.9, d, "staircase") == 1.0


def test_stage_exponent_rejects_bad_input():
    with pytest.raises(ValueError, match="double_nimg"):
        stage_exponent(10, 0, "staircase")
    with pytest.raises(ValueError, match="staircase"):
        stage_exponent(10, 100, "cosine")
    with pytest.raises(ValueError, match="nimg"):
        stage_exponent(-1, 100, "smooth")
    with pytest.raises(ValueError, match="smooth_end"):
        stage_exponent(10, 100, "smooth", "late")


@pytest.mark.parametrize("mapping", ["sigmoid", "const"])
def test_mapping_r_bounds_and_monotone_progress(mapping):
    t = torch.logspace(-4, 3, 500)
    prev = None
    for a in [1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 20.0, 40.0]:  # a = 40: q^-a below float32 eps
        r = mapping_r(t, a, q=2.0, mapping=mapping)
        assert bool((r >= 0).all()) and bool((r < t).all()), f"0 <= r < t violated at a={a}"
        if prev is not None:
            assert bool((r / t >= prev / t).all()), "r/t must grow with progress"
        prev = r
    # at large t the sigmoid factor is 1: r/t -> 1 - q^-a
    r = mapping_r(torch.tensor([200.0]), 3.0, q=2.0, mapping=mapping)
    assert abs(r.item() / 200.0 - (1 - 2.0**-3)) < 1e-6


def test_mapping_r_matches_formula_and_zero_region():
    t = torch.tensor([0.1, 0.5, 1.0, 1.9, 2.0, 10.0], dtype=torch.float64)
    a, q, k, b = 1.0, 2.0, 8.0, 1.0
    expected = (t * (1 - q**-a * (1 + k * torch.sigmoid(-b * t)))).clamp(min=0)
    assert torch.allclose(mapping_r(t, a, q=q, k=k, b=b), expected, rtol=0, atol=1e-12)
    # b enters through n(t) = 1 + k sigmoid(-b t): a b that is ignored (or used as 1) changes r
    for b in (0.5, 2.0):
        expected = (t * (1 - q**-2.0 * (1 + k * torch.sigmoid(-b * t)))).clamp(min=0)
        got = mapping_r(t, 2.0, q=q, k=k, b=b)
        assert torch.allclose(got, expected, rtol=0, atol=1e-12), b
        assert not torch.allclose(got, mapping_r(t, 2.0, q=q, k=k, b=1.0))
    # ECT facts: stage 0 with q=2 gives r == 0 exactly for t <= ln 7 ~ 1.95, r > 0 above
    r = mapping_r(torch.tensor([1.9, 2.0]), 1.0, q=2.0)
    assert r[0].item() == 0.0 and r[1].item() > 0.0


def test_mapping_r_validation():
    with pytest.raises(ValueError, match="mapping"):
        mapping_r(torch.ones(2), 1.0, q=2.0, mapping="linear")
    with pytest.raises(ValueError, match="q"):
        mapping_r(torch.ones(2), 1.0, q=1.0)


def test_smooth_dt_between_consecutive_staircase_stages():
    d, q = 1000, 2.0
    t = torch.logspace(-2, 2, 50, dtype=torch.float64)
    for nimg in [0, 250, 500, 999, 1000, 1700, 2999]:
        s = nimg // d
        dt_sm = t - mapping_r(t, stage_exponent(nimg, d, "smooth", "beyond"), q=q, mapping="const")
        dt_this = t - mapping_r(t, float(s + 1), q=q, mapping="const")
        dt_next = t - mapping_r(t, float(s + 2), q=q, mapping="const")
        assert bool((dt_sm <= dt_this * (1 + 1e-12)).all())
        assert bool((dt_sm > dt_next).all())


def test_loss_weights():
    t = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    r = torch.tensor([0.05, 0.5, 9.0], dtype=torch.float64)
    assert torch.allclose(loss_weight(t, r, "inv_dt"), torch.tensor([20.0, 2.0, 1.0], dtype=torch.float64))
    sd = 0.5
    expected = torch.tensor([100 + 4, 1 + 4, 0.01 + 4], dtype=torch.float64)
    assert torch.allclose(loss_weight(t, r, "snrpk", sd), expected)
    assert torch.allclose(loss_weight(t, r, "edm", sd), expected)  # EDM lambda == snrpk algebraically
    assert torch.equal(loss_weight(t, r, "uniform"), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="inv_dt"):
        loss_weight(t, r, "lpips")


def test_karras_sigmas():
    s = karras_sigmas(18)
    assert s.shape == (19,) and s[-1].item() == 0.0
    assert abs(s[0].item() - 80.0) < 1e-9 and abs(s[-2].item() - 0.002) < 1e-12
    assert bool((s[1:] < s[:-1]).all())
    # EDM Eq. 5 at i = 9 of 18, by hand
    i, N, rho = 9, 18, 7.0
    ref = (80.0 ** (1 / rho) + i / (N - 1) * (0.002 ** (1 / rho) - 80.0 ** (1 / rho))) ** rho
    assert abs(s[i].item() - ref) < 1e-12
    assert karras_sigmas(1).tolist() == [80.0, 0.0]
    with pytest.raises(ValueError):
        karras_sigmas(0)


def test_lr_at():
    assert lr_at(123, lr=1e-4) == 1e-4
    ref = 256_000
    assert lr_at(0, lr=1e-3, schedule="inv_sqrt", ref_nimg=ref) == 1e-3
    assert lr_at(ref, lr=1e-3, schedule="inv_sqrt", ref_nimg=ref) == 1e-3
    assert math.isclose(lr_at(50 * ref, lr=1e-3, schedule="inv_sqrt", ref_nimg=ref), 1e-3 / math.sqrt(50))
    assert math.isclose(lr_at(500, lr=1.0, rampup_nimg=1000), 0.5)
    assert lr_at(5000, lr=1.0, rampup_nimg=1000) == 1.0
    with pytest.raises(ValueError, match="ref_nimg"):
        lr_at(10, lr=1.0, schedule="inv_sqrt")
    with pytest.raises(ValueError, match="constant"):
        lr_at(10, lr=1.0, schedule="cosine")
