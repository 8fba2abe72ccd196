#!/usr/bin/env bash
# Image-scale evidence on one GPU, on the embedded natural-image set at 32x32 (python -m sctlib.data natural).
# Each stage is one command; the book's results pages cite the stage that produced each record.
#
#   bash experiments/natural32.sh setup        # build the 50,688-image set; Inception reference statistics
#   bash experiments/natural32.sh teacher      # diffusion teacher (EDM loss), time-boxed by TEACHER_SECONDS
#   bash experiments/natural32.sh ablation     # 4 arms x 3 seeds (+ reference sources, + precision), papermill, in parallel
#   bash experiments/natural32.sh collect      # aggregate results.json files into $OUT
#
# On a lent GPU, where each command is limited to minutes but the machine stays up between commands, the
# whole sequence runs detached from a copy of the repository and later commands wait on it:
#
#   bash experiments/natural32.sh start        # copy the repo to $WORK/repo, run 'all' there under setsid
#   bash experiments/natural32.sh wait 540     # wait up to 540 s (or until done), then 'pack' into $OUT
#   bash experiments/natural32.sh stop         # end the detached sequence (what finished is kept)
#
# 'all' = setup, teacher (+ its Heun FID), then one queue of papermill runs, LANES at a time: the four
# arms x SEEDS (the ablation), matched precision runs (bf16 / fp16 / tf32, stage exponent up to 8), the
# reference sources batch and bank (SCT Fig. 4), and autoguidance of abl-sct-s0 by its EMA snapshots (Fig. 6).
#
# Environment: WORK (runs and data, default /tmp/sct-natural32), OUT (records to keep, default ./out),
# PY (python, default python3), PREC_TOTAL_NIMG / PREC_DOUBLE_NIMG / PREC_EVAL_NIMG (length of the
# matched precision runs), JOBS_EXTRA (extra parallel runs: "refs", "precision"; default both), ARMS (the
# ablation arms queued; "" for none), LANES (runs at a time, per GPU with QUEUE_GPUS), QUEUE_GPUS (e.g. "1 0":
# one set of lanes per GPU), TEACHER_GPU, BENCH_GPU (experiments/gpu_bench.sh exclusive on that GPU beside the
# teacher), AFTER_BENCH (a gpu_bench.sh stage after the queue, e.g. ddp), RUN_CPUS / BENCH_CPUS (taskset lists
# that keep the runs off the benchmark's cores).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-python3}
WORK=${WORK:-/tmp/sct-natural32}
OUT=${OUT:-$ROOT/out}
mkdir -p "$WORK" "$OUT"
DATA=${DATA:-$WORK/natural-32.zip}  # another EDM zip may be named; setup builds the natural set only when it is missing

# The network of the teacher and of every tuning run: a reduced DDPM++ (7.0M parameters; CIFAR-10's is 55.7M).
# Eager and NCHW as the committed runs ran (the paper presets compile on CUDA since 2026-11-29; compiled dropout
# draws other masks than eager, so a compiled rerun would not repeat the recorded draws).
NET=${NET:-"net.model_channels=64 net.channel_mult=1,2,2 net.num_blocks=2 net.attn_resolutions=16 net.dropout=0.1 net.label_dim=0 cond=false compile=false channels_last=false"}
# Tuning budget and schedule: 3 ECT stages of 32k images (q = 2), EMA half-life 10k images, batch 128.
TOTAL_NIMG=${TOTAL_NIMG:-96000}
DOUBLE_NIMG=${DOUBLE_NIMG:-32000}
EVAL_NIMG=${EVAL_NIMG:-32000,64000,96000}
FID_IMAGES=${FID_IMAGES:-5000}
TUNE=${TUNE:-"loss.double_nimg=$DOUBLE_NIMG optim.lr=2e-4 ema_halflife_nimg=10000 batch_size=128 tick_nimg=16000 checkpoint_nimg=32000 workers=0"}

