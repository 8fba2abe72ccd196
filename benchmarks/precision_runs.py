"""Matched tuning runs: the same teacher, images and seeds, one precision each; FD / FID at 1 and 2 steps.

For every precision P (default bf16, fp16 with its gradient scaler, tf32) and seed s, one run
``python -m sctlib.train --preset PRESET init=TEACHER precision=P seed=s ...``: the seed fixes the data
order and every draw of t, eps and dropout (sctlib.train.seed_for), so runs with the same seed see the
same images and noise and differ only in arithmetic. Runs go ``--jobs`` at a time as separate processes
(several fit on one GPU). Each run is scored where it ran: FD in the digits-classifier feature space and
class accuracy for the digits (``dataset=digits``), FID for an EDM zip (``dataset=edmzip data_path=...``).
The JSON holds every run and, per precision, the mean and sample sd over seeds.

    # digits at 32x32 on a GPU, a teacher trained here first, 3 seeds per precision; 1.6M images with
    # double_nimg 200k take SCT's smooth exponent from a = 1 to 9, the range of the CIFAR-10 preset
    python benchmarks/precision_runs.py --preset digits-sct --train-teacher-nimg 1000000 --jobs 9 \\
        --out benchmarks/results/precision_runs_digits32.json \\
        dataset=digits data_resolution=32 net.img_resolution=32 total_nimg=1600000 loss.double_nimg=200000
    # with a trained teacher and the natural-image zip
    python benchmarks/precision_runs.py --preset cifar10-sct --teacher runs/teacher --fid-images 10000 \\
        --out benchmarks/results/precision_runs_natural.json dataset=edmzip data_path=natural32.zip ...

Settings after the options are ``key=value`` overrides shared by the teacher and every tuning run (the
teacher gets ``loss.task=edm`` and its own length on top).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sctlib import evaluate as E, train as T  # noqa: E402

RESULT = "precision_result.json"
# Teacher pre-training on top of the shared overrides (EDM loss; Adam as the digits-edm preset).
TEACHER_SETTINGS = ["loss.task=edm", "loss.P_mean=-1.2", "loss.P_std=1.2", "loss.weighting=edm", "loss.schedule=staircase",
                    "loss.ref_source=batch", "optim.name=adam", "optim.lr=0.0005", "optim.betas=0.9,0.99",
                    "net.boundary=never", "init="]


def _score(run_dir: Path, cfg, fid_images: int, eval_samples: int) -> dict:
    model, _ = T.load_run(run_dir)
    model = model.to("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    if cfg.dataset.startswith("digits") or cfg.dataset.startswith("toy2d"):
        return E.evaluate(model, cfg, num_samples=eval_samples, seed=0, steps=(1, 2))
    from sctlib import metrics

    ref = metrics.inception_reference_stats(cfg.data_path, progress=False)
    rep = E.fid_report(model, cfg, ref, num_images=fid_images, seeds=(0,), steps=(1, 2), progress=False)
    return {k: v["mean"] for k, v in rep.items()}


def worker(run_dir: str, preset: str, settings, fid_images: int, eval_samples: int) -> int:
    """Train (or resume) one run, score it and write RESULT into its folder."""
    cfg = T.resolve_config(preset, settings)
    t0 = time.time()
    summary = T.train(cfg, run_dir, progress=False)
    wall = time.time() - t0
    lines = [json.loads(x) for x in open(Path(run_dir) / "stats.jsonl")]
    # the teacher (task edm) is scored too, with EDM's Heun sampler, when there is an evaluation budget
    scores = _score(Path(run_dir), cfg, fid_images, eval_samples) if eval_samples > 0 or cfg.loss.task != "edm" else {}
    rec = {"preset": preset, "settings": list(settings), "precision": cfg.precision, "seed": cfg.seed,
           "scores": scores, "train_wall_s": wall, "nimg": summary["nimg"],
           "skipped_steps": summary["skipped_steps"], "fp16_skipped_steps": summary.get("fp16_skipped_steps", 0),
           "final_loss": lines[-1]["loss"], "final_stage_exponent": lines[-1]["stage_exponent"],
           "img_per_s": float(np.mean([x["img_per_s"] for x in lines[1:]] or [lines[-1]["img_per_s"]]))}
    (Path(run_dir) / RESULT).write_text(json.dumps(rec, indent=1))
    return 0


def _launch(jobs, max_parallel: int, log_dir: Path):
    """Run (name, argv) jobs, at most ``max_parallel`` at once; raise with the log tail of a failed one."""
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < max_parallel:
            name, argv = pending.pop(0)
            log = open(log_dir / f"{name}.log", "w")
            env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            running.append((name, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env), log))
            print(f"[precision_runs] started {name}", file=sys.stderr, flush=True)
        time.sleep(0.5)
        for item in list(running):
            name, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                if proc.returncode != 0:
                    for _, other, _ in running:
                        other.kill()
                    tail = (log_dir / f"{name}.log").read_text()[-3000:]
                    raise RuntimeError(f"run {name} failed with exit code {proc.returncode}:\n{tail}")
                print(f"[precision_runs] finished {name}", file=sys.stderr, flush=True)


def _aggregate(runs: list) -> dict:
    out = {}
    for prec in sorted({r["precision"] for r in runs}):
        rs = [r for r in runs if r["precision"] == prec]
        row = {"seeds": [r["seed"] for r in rs], "n": len(rs)}
        keys = sorted({k for r in rs for k, v in r["scores"].items() if isinstance(v, (int, float))})
        for k in keys + ["final_loss", "img_per_s", "fp16_skipped_steps"]:
            vals = np.array([r["scores"][k] if k in r["scores"] else r[k] for r in rs], dtype=float)
            row[k] = {"mean": float(vals.mean()), "sd": float(vals.std(ddof=1)) if len(vals) > 1 else None,
                      "values": vals.tolist()}
        out[prec] = row
    return out


def plot(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    agg = result["per_precision"]
    precs = list(agg)
    metrics_ = [k for k in next(iter(agg.values())) if k.startswith(("fd_", "fid_"))]
    fig = Figure(figsize=(4 * max(len(metrics_), 1), 3.2))
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, max(len(metrics_), 1)))
    for ax, m in zip(axes, metrics_):
        means = [agg[p][m]["mean"] for p in precs]
        sds = [agg[p][m]["sd"] or 0.0 for p in precs]
        ax.bar(precs, means, yerr=sds, capsize=4, color=["tab:red", "tab:orange", "tab:blue", "k"][: len(precs)])
        for i, p in enumerate(precs):
            ax.plot([i] * len(agg[p][m]["values"]), agg[p][m]["values"], "k.", ms=4)
        ax.set_title(m)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="digits-sct")
    p.add_argument("--teacher", default="", help="init of every run: a run dir, .safetensors or EDM pickle")
    p.add_argument("--train-teacher-nimg", type=int, default=0, help="train a teacher here first (images)")
    p.add_argument("--precisions", default="bf16,fp16,tf32")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=3, help="runs in parallel (processes)")
    p.add_argument("--eval-samples", type=int, default=1000, help="samples for the digits FD")
    p.add_argument("--teacher-eval-samples", type=int, default=0, help="score the teacher too (Heun, 35 NFE)")
    p.add_argument("--fid-images", type=int, default=10_000, help="images per FID (EDM zip data)")
    p.add_argument("--work", default="", help="run folders (default: next to --out)")
    p.add_argument("--out", default="benchmarks/results/precision_runs.json")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("settings", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.preset, args.settings, args.fid_images, args.eval_samples)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else out.parent / (out.stem + "_runs")
    work.mkdir(parents=True, exist_ok=True)
    T.resolve_config(args.preset, args.settings)  # a typo fails here, before any process starts
    t0 = time.time()
    me = [sys.executable, str(Path(__file__).resolve())]
    teacher = args.teacher
    if not teacher:
        if args.train_teacher_nimg <= 0:
            p.error("give --teacher or --train-teacher-nimg")
        teacher = str(work / "teacher")
        tset = [*args.settings, *TEACHER_SETTINGS, f"total_nimg={args.train_teacher_nimg}", "seed=1000"]
        T.resolve_config(args.preset, tset)
        _launch([("teacher", [*me, "--worker", teacher, "--preset", args.preset, "--eval-samples",
                              str(args.teacher_eval_samples), "--fid-images", str(args.fid_images), *tset])], 1, work)
    jobs = []
    for prec in args.precisions.split(","):
        for seed in args.seeds.split(","):
            name = f"{prec}-s{seed}"
            settings = [*args.settings, f"init={teacher}", f"precision={prec}", f"seed={seed}"]
            T.resolve_config(args.preset, settings)
            jobs.append((name, [*me, "--worker", str(work / name), "--preset", args.preset, "--eval-samples",
                                str(args.eval_samples), "--fid-images", str(args.fid_images), *settings]))
    _launch(jobs, args.jobs, work)
    runs = [json.loads((work / name / RESULT).read_text()) for name, _ in jobs]
    teacher_rec = json.loads((Path(teacher) / RESULT).read_text()) if (Path(teacher) / RESULT).exists() else None
    result = {
        "command": "python benchmarks/precision_runs.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "preset": args.preset, "settings": args.settings, "teacher": teacher, "teacher_record": teacher_rec,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "git_sha": T._git_sha(), "torch": torch.__version__,
        "per_precision": _aggregate(runs), "runs": runs, "wall_s": time.time() - t0,
    }
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(json.dumps({"out": str(out), "per_precision": {k: {m: v[m]["mean"] for m in v if isinstance(v[m], dict)}
                                                         for k, v in result["per_precision"].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
