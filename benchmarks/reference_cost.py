"""Cost and accuracy of SCT's reference pass alone (issue 13): DatasetReferences with compute='float64'
(the exact reference) and compute='mixed' (float32 screening + exact float64 top-k), and the 'batch'
source for scale.

Cases (batch 128, as the training step):

* ``cifar``     - 50,000 references of 3x32x32, unconditional (all of CIFAR-10);
* ``imagenet``  - 3x64x64, class-conditional, 1,300 references per class (ImageNet-64 has ~1,281);
  ``--classes`` of them (default 100: each row reads only its own class, so the cost per call does not
  depend on the number of classes; 1000 holds the full 16 GB set).

Per case and mode: the median (and 10 / 90 % quantiles) over ``--calls`` calls of the reference call alone,
timed with CUDA events after ``--warmup`` calls (perf_counter on a CPU); a torch.profiler top-kernel table;
and the accuracy of 'mixed' against 'float64' on the same inputs over t in a log grid 0.002 ... 80:
max over rows of ||x0_hat_mixed - x0_hat_f64|| / ||x_t - x0_hat_f64|| (the relative error of the score
estimate (x_t - x0_hat) / t, SCT Eq. 13) and max |w_mixed - w_f64| over all weights (own image included).
The reference images are smooth (bilinear upsampling of 4x4 noise, on the uint8 grid) and include
near-duplicates: copies one uint8 level apart in a few pixels (inside dup_rms: the own image's copies, skipped)
and in about half the pixels (outside dup_rms: real references that tie with the own image at t ~ 0.05);
the queries are drawn from images that have such copies. Timing does not depend on the content.

    python benchmarks/reference_cost.py --out refcost.json           # one H200: about a minute
    python benchmarks/reference_cost.py --classes 1000 --out refcost.json
    python benchmarks/reference_cost.py --tiny                        # CPU, seconds
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch

from sctlib.references import DatasetReferences, GatheredReferences


def smooth_store(n, shape, near_every, device, seed=0):
    """n uint8 images [n, *shape]: smooth ones, and after every ``near_every`` originals two near-copies of
    the last original (one level apart in 3 pixels; in ~50% of the pixels). Generated in chunks on device."""
    g = torch.Generator(device=device).manual_seed(seed)
    C, H, W = shape
    out = torch.empty((n, *shape), dtype=torch.uint8, device=device)
    step = 4096
    for s in range(0, n, step):
        m = min(step, n - s)
        z = torch.randn(m, C, 4, 4, generator=g, device=device)
        img = torch.nn.functional.interpolate(z, size=(H, W), mode="bilinear", align_corners=False)
        out[s:s + m] = ((img.tanh() * 0.9 + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    # near-copies: rows j*near_every + 1 and + 2 are copies of row j*near_every
    base = torch.arange(0, n - 2, near_every, device=device)
    d = C * H * W
    src = out[base].reshape(-1, d).int()
    few = src.clone()
    pix = torch.randint(0, d, (base.shape[0], 3), generator=g, device=device)
    few.scatter_(1, pix, (few.gather(1, pix) + 1).clamp(max=255))
    half = src + (torch.rand(src.shape, generator=g, device=device) < 0.5).int() * \
        (torch.randint(0, 2, src.shape, generator=g, device=device) * 2 - 1)
    out[base + 1] = few.clamp(0, 255).to(torch.uint8).reshape(-1, *shape)
    out[base + 2] = half.clamp(0, 255).to(torch.uint8).reshape(-1, *shape)
    return out


def timed(fn, calls, warmup, device):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"ms_median": statistics.median(times), "ms_p10": q[0], "ms_p90": q[-1], "calls": calls}


def profile_table(fn, device, rows):
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(3):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    keys = ("self_device_time_total", "self_cuda_time_total") if device.type == "cuda" else ("self_cpu_time_total",)
    for key in keys:  # the CUDA column is 'device' in current torch, 'cuda' in older releases
        try:
            return prof.key_averages().table(sort_by=key, row_limit=rows)
        except (AttributeError, KeyError, ValueError):
            continue
    return prof.key_averages().table(row_limit=rows)


def accuracy(src, X, labels, idx, t_grid, gen):
    """Max over rows and t of the score-relative x0_hat error and of the weight error, mixed vs float64."""
    out = []
    x0 = X[idx].float() / 127.5 - 1
    lab = None if labels is None else labels[idx]
    B = x0.shape[0]
    for t in t_grid:
        x_t = x0 + t * torch.randn(x0.shape, generator=gen, device=x0.device)
        tt = torch.full((B,), float(t), device=x0.device)
        ref, sr = src(x_t, tt, x0, lab, compute="float64", return_weights=True)
        mix, sm = src(x_t, tt, x0, lab, compute="mixed", return_weights=True)
        num = (mix.double() - ref.double()).reshape(B, -1).norm(dim=1)
        den = (x_t.double() - ref.double()).reshape(B, -1).norm(dim=1)
        w_err = max(float((sm["weights"] - sr["weights"]).abs().max()),
                    float((sm["own_weight"] - sr["own_weight"]).abs().max()))
        out.append({"t": float(t), "ratio_max": float((num / den).max()), "w_err_max": w_err,
                    "ess_f64_mean": float(sr["ess"].mean()), "own_weight_f64_mean": float(sr["own_weight"].mean()),
                    "n_refs_equal": bool(torch.equal(sm["n_refs"], sr["n_refs"]))})
        del sr, sm
    return out


def fused_vs_torch_rel(src, x_t, t, x0, labels, chunk) -> float:
    """max |x0_hat(fused kernels) - x0_hat(PyTorch float64)| / max |x_t - x0_hat| for a class source.

    The queries go in as float64, so x0_hat comes back in float64 and the comparison sees float64 differences
    (with float32 queries both paths round to the same float32 output). ``src.fused`` is restored after."""
    xq, x0q, tq = x_t.double(), x0.double(), t.double()
    before = src.fused
    try:
        src.fused = True
        x_fused, _ = src(xq, tq, x0q, labels, chunk_size=chunk, compute="float64")
        src.fused = False
        x_torch, _ = src(xq, tq, x0q, labels, chunk_size=chunk, compute="float64")
    finally:
        src.fused = before
    if x_fused.dtype != torch.float64 or x_torch.dtype != torch.float64:
        raise RuntimeError(f"expected float64 outputs, got {x_fused.dtype} and {x_torch.dtype}")
    return float((x_fused - x_torch).abs().max() / (xq - x_fused).abs().max())


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="small sizes on the CPU (a few seconds)")
    ap.add_argument("--cases", default="cifar,imagenet")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--classes", type=int, default=100, help="ImageNet-64 case: classes x --per-class references")
    ap.add_argument("--per-class", type=int, default=1300)
    ap.add_argument("--cifar-refs", type=int, default=50_000)
    ap.add_argument("--chunk", type=int, default=8192, help="chunk_size (the CIFAR SCT preset's loss.ref_chunk)")
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--t-points", type=int, default=12)
    ap.add_argument("--profile-rows", type=int, default=8)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        args.batch, args.classes, args.per_class, args.cifar_refs = 16, 4, 100, 1000
        args.calls, args.warmup, args.t_points, args.profile_rows = 3, 1, 6, 5
    # The training step runs with TF32 on (bf16 presets): the mixed path must turn it off by itself.
    torch.backends.cuda.matmul.allow_tf32 = True
    shapes = {"cifar": (3, 16, 16) if args.tiny else (3, 32, 32), "imagenet": (3, 16, 16) if args.tiny else (3, 64, 64)}
    t_grid = [float(v) for v in torch.logspace(math.log10(0.002), math.log10(80.0), args.t_points)]
    gen = torch.Generator(device=device).manual_seed(1)
    results, tables = [], {}
    for case in args.cases.split(","):
        shape = shapes[case]
        B = args.batch
        if case == "cifar":
            n, labels = args.cifar_refs, None
        else:
            n = args.classes * args.per_class
        X = smooth_store(n, shape, 50, device)
        if case != "cifar":  # class-sorted blocks of per_class images, so near-copies share their class
            labels = torch.arange(n, device=device) // args.per_class
        t0 = time.perf_counter()
        src = DatasetReferences(X, labels, device=device, topk=args.topk)
        build_s = time.perf_counter() - t0
        # Timing inputs: random rows, log-normal t as in training (P_mean -1.1, P_std 2).
        idx = torch.randint(0, n, (B,), generator=gen, device=device)
        x0 = X[idx].float() / 127.5 - 1
        lab = None if labels is None else labels[idx]
        t = (torch.randn(B, generator=gen, device=device) * 2.0 - 1.1).exp()
        x_t = x0 + t[:, None, None, None] * torch.randn(x0.shape, generator=gen, device=device)
        batch_src = GatheredReferences("batch")
        calls = {
            "float64": lambda: src(x_t, t, x0, lab, chunk_size=args.chunk, compute="float64"),
            "mixed": lambda: src(x_t, t, x0, lab, chunk_size=args.chunk, compute="mixed"),
            "batch": lambda: batch_src(x_t, t, x0, lab, chunk_size=args.chunk),
        }
        if labels is not None:  # the class path: fused Triton kernels (the default on CUDA) vs plain PyTorch
            def torch_path():
                before, src.fused = src.fused, False
                try:
                    return src(x_t, t, x0, lab, chunk_size=args.chunk, compute="float64")
                finally:
                    src.fused = before  # keeps a fallback (fused=False after a kernel failure) in force
            calls["float64-torch"] = torch_path
            if device.type == "cuda" and src._use_fused(device):
                try:
                    fused_vs_torch = fused_vs_torch_rel(src, x_t, t, x0, lab, args.chunk)
                    row_base_extra = {"fused_vs_torch_rel": fused_vs_torch}
                    print(f"{case}: fused float64 vs PyTorch float64 (float64 queries), "
                          f"max |dx0| / max |x_t - x0_hat| = {fused_vs_torch:.2e}")
                except Exception as exc:  # noqa: BLE001 - a kernel that cannot build: the timings still count
                    row_base_extra = {"fused_vs_torch_error": f"{type(exc).__name__}: {exc}"[:300]}
            else:
                row_base_extra = {}
        else:
            row_base_extra = {}
        row_base = {"case": case, "B": B, "shape": list(shape), "refs": n, "conditional": labels is not None,
                    "classes": args.classes if labels is not None else 0, "build_s": build_s, **row_base_extra}
        for mode, fn in calls.items():
            r = {**row_base, "mode": mode, **timed(fn, args.calls, args.warmup, device)}
            if mode == "float64" and labels is not None:  # after the calls: a kernel failure falls back for good
                r["fused_kernels"] = bool(src._use_fused(device))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                fn()
                torch.cuda.synchronize()
                r["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            results.append(r)
            print(json.dumps(r), flush=True)
            if not args.no_profile:
                try:
                    tables[f"{case}/{mode}"] = profile_table(fn, device, args.profile_rows)
                except Exception as exc:  # noqa: BLE001 - the timings and accuracy still count
                    tables[f"{case}/{mode}"] = f"profiler failed: {type(exc).__name__}: {exc}"
                print(f"\n--- {case} / {mode}: top kernels ---\n{tables[f'{case}/{mode}']}", flush=True)
        # Accuracy on queries that have near-copies (rows 0, 1, 2 mod 50) and random ones.
        q = torch.cat([torch.arange(0, n - 2, 50, device=device)[: B // 2] + torch.arange(B // 2, device=device) % 3,
                       torch.randint(0, n, (B - B // 2,), generator=gen, device=device)])[:B]
        acc = accuracy(src, X, labels, q, t_grid, gen)
        for r in results:
            if r["case"] == case and r["mode"] == "mixed":
                r["accuracy"] = acc
                r["ratio_max"] = max(a["ratio_max"] for a in acc)
                r["w_err_max"] = max(a["w_err_max"] for a in acc)
        del src, X
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"\n{'case':10s} {'mode':13s} {'refs':>8s} {'ms med':>8s} {'p10':>7s} {'p90':>7s} {'x f64':>6s} "
          f"{'max |dx0|/|x_t-x0|':>19s} {'max |dw|':>9s}")
    for r in results:
        f64 = next(x for x in results if x["case"] == r["case"] and x["mode"] == "float64")  # default path
        speed = f64["ms_median"] / r["ms_median"]
        acc = f"{r['ratio_max']:19.2e} {r['w_err_max']:9.2e}" if "ratio_max" in r else f"{'-':>19s} {'-':>9s}"
        print(f"{r['case']:10s} {r['mode']:13s} {r['refs']:8d} {r['ms_median']:8.2f} {r['ms_p10']:7.2f} "
              f"{r['ms_p90']:7.2f} {speed:6.2f} {acc}")
    for r in results:
        if "accuracy" in r:
            print(f"\n{r['case']} mixed vs float64 per t:  t, max ratio, max |dw|, mean ESS (f64), n_refs equal")
            for a in r["accuracy"]:
                print(f"  {a['t']:9.4f} {a['ratio_max']:10.2e} {a['w_err_max']:10.2e} {a['ess_f64_mean']:10.2f} "
                      f"{a['n_refs_equal']}")
    if args.out:
        meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
                "tiny": args.tiny, "calls": args.calls, "warmup": args.warmup, "chunk": args.chunk, "topk": args.topk}
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "rows": results, "profiles": tables}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
