"""The precision rule: parsing, switching by stage, the fp16 gradient scaler in the trainer (skipped steps
counted apart from non-finite ones), and exact resumption across a switch of format."""
import functools
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sctlib import train as T
from sctlib.config import ConfigError
from sctlib.precision import PrecisionError, PrecisionRule, autocast, set_tf32

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# Tiny digits ECT run: stage a = 1 on [0, 512) images, 2 on [512, 1024), 3 from 1024 (staircase).
TINY = ["device=cpu", "net.model_channels=8", "batch_size=32", "tick_nimg=256", "loss.double_nimg=512",
        "checkpoint_nimg=256", "keep_checkpoints=10", "seed=5"]


def _cfg(precision, total_nimg, preset="digits-ect"):
    return T.resolve_config(preset, TINY + [f"precision={precision}", f"total_nimg={total_nimg}"])


def _stats(run_dir):
    return [json.loads(line) for line in open(run_dir / "stats.jsonl")]


# ---------------------------------------------------------------- parsing and switching

def test_single_formats_and_auto():
    for f in ("fp32", "tf32", "bf16", "fp16"):
        rule = PrecisionRule.parse(f)
        assert rule.formats == (f,) and rule.format_at(0.0) == f and rule.format_at(9.0) == f
    assert PrecisionRule.parse("auto", "cuda").formats == ("bf16",)
    assert PrecisionRule.parse("auto", "cpu").formats == ("fp32",)
    # 'auto' as the first item of a stage rule (the paper-scale presets' default)
    assert PrecisionRule.parse("auto,tf32@stage>=4", "cuda").formats == ("bf16", "tf32")
    assert PrecisionRule.parse("auto,tf32@stage>=4", "cpu").formats == ("fp32", "tf32")
    assert PrecisionRule.parse("auto,tf32@stage>=4", "cuda").format_at(3.9) == "bf16"
    assert PrecisionRule.parse("auto,tf32@stage>=4", "cuda").format_at(4.0) == "tf32"
    assert PrecisionRule.parse(" BF16 ").formats == ("bf16",)
    assert PrecisionRule.parse("fp16").uses_fp16 and not PrecisionRule.parse("bf16").uses_fp16


def test_stage_switch():
    rule = PrecisionRule.parse("bf16,tf32@stage>=5,fp32@stage>=8")
    assert rule.formats == ("bf16", "tf32", "fp32") and rule.thresholds == (-math.inf, 5.0, 8.0)
    got = [rule.format_at(a) for a in (0.0, 1.0, 4.999, 5.0, 7.5, 8.0, 9.0)]
    assert got == ["bf16", "bf16", "bf16", "tf32", "tf32", "fp32", "fp32"]
    assert rule.describe() == "bf16 for a < 5, tf32 for 5 <= a < 8, fp32 for a >= 8"
    assert PrecisionRule.parse("bf16,fp16@stage>=2.5").uses_fp16
    assert PrecisionRule.parse("bf16,tf32@stage>=6").format_at(5.99) == "bf16"


@pytest.mark.parametrize("spec, words", [
    ("fp8", "unknown format 'fp8'"),
    ("", "empty"),
    ("tf32@stage>=3", "first item"),
    ("bf16,tf32@a>=3", "cannot read item"),
    ("bf16,tf32", "cannot read item"),
    ("bf16,tf32@stage>=6,fp32@stage>=6", "increase strictly"),
    ("bf16,tf32@stage>=6,fp32@stage>=4", "increase strictly"),
    ("bf16,fp9@stage>=2", "unknown format 'fp9'"),
    ("bf16,tf32@stage>=-1", "must be a finite number >= 0"),
    ("bf16,tf32@stage>=1e", "is not a number"),
])
def test_bad_strings_raise_clear_errors(spec, words):
    with pytest.raises(PrecisionError, match=words) as exc:
        PrecisionRule.parse(spec)
    assert isinstance(exc.value, ConfigError) and "bf16,tf32@stage>=6" in str(exc.value)


def test_cli_reports_a_bad_rule(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sctlib.train", "--preset", "digits-ect", "--run-dir", str(tmp_path),
                        "--no-progress", *TINY, "total_nimg=64", "precision=bf16,tf32@stage<6"],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 2 and "precision 'bf16,tf32@stage<6'" in r.stderr and "FORMAT@stage>=A" in r.stderr


