#!/usr/bin/env bash
# Speed benchmarks on a lent GPU machine, each writing its JSON and printed table to $RES (default
# $WORK/runs), with a time limit each so that one slow benchmark cannot eat the rest. Run from the repo root.
#
#   bash experiments/gpu_bench.sh exclusive   # one idle GPU: reference-pass cost, SCT reference rows of the
#                                             # training step (bf16 and TF32)
#   bash experiments/gpu_bench.sh fused       # one idle GPU: the ImageNet-64 class reference pass (fused kernels
#                                             # vs PyTorch) alone and inside the EDM2-S step (~4 min)
#   bash experiments/gpu_bench.sh sample      # one idle GPU: 1-step sampling rate for FID-50k
#   bash experiments/gpu_bench.sh compile     # one idle GPU: compiled step vs eager (loss, gradient, update)
#   bash experiments/gpu_bench.sh compile-cli # one idle GPU: the CLI with compile and channels-last
#   bash experiments/gpu_bench.sh profile     # one idle GPU: where the step's time goes (eager bf16, compiled)
#                                             # (PROFILE_NETS, PROFILE_VARIANTS pick the rows)
#   bash experiments/gpu_bench.sh profile-ddp # 2 GPUs: the profile of the step in 1 and 2 processes (allreduce, DDP)
#   bash experiments/gpu_bench.sh no-sync     # one idle GPU: the step with and without its one host sync
#   bash experiments/gpu_bench.sh adam        # one idle GPU: fused vs multi-tensor Adam in the EDM2-S step
#   bash experiments/gpu_bench.sh cudagraphs  # one idle GPU: the compiled DDPM++ step as CUDA graphs (speed, numbers)
#   bash experiments/gpu_bench.sh compile-late # one idle GPU: the compile check at stage 3, where the target pass runs
#   bash experiments/gpu_bench.sh compile-warm # one idle GPU: the EDM2-S compile check from weights off their init
#   bash experiments/gpu_bench.sh ddp         # every GPU of the host, nothing else running: the CLI on 1 and 2
#                                             # processes (DDP efficiency at the same per-GPU batch)
#   bash experiments/gpu_bench.sh ddp-probe   # 2 GPUs: what the CLI and DDP lose (data decoding, NCCL rate, bucket
#                                             # size, eager, CUDA graphs; DDP_PROBES picks), compiled equivalence
#
# DATA names the EDM-format zip of the CLI runs (experiments/natural32.sh setup builds one).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WORK=${WORK:-/tmp/sct-natural32}
RES=${RES:-$WORK/runs}
DATA=${DATA:-$WORK/natural-32.zip}
mkdir -p "$RES"
b() {  # b NAME SECONDS CMD...: run one benchmark, its table to NAME.txt, exit status noted
  local name=$1 secs=$2; shift 2
  echo "$(date +%T) bench $name: start"
  # TERM first: torchrun passes it on to its workers (they run in sessions of their own, which a KILL of torchrun
  # would leave running on the GPUs); KILL 20 s later if anything is still there.
  timeout -k 20 -s TERM "$secs" "$@" > "$RES/$name.txt" 2>&1
  local rc=$?  # before any $(...) in the message: a command substitution resets $?
  echo "$(date +%T) bench $name: exit $rc"
}
case "${1:?stage: exclusive | fused | sample | ddp | ddp-probe | profile-ddp | no-sync | compile | compile-late | compile-warm | compile-cli | profile | adam | cudagraphs}" in
exclusive)
  nvidia-smi --query-gpu=name,utilization.gpu,memory.used --format=csv > "$RES/bench_gpu_state.txt" 2>&1
  # Issue 13: the reference pass alone (CIFAR-10 50,000 references; ImageNet-64 per class), float64 vs mixed.
  b bench_reference_cost 150 $PY benchmarks/reference_cost.py --calls 20 --out "$RES/bench_reference_cost.json"
  # Issues 13 and 8: the reference sources inside the real training step, interleaved with the ECT step, in
  # both formats of the CIFAR-10 presets' precision rule (bf16 early, TF32 late) ...
  b bench_throughput_cifar 240 $PY benchmarks/train_throughput.py --nets cifar10 --variants bf16,fp32+tf32 \
      --refs batch,dataset-all-f64,dataset-all --steps 8 --rounds 4 --warmup 5 --out "$RES/bench_throughput_cifar.json"
  # ... and ImageNet-64 EDM2-S with the class-restricted source of its SCT presets (bf16; its TF32 rows are
  # in the committed throughput record).
  b bench_throughput_in64 240 $PY benchmarks/train_throughput.py --nets imagenet64-s --variants bf16 \
      --refs batch,dataset-class-f64,dataset-class --steps 6 --rounds 4 --warmup 4 --out "$RES/bench_throughput_in64.json"
  ;;
