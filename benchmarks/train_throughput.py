"""Training throughput of sctlib's real training step (Trainer.train_step), in images per second.

Runs the configurations side by side in one process and prints a table with ratios against the
baseline measured in the same run: ECT's own default numerics (fp32, TF32 off, no compile). The project
goal (issue 12): >= 2x the official ECT code's best row on the same GPU,
i.e. >= 1,380 img/s for CIFAR-10 DDPM++ and >= 470 img/s for EDM2-S at 64x64, with SCT costing <= 5%
over ECT.

    python benchmarks/train_throughput.py --nets cifar10,imagenet64-s --steps 10 --rounds 5 --out bench.json
    python benchmarks/train_throughput.py --tiny        # CPU plumbing check with small networks

SCT's reference sources (issue 13: each at most 5% over the ECT step) are rows of their own with ``--refs``:

    python benchmarks/train_throughput.py --nets cifar10,imagenet64-s --variants bf16 \
        --refs batch,bank,dataset-all,dataset-class --out refs.json

'batch' = the local batch; 'bank' = a 4,096-image memory bank; 'dataset-all' = 50,000 references (all of
CIFAR-10); 'dataset-class' = references from the sample's class with 1,300 images per class (ImageNet-64's
~1,281; only for class-conditional nets). The dataset rows hold the synthetic set on the device as uint8,
as the trainer does with a real one. They use loss.ref_compute='mixed'; 'dataset-all-f64' and
'dataset-class-f64' are the same with ref_compute='float64' (the exact path), so one run compares both.

Measurement: every row of a net is built and warmed up first, then the rows are timed in ``--rounds``
interleaved rounds of ``--steps`` steps each (ECT, SCT[...], ECT, SCT[...], ...), and img/s is the median
over rounds: drifts of the GPU clock or of other load hit every row alike, and one slow round does not
count. Ratios (x base, SCT/ECT) are of medians; 'spread' is (max - min) / median over the rounds.
'MFU' is model-FLOP utilisation (sctlib.flops): img/s x the model FLOPs per image of the step (counted once
per net, fp32 ECT step) over the GPU's dense bf16 peak.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace

import torch

from sctlib import config as C
from sctlib.data import SyntheticImages
from sctlib.flops import mfu, peak_tflops, step_flops_per_image
from sctlib.precision import set_tf32
from sctlib.train import Trainer

VARIANTS = {
    # name: (precision, tf32, channels_last, compile); cuDNN autotuning (cudnn_benchmark) is on in every row
    "fp32 (ECT default)": ("fp32", False, False, False),
    "fp32+tf32": ("tf32", True, False, False),
    "bf16": ("bf16", True, False, False),
    "bf16+channels_last": ("bf16", True, True, False),
    "bf16+cl+compile": ("bf16", True, True, True),
    # opt-in rows (name them in --variants): one more change each on top of bf16+cl+compile
    "bf16+fused-adam": ("bf16", True, False, False),
    "bf16+cl+compile+fused-adam": ("bf16", True, True, True),
    "bf16+cl+compile+cudagraphs": ("bf16", True, True, True),
    "bf16+cl+compile+autotune": ("bf16", True, True, True),
    # no host sync per step: the skip decision on a non-finite gradient assumed 'finite' (Trainer._grad_is_finite),
    # an upper bound of what deciding it on the device could gain; the same trajectory while every step is finite
    "bf16+cl+compile+no-sync": ("bf16", True, True, True),
    "fp32+no-sync": ("fp32", False, False, False),
}
NO_SYNC = {"bf16+cl+compile+no-sync": "bf16+cl+compile", "fp32+no-sync": "fp32 (ECT default)"}  # -> its twin
DEFAULT_VARIANTS = list(VARIANTS)[:5]
# config overrides of the opt-in rows (sctlib.config.override keys)
VARIANT_EXTRA = {
    "bf16+fused-adam": {"optim.impl": "fused"},
    "bf16+cl+compile+fused-adam": {"optim.impl": "fused"},      # Adam nets only (EDM2); skipped for RAdam
    "bf16+cl+compile+cudagraphs": {"compile_mode": "reduce-overhead"},
    "bf16+cl+compile+autotune": {"compile_mode": "max-autotune-no-cudagraphs"},
}


# SCT reference-source rows: name -> (loss overrides, images in the synthetic set, classes or 0 = random labels)
REF_VARIANTS = {
    "preset": ({}, 0, 0),
    "batch": ({"ref_source": "batch"}, 0, 0),
    "bank": ({"ref_source": "bank", "ref_size": 4096, "ref_per_class": 0}, 0, 0),
    "dataset-all": ({"ref_source": "dataset", "ref_size": 0, "ref_conditional": False, "ref_compute": "mixed"},
                    50_000, 0),
    "dataset-class": ({"ref_source": "dataset", "ref_size": 0, "ref_conditional": True, "ref_compute": "mixed"},
                      13_000, 10),
    "dataset-all-f64": ({"ref_source": "dataset", "ref_size": 0, "ref_conditional": False,
                         "ref_compute": "float64"}, 50_000, 0),
    "dataset-class-f64": ({"ref_source": "dataset", "ref_size": 0, "ref_conditional": True,
                           "ref_compute": "float64"}, 13_000, 10),
}


class Bench:
    """One row: a Trainer on a synthetic in-memory set, warmed up; ``round(steps)`` times steps."""

    def __init__(self, cfg, warmup, device, n_images=0, classes=0, no_sync=False):
        ds = SyntheticImages.for_config(cfg, n_images or 4 * cfg.batch_size, device, classes)
        self.tmp = tempfile.TemporaryDirectory()
        self.cfg, self.device = cfg, device
        self.tr = Trainer(cfg, self.tmp.name, progress=False, dataset=ds)
        if no_sync:  # measurement only: a non-finite step would be applied instead of skipped
            self.tr._grad_is_finite = lambda norm: True
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        t0 = time.time()
        for _ in range(warmup):
            self.tr.train_step()
        self.sync()
        self.warm_s = time.time() - t0
        self.rates = []
        self.peak = float("nan")

    def round(self, steps):
        # The TF32 / cuDNN switches are process-global and a Trainer sets them when built or when its
        # format changes: set this row's again, since the rows of different variants interleave.
        set_tf32(self.tr.precision, self.cfg.tf32)
        torch.backends.cudnn.benchmark = self.cfg.cudnn_benchmark
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.sync()
        t0 = time.time()
        for _ in range(steps):
            self.tr.train_step()
        self.sync()
        self.rates.append(steps * self.cfg.batch_size / (time.time() - t0))
        if self.device == "cuda":
            self.peak = max(torch.cuda.max_memory_allocated() / 2**30, 0 if self.peak != self.peak else self.peak)

    def result(self, steps):
        med = statistics.median(self.rates)
        loss = float(self.tr.acc["loss_sum"] / self.tr.acc["count"].clamp(min=1))
        return {"img_per_s": med, "s_per_step": self.cfg.batch_size / med, "rounds": len(self.rates),
                "steps_per_round": steps, "img_per_s_rounds": self.rates,
                "spread": (max(self.rates) - min(self.rates)) / med, "peak_gib": self.peak,
                "warmup_s": self.warm_s, "mean_loss": loss, "skipped": self.tr.total_nonfinite}

    def close(self):
        del self.tr
        self.tmp.cleanup()
        if self.device == "cuda":
            torch.cuda.empty_cache()


# Eager rows that measure one format each (the formats a precision rule switches between).
FORMAT_ROWS = {"bf16": "bf16", "tf32": "fp32+tf32", "fp32": "fp32 (ECT default)"}


def preset_mixes(rows) -> list:
    """For every (net, task) whose preset uses a precision rule and whose formats all have an eager row:
    the speed of the rule over the preset's schedule (sctlib.precision.schedule_mix), next to bf16 throughout."""
    from sctlib.precision import schedule_mix

    out = []
    for net, task in dict.fromkeys((r["net"], r["task"]) for r in rows if "error" not in r):
        if task not in ("ect", "sct"):
            continue
        rates = {f: r["img_per_s"] for f, v in FORMAT_ROWS.items() for r in rows
                 if r["net"] == net and r["task"] == task and r["variant"] == v and "error" not in r}
        cfg = C.get_preset(f"{net}-{task}")
        try:
            mix = schedule_mix(cfg, rates)
        except ValueError:
            continue  # a format of the rule was not measured in this run
        if "bf16" in rates:
            out.append({"net": net, "task": task, "preset": cfg.name, "precision": cfg.precision,
                        "rates": rates, "bf16_img_per_s": rates["bf16"], **mix})
    return out


