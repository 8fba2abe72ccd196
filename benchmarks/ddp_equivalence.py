"""One process with k accumulation rounds vs k processes (torchrun): final weights must agree.

Draws are seeded by global position and the gradient is the mean over the global batch, so the two runs
differ only by the order of floating-point reductions. Prints the largest absolute weight difference.

    python benchmarks/ddp_equivalence.py --nproc 2 --device cuda       # NCCL on 2 GPUs
    python benchmarks/ddp_equivalence.py --nproc 2 --device cpu        # gloo
    python benchmarks/ddp_equivalence.py --nproc 2 --extra compile=true --yardstick compile=false
        # compiled DDP vs one compiled process, next to what compiling alone moves (one process, eager vs compiled)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file


def max_abs_diff(a: dict, b: dict) -> float:
    """Largest absolute difference between two state dicts with the same keys."""
    if a.keys() != b.keys():
        raise ValueError(f"different tensors: {sorted(a.keys() ^ b.keys())[:5]}")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="digits-ect")
    ap.add_argument("--total-nimg", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--extra", nargs="*", default=[], help="more key=value overrides")
    ap.add_argument("--yardstick", nargs="*", default=None,
                    help="also run one process with these overrides added (e.g. compile=false) and report its distance "
                         "from the one-process run: what that change alone moves, the scale for the DDP difference")
    args = ap.parse_args(argv)
    common = ["--preset", args.preset, "--no-progress", f"device={args.device}", f"total_nimg={args.total_nimg}",
              f"batch_size={args.batch}", "precision=fp32", "tf32=false", "cudnn_benchmark=false",
              f"tick_nimg={args.total_nimg // 4}", *args.extra]
    with tempfile.TemporaryDirectory() as d:
        one, many = Path(d) / "one", Path(d) / "many"
        subprocess.run([sys.executable, "-m", "sctlib.train", "--run-dir", str(one), *common,
                        f"batch_gpu={args.batch // args.nproc}"], check=True)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={args.nproc}", "-m", "sctlib.train", "--run-dir", str(many), *common],
                       check=True)
        a, b = load_file(str(one / "final_net.safetensors")), load_file(str(many / "final_net.safetensors"))
        diff = max_abs_diff(a, b)
        scale = max(a[k].float().abs().max().item() for k in a)
        world = json.loads((many / "config.json").read_text())["world_size"]
        out = {"preset": args.preset, "device": args.device, "nproc": world, "total_nimg": args.total_nimg,
               "extra": args.extra, "max_abs_weight_diff": diff, "max_abs_weight": scale}
        if args.yardstick is not None:
            ys = Path(d) / "yardstick"
            subprocess.run([sys.executable, "-m", "sctlib.train", "--run-dir", str(ys), *common,
                            f"batch_gpu={args.batch // args.nproc}", *args.yardstick], check=True)
            out["yardstick"] = args.yardstick
            out["yardstick_max_abs_weight_diff"] = max_abs_diff(a, load_file(str(ys / "final_net.safetensors")))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