fused)
  nvidia-smi --query-gpu=name,utilization.gpu,memory.used --format=csv > "$RES/bench_gpu_state.txt" 2>&1
  # Issue 13's last point: the class-restricted float64 pass through the fused Triton kernels, alone (against the
  # PyTorch float64 path and the mixed path) and inside the EDM2-S training step next to ECT.
  b bench_reference_cost 90 $PY benchmarks/reference_cost.py --calls 20 --out "$RES/bench_reference_cost.json"
  b bench_throughput_in64 230 $PY benchmarks/train_throughput.py --nets imagenet64-s --variants bf16 \
      --refs batch,dataset-class-f64,dataset-class --steps 6 --rounds 4 --warmup 4 --out "$RES/bench_throughput_in64.json"
  ;;
sample)
  # Issue 12: 1-step sampling rate for FID-50k, both networks, with the Inception features.
  b bench_sample_throughput ${SAMPLE_SECONDS:-180} $PY benchmarks/sample_throughput.py --nets cifar10,imagenet64-s --formats bf16,tf32 \
      --features --out "$RES/bench_sample_throughput.json"
  ;;
ddp)
  nvidia-smi --query-gpu=name,utilization.gpu,memory.used --format=csv > "$RES/bench_gpu_state_ddp.txt" 2>&1
  [ -f "$DATA" ] || $PY -m sctlib.data natural "$DATA" --resolution 32 --no-progress
  # Issue 12: 2 GPUs vs 1 at 128 images per GPU, the presets' own defaults (compiled; for CIFAR-10 since the sixth
  # session of 2026-11-29 also grad_sync=allreduce and data_on_device), through the CLI.
  # (one preset: with cold compiles the 1- and 2-process runs take ~3 and ~4 minutes)
  b bench_cli_ddp ${DDP_SECONDS:-480} $PY benchmarks/cli_throughput.py --data "$DATA" --presets ${DDP_PRESETS:-cifar10-sct} \
      --nproc 1,2 --ticks 4 --steps-per-tick 20 --out "$RES/bench_cli_ddp.json"
  # The weights of 2 processes vs 1 with the same global batch (NCCL), SCT with the gathered global batch as the
  # reference set; compiled, so that the compiled target pass of a DDP run is checked (eager ECT and SCT are in
  # benchmarks/results/h200x2_ddp_nccl_*.json). DDP_EQUIV="task:key=value+key=value ..." picks the rows.
  for row in ${DDP_EQUIV:-sct:compile=true}; do
    task=${row%%:*}; over=; [[ $row == *:* ]] && over=${row#*:}
    b bench_ddp_equivalence_${task}_${over//[^a-z0-9]/_} 150 $PY benchmarks/ddp_equivalence.py --nproc 2 --device cuda \
        --preset digits-$task --total-nimg 4096 --extra loss.ref_source=all ${over//+/ }
  done
  ;;
ddp-probe)
  # Issue 12: two compiled processes reached 80% of twice one (benchmarks/results/h200x2_cli_ddp.json); where do the
  # other 20% go? Each probe changes one thing against the preset's defaults, 1 and 2 processes in the same
  # invocation. DDP_PROBES picks and orders them (default: all, ~20 min with cold compiles: split across calls).
  [ -f "$DATA" ] || $PY -m sctlib.data natural "$DATA" --resolution 32 --no-progress
  for probe in ${DDP_PROBES:-preload nccl bucket eager cudagraphs equiv data}; do
    case $probe in
    preload)  # the set decoded before training: a short run otherwise decodes every image in the step (first pass;
              # later passes read a per-process cache), ~0.3 ms per image on a 2-core CPU (data_throughput.py)
      b bench_cli_ddp_preload 480 $PY benchmarks/cli_throughput.py --data "$DATA" --presets cifar10-sct --nproc 1,2 --ticks 4 \
          --steps-per-tick 20 --extra data_preload=true --label "data_preload" --out "$RES/bench_cli_ddp_preload.json" ;;
    data)  # the decoding alone on this host's CPU: per item (first pass, cached, preloaded), per worker count
      b bench_data_throughput 240 $PY benchmarks/data_throughput.py --data "$DATA" --workers 0,2,4,8 \
          --out "$RES/bench_data_throughput.json" ;;
    nccl)  # NVLink or not: the all-reduce rate at the gradient sizes of DDPM++ (212 MiB) and EDM2-S (1,068 MiB)
      b bench_nccl_bandwidth 90 $PY -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/nccl_bandwidth.py \
          --mib 25,212,1068 --out "$RES/bench_nccl_bandwidth.json" ;;
    bucket)  # one 1000 MiB gradient bucket: under compile two graph pieces (DDP's split keeps a 1 MiB first piece)
             # instead of one per 25 MiB bucket; the all-reduce then waits for the end of the backward pass
      b bench_cli_ddp_bucket 420 $PY benchmarks/cli_throughput.py --data "$DATA" --presets cifar10-sct --nproc 1,2 --ticks 4 \
          --steps-per-tick 20 --extra ddp_bucket_mb=1000 --label "1000 MiB gradient buckets" --out "$RES/bench_cli_ddp_bucket.json" ;;
    eager)  # DDP without the compiler
      b bench_cli_ddp_eager 300 $PY benchmarks/cli_throughput.py --data "$DATA" --presets cifar10-sct --nproc 1,2 --ticks 4 \
          --steps-per-tick 20 --extra compile=false channels_last=false --label "eager NCHW" --out "$RES/bench_cli_ddp_eager.json" ;;
    cudagraphs)  # CUDA graphs through the CLI (+5% in train_throughput.py), one and two processes
      b bench_cli_ddp_cudagraphs 480 $PY benchmarks/cli_throughput.py --data "$DATA" --presets cifar10-sct --nproc 1,2 --ticks 4 \
          --steps-per-tick 20 --extra compile_mode=reduce-overhead --label "CUDA graphs" --out "$RES/bench_cli_ddp_cudagraphs.json" ;;
    allreduce-device)  # one all-reduce after the backward pass (the compiled graph of one process kept whole) and
                       # the set held on the GPU: the CIFAR-10 presets' defaults since 2026-11-29 (sixth session)
      # One call of its own (540 s). 2026-11-29 (sixth session): the 2-process cold compile took 165 s (first tick),
      # like one process's; efficiencies 0.833 and 0.891 in two runs, ticks spreading 8-24%. So: 2,1,1,2 = two
      # independent pairs (each 2-process row against its neighbouring 1-process row), the cold compile in the
      # first 2-process run; each run's output in logs_allreduce_device/ as it runs, the GPUs sampled every 5 s.
      nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv -l 5 > "$RES/smi_allreduce_device.csv" 2>&1 &
      smi=$!
      TORCH_LOGS=${TORCH_LOGS:-recompiles} b bench_cli_allreduce_device 540 $PY benchmarks/cli_throughput.py --data "$DATA" \
          --presets cifar10-sct --nproc 2,1,1,2 --ticks 8 --steps-per-tick 30 --skip-ticks 3 \
          --extra grad_sync=allreduce data_on_device=true --label "grad_sync=allreduce data_on_device" \
          --logs "$RES/logs_allreduce_device" --out "$RES/bench_cli_allreduce_device.json"
      kill $smi ;;
    omp)  # torchrun gives each worker OMP_NUM_THREADS=1, a single process gets every core: one process both ways
      OMP_NUM_THREADS=1 b bench_cli_omp1 200 $PY benchmarks/cli_throughput.py --data "$DATA" --presets cifar10-sct \
          --nproc 1,1 --ticks 8 --steps-per-tick 30 --skip-ticks 3 --label "OMP_NUM_THREADS=1" --out "$RES/bench_cli_omp1.json"
      b bench_cli_omp_default 200 $PY benchmarks/cli_throughput.py --data "$DATA" --presets cifar10-sct \
          --nproc 1,1 --ticks 8 --steps-per-tick 30 --skip-ticks 3 --label "OMP default" --out "$RES/bench_cli_omp_default.json" ;;
    ddp-sync)  # the preset's defaults with DDP instead of one all-reduce, 2-process rows alternating with the default
      b bench_cli_ddp_sync 300 $PY benchmarks/cli_throughput.py --data "$DATA" --presets cifar10-sct --nproc 2 \
          --ticks 8 --steps-per-tick 30 --skip-ticks 3 --extra grad_sync=ddp --label "grad_sync=ddp" \
          --out "$RES/bench_cli_ddp_sync.json"
      b bench_cli_allreduce_sync 150 $PY benchmarks/cli_throughput.py --data "$DATA" --presets cifar10-sct --nproc 2 \
          --ticks 8 --steps-per-tick 30 --skip-ticks 3 --label "grad_sync=allreduce (default)" \
          --out "$RES/bench_cli_allreduce_sync.json" ;;
    equiv-allreduce)  # compiled 2 processes with grad_sync=allreduce vs one compiled process, and compiled vs eager
      b bench_ddp_equivalence_allreduce 330 $PY benchmarks/ddp_equivalence.py --nproc 2 --device cuda --preset digits-sct \
          --total-nimg 4096 --extra loss.ref_source=all compile=true net.dropout=0 grad_sync=allreduce \
          --yardstick compile=false ;;
    equiv)  # compiled DDP vs one compiled process, next to compiled vs eager in one process (the tolerance's scale)
      b bench_ddp_equivalence_compiled 240 $PY benchmarks/ddp_equivalence.py --nproc 2 --device cuda --preset digits-sct \
          --total-nimg 4096 --extra loss.ref_source=all compile=true net.dropout=0 --yardstick compile=false ;;
    *) echo "unknown probe $probe (preload nccl bucket eager cudagraphs equiv data allreduce-device omp ddp-sync equiv-allreduce)" >&2 ;;
    esac
  done
  ;;