stage=${1:?stage: setup | teacher | ablation | queue | collect | all | start | wait | pack | stop}
LANES=${LANES:-6}
command -v taskset > /dev/null || { [ -z "${RUN_CPUS:-}${BENCH_CPUS:-}" ] || echo "no taskset: CPU lists ignored"; RUN_CPUS=; BENCH_CPUS=; }
if [ -d /tmp/site ]; then export PYTHONPATH=/tmp/site:$ROOT; else export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}; fi
case "$stage" in
setup)
  [ -f "$DATA" ] || $PY -m sctlib.data natural "$DATA" --resolution 32 --no-progress ${NATURAL_FLAGS:-} | tee "$OUT/natural32_build.txt"
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
  if [ -f "$WORK/teacher/TIMEBOX_DONE" ]; then echo "teacher: already trained ($WORK/teacher)"; exit 0; fi
  ${TEACHER_GPU:+env CUDA_VISIBLE_DEVICES=$TEACHER_GPU} ${RUN_CPUS:+taskset -c $RUN_CPUS} \
    timeout -s KILL "${TEACHER_SECONDS:-200}" $PY -m sctlib.train --preset cifar10-ect --run-dir "$WORK/teacher" \
      dataset=edmzip data_path="$DATA" init= $NET net.boundary=never \
      loss.task=edm loss.weighting=edm loss.P_mean=-1.2 loss.P_std=1.2 \
      optim.name=adam optim.lr=1e-3 optim.betas=0.9,0.99 optim.lr_rampup_nimg=100000 \
      ema_halflife_nimg=100000 ema_rampup_ratio=0.05 batch_size=256 total_nimg=${TEACHER_NIMG:-3000000} \
      tick_nimg=${TEACHER_TICK:-51200} checkpoint_nimg=${TEACHER_CKPT:-102400} keep_checkpoints=2 workers=4 \
      > "$WORK/log/teacher.log" 2>&1 || true
  touch "$WORK/teacher/TIMEBOX_DONE"
  ls -l "$WORK/teacher/checkpoints" | tail -3
  cp "$WORK/teacher/stats.jsonl" "$OUT/natural32_teacher_stats.jsonl"
  # The teacher's own quality: EDM's Heun sampler (18 steps, 35 network evaluations), FID over FID_IMAGES.
  $PY - "$WORK/teacher" "$DATA" "$FID_IMAGES" "${FID_REF_IMAGES:-0}" "$OUT/natural32_teacher_fid.json" <<'PY' \
      || echo "teacher FID FAILED"
import sys, sctlib as sct
rec = sct.ablation.teacher_record(sys.argv[1], data_path=sys.argv[2], fid_images=int(sys.argv[3]),
                                  fid_ref_images=int(sys.argv[4]), out=sys.argv[5])
print(f"teacher: Heun {rec['steps']} steps ({rec['nfe']} NFE) FID {rec['fid']:.2f} over {rec['fid_images']} images, "
      f"{rec['nimg']} images seen, {rec['seconds']:.0f} s")
PY
  ;;
ablation)  # the four arms x SEEDS only
  JOBS_EXTRA="" bash "$0" queue
  ;;
job)  # one papermill run of pipelines/ablation.ipynb: job NAME ARM SEED [EXTRA OVERRIDES] [REFERENCE SOURCE]
  name=$2 arm=$3 seed=$4 extra=${5:-} ref=${6:-dataset}
  mkdir -p "$WORK/nb" "$WORK/log" "$WORK/runs"
  if [ -f "$WORK/runs/$name/results.json" ]; then echo "$(date +%T) have $name" >> "$WORK/log/jobs.txt"; exit 0; fi
  # Several lanes (one xargs per GPU) read the same queue: the first to claim a run takes it.
  mkdir -p "$WORK/claims"; mkdir "$WORK/claims/$name" 2>/dev/null || exit 0
  t0=$(date +%s)
  total=$TOTAL_NIMG evals=$EVAL_NIMG
  # Matched precision runs have their own length (PREC_TOTAL_NIMG, PREC_EVAL_NIMG; the schedule's
  # double_nimg is in their overrides, so the stage exponent still ends at 8).
  case "$name" in prec-*) total=${PREC_TOTAL_NIMG:-$TOTAL_NIMG} evals=${PREC_EVAL_NIMG:-$EVAL_NIMG} ;; esac
  echo "$(date +%T) start $name (GPU ${CUDA_VISIBLE_DEVICES:-default})" >> "$WORK/log/jobs.txt"
  OMP_NUM_THREADS=${JOB_THREADS:-2} ${RUN_CPUS:+taskset -c $RUN_CPUS} $PY -m papermill pipelines/ablation.ipynb "$WORK/nb/$name.ipynb" --log-output \
      --no-progress-bar -k python3 \
      -p arm "$arm" -p seed "$seed" -p run_name "$name" -p runs_dir "$WORK/runs" -p teacher "$WORK/teacher" \
      -p data_path "$DATA" -p base_preset cifar10-ect -p ref_source "$ref" -p total_nimg "$total" \
      -p fid_images "$FID_IMAGES" -p fid_ref_images "${FID_REF_IMAGES:-0}" -p eval_nimg "$evals" \
      -p overrides "$NET $TUNE $extra" > "$WORK/log/$name.log" 2>&1 && st=done || st=FAILED
  echo "$(date +%T) $st $name $(( $(date +%s) - t0 )) s" >> "$WORK/log/jobs.txt"
  ;;
