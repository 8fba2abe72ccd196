#!/usr/bin/env bash
# Everything of one GPU session in a single command of under 10 minutes (a lent machine can be gone by the next
# command, so nothing is left running detached): optionally the reference-pass cost (REF_COST=1, issue 13,
# ~25 s), then a short version of the matched precision runs of experiments/natural32.sh (issue 8: its own
# teacher, 4 formats x 3 seeds, SCT to stage exponent 8), cut at DEADLINE seconds, then packed into $OUT
# (natural32.sh pack).
#
# Timings measured on one H200 (2026-11-29, second session): setup 57 s; teacher TEACHER_SECONDS + 28 s (its
# FID and checkpoints); the 12 runs in parallel 275-289 s each, evaluations at 12,000 and 24,000 images
# included (FID-5k at 1 and 2 steps, 12 at once). With the defaults: ~10 + 57 + 138 + 290 = ~495 s.
#
#   source experiments/gpu_env.sh && bash experiments/one_call.sh       # the device tool's carry: [".whl", ".fidw"]
#
# The session's other calls, the speed benchmarks on the idle GPU (each under 10 minutes; a tarball stays
# under the file limit of what comes back):
#
#   source experiments/gpu_env.sh && bash experiments/gpu_bench.sh fused; bash experiments/gpu_bench.sh sample; \
#     tar -C "$WORK" -czf "$OUT/bench.tgz" runs
#
# Environment: DEADLINE (seconds from the start of this script to the end of natural32.sh all, default 530), REF_COST (1: time the reference pass first),
# and natural32.sh's own variables (defaults below: teacher 110 s, runs of 24,000 images, 3,000 per stage).
# The first 2026-11-29 session ran REF_COST=1 DEADLINE=450 TEACHER_SECONDS=110: the final evaluations were cut;
# the second ran TEACHER_SECONDS=110 DEADLINE=530: all 12 runs finished (494 s in all).
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/sct-natural32}
mkdir -p "$WORK/log" "$WORK/runs"
if [ "${REF_COST:-0}" = 1 ]; then
  echo "$(date +%T) reference cost"
  timeout -s KILL 90 ${PY:-python3} benchmarks/reference_cost.py --calls 20 --out "$WORK/runs/bench_reference_cost.json" \
      > "$WORK/runs/bench_reference_cost.txt" 2>&1
  rc=$?; echo "$(date +%T) reference cost: exit $rc"
fi
export ARMS=${ARMS-} JOBS_EXTRA=${JOBS_EXTRA-precision} LANES=${LANES:-12} TEACHER_SECONDS=${TEACHER_SECONDS:-110} \
    PREC_TOTAL_NIMG=${PREC_TOTAL_NIMG:-24000} PREC_DOUBLE_NIMG=${PREC_DOUBLE_NIMG:-3000} \
    PREC_EVAL_NIMG=${PREC_EVAL_NIMG:-12000,24000} OUT=${OUT:-$PWD/out}
# The deadline counts from the start of this script (so REF_COST's time comes out of it), leaving ~30 s for
# stop and pack inside a 600 s command.
left=$(( ${DEADLINE:-530} - SECONDS ))
[ "$left" -gt 60 ] || { echo "DEADLINE=${DEADLINE:-530} leaves ${left} s after the reference timing" >&2; left=60; }
timeout -s TERM "$left" bash experiments/natural32.sh all > "$WORK/log/all.log" 2>&1
rc=$?; echo "$(date +%T) all: exit $rc (124 = cut at the deadline)" | tee -a "$WORK/log/all.log"
bash experiments/natural32.sh stop > /dev/null 2>&1
bash experiments/natural32.sh pack