compile)
  # Issue 12: does the compiled step keep eager's loss and gradients (dropout off: compiled dropout draws other
  # masks), against eager's own floor and eager TF32 as the yardstick? Both nets, SCT (~6 min: two compiles).
  # fused-adam: the fused Adam kernel against the multi-tensor one (EDM2-S; DDPM++ trains with RAdam).
  b bench_compile_check 420 $PY benchmarks/compile_check.py --tasks sct --steps 2 \
      --variants eager,eager-again,compiled,eager-tf32,fused-adam --out "$RES/bench_compile_check.json"
  ;;
compile-late)
  # Issue 12: the compile check above starts at stage 0, where ECT's target is the data point; at stage 3 the target
  # pass runs the network, and every variant is also compared with eager fp32 (TF32 off), the exact reference.
  b bench_compile_check_late 480 $PY benchmarks/compile_check.py --tasks sct --steps 2 --stage 3 \
      --variants eager,compiled,eager-tf32,eager-fp32 --out "$RES/bench_compile_check_late.json"
  ;;
compile-warm)
  # Issue 12: EDM2 initialises its output gain to 0, so from its initialisation (the checks above) the first gradient is
  # that one number's; from weights after 4 eager steps every layer's gradient is compared (~6 min: one EDM2-S compile).
  b bench_compile_check_warm 480 $PY benchmarks/compile_check.py --nets ${WARM_NETS:-imagenet64-s} --tasks sct --steps 2 \
      --init-steps 4 --stage ${WARM_STAGE:-3} --variants eager,compiled,eager-tf32,eager-fp32 --out "$RES/bench_compile_check_warm.json"
  ;;
