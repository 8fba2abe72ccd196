#!/usr/bin/env bash
# Everything of one GPU session in a single command of under 9 minutes (a lent machine can be gone by the next
# command, so nothing is left running detached): the reference-pass cost (issue 13), then a short version of
# the matched precision runs of experiments/natural32.sh (issue 8: its own teacher, 4 formats x 3 seeds, SCT
# to stage exponent 8), cut at DEADLINE seconds, then packed into $OUT (natural32.sh pack).
#
#   source experiments/gpu_env.sh && bash experiments/one_call.sh
#
# Environment: DEADLINE (seconds for natural32.sh all, default 420), and natural32.sh's own variables; the
# defaults below are those of the 2026-11-29 session (teacher 110 s, runs of 24,000 images, 3,000 per stage).
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/sct-natural32}
mkdir -p "$WORK/log" "$WORK/runs"
echo "$(date +%T) reference cost"
timeout -s KILL 90 ${PY:-python3} benchmarks/reference_cost.py --calls 20 --out "$WORK/runs/bench_reference_cost.json" \
    > "$WORK/runs/bench_reference_cost.txt" 2>&1
rc=$?; echo "$(date +%T) reference cost: exit $rc"
export ARMS=${ARMS-} JOBS_EXTRA=${JOBS_EXTRA-precision} LANES=${LANES:-12} TEACHER_SECONDS=${TEACHER_SECONDS:-110} \
    PREC_TOTAL_NIMG=${PREC_TOTAL_NIMG:-24000} PREC_DOUBLE_NIMG=${PREC_DOUBLE_NIMG:-3000} \
    PREC_EVAL_NIMG=${PREC_EVAL_NIMG:-12000,24000} OUT=${OUT:-$PWD/out}
timeout -s TERM "${DEADLINE:-420}" bash experiments/natural32.sh all > "$WORK/log/all.log" 2>&1
rc=$?; echo "$(date +%T) all: exit $rc (124 = cut at the deadline)" | tee -a "$WORK/log/all.log"
bash experiments/natural32.sh stop > /dev/null 2>&1
bash experiments/natural32.sh pack