def test_autocast_and_tf32_flags():
    x = torch.randn(4, 4)
    with autocast("bf16", "cpu"):
        assert (x @ x).dtype == torch.bfloat16
    with autocast("tf32", "cpu"):
        assert (x @ x).dtype == torch.float32
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        assert set_tf32("fp32", True) is False and not torch.backends.cuda.matmul.allow_tf32
        assert set_tf32("tf32", False) is True and torch.backends.cudnn.allow_tf32
        assert set_tf32("bf16", False) is False and set_tf32("fp16", True) is True
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ---------------------------------------------------------------- the trainer

class _Wrap:
    """A loss stand-in that forwards everything to the real loss but lets a test watch or alter a call."""

    def __init__(self, inner, fn):
        self.inner, self.fn = inner, fn

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, net, x0, labels=None, *, nimg, **kw):  # kw: the trainer's target_net, passed through
        return self.fn(functools.partial(self.inner, **kw), net, x0, labels, nimg)


def test_trainer_switches_format_by_stage(tmp_path):
    tr = T.Trainer(_cfg("fp32,bf16@stage>=2", 1024), tmp_path, progress=False)
    seen = []

    def spy(loss, net, x0, labels, nimg):
        # which autocast is active inside the loss: the format the rule chose for this step
        seen.append((nimg, torch.is_autocast_enabled("cpu")))
        return loss(net, x0, labels, nimg=nimg)

    tr.loss_fn = _Wrap(tr.loss_fn, spy)
    tr.run()
    assert seen and all(on == (nimg >= 512) for nimg, on in seen)
    lines = _stats(tmp_path)
    assert [d["precision"] for d in lines] == ["fp32", "fp32", "bf16", "bf16"]  # format of the tick's last step
    assert json.loads((tmp_path / "config.json").read_text())["precision"] == "fp32 for a < 2, bf16 for a >= 2"


def test_fp16_scaler_skips_overflow_steps_and_counts_them(tmp_path):
    """Start the scaler at 2^40: fp16 gradients overflow, each such step is skipped (weights unchanged) and
    the scale halves; these skips are counted as fp16_skipped_steps and do not trip max_nonfinite_steps."""
    tr = T.Trainer(_cfg("fp16", 1024), tmp_path, progress=False)
    assert tr.scaler is not None and tr.cfg.max_nonfinite_steps == 10
    tr.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    before = {k: v.clone() for k, v in tr.net.state_dict().items()}
    tr.train_step()  # surely overflows at 2^40: nothing may change
    assert tr.total_fp16_skipped == 1 and tr.scaler.get_scale() == 2.0**39
    assert all(torch.equal(before[k], v) for k, v in tr.net.state_dict().items())
    summary = tr.run()
    skipped = summary["fp16_skipped_steps"]
    # every skip halved the scale once (no growth within growth_interval = 2000 steps)
    assert skipped > 10 and tr.scaler.get_scale() == 2.0 ** (40 - skipped)
    assert tr.total_nonfinite == 0 and tr.consecutive_nonfinite == 0
    lines = _stats(tmp_path)
    assert sum(d["fp16_skipped_steps"] for d in lines) == skipped  # the step before run() is in the first tick
    cumulative = 0
    for d in lines:
        cumulative += d["fp16_skipped_steps"]
        assert d["loss_scale"] == 2.0 ** (40 - cumulative) and d["skipped_steps"] >= d["fp16_skipped_steps"]
    assert summary["steps"] - skipped > 0  # it did train once the scale fitted
    assert any(not torch.equal(before[k], v) for k, v in tr.net.state_dict().items())