def no_sync_pairs(rows) -> None:
    """Each '+no-sync' row against its twin with the per-step sync (same net and task): ``sync_gain`` = rate / the
    twin's rate - 1, and the twin's mean loss beside the row's (equal while no step was non-finite)."""
    for r in rows:
        if r.get("variant") not in NO_SYNC or "error" in r:
            continue
        twin = next((b for b in rows if b["variant"] == NO_SYNC[r["variant"]] and b["net"] == r["net"]
                     and b["task"] == r["task"] and "error" not in b), None)
        if twin is None:
            continue
        r["sync_gain"] = r["img_per_s"] / twin["img_per_s"] - 1
        r["twin_mean_loss"] = twin["mean_loss"]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--nets", default="cifar10,imagenet64-s")
    ap.add_argument("--tasks", default="ect,sct")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="rows, of: " + ", ".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=10, help="steps per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; img/s = median over rounds")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--tiny", action="store_true", help="small networks and batch, for a CPU check")
    ap.add_argument("--refs", default="preset", help="SCT reference sources, one row each: " + ",".join(REF_VARIANTS))
    ap.add_argument("--ref-images", type=int, default=0, help="override the synthetic set size of dataset rows")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        ap.error(f"--variants: unknown {unknown}; valid: {', '.join(VARIANTS)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    jobs = []
    for net in args.nets.split(","):
        for task in args.tasks.split(","):
            for ref in (args.refs.split(",") if task == "sct" else [""]):
                jobs.append((net, task, ref))
    plans = []  # (net, row, cfg, n_images, classes)
    for net, task, ref in jobs:
        base = C.get_preset(f"{net}-{task}")
        base = replace(base, device=device, batch_size=args.batch, ema_halflife_nimg=base.ema_halflife_nimg,
                       init="", tick_nimg=10**12, loss=replace(base.loss, double_nimg=3_200_000))
        if args.tiny:
            base = C.override(base, **{"net.model_channels": 32, "net.num_blocks": 1}, batch_size=8)
        n_images, classes = 0, 0
        if ref:
            changes, n_images, classes = REF_VARIANTS[ref]
            if changes.get("ref_conditional") and not base.cond:
                print(f"# skipping {net} {ref}: the net is unconditional", flush=True)
                continue
            n_images = args.ref_images or n_images
            base = replace(base, loss=replace(base.loss, **changes))
        label = f"{task}[{ref}]" if ref else task
        for vname in args.variants.split(","):
            prec, tf32, cl, comp = VARIANTS[vname]
            if device == "cpu" and prec != "fp32":
                continue
            cfg = replace(base, precision=prec, tf32=tf32, channels_last=cl, compile=comp)
            extra = VARIANT_EXTRA.get(vname, {})
            if extra.get("optim.impl") == "fused" and cfg.optim.name != "adam":
                print(f"# skipping {net} {vname}: {cfg.optim.name} has no fused kernel", flush=True)
                continue
            if extra:
                cfg = C.override(cfg, **extra)
            row = {"net": net, "task": label, "variant": vname, "ref_source": cfg.loss.ref_source if ref else None,
                   "ref_compute": cfg.loss.ref_compute if ref and cfg.loss.ref_source == "dataset" else None,
                   "ref_images": n_images or None}
            plans.append((net, row, cfg, n_images, classes))
    # One net at a time: build and warm up all its rows, then interleave the timed rounds.
    dev_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    for net in dict.fromkeys(p[0] for p in plans):
        # Model FLOPs per image of the step (sctlib.flops: counted while one fp32 ECT step runs; SCT's
        # reference arithmetic is overhead, not model work) -> MFU against the GPU's dense bf16 peak.
        try:
            flops_img = step_flops_per_image(next(p[2] for p in plans if p[0] == net), device=device)
        except Exception as exc:  # noqa: BLE001 - the rates still count without it
            print(f"# {net}: FLOP count failed ({type(exc).__name__}: {exc})", flush=True)
            flops_img = None
        benches = []
        for _, row, cfg, n_images, classes in (p for p in plans if p[0] == net):
            try:
                benches.append((row, Bench(cfg, args.warmup, device, n_images, classes,
                                           no_sync=row["variant"] in NO_SYNC)))
            except Exception as exc:  # noqa: BLE001 - report and go on with the other rows
                rows.append({**row, "error": f"{type(exc).__name__}: {exc}"[:300]})
                print(json.dumps(rows[-1]), flush=True)
        for _ in range(args.rounds):
            for row, b in benches:
                if "error" not in row:
                    try:
                        b.round(args.steps)
                    except Exception as exc:  # noqa: BLE001
                        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        for row, b in benches:
            if "error" not in row:
                row.update(b.result(args.steps))
                row["model_gflop_per_img"] = flops_img / 1e9 if flops_img else None
                row["mfu"] = mfu(row["img_per_s"], flops_img, dev_name) if flops_img else None
            rows.append(row)
            print(json.dumps(row), flush=True)
            b.close()
    # Ratios against the fp32 baseline of the same net and task, and SCT over ECT per variant.
    print(f"\n{'net':14s} {'task':24s} {'variant':22s} {'img/s':>9s} {'x base':>7s} {'SCT/ECT':>8s} {'spread':>7s} "
          f"{'GiB':>6s} {'MFU':>6s}")
    for r in rows:
        if "error" in r:
            print(f"{r['net']:14s} {r['task']:24s} {r['variant']:22s} ERROR {r['error']}")
            continue
        base = next((b for b in rows if b["net"] == r["net"] and b["task"] == r["task"]
                     and b["variant"] == "fp32 (ECT default)" and "error" not in b), None)
        ect = next((b for b in rows if b["net"] == r["net"] and b["task"] == "ect"
                    and b["variant"] == r["variant"] and "error" not in b), None)
        r["x_baseline"] = r["img_per_s"] / base["img_per_s"] if base else None
        r["sct_cost_over_ect"] = ect["img_per_s"] / r["img_per_s"] - 1 if (ect and r["task"].startswith("sct")) else None
        xb = f"{r['x_baseline']:.2f}" if r["x_baseline"] else "-"
        so = f"{100 * r['sct_cost_over_ect']:+.1f}%" if r["sct_cost_over_ect"] is not None else "-"
        mf = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else "-"
        print(f"{r['net']:14s} {r['task']:24s} {r['variant']:22s} {r['img_per_s']:9.1f} {xb:>7s} {so:>8s} "
              f"{100 * r['spread']:6.1f}% {r['peak_gib']:6.1f} {mf:>6s}")
    no_sync_pairs(rows)
    for r in rows:
        if r.get("sync_gain") is not None:
            print(f"{r['net']:14s} {r['task']:24s} {r['variant']:22s} {100 * r['sync_gain']:+.1f}% against "
                  f"{NO_SYNC[r['variant']]!r} (mean loss {r['mean_loss']:.6g} vs {r['twin_mean_loss']:.6g})")
    mixes = preset_mixes(rows)
    if mixes:
        print("\nThe presets' precision rule over their whole schedule (sctlib.precision.schedule_mix of the eager rows):")
        for m in mixes:
            share = ", ".join(f"{f} {100 * v:.0f}% of images" for f, v in m["fraction"].items())
            print(f"  {m['preset']:22s} {m['precision']:22s} {m['img_per_s']:8.1f} img/s  ({share}; "
                  f"{100 * (m['img_per_s'] / m['bf16_img_per_s'] - 1):+.1f}% against bf16 throughout)")
    if args.out:
        meta = {"device": dev_name, "torch": torch.__version__, "peak_bf16_dense_tflops": peak_tflops(dev_name),
                "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup, "batch": args.batch}
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows, "preset_mix": mixes}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