queue)
  # One queue, LANES runs at a time, in the order the evidence matters: a whole seed of the four arms first.
  mkdir -p "$WORK/log"
  rm -rf "$WORK/claims"  # claims of an earlier (stopped) queue
  Q=$WORK/queue.txt
  : > "$Q"
  for seed in ${SEEDS:-0 1 2}; do
    for arm in ${ARMS-ect ect_target ect_smooth sct}; do echo "abl-$arm-s$seed $arm $seed '' dataset" >> "$Q"; done
  done
  case " ${JOBS_EXTRA-precision refs} " in *" precision "*)
    # Matched precision runs (issue 8): SCT, the same teacher, images and seeds, one format each. The smooth
    # schedule ends at a = PREC_TOTAL_NIMG / PREC_DOUBLE_NIMG (ECT's final stage 8 by default: 96,000 /
    # 12,000), where the difference D(x_t) - D(x_r) is smallest.
    # 'rule' is the paper presets' default, bf16 until stage 4, then TF32 (sctlib.precision).
    for seed in ${SEEDS:-0 1 2}; do for p in bf16 fp16 tf32 rule; do
      prec=$p; [ "$p" = rule ] && prec='auto,tf32@stage>=4'
      echo "prec-$p-s$seed sct $seed 'precision=$prec loss.double_nimg=${PREC_DOUBLE_NIMG:-12000}' dataset" >> "$Q"
    done; done ;; esac
  case " ${JOBS_EXTRA-precision refs} " in *" refs "*)
    # Reference sources (SCT Fig. 4): the local batch and a 4,096-image bank; the whole set is abl-sct-s*.
    for seed in ${SEEDS:-0 1 2}; do
      echo "ref-batch-s$seed sct $seed '' batch" >> "$Q"
      echo "ref-bank-s$seed sct $seed 'loss.ref_size=4096' bank" >> "$Q"
    done ;; esac
  ( # autoguidance by the EMA snapshots of abl-sct-s0 (SCT Fig. 6), as soon as that run exists
    while [ ! -f "$WORK/runs/abl-sct-s0/results.json" ]; do sleep 10; [ -f "$WORK/QUEUE_DONE" ] && exit 0; done
    bash "$0" guidance ) &
  if [ -z "${QUEUE_GPUS:-}" ]; then
    xargs -P "$LANES" -L 1 bash "$0" job < "$Q"
  else  # one xargs per GPU, LANES each; GPU g starts when $WORK/gpu$g.free exists ('all' makes it)
    for g in $QUEUE_GPUS; do
      ( while [ ! -f "$WORK/gpu$g.free" ]; do sleep 5; done
        CUDA_VISIBLE_DEVICES=$g xargs -P "$LANES" -L 1 bash "$0" job < "$Q" ) &
    done
    wait
  fi
  touch "$WORK/QUEUE_DONE"
  wait
  ;;
guidance)
  $PY - "$WORK/runs/abl-sct-s0" "$DATA" "$FID_IMAGES" "${FID_REF_IMAGES:-0}" "$WORK/runs/guidance_abl-sct-s0.json" \
      > "$WORK/log/guidance.log" 2>&1 <<'PY' || echo "guidance FAILED (see $WORK/log/guidance.log)"
import sys, sctlib as sct
sct.ablation.guidance_record(sys.argv[1], data_path=sys.argv[2], fid_images=int(sys.argv[3]),
                             fid_ref_images=int(sys.argv[4]), out=sys.argv[5])
PY
  ;;