profile)
  # Issue 12: where the step's time goes, per kernel category and per phase, eager bf16 and compiled (the
  # compiled net as compile_check builds it - SCT, batch references, dropout 0 - so that one compile serves both).
  for v in ${PROFILE_VARIANTS:-bf16 bf16+cl+compile}; do
    b bench_profile_$v ${PROFILE_SECONDS:-330} $PY benchmarks/profile_step.py --nets ${PROFILE_NETS:-cifar10,imagenet64-s} \
        --task sct --variant $v --extra net.dropout=0 --out "$RES/bench_profile_$v.json"
  done
  ;;
profile-ddp)
  # Issue 12: where a two-process step's time goes (2 GPUs): the compiled SCT step of DDPM++ (synthetic set on the GPU,
  # batch references, dropout off, 128 images per process) in one process, then in two under torchrun with the
  # preset's grad_sync=allreduce, then with DDP; every process writes its own profile (bench_profile_2proc*.rank<r>.json).
  for n in 1 2; do
    launch="$PY"; [ $n -gt 1 ] && launch="$PY -m torch.distributed.run --standalone --nproc_per_node=$n"
    b bench_profile_${n}proc 240 $launch benchmarks/profile_step.py --nets cifar10 --task sct --variant bf16+cl+compile \
        --extra net.dropout=0 --out "$RES/bench_profile_${n}proc.json"
  done
  b bench_profile_2proc_ddp 240 $PY -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/profile_step.py \
      --nets cifar10 --task sct --variant bf16+cl+compile --extra net.dropout=0 grad_sync=ddp --out "$RES/bench_profile_2proc_ddp.json"
  ;;
