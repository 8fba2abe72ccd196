"""Effective number of references (ESS) of the SCT posterior-mean estimate on natural-image crops.

ESS = 1 / sum_i w_i^2 with w = softmax_i(-||x_t - ref_i||^2 / (2 t^2)) (SCT Sec. 4.1 / STF): 1 means the
target is ECT's single-sample one; ESS well above 1 means the reference set actually averages. Natural
images stand in for CIFAR-10 / ImageNet-64 (which cannot be downloaded here): non-overlapping 32x32x3
crops of the photographs that ship with scikit-learn (``load_sample_images``) and, when installed,
scikit-image (``skimage.data``), at full resolution and downscaled by 2 and 4 (area average), mapped to
[-1, 1] like EDM's uint8 / 127.5 - 1.

    python benchmarks/natural_ess.py                  # table of mean / median ESS per t and reference-set size

Every query's own crop is in its reference set (as in training); the other references are drawn at random
from the remaining crops.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from sctlib.targets import posterior_mean

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "cat", "hubble_deep_field",
                  "retina", "colorwheel")


def photographs() -> list:
    """RGB uint8 [H, W, 3] photographs available offline."""
    from sklearn.datasets import load_sample_images

    out = list(load_sample_images().images)
    try:
        import skimage.data as skd
    except ImportError:  # optional: the scikit-learn photographs alone still give ~1,000 crops
        return out
    for name in SKIMAGE_PHOTOS:
        try:
            img = getattr(skd, name)()
        except Exception:  # noqa: BLE001 - a data file that needs a download is skipped
            continue
        if img.ndim == 3 and img.shape[2] >= 3:
            out.append(np.ascontiguousarray(img[..., :3]))
    return out


def natural_crops(size: int = 32, scales=(1, 2, 4)) -> torch.Tensor:
    """Non-overlapping size x size RGB crops at several downscales, float [-1, 1], [N, 3, size, size]."""
    crops = []
    for img in photographs():
        x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None]
        for s in scales:
            y = torch.nn.functional.avg_pool2d(x, s) if s > 1 else x
            y = y.round().clamp(0, 255)  # back on the uint8 grid, as a stored data set would be
            H, W = y.shape[-2:]
            p = y[0, :, : H // size * size, : W // size * size]
            p = p.unfold(1, size, size).unfold(2, size, size)  # [3, h, w, size, size]
            crops.append(p.permute(1, 2, 0, 3, 4).reshape(-1, 3, size, size))
    return torch.cat(crops) / 127.5 - 1.0


def ess_table(crops: torch.Tensor, ts, sizes, *, queries: int = 256, seed: int = 0) -> list:
    """Rows {n_refs, t, ess_mean, ess_median, own_weight_mean}; n_refs = 0 means all crops."""
    g = torch.Generator().manual_seed(seed)
    N = crops.shape[0]
    q_idx = torch.randperm(N, generator=g)[:queries]
    rows = []
    for n in sizes:
        n_eff = N if n == 0 or n >= N else n
        for t in ts:
            ess, own = [], []
            for i in q_idx.tolist():
                others = torch.randperm(N - 1, generator=g)[: n_eff - 1]
                others = others + (others >= i).long()  # skip the own crop
                ref = torch.cat([crops[i:i + 1], crops[others]])
                x_t = crops[i:i + 1] + t * torch.randn(crops[i:i + 1].shape, generator=g)
                _, st = posterior_mean(x_t, t, ref, return_stats=True, own=crops[i:i + 1])
                ess.append(float(st["ess"][0]))
                own.append(float(st["own_weight"][0]))
            ess_t = torch.tensor(ess)
            rows.append({"n_refs": n_eff, "t": t, "ess_mean": float(ess_t.mean()),
                         "ess_median": float(ess_t.median()), "frac_mixed": float((torch.tensor(own) < 0.99).float().mean()),
                         "own_weight_mean": float(np.mean(own))})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--t", default="0.25,0.5,1,2,5,10")
    ap.add_argument("--sizes", default="128,2048,0", help="reference-set sizes; 0 = every crop")
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--size", type=int, default=32, help="crop size (32: CIFAR-10 stand-in, 64: ImageNet-64)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    crops = natural_crops(args.size)
    print(f"{crops.shape[0]} crops of {args.size}x{args.size}x3", file=sys.stderr)
    rows = ess_table(crops, [float(t) for t in args.t.split(",")], [int(s) for s in args.sizes.split(",")],
                     queries=args.queries)
    print(f"{'n_refs':>7s} {'t':>6s} {'ESS mean':>9s} {'median':>7s} {'mixed':>6s} {'own w':>6s}")
    for r in rows:
        print(f"{r['n_refs']:7d} {r['t']:6.2f} {r['ess_mean']:9.2f} {r['ess_median']:7.2f} {r['frac_mixed']:6.2f} "
              f"{r['own_weight_mean']:6.3f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"num_crops": int(crops.shape[0]), "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
