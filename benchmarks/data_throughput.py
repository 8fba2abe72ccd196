"""How fast the training data arrives: batches from an EDM-format zip through a DataLoader, per worker count.

With ``workers=0`` (the presets' default) the training process decodes every batch itself, between two steps;
a compiled DDPM++ step takes about 107 ms on an H200 (``benchmarks/train_throughput.py``), so a batch that takes
tens of milliseconds to decode is a visible share of what the CLI measures. With workers the decoding runs in
other processes, ahead of the step. This script times that part alone, on the CPU, with no GPU involved:

    python benchmarks/data_throughput.py --data natural-32.zip --workers 0,2,4,8 --out data.json

Per item: milliseconds for a first use (read from the zip, decode, convert; the dataset then caches the image
in its process), a cached use, and a use after ``data_preload`` (plus the seconds the preload takes). Per worker
count: milliseconds per batch of a first pass through a DataLoader (the whole wait for ``--batches`` batches after
one warm-up batch, divided by their number) and images per second; with workers the main process only waits, so
these rows say how fast the workers deliver, not how much of a training step they hide. The total, not the median
wait, is the rate: workers fill a queue of ``workers x 4`` batches ahead, and the median of a short run then times
batches taken from that queue (a GPU-host run of this script at 20 batches reported 0.4 ms per batch for 8 workers
that way). Batches the workers prepared during the warm-up wait still count, so with workers the rate is an upper
bound (up to workers x 4 of the timed batches). The order of the data is the
trainer's concern, not this script's: workers change who decodes, not what (``tests/test_train.py`` checks that
runs with and without workers train identically).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def time_items(ds, n: int) -> float:
    """Seconds per ``ds[i]`` over n items spread over the set (item 0 first, untimed: opens the zip)."""
    ds[0]
    step = max(len(ds) // n, 1)
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        ds[(i * step) % len(ds)]
    return (time.perf_counter() - t0) / n


def time_loader(ds, batch: int, workers: int, batches: int) -> list:
    """Seconds per batch for ``batches`` batches after a warm-up batch (worker start-up excluded)."""
    g = torch.Generator().manual_seed(0)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, generator=g, num_workers=workers,
                                     prefetch_factor=4 if workers > 0 else None, drop_last=True)
    it = iter(dl)
    next(it)
    times = []
    for _ in range(batches):
        t0 = time.perf_counter()
        next(it)
        times.append(time.perf_counter() - t0)
    del it
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="EDM-format zip (python -m sctlib.data natural out.zip writes one)")
    ap.add_argument("--resolution", type=int, default=0, help="0 = the zip's own")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", default="0,2,4,8", help="worker counts, comma-separated")
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--items", type=int, default=512, help="items timed per item measurement")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if not Path(args.data).is_file():
        raise SystemExit(f"--data: no such EDM-format zip: {args.data!r}")
    try:
        workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        raise SystemExit(f"--workers: comma-separated integers, got {args.workers!r}")
    if min(workers) < 0 or args.batch < 1 or args.batches < 1 or args.items < 1:
        raise SystemExit("--workers >= 0, --batch, --batches and --items >= 1")

    from sctlib import data as data_mod

    def fresh():  # a new dataset object: no decoded image cached from an earlier measurement
        return data_mod.load_dataset("edmzip", path=args.data, resolution=args.resolution)

    ds = fresh()
    if len(ds) < 2 * args.batch:
        raise SystemExit(f"--data holds {len(ds)} images; need at least 2 x --batch ({2 * args.batch})")
    n_batches = min(args.batches, len(ds) // args.batch - 1)  # one pass: the warm-up batch and these
    if n_batches < args.batches:
        print(f"# {len(ds)} images give {n_batches} timed batches of {args.batch} (asked: {args.batches})", flush=True)
    # Per item: the first pass decodes (read from the zip, PNG decode, convert) and caches; later passes read the
    # per-process cache; data_preload decodes everything up front (timed here per image) and then reads one tensor.
    first = time_items(ds, args.items)
    cached = time_items(ds, args.items)
    pre = fresh()
    t0 = time.perf_counter()
    pre.preload()
    preload_s = time.perf_counter() - t0
    preloaded = time_items(pre, args.items)
    del pre
    meta = {"data": Path(args.data).name, "images": len(ds), "batch": args.batch, "batches": n_batches, "batches_asked": args.batches,
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "item_ms": {"first_pass": first * 1e3, "cached": cached * 1e3, "preloaded": preloaded * 1e3},
            "preload_s": preload_s, "argv": list(sys.argv[1:] if argv is None else argv)}
    print(f"one item, ms: first pass (decode) {first * 1e3:.3f}, cached {cached * 1e3:.3f}, preloaded "
          f"{preloaded * 1e3:.3f}; preloading all {len(ds)} took {preload_s:.1f} s; {meta['cpus']} CPUs")
    print(f"first pass through a DataLoader (fresh set per row):\n{'workers':>7} {'ms/batch':>9} {'img/s':>9} {'spread':>7}")
    rows = []
    for w in workers:
        times = time_loader(fresh(), args.batch, w, n_batches)
        s = sum(times) / len(times)
        row = {"workers": w, "batches": len(times), "ms_per_batch": s * 1e3, "img_per_s": args.batch / s,
               "median_wait_ms": statistics.median(times) * 1e3, "spread": (max(times) - min(times)) / s}
        rows.append(row)
        print(f"{w:>7} {row['ms_per_batch']:>9.1f} {row['img_per_s']:>9.0f} {row['spread']:>7.2f}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
