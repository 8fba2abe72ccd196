#!/usr/bin/env bash
# Image-scale evidence on one GPU, on the embedded natural-image set at 32x32 (python -m sctlib.data natural).
# Each stage is one command; the book's results pages cite the stage that produced each record.
#
#   bash experiments/natural32.sh setup        # build the 50,688-image set; Inception reference statistics
#   bash experiments/natural32.sh teacher      # diffusion teacher (EDM loss), time-boxed by TEACHER_SECONDS
#   bash experiments/natural32.sh ablation     # 4 arms x 3 seeds (+ reference sources, + precision), papermill, in parallel
#   bash experiments/natural32.sh collect      # aggregate results.json files into $OUT
#
# Environment: WORK (runs and data, default /tmp/sct-natural32), OUT (records to keep, default ./out),
# PY (python, default python3), JOBS_EXTRA (extra parallel runs: "refs", "precision"; default both).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-python3}
WORK=${WORK:-/tmp/sct-natural32}
OUT=${OUT:-$ROOT/out}
mkdir -p "$WORK" "$OUT"
DATA=$WORK/natural-32.zip

# The network of the teacher and of every tuning run: a reduced DDPM++ (7.0M parameters; CIFAR-10's is 55.7M).
NET=${NET:-"net.model_channels=64 net.channel_mult=1,2,2 net.num_blocks=2 net.attn_resolutions=16 net.dropout=0.1 net.label_dim=0 cond=false"}
# Tuning budget and schedule: 3 ECT stages of 32k images (q = 2), EMA half-life 10k images, batch 128.
TOTAL_NIMG=${TOTAL_NIMG:-96000}
DOUBLE_NIMG=${DOUBLE_NIMG:-32000}
EVAL_NIMG=${EVAL_NIMG:-32000,64000,96000}
FID_IMAGES=${FID_IMAGES:-5000}
TUNE=${TUNE:-"loss.double_nimg=$DOUBLE_NIMG optim.lr=2e-4 ema_halflife_nimg=10000 batch_size=128 tick_nimg=16000 checkpoint_nimg=32000 workers=0"}

stage=${1:?stage: setup | teacher | ablation | collect}
case "$stage" in
setup)
  $PY -m sctlib.data natural "$DATA" --resolution 32 --no-progress ${NATURAL_FLAGS:-} | tee "$OUT/natural32_build.txt"
  $PY - "$DATA" "${FID_REF_IMAGES:-0}" <<'PY'
import sys, time, torch, sctlib as sct
DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
t0 = time.time()
ext = sct.metrics.load_inception(None, device=DEVICE)
sct.metrics.inception_reference_stats(sys.argv[1], extractor=ext, device=DEVICE, progress=False,
                                       max_images=int(sys.argv[2]) or None)
print(f"reference statistics of {sys.argv[1]} in {time.time() - t0:.1f} s with {ext.weights_path}")
PY
  ;;
teacher)
  # Denoising score matching (EDM Eq. 2), Adam 1e-3 with a 100k-image warm-up, EMA half-life 100k images.
  # Time-boxed: the run is killed after TEACHER_SECONDS and the tuning runs start from its newest checkpoint's EMA.
  timeout -s KILL "${TEACHER_SECONDS:-200}" $PY -m sctlib.train --preset cifar10-ect --run-dir "$WORK/teacher" \
      dataset=edmzip data_path="$DATA" init= $NET net.boundary=never \
      loss.task=edm loss.weighting=edm loss.P_mean=-1.2 loss.P_std=1.2 \
      optim.name=adam optim.lr=1e-3 optim.betas=0.9,0.99 optim.lr_rampup_nimg=100000 \
      ema_halflife_nimg=100000 ema_rampup_ratio=0.05 batch_size=256 total_nimg=${TEACHER_NIMG:-3000000} \
      tick_nimg=${TEACHER_TICK:-51200} checkpoint_nimg=${TEACHER_CKPT:-102400} keep_checkpoints=2 workers=4 || true
  ls -l "$WORK/teacher/checkpoints" | tail -3
  cp "$WORK/teacher/stats.jsonl" "$OUT/natural32_teacher_stats.jsonl"
  ;;
ablation)
  run() {  # name arm seed [extra overrides, space-separated] [reference source]
    local name=$1 arm=$2 seed=$3 extra=${4:-} ref=${5:-dataset}
    local ov="$NET $TUNE $extra"
    $PY -m papermill pipelines/ablation.ipynb "$WORK/nb/$name.ipynb" --log-output --no-progress-bar -k python3 \
      -p arm "$arm" -p seed "$seed" -p run_name "$name" -p runs_dir "$WORK/runs" -p teacher "$WORK/teacher" \
      -p data_path "$DATA" -p base_preset cifar10-ect -p ref_source "$ref" -p total_nimg "$TOTAL_NIMG" \
      -p fid_images "$FID_IMAGES" -p fid_ref_images "${FID_REF_IMAGES:-0}" -p eval_nimg "$EVAL_NIMG" -p overrides "$ov" > "$WORK/log/$name.log" 2>&1 \
      && echo "done $name" || echo "FAILED $name (see $WORK/log/$name.log)"
  }
  mkdir -p "$WORK/nb" "$WORK/log" "$WORK/runs"
  for seed in ${SEEDS:-0 1 2}; do
    for arm in ect ect_target ect_smooth sct; do run "abl-$arm-s$seed" "$arm" "$seed" & done
    case " ${JOBS_EXTRA-refs precision} " in *" refs "*)
      run "ref-batch-s$seed" sct "$seed" "" batch &
      run "ref-bank-s$seed" sct "$seed" "loss.ref_size=4096" bank & ;; esac
    case " ${JOBS_EXTRA-refs precision} " in *" precision "*)
      run "prec-fp16-s$seed" sct "$seed" "precision=fp16" &
      run "prec-tf32-s$seed" sct "$seed" "precision=tf32" & ;; esac
  done
  wait
  ;;
collect)
  $PY - "$WORK/runs" "$OUT" <<'PY'
import json, sys
from pathlib import Path
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
recs, partial = {}, {}
for d in sorted(p for p in runs.iterdir() if p.is_dir()):
    if (d / "results.json").exists():
        recs[d.name] = json.loads((d / "results.json").read_text())
    elif (d / "evals.jsonl").exists():  # a run stopped by the time box: keep the evaluations it made
        partial[d.name] = [json.loads(l) for l in (d / "evals.jsonl").read_text().splitlines() if l.strip()]
(out / "natural32_runs.json").write_text(json.dumps({"complete": recs, "partial": partial}))
print(f"{len(recs)} complete: {', '.join(recs)}; {len(partial)} partial: {', '.join(partial)}")
PY
  ;;
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac
