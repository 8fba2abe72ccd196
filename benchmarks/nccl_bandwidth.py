"""All-reduce rate between the processes of one host, at the sizes a DDP training step exchanges.

DDP all-reduces the whole float32 gradient every step (DDPM++ 55.7M parameters: 212 MiB; EDM2-S 280M:
1,068 MiB). If the GPUs talk over NVLink this costs about a millisecond per step; over PCIe or through host memory,
tens of milliseconds, which would be part of what a two-GPU run loses against two single GPUs. Run under torchrun:

    torchrun --standalone --nproc_per_node=2 benchmarks/nccl_bandwidth.py --mib 25,212,1068 --out nccl.json

Per size: milliseconds per all-reduce (median of ``--iters`` samples after ``--warmup``, each ``--reps``
all-reduces back to back), the algorithm bandwidth
(bytes / time) and the bus bandwidth (algorithm bandwidth x 2 (n - 1) / n, NCCL's convention for all-reduce:
what each link carried). NCCL on CUDA, gloo on a CPU (``--device cpu``, for a plumbing check).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", default="25,212,1068", help="message sizes in MiB (float32), comma-separated")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=4, help="all-reduces back to back per timed sample (launch and sync "
                                                         "overhead spread over them)")
    ap.add_argument("--device", default="auto", help="'auto' (cuda when there is one), 'cuda' or 'cpu'")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if "WORLD_SIZE" not in os.environ:
        raise SystemExit("run under torchrun: torchrun --standalone --nproc_per_node=N benchmarks/nccl_bandwidth.py")
    try:
        sizes = [float(m) for m in args.mib.split(",")]
    except ValueError:
        raise SystemExit(f"--mib: comma-separated numbers, got {args.mib!r}")
    if not all(math.isfinite(m) and m * 2**20 >= 4 for m in sizes) or args.iters < 1 or args.warmup < 0 or args.reps < 1:
        raise SystemExit("--mib: sizes of at least one float32 (4 bytes); --iters >= 1, --warmup >= 0, --reps >= 1")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    sync = torch.cuda.synchronize if use_cuda else (lambda: None)
    rows = []
    try:
        for mib in sizes:
            x = torch.ones(int(mib * 2**20 / 4), dtype=torch.float32, device=device)
            times = []
            for i in range(args.warmup + args.iters):
                x.fill_(1.0)
                dist.barrier()
                sync()
                t0 = time.perf_counter()
                for _ in range(args.reps):
                    dist.all_reduce(x)
                sync()
                if i >= args.warmup:
                    times.append((time.perf_counter() - t0) / args.reps)
            # ones from every process, summed reps times: world ** reps everywhere (exact in float32 for small
            # powers); a wrong or partial reduction shows here
            if not bool((x == float(world) ** args.reps).all()):
                raise RuntimeError(f"all_reduce of ones gave {x[:4].tolist()}..., expected {world ** args.reps}")
            s = statistics.median(times)
            algbw = x.numel() * 4 / s / 1e9
            rows.append({"mib": mib, "ms": s * 1e3, "algbw_gbps": algbw, "busbw_gbps": algbw * 2 * (world - 1) / world,
                         "spread": (max(times) - min(times)) / s})
            del x
        if rank == 0:
            meta = {"device": torch.cuda.get_device_name(device) if use_cuda else "cpu", "world": world,
                    "backend": dist.get_backend(), "torch": torch.__version__,
                    "nccl": ".".join(map(str, torch.cuda.nccl.version())) if use_cuda else None,
                    "iters": args.iters, "warmup": args.warmup, "reps": args.reps, "argv": list(sys.argv[1:] if argv is None else argv)}
            print(f"{'MiB':>8} {'ms':>9} {'algbw GB/s':>11} {'busbw GB/s':>11} {'spread':>7}   ({meta['backend']}, "
                  f"{world} processes, {meta['device']})")
            for r in rows:
                print(f"{r['mib']:>8.1f} {r['ms']:>9.3f} {r['algbw_gbps']:>11.1f} {r['busbw_gbps']:>11.1f} "
                      f"{r['spread']:>7.3f}")
            if args.out:
                with open(args.out, "w") as f:
                    json.dump({"meta": meta, "rows": rows}, f, indent=1)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
