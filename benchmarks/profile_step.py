"""Where the time of one training step goes (issue 12: "profile first"), from the PyTorch profiler.

For each network it builds the real `Trainer.train_step` on a synthetic in-memory set (the same rows as
benchmarks/train_throughput.py), warms it up, then profiles ``--steps`` steps and prints:

* wall time per step, GPU kernel time per step, and ``busy``: the share of the wall time in which some kernel
  runs (union of kernel intervals; below ~95% the GPU waits for the host - launch overhead, the step's one host
  sync, Python). The profiler itself slows the host, so ``busy`` is a lower bound for an unprofiled step;
* kernel time by category (convolution / matrix multiply, attention, Triton-generated, elementwise,
  normalisation and reductions, optimizer, copies, other), matched on the kernel names;
* the GPU span of each phase the trainer and losses mark (``sctlib.progress.phase``: loss, student, target,
  target_point, grad_norm, optimizer, ema): from its first to its last kernel, idle gaps included; the backward
  pass is not a phase (on CUDA autograd runs it on its own thread);
* the top kernels by total time.

    python benchmarks/profile_step.py --nets cifar10,imagenet64-s --variant bf16+cl+compile --out profile.json
    python benchmarks/profile_step.py --tiny                         # CPU plumbing check (CPU op times)
    torchrun --nproc_per_node=2 benchmarks/profile_step.py --nets cifar10 --task sct --out p.json
        # every process profiles its own step (--batch images each; the global batch is world x --batch) and
        # writes p.rank<r>.json; the phase 'allreduce' is grad_sync=allreduce's, kernels named nccl* are counted
        # as 'communication' (with DDP they run inside the backward pass)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_throughput as TT  # noqa: E402
from sctlib import config as C  # noqa: E402
from sctlib.train import leave_process_group  # noqa: E402

# First match wins: (category, regex on the kernel name, case-insensitive).
CATEGORIES = [
    ("triton (compiled)", r"^triton_"),  # first: Inductor names fused kernels after their ops ("convolution", ...)
    ("communication", r"nccl"),  # NCCL's all-reduce / broadcast kernels (processes under torchrun)
    ("attention", r"flash|fmha|attention|sdpa"),
    ("conv / matmul", r"gemm|conv|cutlass|sm90_|sm80_|xmma|implicit|wgrad|dgrad|cudnn|nvjet|cublas"),
    ("optimizer", r"adam|multi_tensor|foreach|lerp"),
    ("norm / reduce", r"norm|reduce|welford|softmax|sum_|mean"),
    ("copy / layout", r"copy|memcpy|memset|transpose|permute|cat|nchw|nhwc|fill"),
    ("elementwise", r"elementwise|vectorized|unrolled|where|add|mul|silu|sigmoid|dropout|rand|philox"),
]


def categorise(name: str) -> str:
    for cat, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return cat
    return "other"


# Ranges, not kernels: the profiler also lists record_function ranges (ours, the optimizer's) as device events
# spanning the kernels inside them; they must not count as kernel time.
RANGE_PREFIXES = ("sctlib.", "Optimizer.", "ProfilerStep", "## ")


def union_ms(spans) -> float:
    """Length of the union of (start_us, end_us) intervals, in ms: overlapping kernels count once."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(spans):
        if cur_e is None or s > cur_e:
            total += 0 if cur_e is None else cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    total += 0 if cur_e is None else cur_e - cur_s
    return total / 1e3


def busy_ms(prof) -> float:
    """Time in which some kernel runs on the device (ms), from a finished profile."""
    return union_ms((e.time_range.start, e.time_range.end) for e in prof.events()
                    if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(RANGE_PREFIXES)
                    and not getattr(e, "is_user_annotation", False))


