"""Turn what `bash experiments/natural32.sh collect` / `pack` wrote into the book's records and figures.

    python experiments/natural32_book.py OUT_DIR [--prefix natural32] [--dest book/results]

OUT_DIR holds natural32_runs.json (collect), and optionally natural32_teacher_fid.json and
guidance_abl-sct-s0.json. Writes book/results/<prefix>_{ablation,precision,reference_sources,guidance,teacher}.json
and the figures <prefix>_<kind>_fid_curves.png / <prefix>_guidance_fid_vs_w.png. The grouping and the
statistics are sctlib.ablation.evidence_records (tested); this script only reads and writes files.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import sctlib as sct  # noqa: E402

COMMAND = ("bash experiments/natural32.sh start; bash experiments/natural32.sh wait 540 (repeated); "
           "bash experiments/natural32.sh collect; python experiments/natural32_book.py OUT")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--prefix", default="natural32")
    ap.add_argument("--dest", default="book/results")
    ap.add_argument("--setting", default="", help="the sizes of the experiment, in words (stored in each record)")
    ap.add_argument("--command", default=COMMAND, help="how the runs were made (stored in each record)")
    ap.add_argument("--partial", action="store_true",
                    help="also use runs stopped before their end (their evaluations so far; say so in --setting)")
    args = ap.parse_args(argv)
    src, dest = Path(args.out_dir), Path(args.dest)
    if not (src / "natural32_runs.json").is_file():
        ap.error(f"{src / 'natural32_runs.json'} does not exist: run `bash experiments/natural32.sh collect` "
                 "(or `pack`) with OUT pointing there first")
    collected = json.loads((src / "natural32_runs.json").read_text())
    runs = dict(collected["complete"])
    if args.partial:  # runs cut by the time limit: their evaluations so far (marked 'partial' in each run)
        runs.update(sct.ablation.partial_runs(collected.get("partial", {})))
    if not runs:
        ap.error(f"{src / 'natural32_runs.json'} holds no finished run")
    def opt(name):
        hits = sorted(src.rglob(name))
        return json.loads(hits[0].read_text()) if hits else None
    recs = sct.ablation.evidence_records(runs, prefix=args.prefix, command=args.command, setting=args.setting,
                                         guidance=opt("guidance_abl-sct-s0.json"),
                                         teacher=opt("natural32_teacher_fid.json"))
    dest.mkdir(parents=True, exist_ok=True)
    import matplotlib.pyplot as plt

    for name, rec in recs.items():
        (dest / f"{name}.json").write_text(json.dumps(rec, indent=1, default=float))
        rows = rec["results"].get("rows")
        if name.endswith("_guidance"):
            fig = sct.ablation.plot_guidance(rows)
            fig.savefig(dest / f"{name}_fid_vs_w.png", dpi=110)
        elif rows and "fid_1step_mean" in rows[0]:
            fig = sct.ablation.plot_fid_curves(rows)
            fig.savefig(dest / f"{name}_fid_curves.png", dpi=110)
        else:
            continue
        plt.close(fig)
    print("wrote", ", ".join(sorted(recs)), "to", dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