def test_fp16_overflow_below_unit_scale_counts_as_nonfinite(tmp_path):
    """With the scale already < 1, an overflow is a real non-finite gradient: it counts towards the limit."""
    cfg = T.resolve_config("digits-ect", TINY + ["precision=fp16", "total_nimg=1024", "max_nonfinite_steps=3"])
    tr = T.Trainer(cfg, tmp_path, progress=False)
    tr.scaler = torch.amp.GradScaler("cpu", init_scale=0.5)

    def poisoned(loss, net, x0, labels, nimg):
        out, stats = loss(net, x0, labels, nimg=nimg)
        return out * float("inf"), stats

    tr.loss_fn = _Wrap(tr.loss_fn, poisoned)
    with pytest.raises(T.NonFiniteError, match="3 consecutive"):
        tr.run()
    assert tr.total_fp16_skipped == 0 and tr.total_nonfinite == 3


def _train(run_dir, precision, total, scaler_init=None):
    tr = T.Trainer(_cfg(precision, total), run_dir, progress=False)
    if scaler_init is not None and tr.scaler is not None:
        tr.scaler = torch.amp.GradScaler("cpu", init_scale=scaler_init)
    tr.run()
    return tr


@pytest.mark.parametrize("precision", ["fp32,bf16@stage>=2", "bf16,fp16@stage>=2"])
def test_resume_across_a_switch_is_exact(tmp_path, precision):
    """Stop before the switch (a = 1 -> 2 at 512 images) or after it, resume: the same weights bit for bit.

    The resumed trainer starts its scaler at 2^40; only a restored scaler state makes it match."""
    full = _train(tmp_path / "full", precision, 1024, scaler_init=2.0**30)
    for stop in (384, 768):
        d = tmp_path / f"stop{stop}"
        _train(d, precision, stop, scaler_init=2.0**30)
        resumed = _train(d, precision, 1024, scaler_init=2.0**40)
        a = load_file(str(tmp_path / "full" / "final_net.safetensors"))
        b = load_file(str(d / "final_net.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (precision, stop)
        if full.scaler is not None:
            assert resumed.scaler.get_scale() == full.scaler.get_scale()
            assert resumed.total_fp16_skipped == full.total_fp16_skipped


# ---------------------------------------------------------------- the benchmarks (CPU, tiny)

def _bench_module(name):
    import importlib.util

    path = T.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("preset", ["ddpmpp-tiny", "edm2-tiny"])
def test_float64_reference_is_the_same_denoiser(preset):
    """The float64 reference computes EDM's D like Precond does (same coefficients, labels, boundary)."""
    from dataclasses import replace

    from sctlib.networks import NET_PRESETS, build_network

    B = _bench_module("precision")
    torch.manual_seed(0)
    cfg = replace(NET_PRESETS[preset], dropout=0.0, boundary="eval")
    net = build_network(cfg).eval()
    ref = B.Float64Denoiser(build_network(cfg).eval())
    ref.pre.load_state_dict(net.state_dict())
    ref.eval()
    x = torch.randn(6, 3, 16, 16)
    t = torch.tensor([0.004, 0.03, 0.3, 1.0, 7.0, 60.0])
    lab = torch.arange(6) % 10 if cfg.label_dim else None
    out = ref(x, t, lab)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), net(x, t, lab), atol=2e-5, rtol=1e-4)
    assert (out[0] - x[0].double()).abs().max() < 0.1  # boundary in eval: f(x, t ~ sigma_min) ~ x


def test_measurements_against_an_identical_reference():
    """With the fp32 network as its own reference, fp32 has zero error and cosine 1; bf16 does not, and its
    error on D(x_t) - D(x_r) grows as Delta t shrinks (the effect the benchmark exists to measure)."""
    from dataclasses import replace

    from sctlib.networks import build_network

    B = _bench_module("precision")
    ect, sct, net_cfg = B.preset_for("digits", tiny=False)
    net_cfg = replace(net_cfg, model_channels=8, dropout=0.0)
    data = B.Images(1, 8, 10)
    torch.manual_seed(0)
    net = build_network(net_cfg).train()
    ref = B.Float32Reference(build_network(net_cfg).train())
    ref.pre.load_state_dict(net.state_dict())
    d = B.measure_diff(net, ref, data, [2.0, 8.0], 2.0, 8.0, 1.0, 4, "cpu", 0, 64)
    assert all(e == 0.0 for row in d["rel_error"]["fp32"] for e in row if e == e)
    bf = [max(e for e in row if e == e) for row in d["rel_error"]["bf16"]]
    assert 0 < bf[0] < bf[1]
    g = B.measure_grad(net, ref, {"ect": replace(ect.loss, ref_source="batch")}, data, [2.0, 8.0], 16, "cpu", 0)
    assert all(abs(c - 1) < 1e-12 for c in g["ect"]["fp32"]["cosine"])
    assert all(e == 0.0 for e in g["ect"]["fp32"]["rel_error"])
    assert all(0.9 < c < 1 - 1e-12 for c in g["ect"]["bf16"]["cosine"])