no-sync)
  # Issue 12: what the step's one host sync (the skip decision on a non-finite gradient) costs: the compiled step with
  # it and with it assumed 'finite' (an upper bound of deciding on the device), interleaved; mean losses side by side.
  b bench_throughput_no_sync ${NO_SYNC_SECONDS:-360} $PY benchmarks/train_throughput.py --nets ${NO_SYNC_NETS:-cifar10} \
      --tasks ect,sct --variants bf16+cl+compile,bf16+cl+compile+no-sync --steps 10 --rounds 5 --warmup 5 \
      --out "$RES/bench_throughput_no_sync.json"
  ;;
adam)
  # Issue 12: PyTorch's fused Adam kernel against its multi-tensor one in the EDM2-S step (eager bf16; the
  # optimizer runs outside the compiled network, so the difference carries over to the compiled step).
  b bench_throughput_adam 120 $PY benchmarks/train_throughput.py --nets imagenet64-s --tasks ect \
      --variants bf16,bf16+fused-adam --steps 5 --rounds 4 --warmup 3 --out "$RES/bench_throughput_adam.json"
  ;;
cudagraphs)
  # Issue 12: compiled DDPM++ SCT runs kernels 78 of its 111 ms (book/results/h200_profile_step.json); CUDA graphs
  # (compile_mode=reduce-overhead) take the host out of the step. Speed interleaved with the default compile, then
  # the numbers against eager (~8 min: three compiles of DDPM++).
  b bench_throughput_cudagraphs 300 $PY benchmarks/train_throughput.py --nets cifar10 --tasks ect,sct \
      --variants bf16+cl+compile,bf16+cl+compile+cudagraphs --steps 10 --rounds 4 --warmup 5 \
      --out "$RES/bench_throughput_cudagraphs.json"
  b bench_compile_check_cudagraphs 240 $PY benchmarks/compile_check.py --nets cifar10 --tasks sct --steps 2 \
      --variants eager,cudagraphs --out "$RES/bench_compile_check_cudagraphs.json"
  ;;
compile-cli)
  # Issue 12: the CLI as a user runs it: the presets' defaults (compile + channels-last since 2026-11-29; compile
  # warm-up in the first tick), then the same with eager NCHW.
  b bench_cli_compile 420 $PY benchmarks/cli_throughput.py --data "$DATA" --presets cifar10-ect,cifar10-sct --nproc 1 \
      --ticks 5 --steps-per-tick 20 --label "preset defaults (compile + channels-last)" --out "$RES/bench_cli_compile.json"
  b bench_cli_eager 300 $PY benchmarks/cli_throughput.py --data "$DATA" --presets cifar10-ect,cifar10-sct --nproc 1 \
      --ticks 5 --steps-per-tick 20 --extra compile=false channels_last=false --label "eager NCHW" \
      --out "$RES/bench_cli_eager.json"
  ;;
*) echo "unknown stage $1" >&2; exit 2 ;;
esac
