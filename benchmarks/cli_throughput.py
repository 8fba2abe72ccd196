"""Training speed as a user gets it: ``python -m sctlib.train --preset P`` on an EDM-format zip, one process
or several under torchrun, the rate read from the run's own ``stats.jsonl``.

``train_throughput.py`` times the step in isolation; this script runs the command line a user types (data
loading, the preset's defaults, EMA, tick bookkeeping, DDP) and reports, per preset and process count:

- ``img_per_s``: the median of the per-tick rates after the first ``--skip-ticks`` ticks (the first tick
  holds start-up work: cuDNN autotuning, ``torch.compile``'s compilation, the first sample grid);
- ``first_tick_s``: the first tick's wall time, so the compile warm-up is reported apart from the rate;
- ``ddp_efficiency`` (rows with nproc > 1): rate / (nproc x the 1-process rate of the same preset and
  overrides, measured in the same invocation: the 1-process row just before, else the first after;
  ``baseline_row`` names it), at the same per-GPU batch (``--batch-gpu``). ``--nproc 1,2,1,2`` alternates the
  process counts and gives one efficiency per pair, so that their spread is measured too.

    python benchmarks/cli_throughput.py --data natural-32.zip --presets cifar10-ect,cifar10-sct --nproc 1,2
    python benchmarks/cli_throughput.py --data natural-32.zip --presets cifar10-ect --extra compile=false channels_last=false  # eager
    python benchmarks/cli_throughput.py --data natural-32.zip --presets cifar10-sct --nproc 1,2,1,2 --logs logs/
    python benchmarks/cli_throughput.py --tiny        # CPU plumbing check on a small written zip (gloo for nproc 2)
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional


def run_cli(preset: str, data: str, nproc: int, batch_gpu: int, ticks: int, steps_per_tick: int,
            extra, run_dir: Path, env=None, log: Optional[Path] = None) -> dict:
    """One training run through the CLI; returns its per-tick rates and wall times.

    ``log``: the run's output goes to this file as it is written (a run cut by a time limit still shows how
    far it got); otherwise it is captured and shown only on failure."""
    batch = batch_gpu * nproc
    tick_nimg = batch * steps_per_tick
    args = ["--preset", preset, "--run-dir", str(run_dir), "--no-progress", "dataset=edmzip", f"data_path={data}",
            "init=", f"batch_size={batch}", f"tick_nimg={tick_nimg}", f"total_nimg={tick_nimg * ticks}",
            "checkpoint_nimg=0", "keep_checkpoints=1", *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "sctlib.train", *args]
    else:
        cmd = [sys.executable, "-m", "sctlib.train", *args]
    t0 = time.time()
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as fh:
            fh.write(" ".join(cmd) + "\n")
            fh.flush()
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True, env=env)
        output = log.read_text()
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        output = proc.stderr
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\nfailed ({proc.returncode}):\n{output[-3000:]}")
    lines = [json.loads(l) for l in (run_dir / "stats.jsonl").read_text().splitlines() if l.strip()]
    return {"rates": [l["img_per_s"] for l in lines], "times": [l["time"] for l in lines],
            "peak_mem_gib": max((l.get("peak_mem_gib") or 0.0) for l in lines),
            "precision": lines[-1].get("precision"), "wall_s": wall, "command": " ".join(cmd)}


def summarise(res: dict, skip: int, tick_nimg: int) -> dict:
    rates = res["rates"][skip:]
    if not rates:
        raise ValueError(f"no ticks left after skipping {skip}: raise --ticks")
    return {"img_per_s": statistics.median(rates), "tick_rates": res["rates"],
            "spread": (max(rates) - min(rates)) / statistics.median(rates),
            # the first tick's wall time (img_per_s = tick images / tick seconds): start-up and compilation
            "first_tick_s": tick_nimg / res["rates"][0], "peak_mem_gib": res["peak_mem_gib"],
            "precision": res["precision"], "wall_s": res["wall_s"], "command": res["command"]}


def _pair_efficiencies(rows: list) -> None:
    """Each multi-process row's DDP efficiency against its preset's 1-process row measured just before it, or, when
    none was, the first one after it (``baseline_row``: that row's index in ``rows``, one preset's rows in run order)."""
    for i, r in enumerate(rows):
        r["ddp_efficiency"], r["baseline_row"] = None, None
        if r["nproc"] == 1:
            continue
        before = [j for j in range(i) if rows[j]["nproc"] == 1]
        after = [j for j in range(i + 1, len(rows)) if rows[j]["nproc"] == 1]
        j = before[-1] if before else (after[0] if after else None)
        if j is not None:
            r["baseline_row"] = j
            r["ddp_efficiency"] = r["img_per_s"] / (r["nproc"] * rows[j]["img_per_s"])


def _tiny_zip(path: Path) -> str:
    import numpy as np

    from sctlib.data import write_edm_zip

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(256, 32, 32, 3), dtype=np.uint8)
    write_edm_zip(str(path), images, labels=None)
    return str(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="", help="EDM-format zip (CIFAR-10 or ImageNet-64 layout)")
    ap.add_argument("--presets", default="cifar10-ect,cifar10-sct")
    ap.add_argument("--nproc", default="1,2", help="process counts, one row each (1 is the DDP baseline)")
    ap.add_argument("--batch-gpu", type=int, default=128, help="per-process batch (global = nproc x this)")
    ap.add_argument("--ticks", type=int, default=6)
    ap.add_argument("--steps-per-tick", type=int, default=10)
    ap.add_argument("--skip-ticks", type=int, default=1)
    ap.add_argument("--extra", nargs="*", default=[], help="overrides added to every run (e.g. compile=true)")
    ap.add_argument("--label", default="preset defaults")
    ap.add_argument("--tiny", action="store_true", help="small networks on the CPU, a written 256-image zip")
    ap.add_argument("--logs", default="", help="folder for each run's output as it is written (<preset>-<nproc>.log)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)

    extra = list(args.extra)
    tmp = tempfile.TemporaryDirectory()
    data = args.data
    if args.tiny:
        data = data or _tiny_zip(Path(tmp.name) / "tiny.zip")
        extra = ["device=cpu", "net.model_channels=16", "net.channel_mult=1,1", "net.num_blocks=1",
                 "net.attn_resolutions=", "workers=0", *extra]
        args.batch_gpu, args.ticks, args.steps_per_tick = 8, 3, 2
    if not data or not Path(data).is_file():
        raise SystemExit(f"--data: no such EDM-format zip: {data!r} (python -m sctlib.data natural out.zip writes one)")

    import torch

    meta = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.tiny else "cpu",
            "gpus": torch.cuda.device_count(), "torch": torch.__version__, "batch_gpu": args.batch_gpu,
            "ticks": args.ticks, "steps_per_tick": args.steps_per_tick, "skip_ticks": args.skip_ticks,
            "extra": extra, "label": args.label, "data": Path(data).name, "argv": list(sys.argv[1:] if argv is None else argv)}
    rows = []
    try:
        procs = [int(n) for n in args.nproc.split(",")]
    except ValueError:
        procs = []
    if not procs or min(procs) < 1:
        ap.error(f"--nproc: process counts of at least 1, separated by commas (e.g. 2,1,1,2), got {args.nproc!r}")
    print(f"{'preset':<16} {'nproc':>5} {'img/s':>9} {'per GPU':>9} {'DDP eff':>8} {'spread':>7} "
          f"{'tick 1 s':>9} {'peak GiB':>9} {'wall s':>7}  format", flush=True)
    for preset in args.presets.split(","):
        mine = []  # this preset's rows, in the order run
        for k, n in enumerate(procs):  # in the order given: "2,1" runs the 2-process row first (both ranks on a
            # cold cache); "1,2,1,2" alternates, each multi-process row paired with the 1-process row before it
            name = f"{preset}-{n}" if procs.count(n) == 1 else f"{preset}-{n}-{k}"  # a repeated count: its own run
            res = run_cli(preset, data, n, args.batch_gpu, args.ticks, args.steps_per_tick, extra,
                          Path(tmp.name) / name, log=Path(args.logs) / f"{name}.log" if args.logs else None)
            row = {"preset": preset, "nproc": n,
                   **summarise(res, args.skip_ticks, args.batch_gpu * n * args.steps_per_tick)}
            rows.append(row)
            mine.append(row)
            _pair_efficiencies(mine)
            eff = f"{row['ddp_efficiency']:.3f}" if row["ddp_efficiency"] is not None else "-"
            print(f"{preset:<16} {n:>5} {row['img_per_s']:>9.1f} {row['img_per_s'] / n:>9.1f} {eff:>8} "
                  f"{row['spread']:>7.3f} {row['first_tick_s']:>9.1f} {row['peak_mem_gib']:>9.2f} "
                  f"{row['wall_s']:>7.1f}  {row['precision']}", flush=True)
            if args.out:  # after every row: a later failure keeps what was measured
                Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        for i, r in enumerate(mine):  # rows printed before their baseline existed
            if r["ddp_efficiency"] is not None and r["baseline_row"] > i:
                print(f"{preset:<16} {r['nproc']:>5} DDP efficiency {r['ddp_efficiency']:.3f} "
                      f"(against the 1-process row measured after it)", flush=True)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
