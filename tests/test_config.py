"""Presets against the ECT scripts' table (ect-edm-code-facts.md Sec. 4) and override validation."""
import dataclasses
from dataclasses import replace
import json

import pytest

from sctlib import config as C


def test_cifar10_presets_match_run_ecm_sh():
    for task in ("ect", "sct"):
        cfg = C.get_preset(f"cifar10-{task}")
        assert cfg.loss.task == task
        assert cfg.net.arch == "ddpmpp" and cfg.net.model_channels == 128 and cfg.net.channel_mult == (2, 2, 2)
        assert cfg.net.num_blocks == 4 and cfg.net.attn_resolutions == (16,) and cfg.net.dropout == 0.2
        assert cfg.net.label_dim == 0 and not cfg.cond
        assert cfg.batch_size == 128 and cfg.total_nimg == 25_600_000
        assert cfg.optim.name == "radam" and cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.9, 0.999)
        assert cfg.optim.lr_schedule == "constant"
        L = cfg.loss
        assert (L.q, L.k, L.b, L.c) == (2.0, 8.0, 1.0, 0.0)
        assert (L.P_mean, L.P_std) == (-1.1, 2.0)
        assert L.mapping == "sigmoid" and L.weighting == "inv_dt"
        # double = 250 ticks of 12.8 kimg
        assert L.double_nimg == 250 * 12_800
        assert cfg.eval.mid_t == (0.821,)
        # ECMPrecond: sigma_min 0.003, boundary form only in eval mode
        assert cfg.net.sigma_min == 0.003 and cfg.net.boundary == "eval"
        # EMA beta 0.9999 at batch 128 <=> half-life ln(0.5)/ln(0.9999)*128 images
        import math
        assert abs(cfg.ema_halflife_nimg - math.log(0.5) / math.log(0.9999) * 128) < 1
    assert C.get_preset("cifar10-ect").loss.schedule == "staircase"
    assert C.get_preset("cifar10-sct").loss.schedule == "smooth"


@pytest.mark.parametrize("size,channels,lr,dropout", [
    ("s", 192, 1e-3, 0.40), ("m", 256, 9e-4, 0.50), ("l", 320, 8e-4, 0.50), ("xl", 384, 7e-4, 0.50)])
def test_imagenet64_presets_match_run_imgnet_ecm_sh(size, channels, lr, dropout):
    for task in ("ect", "sct"):
        cfg = C.get_preset(f"imagenet64-{size}-{task}")
        assert cfg.net.arch == "edm2" and cfg.net.model_channels == channels
        assert cfg.net.channel_mult == (1, 2, 3, 4) and cfg.net.num_blocks == 3
        assert cfg.net.attn_resolutions == (16, 8) and cfg.net.label_dim == 1000 and cfg.cond
        assert cfg.net.dropout == dropout and cfg.net.dropout_res == 16 and cfg.net.boundary == "never"
        assert cfg.optim.name == "adam" and cfg.optim.lr == lr and cfg.optim.betas == (0.9, 0.99)
        assert cfg.optim.lr_schedule == "inv_sqrt" and cfg.optim.lr_ref_nimg == 2000 * 128
        L = cfg.loss
        assert (L.P_mean, L.P_std, L.q, L.k, L.b, L.c) == (-0.8, 1.6, 4.0, 8.0, 1.0, 0.06)
        assert L.weighting == "snrpk" and L.double_nimg == 500 * 6_400
        assert cfg.total_nimg == 12_800_000 and cfg.batch_size == 128
        assert cfg.eval.mid_t == (1.526,)
        assert cfg.phema_stds == (0.010, 0.050, 0.100)


def test_embedded_presets_exist_and_are_consistent():
    for name in ("digits-edm", "digits-ect", "digits-sct", "toy2d-edm", "toy2d-ect", "toy2d-sct"):
        cfg = C.get_preset(name)
        assert cfg.name == name
        assert cfg.loss.task == name.split("-")[1]
        assert (cfg.net.label_dim > 0) == cfg.cond


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(C.ConfigError) as e:
        C.get_preset("cifar11-sct")
    assert "cifar10-sct" in str(e.value) and "digits-edm" in str(e.value)


def test_override_types_and_nested_keys():
    cfg = C.get_preset("digits-sct")
    new = C.override(cfg, **C.parse_overrides(["total_nimg=6400", "loss.q=4", "seed=3", "device=cpu",
                                                "eval.mid_t=0.5,1.0", "cond=false"]))
    assert new.total_nimg == 6400 and new.loss.q == 4.0 and new.seed == 3 and new.device == "cpu"
    assert new.eval.mid_t == (0.5, 1.0) and new.cond is False
    assert cfg.total_nimg != 6400  # frozen original untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]


@pytest.mark.parametrize("item,needle", [
    ("total_nimgs=5", "valid keys"), ("loss.qq=1", "valid keys"), ("seed=abc", "cannot read"),
    ("total_nimg=1.5", "cannot read"), ("cond=maybe", "cannot read"), ("loss=3", "nested config"),
    ("seed", "key=value")])
