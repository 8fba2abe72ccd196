"""1-step sampling throughput for FID-50k, in images per second (issue 12), for DDPM++ and EDM2-S.

Three numbers per network, format and batch size, in one process:

* ``net``: the consistency function alone, f(x, t_max) on a ready batch of noise (the GPU's share);
* ``generate``: :func:`sctlib.evaluate.seeded_generator` as FID uses it (one seed per image: its noise and
  label drawn on the host, moved to the device, sampled, quantised to uint8);
* ``generate+features``: the same plus the Inception pool features that FID needs (299x299 resize inside
  the extractor), i.e. the rate of ``sctlib.metrics.fid`` over 50,000 images, when ``--features`` is given.

Weights are random (speed does not depend on them). Formats: 'fp32' (TF32 off), 'tf32', 'bf16' (autocast).

    python benchmarks/sample_throughput.py --nets cifar10,imagenet64-s --batch 500 --features --out s.json
    python benchmarks/sample_throughput.py --tiny           # CPU plumbing check with small networks
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from sctlib import config as C
from sctlib import evaluate, samplers
from sctlib.networks import build_network, count_params
from sctlib.precision import autocast, set_tf32

PRESETS = {"cifar10": "cifar10-ect", "imagenet64-s": "imagenet64-s-ect"}


def _timed(fn, reps: int, device) -> float:
    """Seconds per call: median of ``reps`` timed calls after one warm-up call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench_net(name: str, *, batch: int, formats, reps: int, device, tiny: bool, extractor=None) -> list:
    cfg = C.get_preset(PRESETS[name])
    net_cfg = cfg.net
    if tiny:
        net_cfg = C.override(cfg, **{"net.model_channels": 16, "net.num_blocks": 1}).net
    model = build_network(net_cfg).to(device).eval()
    shape = (net_cfg.img_channels, net_cfg.img_resolution, net_cfg.img_resolution)
    label_dim = net_cfg.label_dim if cfg.cond else 0
    noise = torch.randn((batch, *shape), device=device) * cfg.eval.t_max
    lab = torch.randint(label_dim, (batch,), device=device) if label_dim else None  # class indices, as FID draws them
    rows = []
    for fmt in formats:
        set_tf32(fmt)
        ctx = lambda: autocast(fmt, device.type)  # noqa: E731 - a null context for fp32 / tf32
        gen = evaluate.seeded_generator(model, shape, steps=1, t_max=cfg.eval.t_max, label_dim=label_dim, device=device)
        seeds = torch.arange(batch)

        @torch.no_grad()
        def net_only():
            with ctx():
                samplers.sample_onestep(model, noise, lab, t_max=cfg.eval.t_max)

        @torch.no_grad()
        def gen_only():
            with ctx():
                gen(seeds)

        row = {"net": name, "params": count_params(model), "format": fmt, "batch": batch,
               "net_img_per_s": batch / _timed(net_only, reps, device),
               "generate_img_per_s": batch / _timed(gen_only, reps, device)}
        if extractor is not None:
            @torch.no_grad()
            def gen_feat():
                with ctx():
                    x = gen(seeds)
                extractor(x.to(device))

            row["generate_features_img_per_s"] = batch / _timed(gen_feat, reps, device)
            row["fid50k_minutes"] = 50_000 / row["generate_features_img_per_s"] / 60
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default="cifar10,imagenet64-s")
    ap.add_argument("--formats", default="fp32,tf32,bf16")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--features", action="store_true", help="also time the Inception features (FID's full rate)")
    ap.add_argument("--inception-weights", default="", help="weights for --features (default: the installed ones)")
    ap.add_argument("--tiny", action="store_true", help="small networks, batch 4, fp32 only, on the CPU")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    formats = ["fp32"] if device.type == "cpu" else args.formats.split(",")
    batch = 4 if args.tiny else args.batch
    extractor = None
    if args.features:
        from sctlib import metrics

        extractor = metrics.load_inception(args.inception_weights or None, device=device)
    rows = []
    for name in args.nets.split(","):
        if name not in PRESETS:
            ap.error(f"unknown net {name!r}; valid: {', '.join(PRESETS)}")
        rows += bench_net(name, batch=batch, formats=formats, reps=1 if args.tiny else args.reps, device=device,
                          tiny=args.tiny, extractor=extractor)
    print(f"\n{'net':13s} {'format':6s} {'batch':>6s} {'net img/s':>10s} {'generate':>10s} {'+features':>10s} {'FID-50k min':>12s}")
    for r in rows:
        feat = f"{r['generate_features_img_per_s']:10.0f}" if "generate_features_img_per_s" in r else f"{'-':>10s}"
        mins = f"{r['fid50k_minutes']:12.1f}" if "fid50k_minutes" in r else f"{'-':>12s}"
        print(f"{r['net']:13s} {r['format']:6s} {r['batch']:6d} {r['net_img_per_s']:10.0f} "
              f"{r['generate_img_per_s']:10.0f} {feat} {mins}")
    if args.out:
        meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
                "command": "python benchmarks/sample_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])}
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
