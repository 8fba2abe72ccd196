"""The ablation pipeline: arm -> overrides, the gradient-spread diagnostic, aggregation over seeds, the plot, and
one arm end to end on the CPU through the notebook (tiny settings, the real Inception weights, the natural set)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import sctlib as sct
from sctlib import ablation as A
from sctlib.config import LossConfig

ROOT = Path(__file__).resolve().parents[1]


def test_arms_map_to_the_agreed_config_names():
    assert A.ARMS == ("ect", "ect_target", "ect_smooth", "sct")
    assert A.arm_overrides("ect") == ["loss.task=ect", "loss.schedule=staircase"]
    assert A.arm_overrides("ect_target", "dataset") == ["loss.task=sct", "loss.schedule=staircase", "loss.ref_source=dataset"]
    assert A.arm_overrides("ect_smooth", "bank") == ["loss.task=ect", "loss.schedule=smooth", "loss.smooth_end=ect"]
    assert A.arm_overrides("sct", "batch")[-1] == "loss.ref_source=batch"
    with pytest.raises(ValueError, match="unknown arm 'cd'"):
        A.arm_overrides("cd")


def test_supported_overrides_keeps_known_keys_and_reports_the_rest():
    kept, dropped = A.supported_overrides(["loss.task=sct", "net.model_channels=16", "total_nimg=5", "loss.nope=1",
                                           "loss.smooth_end=ect"])
    assert kept[:3] == ["loss.task=sct", "net.model_channels=16", "total_nimg=5"] and "loss.nope=1" in dropped
    has_smooth_end = any(f == "smooth_end" for f in LossConfig.__dataclass_fields__)
    assert ("loss.smooth_end=ect" in kept) == has_smooth_end and ("loss.smooth_end=ect" in dropped) != has_smooth_end
    # every kept override resolves
    sct.train.resolve_config("cifar10-ect", kept)


def test_gradient_variance_is_the_trace_of_the_minibatch_gradient_covariance():
    # loss per sample = -w . x, so the batch-mean gradient is g_m = -mean(x over batch m)
    net = nn.Linear(3, 1, bias=False)
    w0 = net.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 3, generator=g), None) for _ in range(4)]

    def loss_fn(model, x0, labels, *, nimg):
        return -model(x0)[:, 0], {}

    out = A.gradient_variance(net, loss_fn, batches, nimg=0)
    gm = torch.stack([-x.mean(0) for x, _ in batches]).double()
    want_var = float(gm.var(0, unbiased=True).sum())
    assert out["grad_var_trace"] == pytest.approx(want_var, rel=1e-5)  # float32 gradients
    assert out["grad_mean_sq"] == pytest.approx(float((gm.mean(0) ** 2).sum()), rel=1e-5)
    assert out["grad_snr"] == pytest.approx(out["grad_mean_sq"] / out["grad_var_trace"])
    # the model is untouched: weights, gradients, mode; the global RNG state too
    net.eval()
    state = torch.get_rng_state()
    A.gradient_variance(net, loss_fn, batches, nimg=0)
    assert torch.equal(net.weight, w0) and net.weight.grad is None and not net.training
    assert torch.equal(torch.get_rng_state(), state)
    # identical batches: no spread
    same = A.gradient_variance(net, loss_fn, [batches[0]] * 3, nimg=0)
    assert same["grad_var_trace"] == 0.0 and same["grad_snr"] == math.inf
    with pytest.raises(ValueError, match="at least 2 batches"):
        A.gradient_variance(net, loss_fn, batches[:1], nimg=0)


def _record(arm, seed, fids1, fids2, points=(10, 20)):
    curve = [{"eval_point": p, "nimg": p, "fid_1step": a, "fid_2step": b, "grad_var_trace": 1.0 + seed}
             for p, a, b in zip(points, fids1, fids2)]
    return {"results": {"arm": arm, "seed": seed, "curve": curve}}


def test_aggregate_arms_gives_mean_and_sd_over_seeds():
    recs = [_record("sct", 0, [5, 3], [4, 2]), _record("sct", 1, [7, 5], [6, 2]), _record("sct", 2, [9, 4], [5, 2]),
            _record("ect", 0, [8, 6], [7, 5])]
    rows = A.aggregate_arms(recs)
    assert [(r["arm"], r["nimg"]) for r in rows] == [("ect", 10), ("ect", 20), ("sct", 10), ("sct", 20)]
    r = rows[2]
    assert r["n_seeds"] == 3 and r["seeds"] == [0, 1, 2]
    assert r["fid_1step_mean"] == pytest.approx(7.0) and r["fid_1step_sd"] == pytest.approx(2.0)  # 5, 7, 9
    assert rows[3]["fid_2step_sd"] == 0.0 and rows[3]["grad_var_trace_mean"] == pytest.approx(2.0)
    assert rows[0]["fid_1step_sd"] == 0.0 and rows[0]["n_seeds"] == 1
    with pytest.raises(ValueError, match="seed 0 twice"):
        A.aggregate_arms([_record("sct", 0, [1, 1], [1, 1])] * 2)
    with pytest.raises(ValueError, match="different points"):
        A.aggregate_arms([_record("sct", 0, [1, 1], [1, 1]), _record("sct", 1, [1, 1], [1, 1], points=(10, 30))])


def test_plot_fid_curves_draws_a_band_per_arm():
    import matplotlib

    matplotlib.use("Agg", force=False)
    rows = A.aggregate_arms([_record("sct", 0, [5, 3], [4, 2]), _record("sct", 1, [7, 5], [6, 2]),
                             _record("ect", 0, [8, 6], [7, 5]), _record("ect", 1, [9, 6], [7, 6])])
    fig = A.plot_fid_curves(rows)
    axes = fig.axes
    assert len(axes) == 2 and axes[0].get_ylabel() == "FID, 1 step" and axes[1].get_ylabel() == "FID, 2 steps"
    assert [len(ax.lines) for ax in axes] == [2, 2] and [len(ax.collections) for ax in axes] == [2, 2]
    ect = axes[0].lines[0]
    assert list(ect.get_xdata()) == [10, 20] and list(ect.get_ydata()) == [8.5, 6.0]
    import matplotlib.pyplot as plt

    plt.close(fig)
    # one eval point (runs cut short): the arms side by side with sd error bars
    one = [r for r in rows if r["nimg"] == 10]
    fig = A.plot_fid_curves(one)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["ect", "sct"]  # aggregate_arms' order
    ys = [c.lines[0].get_ydata()[0] for c in ax.containers]
    assert ys == [8.5, 6.0]
    seg = ax.containers[0].lines[2][0].get_segments()[0]  # ect's error bar: mean -+ sd (8 and 9: sd 0.707)
    assert abs(seg[1][1] - seg[0][1] - 2 * 0.5 ** 0.5) < 1e-9
    plt.close(fig)


def test_run_arm_refuses_bad_arguments(tmp_path):
    kw = dict(seed=0, data_path=str(tmp_path / "x.zip"), base_preset="cifar10-ect", total_nimg=32, fid_images=8,
              run_name="r", runs_dir=tmp_path)
    with pytest.raises(ValueError, match="teacher is empty"):
        A.run_arm("ect", eval_nimg=[16], **kw)
    kw["teacher"] = str(tmp_path / "teacher")
    with pytest.raises(ValueError, match="sets the arm's own key 'loss.task'"):
        A.run_arm("ect", overrides=["loss.task=sct"], eval_nimg=[16], **kw)
    with pytest.raises(ValueError, match="eval_nimg must be points"):
        A.run_arm("ect", eval_nimg=[64], **kw)
    with pytest.raises(ValueError, match="unknown arm"):
        A.run_arm("nope", eval_nimg=[16], **kw)


@pytest.mark.slow  # ~60 s: two tiny runs, 96 images through the real InceptionV3 on the CPU
def test_ablation_pipeline_smoke_then_an_arm_from_that_teacher(tmp_path, monkeypatch, real_inception_file):
    import papermill as pm
    from sctlib.data import build_natural

    monkeypatch.setenv("SCTLIB_CACHE", str(tmp_path / "cache"))  # reference statistics of this test's data
    data = build_natural(tmp_path / "natural.zip", 32, crops_per_photo=4)["path"]
    runs = tmp_path / "runs"
    out = tmp_path / "out.ipynb"
    pm.execute_notebook(str(ROOT / "pipelines" / "ablation.ipynb"), str(out), kernel_name="python3",
                        cwd=str(ROOT / "pipelines"), progress_bar=False, parameters=dict(
                            arm="ect", seed=0, teacher="", data_path=data, run_name="t-ect", runs_dir=str(runs),
                            smoke=True, inception_weights=str(real_inception_file)))
    rec = json.loads((runs / "t-ect" / "results.json").read_text())
    res = rec["results"]
    assert rec["arm"] == res["arm"] == "ect" and rec["seed"] == 0 and rec["inception"] == str(real_inception_file)
    assert [c["eval_point"] for c in res["curve"]] == [16, 32]
    for c in res["curve"]:
        assert c["nimg"] >= c["eval_point"]
        assert all(math.isfinite(c[k]) and c[k] > 0 for k in ("fid_1step", "fid_2step", "grad_var_trace"))
    assert len(res["stats"]) == 4 and all("residual_var" in s and "loss_std" in s for s in res["stats"])
    assert "loss.task=ect" in rec["settings"] and "loss.schedule=staircase" in rec["settings"]

    # the SCT arm from that run as the teacher, directly through the library
    rec2 = A.run_arm("sct", seed=1, teacher=str(runs / "t-ect"), data_path=data, base_preset="cifar10-ect",
                     run_name="t-sct", runs_dir=runs, inception_weights=str(real_inception_file), progress=False,
                     ref_source="batch", **A.smoke_params())
    assert "loss.task=sct" in rec2["settings"] and "loss.ref_source=batch" in rec2["settings"]
    assert rec2["teacher"] == str(runs / "t-ect")
    _, dropped = A.supported_overrides(["loss.smooth_end=ect"])
    assert rec2["dropped_overrides"] == dropped  # recorded where this sctlib lacks the switch
    evals_before = (runs / "t-sct" / "evals.jsonl").read_text()
    # re-running the same call resumes: no new training, no new evaluation, the same record
    again = A.run_arm("sct", seed=1, teacher=str(runs / "t-ect"), data_path=data, base_preset="cifar10-ect",
                      run_name="t-sct", runs_dir=runs, inception_weights=str(real_inception_file), progress=False,
                      ref_source="batch", **A.smoke_params())
    assert (runs / "t-sct" / "evals.jsonl").read_text() == evals_before
    assert again["results"]["curve"] == rec2["results"]["curve"]
    rows = A.aggregate_arms([rec, rec2])
    assert [r["arm"] for r in rows] == ["ect", "ect", "sct", "sct"] and np.isfinite(rows[-1]["fid_1step_mean"])

    # the teacher's Heun FID, autoguidance by the SCT run's own EMA snapshots, and the book records
    trec = A.teacher_record(runs / "t-ect", data_path=data, fid_images=8, fid_ref_images=16, steps=2,
                            inception_weights=str(real_inception_file), out=tmp_path / "teacher.json")
    assert trec["sampler"] == "heun" and trec["nfe"] == 3 and math.isfinite(trec["fid"]) and trec["nimg"] == 32
    assert json.loads((tmp_path / "teacher.json").read_text())["fid"] == trec["fid"]
    g = A.guidance_record(runs / "t-sct", data_path=data, fid_images=8, fid_ref_images=16, ws=(1.0, 1.5),
                          steps=(1,), inception_weights=str(real_inception_file))
    fracs = sorted(r["frac"] for r in g["rows"] if r["frac"] is not None)
    assert fracs == [0.25, 0.5, 0.75] and [r["w"] for r in g["rows"]] == [1.0, 1.5, 1.5, 1.5]
    assert all(math.isfinite(r["fid_1step"]) for r in g["rows"])
    assert len({r["fid_1step"] for r in g["rows"]}) > 1  # the guide changes the samples
    books = A.evidence_records({"abl-ect-s0": rec, "abl-sct-s1": rec2}, prefix="t", command="c", setting="s",
                               guidance=g, teacher=trec)
    assert sorted(books) == ["t_ablation", "t_guidance", "t_teacher"]  # one reference source compares nothing
    assert [r["arm"] for r in books["t_ablation"]["results"]["rows"]] == ["ect", "ect", "sct", "sct"]


def _fake_run(arm, seed, fids, stats):
    return {"results": {"arm": arm, "seed": seed, "stats": stats,
                        "curve": [{"eval_point": 10 * (i + 1), "fid_1step": f, "fid_2step": f / 2,
                                   "grad_var_trace": 1.0 + i} for i, f in enumerate(fids)]},
            "settings": [f"seed={seed}"], "git_sha": "x"}


def test_evidence_records_group_runs_by_name_and_average_over_seeds():
    runs = {
        "abl-ect-s0": _fake_run("ect", 0, [10.0, 8.0], [{"nimg": 20, "loss": 1.0}]),
        "abl-ect-s1": _fake_run("ect", 1, [12.0, 6.0], [{"nimg": 20, "loss": 1.0}]),
        "abl-sct-s0": _fake_run("sct", 0, [9.0, 5.0], [{"nimg": 20, "sct_ess_mean": 3.0, "sct_ess_bins": [1.0, 4.0],
                                                        "t_bin_edges": [1.0]}]),
        "abl-sct-s1": _fake_run("sct", 1, [7.0, 5.0], [{"nimg": 20, "sct_ess_mean": 5.0, "sct_ess_bins": [1.0, 8.0],
                                                        "t_bin_edges": [1.0]}]),
        "prec-fp16-s0": _fake_run("sct", 0, [20.0, 10.0], [{"nimg": 10, "fp16_skipped_steps": 3},
                                                           {"nimg": 20, "fp16_skipped_steps": 2}]),
        "prec-bf16-s0": _fake_run("sct", 0, [21.0, 11.0], [{"nimg": 20, "fp16_skipped_steps": 0}]),
        "ref-batch-s0": _fake_run("sct", 0, [30.0, 20.0], [{"nimg": 20}]),
        "ref-bank-s0": _fake_run("sct", 0, [31.0, 21.0], [{"nimg": 20}]),
        "other-run": _fake_run("ect", 5, [1.0, 1.0], []),
    }
    rec = A.evidence_records(runs, prefix="n", command="cmd", setting="set")
    assert sorted(rec) == ["n_ablation", "n_precision", "n_reference_sources"]
    abl = {(r["arm"], r["nimg"]): r for r in rec["n_ablation"]["results"]["rows"]}
    assert abl[("ect", 10)]["fid_1step_mean"] == 11.0 and abs(abl[("ect", 10)]["fid_1step_sd"] - 2 ** 0.5) < 1e-12
    assert abl[("sct", 20)]["fid_2step_mean"] == 2.5 and abl[("sct", 20)]["n_seeds"] == 2
    diag = {d["group"]: d for d in rec["n_ablation"]["results"]["diagnostics"]}
    assert diag["sct"]["sct_ess_mean_mean"] == 4.0 and "sct_ess_mean_mean" not in diag["ect"]
    assert diag["sct"]["sct_ess_bins"] == [1.0, 6.0] and diag["sct"]["t_bin_edges"] == [1.0]
    pdiag = {d["group"]: d for d in rec["n_precision"]["results"]["diagnostics"]}
    assert pdiag["fp16"]["fp16_skipped_steps_mean"] == 5.0 and pdiag["bf16"]["fp16_skipped_steps_mean"] == 0.0
    assert rec["n_reference_sources"]["groups"] == {"batch": [0], "bank (4,096)": [0], "dataset": [0, 1]}
    assert set(rec["n_precision"]["runs"]) == {"prec-fp16-s0", "prec-bf16-s0"}
    assert rec["n_ablation"]["command"] == "cmd" and rec["n_ablation"]["setting"] == "set"


def test_partial_runs_become_records_of_their_evaluations_so_far():
    ev = lambda n, f1, f2: {"eval_point": n, "nimg": n + 32, "fid_1step": f1, "fid_2step": f2, "grad_var_trace": 1.0}
    partial = {"prec-bf16-s0": [ev(12, 250.0, 190.0)], "prec-bf16-s1": [ev(12, 254.0, 194.0)],
               "prec-tf32-s2": [ev(12, 240.0, 180.0)], "prec-fp16-s0": [],
               "prec-fp16-s1": {"curve": [ev(12, 251.0, 191.0)],   # the newer form, with the tick statistics
                                "stats": [{"nimg": 8, "fp16_skipped_steps": 3, "not_a_stat": 1},
                                          {"nimg": 16, "fp16_skipped_steps": 1}]}}
    runs = A.partial_runs(partial)
    assert sorted(runs) == ["prec-bf16-s0", "prec-bf16-s1", "prec-fp16-s1", "prec-tf32-s2"]  # no evaluation: out
    assert runs["prec-fp16-s1"]["results"]["stats"][0] == {"nimg": 8, "fp16_skipped_steps": 3}
    assert runs["prec-tf32-s2"]["results"]["seed"] == 2 and runs["prec-tf32-s2"]["results"]["partial"] is True
    rec = A.evidence_records(runs, prefix="p", command="c", setting="cut")
    rows = {r["arm"]: r for r in rec["p_precision"]["results"]["rows"]}
    assert rows["bf16"]["fid_1step_mean"] == 252.0 and abs(rows["bf16"]["fid_2step_sd"] - 8 ** 0.5) < 1e-12
    assert rows["bf16"]["nimg"] == 12 and rows["tf32"]["n_seeds"] == 1
    diag = {d["group"]: d for d in rec["p_precision"]["results"]["diagnostics"]}
    assert diag["fp16"]["fp16_skipped_steps_mean"] == 4.0  # summed over the ticks the cut run logged
    # seeds cut at different points are refused, not averaged
    partial["prec-bf16-s1"].append(ev(24, 200.0, 150.0))
    with pytest.raises(ValueError, match="different points"):
        A.evidence_records(A.partial_runs(partial), prefix="p", command="c", setting="cut")
    with pytest.raises(ValueError, match="-s<seed>"):
        A.partial_runs({"prec-bf16": [ev(12, 1.0, 1.0)]})


def test_partial_runs_keep_only_evaluation_rows_in_order():
    ev = lambda n, f1: {"eval_point": n, "nimg": n + 32, "fid_1step": f1, "fid_2step": f1 - 50, "grad_var_trace": 1.0}
    runs = A.partial_runs({"prec-bf16-s0": [ev(24, 200.0), {"guidance_w": 1.5, "fid_1step": 3.0}, ev(12, 250.0)],
                           "prec-bf16-s1": [{"guidance_w": 1.5, "fid_1step": 3.0}]})  # no evaluation row: out
    assert list(runs) == ["prec-bf16-s0"]
    assert [c["eval_point"] for c in runs["prec-bf16-s0"]["results"]["curve"]] == [12, 24]


def test_paired_differences_pair_seeds_at_the_last_common_point():
    def run(group, seed, f1_by_point):
        return {"run": f"prec-{group}-s{seed}", "group": group, "seed": seed,
                "curve": [{"eval_point": n, "fid_1step": f, "fid_2step": f / 2} for n, f in f1_by_point.items()]}
    curves = [run("bf16", 0, {12: 250.0, 24: 233.0}), run("bf16", 1, {12: 251.0, 24: 230.0}),
              run("tf32", 1, {12: 250.0, 24: 229.5}), run("tf32", 0, {12: 249.0, 24: 231.0}),
              run("fp16", 0, {12: 252.0, 24: 234.0}), run("fp16", 1, {12: 250.0, 24: 229.0})]
    rows = {r["group"]: r for r in A.paired_differences({"results": {"curves": curves}}, baseline="bf16")}
    assert sorted(rows) == ["fp16", "tf32"] and rows["tf32"]["eval_point"] == 24
    assert rows["tf32"]["seeds"] == [0, 1] and rows["tf32"]["fid_1step_diffs"] == [-2.0, -0.5]  # by seed, not by order
    assert rows["tf32"]["fid_1step_mean_diff"] == -1.25 and rows["tf32"]["fid_1step_same_sign"] is True
    assert rows["tf32"]["fid_2step_diffs"] == [-1.0, -0.25]
    assert rows["fp16"]["fid_1step_diffs"] == [1.0, -1.0] and rows["fp16"]["fid_1step_same_sign"] is False
    at12 = {r["group"]: r for r in A.paired_differences({"results": {"curves": curves}}, baseline="bf16", eval_point=12)}
    assert at12["tf32"]["fid_1step_diffs"] == [-1.0, -1.0]
    with pytest.raises(ValueError, match="no group"):
        A.paired_differences({"results": {"curves": curves}}, baseline="fp32")


def test_paired_differences_survive_cut_runs_missing_seeds_and_missing_values():
    def run(group, seed, pts):
        return {"run": f"prec-{group}-s{seed}", "group": group, "seed": seed,
                "curve": [{"eval_point": n, "fid_1step": f, "fid_2step": f} for n, f in pts.items()]}
    curves = [run("bf16", 0, {12: 250.0, 24: 233.0}), run("bf16", 1, {12: 251.0, 24: 230.0}),
              run("fp16", 0, {12: 252.0}),                     # cut after its first evaluation
              run("tf32", 0, {12: 249.0, 24: 231.0}), run("tf32", 1, {12: 250.0, 24: float("nan")}),
              run("rule", 5, {12: 1.0, 24: 1.0})]               # no seed in common with bf16
    rows = {r["group"]: r for r in A.paired_differences({"results": {"curves": curves}}, baseline="bf16")}
    assert rows["fp16"]["eval_point"] == 12 and rows["fp16"]["fid_1step_diffs"] == [2.0]
    assert rows["tf32"]["eval_point"] == 24                      # not pulled back to 12 by the cut fp16 run
    assert rows["tf32"]["fid_1step_seeds"] == [0] and rows["tf32"]["fid_1step_diffs"] == [-2.0]  # NaN left out
    assert rows["rule"]["seeds"] == [] and "fid_1step_diffs" not in rows["rule"]