all)
  mkdir -p "$WORK/log"
  echo "$(date +%T) all: begin (LANES=$LANES)"
  bash "$0" setup > "$WORK/log/setup.log" 2>&1
  echo "$(date +%T) setup done"
  if [ -n "${PRECISION_NETS:-}" ]; then  # the precision benchmark of issue 8 on the side (accuracy only, not speed)
    ( timeout -s KILL "${PRECISION_SECONDS:-540}" $PY benchmarks/precision.py --nets "$PRECISION_NETS" \
        --teacher-nimg "${PRECISION_TEACHER_NIMG:-30000}" ${PRECISION_ARGS:-} --work "$WORK/prec" --out "$WORK/runs/precision_h200_$PRECISION_NETS.json" \
        > "$WORK/log/precision_bench.log" 2>&1; rc=$?; echo "$(date +%T) precision benchmark ended ($rc)" ) &
  fi
  # BENCH_GPU: the exclusive speed benchmarks (experiments/gpu_bench.sh) on that GPU, beside the teacher on
  # TEACHER_GPU; the queue's lanes of that GPU start once they end. Other GPUs of QUEUE_GPUS start at once.
  for g in ${QUEUE_GPUS:-}; do [ "$g" = "${BENCH_GPU:-}" ] || touch "$WORK/gpu$g.free"; done
  if [ -n "${BENCH_GPU:-}" ] && [ "${BENCH_GPU}" = "${TEACHER_GPU:-}" ]; then  # one GPU: the benchmarks first
    CUDA_VISIBLE_DEVICES=$BENCH_GPU bash experiments/gpu_bench.sh exclusive > "$WORK/log/bench.log" 2>&1
    echo "$(date +%T) exclusive benchmarks done"; touch "$WORK/gpu$BENCH_GPU.free"
  elif [ -n "${BENCH_GPU:-}" ]; then
    ( CUDA_VISIBLE_DEVICES=$BENCH_GPU ${BENCH_CPUS:+taskset -c $BENCH_CPUS} bash experiments/gpu_bench.sh exclusive \
        > "$WORK/log/bench.log" 2>&1; echo "$(date +%T) exclusive benchmarks done"; touch "$WORK/gpu$BENCH_GPU.free" ) &
  fi
  ${TEACHER_GPU:+env CUDA_VISIBLE_DEVICES=$TEACHER_GPU} bash "$0" teacher  # its Heun FID on that GPU too
  echo "$(date +%T) teacher done"
  bash "$0" queue
  wait
  for st in ${AFTER_BENCH:-}; do  # e.g. 'ddp compile': gpu_bench.sh stages with nothing else running
    bash experiments/gpu_bench.sh "$st" >> "$WORK/log/bench_after.log" 2>&1
    echo "$(date +%T) benchmarks '$st' done"
  done
  echo "$(date +%T) all: end"
  touch "$WORK/ALL_DONE"
  ;;
start)
  # Copy the repository (a later command may bring a newer working tree) and run 'all' detached from it.
  mkdir -p "$WORK/log"
  rm -rf "$WORK/repo" && mkdir -p "$WORK/repo"
  tar -C "$ROOT" --exclude=./.git --exclude=./runs --exclude=./.venv -cf - . | tar -C "$WORK/repo" -xf -
  setsid nohup env OUT="$WORK/out" bash "$WORK/repo/experiments/natural32.sh" all > "$WORK/log/all.log" 2>&1 < /dev/null &
  echo "started 'all' in $WORK/repo (log $WORK/log/all.log)"
  ;;
wait)
  deadline=$(( $(date +%s) + ${2:-500} ))
  while [ ! -f "$WORK/ALL_DONE" ] && [ "$(date +%s)" -lt "$deadline" ]; do sleep 5; done
  bash "$0" pack
  ;;
pack)
  # At most a few files into $OUT: status, the run records, logs, the side results.
  # Every step tolerates a missing file ('set -e' would otherwise end the pack before the records are written).
  { echo "== $(date +%T)"; cat "$WORK/log/all.log" 2>/dev/null || true; echo "== jobs"; cat "$WORK/log/jobs.txt" 2>/dev/null || true
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv 2>/dev/null || true
    for f in "$WORK"/log/*.log; do [ -f "$f" ] || continue; echo "== $f"; tail -c 1500 "$f" || true; echo; done; } > "$OUT/status.txt" 2>&1 || true
  bash "$0" collect > /dev/null 2>&1 || true
  tar -C "$WORK" -czf "$OUT/side.tgz" $(cd "$WORK" && ls -d runs/*.json runs/*.txt out log 2>/dev/null) 2>/dev/null || true
  head -c 6000 "$OUT/status.txt" || true
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
    elif (d / "evals.jsonl").exists():  # a run stopped by the time box: keep its evaluations and tick statistics
        def rows(f):  # a process killed mid-write leaves a cut last line: skipped (and said), not fatal
            out = []
            for i, line in enumerate((d / f).read_text().splitlines() if (d / f).exists() else []):
                try:
                    out.append(json.loads(line)) if line.strip() else None
                except json.JSONDecodeError:
                    print(f"{d.name}/{f}: line {i + 1} is not JSON (cut by the time limit?): skipped", file=sys.stderr)
            return out
        partial[d.name] = {"curve": rows("evals.jsonl"), "stats": rows("stats.jsonl")}
(out / "natural32_runs.json").write_text(json.dumps({"complete": recs, "partial": partial}))
print(f"{len(recs)} complete: {', '.join(recs)}; {len(partial)} partial: {', '.join(partial)}")
PY
  ;;
stop)
  # The queue first (xargs would start the next run as soon as one is killed), then the runs, then the rest.
  pkill -f "natural32.sh all" || true; pkill -f "natural32.sh queue" || true; pkill -x xargs || true
  pkill -f "natural32.sh job" || true; pkill -f papermill || true; pkill -f ipykernel_launcher || true
  pkill -f "sctlib.train" || true; pkill -f "natural32.sh guidance" || true
  pkill -f "benchmarks/precision.py" || true; pkill -f "gpu_bench.sh" || true; pkill -f "benchmarks/" || true
  sleep 2; echo stopped
  ;;
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac
