"""Command line: ``python -m sctlib.data convert {cifar10,imagenet64,folder} SRC DST.zip``, ``info ZIP`` and
``natural DST.zip --resolution 32|64`` (the embedded natural-image set, :mod:`sctlib.data.natural`)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sctlib.data", description="sctlib data tools: convert data sets to EDM-format zips.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="convert an official download to an EDM-format zip",
                       description="cifar10: cifar-10-python.tar.gz or its extracted folder. "
                                   "imagenet64: Imagenet64_train_part*.zip / a folder of train_data_batch_* (npz or pickle) "
                                   "/ a folder of class folders of JPEGs (ADM centre-crop resize). "
                                   "folder: any class-per-folder image tree at --resolution.")
    c.add_argument("dataset", choices=("cifar10", "imagenet64", "folder"))
    c.add_argument("src", help="source file or folder")
    c.add_argument("dst", help="destination .zip (written atomically)")
    c.add_argument("--split", default=None, help="cifar10: train|test (default train); imagenet64 batches: train|val")
    c.add_argument("--resolution", type=int, default=64, help="output size for JPEG folders (default 64)")
    c.add_argument("--max-images", type=int, default=None, help="stop after this many images (smoke tests)")
    c.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    n = sub.add_parser("natural", help="build the embedded natural-image set (crops of the photographs in "
                                       "scikit-image and scikit-learn) as an EDM-format zip",
                       description="50,688 crops of 11 photographs by a fixed, seeded recipe (see sctlib/data/natural.py); "
                                   "the SHA-256 of the default recipe's pixels and labels is checked before writing.")
    n.add_argument("dst", help="destination .zip (written atomically)")
    n.add_argument("--resolution", type=int, default=32, help="crop size: 32 (CIFAR-10-shaped) or 64 (default 32)")
    n.add_argument("--seed", type=int, default=0, help="recipe seed (only seed 0 has a recorded hash)")
    n.add_argument("--crops-per-photo", type=int, default=None, help="default 4608 (11 x 4608 = 50,688 images)")
    n.add_argument("--no-labels", action="store_true", help="write no class labels (label = source photograph)")
    n.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    n.add_argument("--no-verify", action="store_true",
                   help="write even if the photographs or the result differ from the recorded hashes (another JPEG "
                        "decoder); the hash obtained is printed, so results can say which set they used")
    i = sub.add_parser("info", help="print size, shape and label count of an EDM-format zip")
    i.add_argument("zip")
    args = ap.parse_args(argv)

    from ..errors import cli_main

    return cli_main(lambda: _main(args))


def _main(args) -> int:
    from . import convert as cv
    from .edmzip import EDMZipDataset

    # expected failures become one line on stderr, exit code 2 (sctlib.errors.cli_main)
    if args.cmd == "convert":
        kw = dict(progress=not args.no_progress, max_images=args.max_images)
        if args.dataset == "cifar10":
            out = cv.convert_cifar10(args.src, args.dst, split=args.split or "train", **kw)
        elif args.dataset == "imagenet64":
            out = cv.convert_imagenet64(args.src, args.dst, split=args.split or "train", resolution=args.resolution, **kw)
        else:
            out = cv.convert_image_folder(args.src, args.dst, resolution=args.resolution, **kw)
        ds = EDMZipDataset(out, cache=False)
        print(f"wrote {out}: {ds.num_images} images of shape {ds.shape}, {ds.num_classes} classes")
    elif args.cmd == "natural":
        from .natural import DEFAULT_CROPS_PER_PHOTO, build_natural

        info = build_natural(args.dst, args.resolution, seed=args.seed,
                             crops_per_photo=args.crops_per_photo or DEFAULT_CROPS_PER_PHOTO,
                             labels=not args.no_labels, verify=not args.no_verify, progress=not args.no_progress)
        print(f"wrote {info['path']}: {info['num_images']} images {info['resolution']}x{info['resolution']}x3, "
              f"{info['num_classes']} classes, sha256 {info['sha256']}"
              + (" (verified)" if info["verified"] else " (no recorded hash for these settings)"))
    else:
        ds = EDMZipDataset(args.zip, cache=False)
        print(f"{args.zip}: {ds.num_images} images of shape {ds.shape}, {ds.num_classes} classes, fingerprint {ds.fingerprint()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