def test_precision_benchmark_end_to_end(tmp_path):
    """The script trains a teacher, measures, writes JSON (with its command) and a plot."""
    out = tmp_path / "p.json"
    B = _bench_module("precision")
    B.main(["--nets", "digits", "--teacher-nimg", "1024", "--stages", "1,4", "--n-per-t", "2", "--grad-batch", "8",
            "--tasks", "sct", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["command"].startswith("python benchmarks/precision.py --nets digits")
    net = r["nets"]["digits"]
    assert net["stages"] == [1.0, 4.0] and "trained by this script" in net["teacher"]["source"]
    assert len(net["diff"]["rel_error"]["bf16"]) == 2 and len(net["diff"]["rel_error"]["bf16"][0]) == len(net["t_values"])
    assert set(net["grad"]) == {"sct"} and out.with_suffix(".png").stat().st_size > 10_000
    # a run dir works as --teacher
    B.main(["--nets", "digits", "--teacher", str(tmp_path / "p_runs" / "digits-teacher"), "--stages", "2",
            "--n-per-t", "2", "--grad-batch", "8", "--tasks", "ect", "--out", str(tmp_path / "q.json")])
    q = json.loads((tmp_path / "q.json").read_text())["nets"]["digits"]
    assert q["teacher"]["source"].endswith("digits-teacher")


@pytest.mark.slow
def test_matched_runs_end_to_end(tmp_path):
    """Teacher, then bf16 / fp16 / tf32 tunings with one seed in parallel processes, scored; mean per precision."""
    out = tmp_path / "runs.json"
    r = subprocess.run([sys.executable, "benchmarks/precision_runs.py", "--preset", "digits-sct",
                        "--train-teacher-nimg", "512", "--seeds", "0", "--jobs", "2", "--eval-samples", "100",
                        "--out", str(out), "device=cpu", "net.model_channels=8", "batch_size=32", "total_nimg=512",
                        "loss.double_nimg=256", "loss.ref_size=64", "tick_nimg=256"],
                       capture_output=True, text=True, env=ENV, cwd=str(T.Path(__file__).resolve().parents[1]))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["per_precision"]) == {"bf16", "fp16", "tf32"}
    for prec, row in res["per_precision"].items():
        assert row["n"] == 1 and math.isfinite(row["fd_1step"]["mean"]) and math.isfinite(row["fd_2step"]["mean"])
    runs = {x["precision"]: x for x in res["runs"]}
    assert runs["fp16"]["settings"][-2:] == ["precision=fp16", "seed=0"]
    assert all(x["nimg"] == 512 for x in runs.values())
    # same teacher, same images and draws: the three formats end close, but not bit-identical
    fd = [runs[p]["scores"]["fd_1step"] for p in ("bf16", "fp16", "tf32")]
    assert len(set(fd)) > 1
    assert out.with_suffix(".png").exists()


def test_schedule_mix_weights_each_format_by_the_images_it_trains():
    from dataclasses import replace

    from sctlib import config as C
    from sctlib.precision import schedule_mix

    ect = C.get_preset("cifar10-ect")  # staircase, 8 stages of 3.2M images; 'auto,tf32@stage>=4'
    assert (ect.precision, ect.total_nimg, ect.loss.double_nimg) == ("auto,tf32@stage>=4", 25_600_000, 3_200_000)
    m = schedule_mix(ect, {"bf16": 1000.0, "tf32": 500.0})
    # a = 1, 2, 3 in bf16 (3 of 8 stages), a = 4..8 in TF32
    assert m["fraction"]["bf16"] == pytest.approx(3 / 8) and m["fraction"]["tf32"] == pytest.approx(5 / 8)
    assert m["img_per_s"] == pytest.approx(1 / (3 / 8 / 1000 + 5 / 8 / 500))
    sct = C.get_preset("cifar10-sct")  # smooth, ending at ECT's final exponent: a = max(1, nimg / double)
    assert schedule_mix(sct, {"bf16": 1.0, "tf32": 1.0})["fraction"]["bf16"] == pytest.approx(4 / 8, abs=1e-3)
    one = schedule_mix(replace(ect, precision="bf16"), {"bf16": 700.0})
    assert one["img_per_s"] == pytest.approx(700.0) and one["fraction"] == {"bf16": pytest.approx(1.0)}
    with pytest.raises(ValueError, match="tf32"):
        schedule_mix(ect, {"bf16": 1000.0})


def test_sample_throughput_benchmark_reports_every_rate(tmp_path, random_inception_weights, capsys):
    st = _bench_module("sample_throughput")
    out = tmp_path / "s.json"
    assert st.main(["--tiny", "--features", "--inception-weights", str(random_inception_weights),
                    "--out", str(out)]) == 0
    rec = __import__("json").loads(out.read_text())
    assert [r["net"] for r in rec["rows"]] == ["cifar10", "imagenet64-s"]
    for r in rec["rows"]:
        assert r["format"] == "fp32" and r["batch"] == 4 and r["params"] > 0
        for k in ("net_img_per_s", "generate_img_per_s", "generate_features_img_per_s"):
            assert r[k] > 0
        # the full FID rate cannot exceed the rate of generation alone by more than timing noise
        assert r["generate_features_img_per_s"] < 1.5 * r["generate_img_per_s"]
        assert r["fid50k_minutes"] == pytest.approx(50_000 / r["generate_features_img_per_s"] / 60)
    assert "FID-50k min" in capsys.readouterr().out


def test_switch_stage_is_the_first_stage_whose_error_exceeds_the_signal():
    from sctlib.precision import switch_stage

    assert switch_stage({1: 0.05, 2: 0.2, 3: 0.87, 4: 3.1, 5: 11.0}) == 4.0
    assert switch_stage({3: 1.5, 1: 0.1, 2: 2.0}) == 2.0          # order of the keys does not matter
    assert switch_stage({1: 0.1, 2: 0.5}) is None                 # never swamped: no switch
    assert switch_stage({1: 0.1, 2: 0.5}, threshold=0.3) == 2.0
    assert switch_stage({1: 0.1, 2: float("nan"), 3: 5.0}) == 2.0   # a lost difference is not a fine one
    assert switch_stage({1: 0.1, 2: None, 3: 0.2}) == 2.0
    assert switch_stage({1: 0.1, 2: float("inf")}) == 2.0


@pytest.mark.parametrize("family, record, net", [("cifar10", "precision_h200_cifar10.json", "cifar10"),
                                                 ("imagenet64", "precision_h200_edm2s.json", "imagenet64-s")])
def test_presets_switch_where_the_committed_precision_benchmark_says(family, record, net):
    """The presets' precision rule is recomputed from the committed GPU record of benchmarks/precision.py: bf16
    until the worst-t relative error of D(x_t) - D(x_r) passes 1, TF32 from there. A preset edited without new
    evidence (or a record replaced without updating the presets) fails here."""
    import json
    import math
    from pathlib import Path

    from sctlib.config import PRECISION_SWITCH_STAGE, PRESETS
    from sctlib.precision import switch_stage

    rec = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / record).read_text())
    res = rec["nets"][net]
    # a t the benchmark could not measure (None) is left out; a non-finite error stays and counts as exceeding
    worst = {a: max(math.inf if not math.isfinite(e) else e for e in per_t if e is not None)
             for a, per_t in zip(res["stages"], res["diff"]["rel_error"]["bf16"])}
    A = switch_stage(worst)
    assert A == PRECISION_SWITCH_STAGE[family] == 4.0
    for name, cfg in PRESETS.items():
        if name.startswith(family + "-"):
            assert cfg.precision == f"auto,tf32@stage>={A:g}", name
            rule = PrecisionRule.parse(cfg.precision, "cuda")
            assert rule.format_at(A - 0.01) == "bf16" and rule.format_at(A) == "tf32"
