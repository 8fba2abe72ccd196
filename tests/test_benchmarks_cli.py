"""benchmarks/cli_throughput.py in --tiny mode: small networks on the CPU, a written 256-image zip, gloo for 2 processes.

The runs are real ``python -m sctlib.train`` processes (and torchrun for nproc 2); the test wraps the script's
``run_cli`` to read each run's ``stats.jsonl`` before the script deletes its temporary folder, and checks that the
reported rates are the ones that file records.
"""
import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench_module(name):
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _finite_positive(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _run_tiny(tmp_path, monkeypatch, capsys, presets, nprocs, more=()):
    """main(--tiny) with the JSON written to tmp_path; returns (record, printed table, {(preset, n): stats lines})."""
    # One OpenMP thread per training process (as tests/test_train.py does): on the 2-core machine two threads in
    # one process at times run the tiny network ~100x slower; torchrun sets 1 for its workers itself.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    B = _bench_module("cli_throughput")
    stats = {}
    real_run_cli = B.run_cli

    def spy(preset, data, nproc, batch_gpu, ticks, steps_per_tick, extra, run_dir, env=None, log=None):
        res = real_run_cli(preset, data, nproc, batch_gpu, ticks, steps_per_tick, extra, run_dir, env=env, log=log)
        stats[preset, nproc] = [json.loads(l) for l in (run_dir / "stats.jsonl").read_text().splitlines() if l.strip()]
        return res

    monkeypatch.setattr(B, "run_cli", spy)
    out = tmp_path / "cli.json"
    argv = ["--tiny", "--presets", ",".join(presets), "--nproc", ",".join(map(str, nprocs)), "--out", str(out), *more]
    assert B.main(argv) == 0
    assert out.is_file()
    rec = json.loads(out.read_text())
    assert rec["meta"]["argv"] == argv  # the arguments main was given, not the caller's sys.argv
    return rec, capsys.readouterr().out, stats


def _check(rec, table, stats, presets, nprocs):
    meta, rows = rec["meta"], rec["rows"]
    # --tiny's fixed settings
    assert meta["device"] == "cpu" and "device=cpu" in meta["extra"]
    batch_gpu, ticks, steps, skip = meta["batch_gpu"], meta["ticks"], meta["steps_per_tick"], meta["skip_ticks"]
    assert (batch_gpu, ticks, steps, skip) == (8, 3, 2, 1)

    # one row per requested preset and process count, in order, each from its own run
    assert [(r["preset"], r["nproc"]) for r in rows] == [(p, n) for p in presets for n in nprocs]
    assert set(stats) == {(p, n) for p in presets for n in nprocs}

    base = {r["preset"]: r["img_per_s"] for r in rows if r["nproc"] == 1}
    for r in rows:
        p, n = r["preset"], r["nproc"]
        tick_nimg = batch_gpu * n * steps
        lines = stats[p, n]
        assert f"--preset {p} " in r["command"] and f"batch_size={batch_gpu * n} " in r["command"]
        assert ("torch.distributed.run" in r["command"] and f"--nproc_per_node={n}" in r["command"]) == (n > 1)
        # the run trained the requested ticks, and the rates are stats.jsonl's own img_per_s, tick by tick
        assert [l["nimg"] for l in lines] == [tick_nimg * (i + 1) for i in range(ticks)]
        assert r["tick_rates"] == [l["img_per_s"] for l in lines]
        assert all(_finite_positive(x) for x in r["tick_rates"])
        # each tick's rate is consistent with the wall clock stats.jsonl records: a tick runs between two lines
        for prev, cur in zip(lines, lines[1:]):
            assert tick_nimg / cur["img_per_s"] <= cur["time"] - prev["time"] + 1e-3
        assert sum(tick_nimg / x for x in r["tick_rates"]) <= r["wall_s"]
        # the reported rate: median after the skipped (start-up / compile) ticks, in images per second
        assert _finite_positive(r["img_per_s"])
        assert r["img_per_s"] == pytest.approx(statistics.median(r["tick_rates"][skip:]), rel=1e-12)
        assert r["spread"] == pytest.approx((max(r["tick_rates"][skip:]) - min(r["tick_rates"][skip:]))
                                            / r["img_per_s"], rel=1e-9, abs=1e-12)
        # the first tick (compile warm-up) reported apart, as its wall time
        assert _finite_positive(r["first_tick_s"])
        assert r["first_tick_s"] == pytest.approx(tick_nimg / r["tick_rates"][0], rel=1e-12)
        assert r["first_tick_s"] <= r["wall_s"]
        assert r["precision"] == lines[-1]["precision"] == "fp32"
        assert r["peak_mem_gib"] == 0.0  # not recorded on the CPU
        if n == 1:
            assert r["ddp_efficiency"] is None
        else:
            assert _finite_positive(r["ddp_efficiency"])
            assert r["ddp_efficiency"] == pytest.approx(r["img_per_s"] / (n * base[p]), rel=1e-12)

    # the printed table: a header, then one line per row with its preset, nproc and rate
    lines = [l for l in table.splitlines() if l.strip() and "DDP efficiency" not in l]  # the table's rows only
    assert lines[0].split()[:3] == ["preset", "nproc", "img/s"]
    assert len(lines) == 1 + len(rows)
    for line, r in zip(lines[1:], rows):
        assert line.split()[:3] == [r["preset"], str(r["nproc"]), f"{r['img_per_s']:.1f}"]
    for p in presets:
        assert p in table


def test_cli_throughput_tiny_one_process(tmp_path, monkeypatch, capsys):
    """Both default presets (ECT and SCT, which builds references from the dataset), one process each."""
    presets, nprocs = ["cifar10-ect", "cifar10-sct"], [1]
    _check(*_run_tiny(tmp_path, monkeypatch, capsys, presets, nprocs), presets, nprocs)


def test_cli_throughput_tiny_ddp(tmp_path, monkeypatch, capsys):
    """nproc 2 then 1 (torchrun, gloo): the 2-process row's DDP efficiency against the 1-process row measured after
    it, and each run's output written to its log as it ran."""
    presets, nprocs = ["cifar10-ect"], [2, 1]
    logs = tmp_path / "logs"
    rec, table, stats = _run_tiny(tmp_path, monkeypatch, capsys, presets, nprocs, more=["--logs", str(logs)])
    _check(rec, table, stats, presets, nprocs)
    two = rec["rows"][0]
    assert f"cifar10-ect 2 DDP efficiency {two['ddp_efficiency']:.3f}" in " ".join(table.split())
    for n in nprocs:
        log = (logs / f"cifar10-ect-{n}.log").read_text()
        assert log.splitlines()[0] == rec["rows"][nprocs.index(n)]["command"]
        assert "tick" in log  # the trainer's own progress lines, not only the command


def test_summarise_skips_start_up_ticks():
    B = _bench_module("cli_throughput")
    res = {"rates": [10.0, 40.0, 20.0, 30.0], "peak_mem_gib": 0.0, "precision": "fp32", "wall_s": 9.0, "command": "c"}
    s = B.summarise(res, 1, 16)
    assert s["img_per_s"] == 30.0 and s["tick_rates"] == res["rates"]
    assert s["first_tick_s"] == pytest.approx(1.6) and s["spread"] == pytest.approx(20.0 / 30.0)
    with pytest.raises(ValueError, match="raise --ticks"):
        B.summarise(res, 4, 16)


def test_missing_data_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no such EDM-format zip"):
        _bench_module("cli_throughput").main(["--data", str(tmp_path / "absent.zip")])


def test_compile_check_compares_loss_gradient_and_update_against_eager(tmp_path):
    """benchmarks/compile_check.py: the comparison is zero for identical runs, sees a changed gradient, and its
    CPU run (eager variants: the CPU has no TF32 and the compile variant needs minutes) finds the floor at 0."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compile_check", ROOT / "benchmarks" / "compile_check.py")
    cc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cc)
    g, dw = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([1.0, 0.0, 0.0])
    same = cc.compare(([2.0, 1.0], g, dw), ([2.0, 1.0], g.clone(), dw.clone()))
    assert same["loss_rel_diff_max"] == 0 and same["grad_rel_diff"] == 0 and same["dw_rel_diff"] == 0
    other = cc.compare(([2.0, 1.0], g, dw), ([2.0, 1.5], torch.tensor([3.0, 4.0, 5.0]), torch.tensor([0.0, 1.0, 0.0])))
    assert other["loss_rel_diff"] == [0.0, 0.5] and abs(other["grad_rel_diff"] - 1.0) < 1e-6
    assert abs(other["grad_cosine"] - 0.5 ** 0.5) < 1e-6 and abs(other["dw_cosine"]) < 1e-6
    out = tmp_path / "cc.json"
    assert cc.main(["--tiny", "--nets", "cifar10", "--tasks", "sct", "--steps", "2",
                    "--variants", "eager,eager-again", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    (row,) = rec["rows"]
    assert row["dropout"] == 0.0 and len(row["loss_eager"]) == 2 and all(math.isfinite(v) for v in row["loss_eager"])
    assert row["floor"]["grad_rel_diff"] == 0.0 and "compiled" not in row  # the CPU is deterministic
    assert row["floor"]["grad_cosine"] == pytest.approx(1.0, abs=1e-6)     # a real gradient (all zeros: nan / 0)


def test_profile_step_union_and_categories():
    """benchmarks/profile_step.py: busy time is the union of kernel intervals (overlaps count once), kernel names
    fall into the categories the book reports, and the ranges of the step are not counted as kernels."""
    P = _bench_module("profile_step")
    assert P.union_ms([(0, 1000), (500, 1500), (3000, 4000)]) == 2.5  # [0, 1500] + [3000, 4000] microseconds
    assert P.union_ms([(0, 4000), (1000, 2000)]) == 4.0
    assert P.union_ms([]) == 0.0
    assert P.categorise("sm90_xmma_fprop_implicit_gemm_bf16bf16") == "conv / matmul"
    assert P.categorise("triton_red_fused_native_group_norm_0") == "triton (compiled)"
    assert P.categorise("triton_poi_fused__to_copy_convolution_silu_80") == "triton (compiled)"  # not a cuDNN conv
    assert P.categorise("pytorch_flash::flash_fwd_kernel") == "attention"
    assert P.categorise("multi_tensor_apply_kernel<AdamFunctor>") == "optimizer"


def test_profile_step_tiny_reports_the_phases_of_the_step(tmp_path):
    """The CPU run (small nets): every marked phase of the SCT step shows up with time, the row's op time is
    positive and the record is written."""
    P = _bench_module("profile_step")
    out = tmp_path / "profile.json"
    assert P.main(["--tiny", "--nets", "cifar10", "--task", "sct", "--steps", "1", "--warmup", "1",
                   "--out", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    for phase in ("loss", "student", "target", "target_point", "grad_norm", "optimizer", "ema"):
        assert row["phases_ms"].get(f"sctlib.step/{phase}", 0) > 0, phase
    assert _finite_positive(row["kernel_ms_per_step"]) and _finite_positive(row["wall_ms_per_step"])
    assert not any(t["name"].startswith(P.RANGE_PREFIXES) for t in row["top_kernels"])
    with pytest.raises(SystemExit):
        P.main(["--tiny", "--variant", "fp8"])


def test_profile_step_under_torchrun_profiles_each_process(tmp_path):
    """Two gloo processes: each profiles its own step of --batch images (global batch 2 x that), the CIFAR-10
    preset's one all-reduce shows as a phase, and each writes its own record."""
    import os
    import subprocess
    import sys

    out = tmp_path / "p.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "benchmarks" / "profile_step.py"), "--tiny", "--nets", "cifar10", "--task", "ect",
                        "--steps", "1", "--warmup", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert not out.exists()
    for rank in (0, 1):
        row = json.loads((tmp_path / f"p.rank{rank}.json").read_text())["rows"][0]
        assert (row["world"], row["rank"], row["batch"], row["grad_sync"]) == (2, rank, 16, "allreduce")
        assert row["phases_ms"].get("sctlib.step/allreduce", 0) > 0
        assert f"(rank {rank} of 2, grad_sync=allreduce)" in r.stdout


def test_nccl_bandwidth_reports_each_size_on_gloo(tmp_path):
    """benchmarks/nccl_bandwidth.py under torchrun with 2 CPU processes (gloo): a row per size, positive rates,
    bus bandwidth = 2 (n-1)/n x algorithm bandwidth; outside torchrun it says how to start it."""
    import os
    import subprocess
    import sys

    out = tmp_path / "nccl.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "benchmarks" / "nccl_bandwidth.py"), "--device", "cpu", "--mib", "0.5,2",
                        "--iters", "3", "--warmup", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert rec["meta"]["backend"] == "gloo" and rec["meta"]["world"] == 2
    assert [row["mib"] for row in rec["rows"]] == [0.5, 2.0]
    for row in rec["rows"]:
        assert _finite_positive(row["ms"])
        # bytes over time, and NCCL's bus bandwidth 2 (n-1)/n x that (= 1 x for n = 2)
        assert math.isclose(row["algbw_gbps"], row["mib"] * 2**20 / (row["ms"] / 1e3) / 1e9, rel_tol=1e-9)
        assert math.isclose(row["busbw_gbps"], row["algbw_gbps"], rel_tol=1e-12)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "nccl_bandwidth.py")], capture_output=True, text=True,
                       env=env)
    assert r.returncode != 0 and "torchrun" in r.stderr