def test_bad_overrides_give_clear_errors(item, needle):
    cfg = C.get_preset("digits-sct")
    with pytest.raises(C.ConfigError) as e:
        C.override(cfg, **C.parse_overrides([item]))
    assert needle in str(e.value)


def test_json_round_trip_of_every_preset():
    for name, cfg in C.PRESETS.items():
        d = C.to_dict(cfg)
        json.dumps(d)
        assert C.from_dict(C.TrainConfig, d) == cfg, name


def test_every_sct_preset_uses_a_reference_set_that_averages():
    """issue 13: an SCT preset whose reference set is (almost) only the own image is ECT plus a schedule."""
    sct = {n: p for n, p in C.PRESETS.items() if p.loss.task == "sct"}
    assert {"cifar10-sct", "cifar10-cond-sct", "imagenet64-s-sct", "digits-sct", "toy2d-sct"} <= set(sct)
    for name, p in sct.items():
        src = p.loss
        assert src.schedule == "smooth" and src.smooth_end == "ect", name
        if p.dataset in ("cifar10", "imagenet64") or p.dataset == "digits":
            # the whole training set (per class for conditional models), never a sub-batch
            assert src.ref_source == "dataset" and src.ref_size == 0, name
            assert src.ref_conditional == p.cond or not p.cond, name
        else:  # 2-D toys: a 4,096-point bank (ESS in the hundreds at t ~ 1 in two dimensions)
            assert src.ref_source == "bank" and src.ref_size >= 4096, name
    # ECT and SCT presets of one data set differ only in the loss's SCT switches
    for a, b in (("cifar10-ect", "cifar10-sct"), ("cifar10-cond-ect", "cifar10-cond-sct"),
                 ("imagenet64-s-ect", "imagenet64-s-sct")):
        pa, pb = C.get_preset(a), C.get_preset(b)
        assert replace(pa, name="", loss=None) == replace(pb, name="", loss=None), (a, b)
        la, lb = pa.loss, pb.loss
        assert replace(lb, task="ect", schedule="staircase", ref_source=la.ref_source, ref_chunk=la.ref_chunk,
                       ref_conditional=la.ref_conditional) == la, (a, b)
    cond = C.get_preset("cifar10-cond-sct")
    assert cond.cond and cond.net.label_dim == 10 and cond.init == "edm-cifar10-32x32-cond-vp.pkl"


@pytest.mark.parametrize("changes,needle", [
    ({"optim.impl": "fused"}, "no fused RAdam"),            # digits-ect trains with RAdam
    ({"optim.impl": "apex"}, "'foreach' or 'fused'"),
    ({"compile_mode": "fastest"}, "reduce-overhead"),
    ({"ddp_bucket_mb": -1.0}, "ddp_bucket_mb")])
def test_optimizer_kernel_and_compile_mode_are_checked(changes, needle):
    with pytest.raises(C.ConfigError) as e:
        C.validate(C.override(C.get_preset("digits-ect"), **changes))
    assert needle in str(e.value)
    C.validate(C.override(C.get_preset("digits-edm"), **{"optim.impl": "fused"}))  # Adam has a fused kernel


def test_paper_presets_compile_and_train_channels_last_by_default():
    """issue 12: the presets themselves are the fast path (compile + channels-last, applied on CUDA only; the
    compile check and the speed are in the config comment and the book). Embedded presets stay eager."""
    for name, cfg in C.PRESETS.items():
        paper = name.startswith(("cifar10-", "imagenet64-"))
        assert (cfg.compile, cfg.channels_last) == ((True, True) if paper else (False, False)), name
        assert cfg.compile_mode == "default" and cfg.optim.impl == "foreach", name


def test_cifar10_presets_hold_their_set_on_the_device_and_imagenet64_presets_do_not():
    """Issue 12's data-path decision (sctlib/config.py, 'Data path'): 150 MiB of CIFAR-10 on the GPU, not 15.7 GiB
    of ImageNet-64 per process."""
    for name in C.PRESETS:
        cfg = C.get_preset(name)
        assert cfg.data_on_device == name.startswith("cifar10-"), name


def test_cifar10_presets_sync_gradients_with_one_allreduce_and_the_others_with_ddp():
    """Issue 12's two-GPU decision (sctlib/config.py, 'Gradient sync'): measured on the compiled CIFAR-10 presets only."""
    for name in C.PRESETS:
        cfg = C.get_preset(name)
        assert cfg.grad_sync == ("allreduce" if name.startswith("cifar10-") else "ddp"), name
        other = "ddp" if cfg.grad_sync == "allreduce" else "allreduce"
        assert C.validate(C.override(cfg, grad_sync=other)).grad_sync == other
    with pytest.raises(C.ConfigError, match="grad_sync"):
        C.validate(C.override(C.get_preset("cifar10-sct"), grad_sync="nccl"))