def summarise(prof, steps: int, wall_s: float, device: str) -> dict:
    """Per-step figures from a finished profile (times in ms per step)."""
    events = prof.key_averages()
    kernels, phases = {}, {}
    for e in events:
        dev_self = getattr(e, "self_device_time_total", None)
        if dev_self is None:
            dev_self = getattr(e, "self_cuda_time_total", 0)
        dev_total = getattr(e, "device_time_total", None)
        if dev_total is None:
            dev_total = getattr(e, "cuda_time_total", 0)
        if e.key.startswith("sctlib.step/"):
            # a user range: its device time is that of the kernels launched inside it (CPU time on a CPU)
            t = dev_total if device == "cuda" else e.cpu_time_total
            phases[e.key] = phases.get(e.key, 0.0) + t / 1e3 / steps
        elif e.key.startswith(RANGE_PREFIXES):
            continue
        elif device == "cuda" and dev_self > 0 and e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.key] = (kernels.get(e.key, (0.0, 0))[0] + dev_self / 1e3 / steps,
                              kernels.get(e.key, (0.0, 0))[1] + e.count)
        elif device == "cpu" and e.self_cpu_time_total > 0 and not e.key.startswith(("ProfilerStep", "sctlib.")):
            kernels[e.key] = (kernels.get(e.key, (0.0, 0))[0] + e.self_cpu_time_total / 1e3 / steps,
                              kernels.get(e.key, (0.0, 0))[1] + e.count)
    kernel_ms = sum(v[0] for v in kernels.values())
    cats = {}
    for name, (ms, _) in kernels.items():
        c = categorise(name)
        cats[c] = cats.get(c, 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])
    wall_ms = wall_s * 1e3 / steps
    busy = busy_ms(prof) / steps if device == "cuda" else kernel_ms
    return {"wall_ms_per_step": wall_ms, "kernel_ms_per_step": kernel_ms, "busy_ms_per_step": busy,
            "busy": busy / wall_ms if wall_ms > 0 else None,
            "kernels_per_step": sum(v[1] for v in kernels.values()) / steps,
            "categories_ms": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "phases_ms": dict(sorted(phases.items())),
            "top_kernels": [{"name": n[:160], "ms_per_step": ms, "calls_per_step": cnt / steps,
                             "category": categorise(n)} for n, (ms, cnt) in top[:25]]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default="cifar10,imagenet64-s")
    ap.add_argument("--task", default="ect", choices=["ect", "sct"])
    ap.add_argument("--variant", default="bf16+cl+compile", help="a row of train_throughput: " + ", ".join(TT.VARIANTS))
    ap.add_argument("--extra", nargs="*", default=[], help="config overrides key=value on top of the variant")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--tiny", action="store_true", help="small networks and batch on the CPU")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if args.variant not in TT.VARIANTS:
        ap.error(f"--variant: unknown {args.variant!r}; valid: {', '.join(TT.VARIANTS)}")
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))  # torchrun: one Trainer each
    prec, tf32, cl, comp = TT.VARIANTS[args.variant]
    if device == "cpu":
        prec, tf32, cl, comp = "fp32", False, False, False
    results = []
    for net in args.nets.split(","):
        cfg = C.get_preset(f"{net}-{args.task}")
        cfg = replace(cfg, device=device, batch_size=args.batch * world, init="", tick_nimg=10**12,
                      precision=prec, tf32=tf32, channels_last=cl, compile=comp,
                      loss=replace(cfg.loss, double_nimg=3_200_000,
                                   ref_source="batch" if args.task == "sct" else cfg.loss.ref_source))
        if args.tiny:
            cfg = C.override(cfg, **{"net.model_channels": 32, "net.num_blocks": 1}, batch_size=8 * world)
        try:
            extra = {**TT.VARIANT_EXTRA.get(args.variant, {}), **C.parse_overrides(args.extra)}
            if extra.get("optim.impl") == "fused" and cfg.optim.name != "adam":
                print(f"# skipping {net}: {cfg.optim.name} has no fused kernel", flush=True)
                continue
            cfg = C.validate(C.override(cfg, **extra)) if extra else cfg
        except C.ConfigError as exc:
            ap.error(str(exc))
        bench = TT.Bench(cfg, args.warmup, device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        bench.sync()
        with profile(activities=acts) as prof:
            t0 = time.time()
            for _ in range(args.steps):
                bench.tr.train_step()
            bench.sync()
            wall = time.time() - t0
        row = {"net": net, "task": args.task, "variant": args.variant, "extra": args.extra, "batch": cfg.batch_size,
               "world": world, "rank": rank, "grad_sync": cfg.grad_sync if world > 1 else None,
               "steps": args.steps, **summarise(prof, args.steps, wall, device)}
        results.append(row)
        bench.close()
        who = f" (rank {rank} of {world}, grad_sync={cfg.grad_sync})" if world > 1 else ""
        print(f"\n== {net} {args.task} {args.variant} {' '.join(args.extra)}{who}: {row['wall_ms_per_step']:.1f} ms/step wall, "
              f"{row['kernel_ms_per_step']:.1f} ms kernels, GPU busy {row['busy_ms_per_step']:.1f} ms "
              f"({100 * (row['busy'] or 0):.0f}%), "
              f"{row['kernels_per_step']:.0f} kernels/step")
        for k, v in row["categories_ms"].items():
            print(f"   {k:20s} {v:8.2f} ms  {100 * v / max(row['kernel_ms_per_step'], 1e-9):5.1f}%")
        print("   phases (kernels launched inside each marked range):")
        for k, v in row["phases_ms"].items():
            print(f"   {k:32s} {v:8.2f} ms")
        print("   top kernels:")
        for t in row["top_kernels"][:15]:
            print(f"   {t['ms_per_step']:7.2f} ms {t['calls_per_step']:6.1f}x  [{t['category']}] {t['name'][:100]}")
    if args.out:
        meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}
        out = Path(args.out)
        if world > 1:  # one record per process: p.json -> p.rank0.json, p.rank1.json
            out = out.with_name(f"{out.stem}.rank{rank}{out.suffix}")
        out.write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    leave_process_group()  # the Trainer joined a process group under torchrun: leave it together
    return 0


if __name__ == "__main__":
    sys.exit(main())