@pytest.mark.slow
def test_ddp_equivalence_reports_the_difference_next_to_its_yardstick(tmp_path):
    """benchmarks/ddp_equivalence.py on gloo: 2 processes end where one process with 2 accumulation rounds ends
    (to float rounding), and the --yardstick run (here another seed) is reported on the same scale, far away."""
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ddp_equivalence.py"), "--nproc", "2", "--device", "cpu",
                        "--preset", "digits-ect", "--total-nimg", "256", "--batch", "32",
                        "--extra", "net.model_channels=8", "--yardstick", "seed=1"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads([line for line in r.stdout.splitlines() if line.startswith('{"preset"')][-1])
    assert out["nproc"] == 2 and out["extra"] == ["net.model_channels=8"] and out["yardstick"] == ["seed=1"]
    assert out["max_abs_weight_diff"] < 2e-5
    assert out["yardstick_max_abs_weight_diff"] > 1e-3


def test_data_throughput_times_items_and_batches_per_worker_count(tmp_path):
    """benchmarks/data_throughput.py on a written EDM zip: a row per worker count, ms per batch and img/s that
    agree with each other; a missing zip or a set smaller than two batches is refused in one line."""
    import numpy as np

    from sctlib.data import write_edm_zip

    B = _bench_module("data_throughput")
    rng = np.random.default_rng(0)
    zpath = str(write_edm_zip(str(tmp_path / "d.zip"), rng.integers(0, 256, size=(64, 8, 8, 3), dtype=np.uint8)))
    out = tmp_path / "data.json"
    assert B.main(["--data", zpath, "--batch", "16", "--workers", "0,1", "--batches", "3", "--items", "8",
                   "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert [r["workers"] for r in rec["rows"]] == [0, 1] and rec["meta"]["images"] == 64
    assert all(_finite_positive(rec["meta"]["item_ms"][k]) for k in ("first_pass", "cached", "preloaded"))
    assert _finite_positive(rec["meta"]["preload_s"])
    for r in rec["rows"]:
        assert _finite_positive(r["ms_per_batch"]) and _finite_positive(r["median_wait_ms"]) and r["batches"] == 3
        assert math.isclose(r["img_per_s"], 16 / (r["ms_per_batch"] / 1e3), rel_tol=1e-9)
    # more batches than one pass holds: capped (64 images = 4 batches of 16: a warm-up and 3 timed), not a crash
    assert B.main(["--data", zpath, "--batch", "16", "--workers", "0", "--batches", "50", "--items", "8",
                   "--out", str(out)]) == 0
    assert json.loads(out.read_text())["rows"][0]["batches"] == 3
    with pytest.raises(SystemExit, match="no such"):
        B.main(["--data", str(tmp_path / "missing.zip")])
    with pytest.raises(SystemExit, match="at least 2 x --batch"):
        B.main(["--data", zpath, "--batch", "64"])


def test_compile_check_from_warmed_weights_compares_the_whole_edm2_gradient():
    """EDM2 initialises its output gain to 0: from its initialisation the first gradient is that one number's alone
    (what the committed EDM2-S compile check compared); --init-steps starts every variant from weights after a
    few eager steps, where every layer has a gradient."""
    cc = _bench_module("compile_check")
    from sctlib import config as C

    base = C.override(C.get_preset("imagenet64-s-ect"), device="cpu", init="", precision="fp32", batch_size=4,
                      tick_nimg=10**12, **{"net.model_channels": 32, "net.num_blocks": 1, "net.dropout": 0.0})
    torch.manual_seed(0)
    _, g_init, _ = cc.run_variant(base, 1, "cpu")
    assert int((g_init != 0).sum()) == 1  # the output gain's
    torch.manual_seed(0)
    state = cc.warm_state(base, 2, "cpu")
    torch.manual_seed(0)
    _, g_warm, _ = cc.run_variant(base, 1, "cpu", state=state)
    assert float((g_warm != 0).float().mean()) > 0.5
    torch.manual_seed(0)
    _, g_again, _ = cc.run_variant(base, 1, "cpu", state=state)
    assert torch.equal(g_warm, g_again)  # every variant starts from the same weights
    with pytest.raises(SystemExit):
        cc.main(["--tiny", "--init-steps", "-1"])


def test_efficiency_pairs_each_row_with_the_one_process_row_before_it_else_after():
    B = _bench_module("cli_throughput")
    rows = [{"nproc": n, "img_per_s": v} for n, v in [(2, 180.0), (1, 100.0), (2, 190.0), (1, 120.0), (2, 216.0)]]
    B._pair_efficiencies(rows)
    assert [r["baseline_row"] for r in rows] == [1, None, 1, None, 3]
    assert [r["ddp_efficiency"] for r in rows] == [pytest.approx(0.9), None, pytest.approx(0.95), None,
                                                  pytest.approx(0.9)]
    lone = [{"nproc": 2, "img_per_s": 180.0}]
    B._pair_efficiencies(lone)
    assert lone[0]["ddp_efficiency"] is None and lone[0]["baseline_row"] is None


def test_a_repeated_process_count_is_a_run_of_its_own(tmp_path, monkeypatch, capsys):
    """--nproc 1,1: the second run trains from scratch in its own run directory (the same directory would resume the
    first run, already at total_nimg, and train nothing)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    B = _bench_module("cli_throughput")
    out = tmp_path / "cli.json"
    assert B.main(["--tiny", "--presets", "cifar10-ect", "--nproc", "1,1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all(len(r["tick_rates"]) == 3 for r in rows)
    dirs = [r["command"].split("--run-dir ")[1].split()[0] for r in rows]
    assert dirs[0] != dirs[1]


def test_train_throughput_tiny_no_sync_row_skips_the_host_sync_and_trains_the_same(tmp_path, monkeypatch):
    """benchmarks/train_throughput.py on the CPU: the '+no-sync' row never asks the trainer's finite check (the
    per-step host sync) and, with every step finite, trains what its twin trains (same mean loss, nothing skipped)."""
    from sctlib import train as T

    TT = _bench_module("train_throughput")
    calls = []
    real = T.Trainer._grad_is_finite
    monkeypatch.setattr(T.Trainer, "_grad_is_finite", lambda self, norm: calls.append(1) or real(self, norm))
    out = tmp_path / "tt.json"
    steps, rounds, warmup = 2, 2, 1
    assert TT.main(["--tiny", "--nets", "cifar10", "--tasks", "ect", "--variants", "fp32 (ECT default),fp32+no-sync",
                    "--steps", str(steps), "--rounds", str(rounds), "--warmup", str(warmup), "--out", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    synced, free = rows["fp32 (ECT default)"], rows["fp32+no-sync"]
    assert len(calls) == 1 + warmup + rounds * steps  # sctlib.flops' counted step, then the synced row's steps only
    assert free["skipped"] == synced["skipped"] == 0
    assert free["mean_loss"] == synced["mean_loss"] == free["twin_mean_loss"]
    assert free["sync_gain"] == pytest.approx(free["img_per_s"] / synced["img_per_s"] - 1)
    assert _finite_positive(free["img_per_s"]) and synced.get("sync_gain") is None


@pytest.mark.parametrize("bad", ["0", "2,x", "1,-1", ""])
def test_bad_process_counts_are_refused(bad, capsys):
    with pytest.raises(SystemExit):
        _bench_module("cli_throughput").main(["--tiny", "--nproc", bad])
    assert "--nproc: process counts of at least 1" in capsys.readouterr().err
