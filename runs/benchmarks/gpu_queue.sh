#!/usr/bin/env bash
# One device machine, several benchmarks back to back in a background process that outlives the 10-minute
# command limit (the machine is held up to 30 minutes; each call polls and collects). Every comparison runs
# whole in one process on this card: teacher and student rows of one table are never merged across machines.
#
#   call 1: carry .stage1:  mkdir -p /root/stage1 && cp .stage1/* /root/stage1/
#   call 2: carry .stage2:  eval "$(bash .stage2/install.sh)" && bash runs/benchmarks/gpu_queue.sh start JOB...
#   later:  bash runs/benchmarks/gpu_queue.sh wait 540      # waits up to 540 s, then collects into $OUT
# Issue the next `wait` as soon as one returns: a machine idle for 30 s is given back, with its queue.
# `start` copies the kernels-ab baselines (AB_BASELINES, AB4K_BASELINES: copies of kernels/ under .stage2) to
# $ROOT first: a call that did not carry .stage2 left the job that started during it without the directory
# (twice in the eighteenth session: kernels-ab4k, queued after kernels-ab, found no baseline).
# On a machine with several GPUs, LANE=N runs a queue on GPU N beside the others (its own log, queueN.log);
# LANE=2,3 gives a queue two cards (for fsdp-two). `wait` waits for every lane. Each comparison still runs
# whole in one process on one card.
#   LANE=0 bash runs/benchmarks/gpu_queue.sh start memory llama8b; LANE=1 bash ... start gpu-tests ctx128k kernels
#
# Jobs, run in the order given (rough minutes in brackets, measured where a card and session are named; the
# teacher's decode step is compiled anew for every (context, batch) point, ~45 s each, because its cache length
# differs; the student's once per batch size):
#   memory      SmolLM2 students (eager and compiled decode step), 1k-64k x batch 1/8/32: decode memory after
#               the cache-leak fix, against the fifth session's same-process table (issue 9)  [11, H200 6th]
#   gpu-tests   the GPU-marked tests of kernels and inference                                  [4, H200 6th]
#   kernel-tests  the GPU-marked kernel tests alone (no teacher needed)                   [4.5, H200 13th and 17th]
#   llama8b     Llama-3.1-8B shape, teacher + student, the student's decode step as a CUDA graph and also
#               compiled: the graphed step alone ran 11.6 ms, 2.4x its 16 GB weight-read roofline (H100 8th),
#               4k/32k/64k x batch 1/8 (issue 9)                              [8 without student_compiled, H100 8th]
#   llama8b-full  the same on issue 9's whole grid: contexts 1k-128k x batch 1/8/32 (points that do not fit
#               are recorded as out of memory); --resume skips the points `llama8b` measured. [~50 by the 9th
#               session's ~1 min per point and model: more than one hold; the grid is llama8b + llama8b-short +
#               llama8b-long, e.g. on the two cards of one nvidia-h100-x2 hold]
#   ctx128k     SmolLM2 teacher + students at 131,072 tokens (issue 9: "128k where it fits")  [14, H200 6th]
#   kernels     the mLSTM benchmark, per-kernel profile and host time per call (Triton's launch path apart, host
#               time per torch op), ours (1 and 8 docs, each chunk size) and limit_chunk also replayed from CUDA
#               graphs, the hybrid mixer also compiled as training runs it (issue 3)
#               [6, H100 8th; 6 for four shapes on a cold H200, 13th, where a failed compile and capture then
#               left the fifth shape out of memory]
#   kernels-trace  the two S = 4096 shapes with Chrome traces of ours at L = 64 and 128, 1 and 8 documents (eager;
#               the twelfth session's open question: L = 128 took 1.49 ms eager for 0.68 ms of kernels), the
#               mixer graphed and compiled                                                 [~3, H200 13th]
#   kernels-ab  an A/B of a kernel change: ours beside other copies of kernels/ in one process, alternating, 1 and 8
#               documents, eager and graphed, peers beside; AB_BASELINES="NAME=DIR ..." (DIR a copy of kernels/, e.g.
#               from `git archive COMMIT kernels`, carried in .stage2), AB_SHAPES indices (default 1,2,4: 16k, 64k,
#               (2, 9, 16384, 64)); per-kernel profiles of ours, 1 and 8 documents             [5-6.5, H200 18th]
#   kernels-ab4k  the same A/B at the two S = 4096 shapes, with AB4K_BASELINES (S = 4096 is host-bound eagerly,
#               so host-side changes are compared there)                                       [4, H100 15th]
#   kernels-sweep  the kernels job with the state-tile and launch sweeps                          [8, H200 7th]
#   kernels-segments  per-kernel GPU time of ours at state_segments 1, 2, 4, 8 (kernels/benchmarks/bench_segments.py;
#               SEG_SHAPES indices, default all five; SEG_DOCS documents per row, default 0: one) (issue 3) [0.5, H200 18th]
#   kernels-gates  the gate-gradient kernels alone over block sizes and warps (kernels/benchmarks/bench_gates.py)
#               (issue 3)                                                                       [1, H200 18th]
#   kernels-variants  ours under LAUNCH_GRID entries (bench_mlstm.py) against the defaults, eager and from CUDA graphs
#               (the graphed times pick the winners), peers beside: SWEEP="name,name" (required), SWEEP_SHAPES
#               (indices, default all five) (issue 3; docs/kernels.md)                                  [6.5 for four entries, H200 18th]
#   smollm2     the whole SmolLM2 table, teacher + students, profiles at 4k and 64k (issue 9)           [24]
#   stage2      stage II eager vs compiled blocks, profiled (issue 4)                                   [3]
#   snapshot    allocation sites alive at decode start, SmolLM2 student, batch 8 (diagnosis)           [2]
#   ablations   issue 10's small-budget ablations, two lanes (runs/smollm2/ablations.sh; ABL_GPUS=1: one) into
#               $ROOT/ablations; two cards (e.g. LANE=2,3) unless ABL_GPUS=1; `offline_bundle.sh unpack` done
#               before it starts                                     [> 30, 2 x H100 8th, shared host]
#   fsdp-setup, fsdp-two, fsdp-lanes, fsdp-wintie, fsdp-four, fsdp-stage3, fsdp-summary
#               issue 7: runs/multinode/verify_fsdp.sh's phases of those names, in $ROOT/fsdp, each job capped at
#               FSDP_JOB_SECONDS (default 300). The phases name their cards as positions among those given:
#               without LANE all cards (lanes uses 0-2, four all four); LANE=2,3 fsdp-setup fsdp-two fsdp-summary
#               runs the 1- and 2-GPU half on two cards. FSDP_SKIP: jobs to leave out; BIG_STEPS: steps of the
#               8B jobs (12). Ninth session, 4 x H200: setup 2 min, lanes 4 min, wintie 1.5 min, align8b_4 and
#               kdmix8b_4 1.5 min each. Tenth, 4 x H100, BIG_STEPS=30: setup 1.5, two 5.5, four 6.3, lanes (resume2
#               only) 1, wintie 1.3 min
#   await-JOB   waits until JOB has ended in any lane of this machine (each ended job leaves $ROOT/flags/JOB),
#               at most AWAIT_SECONDS (default 1200): lets a 4-GPU job start only when the card-3 lane is free.
#               The waiting lane idles for as long as the awaited job runs: await only jobs with a measured time
#   llama8b-short  the Llama-3.1-8B rows `llama8b` leaves out at 1k and 16k, batch 1/8/32 (issue 9)
#               [18, H200 9th, beside FSDP jobs]
#   llama8b-long   the rest of issue 9's 8B grid: llama8b-128k (128k at batch 1/8/32) then llama8b-b32 (batch 32
#               at 4k/32k/64k); points that do not fit are recorded as out of memory. The two halves can run in
#               two lanes                                                           [~20, by the 9th's per-point time]
#
# Ninth session, one 4-GPU hold: FSDP 1- and 2-GPU jobs on cards 0-2 beside issue 10's last ablation arm on card 3
# (14 min, H200), then the 4-GPU jobs once the lanes on cards 2 and 3 had ended (docs/multigpu.md):
#   bash runs/benchmarks/gpu_queue.sh start fsdp-setup fsdp-lanes fsdp-wintie await-ablations \
#        await-llama8b-short fsdp-four fsdp-summary
#   LANE=3 ABL_ARMS=mixer-linear ABL_GPUS=1 bash runs/benchmarks/gpu_queue.sh start ablations
#   LANE=2 bash runs/benchmarks/gpu_queue.sh start await-fsdp-lanes llama8b-short
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=/root/bench
LANE=${LANE:-}

job() {
  local B="python3 runs/benchmarks/bench_inference.py" S="--models teacher student student_compiled --resume"
  case $1 in
    memory) $B --shape smollm2 --contexts 1024 4096 16384 32768 65536 --batches 1 8 32 \
              --models student student_compiled --out $ROOT/memory ;;
    gpu-tests) python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/inference ;;
    kernel-tests) python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels ;;
    llama8b) $B --shape llama8b --contexts 4096 32768 65536 --batches 1 8 --models teacher student student_compiled \
               --resume --out $ROOT/llama8b ;;
    llama8b-full) $B --shape llama8b --contexts 1024 4096 16384 32768 65536 131072 --batches 1 8 32 \
                    --models teacher student student_compiled --resume --out $ROOT/llama8b ;;
    ctx128k) $B --shape smollm2 --contexts 131072 --batches 1 8 32 $S --out $ROOT/ctx128k ;;
    kernels) mkdir -p $ROOT/kernels && python3 kernels/benchmarks/bench_mlstm.py --out $ROOT/kernels --profile \
               --graphs --compiled-mixer ;;
    kernels-trace) mkdir -p $ROOT/kernels-trace && python3 kernels/benchmarks/bench_mlstm.py --out $ROOT/kernels-trace \
               --shapes 0,3 --graphs --profile --trace --compiled-mixer ;;
    kernels-ab|kernels-ab4k) local shapes=${AB_SHAPES:-1,2,4} baselines=${AB_BASELINES:-}
      [[ $1 == kernels-ab ]] || { shapes=0,3; baselines=${AB4K_BASELINES:-}; }
      [[ -n $baselines ]] || { echo "$1: name the baselines (AB_BASELINES / AB4K_BASELINES)" >&2; return 2; }
      mkdir -p $ROOT/$1 && python3 kernels/benchmarks/bench_mlstm.py --out $ROOT/$1 --shapes $shapes --chunks "" \
        --graphs --profile $(printf -- '--baseline %s ' $baselines) ;;
    kernels-sweep) mkdir -p $ROOT/kernels && python3 kernels/benchmarks/bench_mlstm.py --out $ROOT/kernels \
               --state-blocks 16,32,64 --launch-sweep ;;
    kernels-segments) python3 kernels/benchmarks/bench_segments.py --out $ROOT/kernels-segments \
        --shapes ${SEG_SHAPES:-all} --docs ${SEG_DOCS:-0} ;;
    kernels-gates) mkdir -p $ROOT/kernels-gates && python3 kernels/benchmarks/bench_gates.py --out $ROOT/kernels-gates ;;
    kernels-variants) [[ -n ${SWEEP:-} ]] || { echo "kernels-variants: name the LAUNCH_GRID entries (SWEEP)" >&2; return 2; }
      mkdir -p $ROOT/kernels-variants && python3 kernels/benchmarks/bench_mlstm.py --out $ROOT/kernels-variants \
        --shapes ${SWEEP_SHAPES:-all} --chunks "" --graphs --launch-sweep "$SWEEP" ;;
    smollm2) $B --shape smollm2 --contexts 1024 4096 16384 32768 65536 --batches 1 8 32 $S --out $ROOT/smollm2 \
               --profile 4096 65536 ;;
    stage2) python3 runs/benchmarks/bench_stage2.py --seq-len 4096 --batch 4 --steps 6 --warmup 2 --compile-blocks \
              --profile --out $ROOT/stage2.md ;;
    snapshot) $B --shape smollm2 --contexts 1024 16384 65536 --batches 8 --models student --memory-snapshot \
                --out $ROOT/snapshot ;;
    ablations) ABL_OUT=$ROOT/ablations ABL_GPUS=${ABL_GPUS:-2} bash runs/smollm2/ablations.sh ;;
    fsdp-setup|fsdp-two|fsdp-lanes|fsdp-wintie|fsdp-four|fsdp-stage3|fsdp-summary)
      ROOT=$ROOT/fsdp JOB_SECONDS=${FSDP_JOB_SECONDS:-300} SKIP=${FSDP_SKIP:-} \
        bash runs/multinode/verify_fsdp.sh "${1#fsdp-}" ;;
    await-*) local flag=$ROOT/flags/${1#await-} end=$((SECONDS + ${AWAIT_SECONDS:-1200}))
      while [[ ! -e $flag ]] && (( SECONDS < end )); do sleep 5; done
      [[ -e $flag ]] || { echo "${1#await-} did not end within ${AWAIT_SECONDS:-1200} s" >&2; return 1; } ;;
    llama8b-short) $B --shape llama8b --contexts 1024 16384 --batches 1 8 32 \
                     --models teacher student student_compiled --resume --out $ROOT/llama8b ;;
    llama8b-long) job llama8b-128k && job llama8b-b32 ;;
    llama8b-128k) $B --shape llama8b --contexts 131072 --batches 1 8 32 --models teacher student student_compiled \
                    --resume --out $ROOT/llama8b-128k ;;
    llama8b-b32) $B --shape llama8b --contexts 4096 32768 65536 --batches 32 \
                   --models teacher student student_compiled --resume --out $ROOT/llama8b-b32 ;;
    *) echo "unknown job $1" >&2; return 2 ;;
  esac
}

case ${1:-} in
  start)
    shift
    (( $# )) || { echo "name the jobs to run (see the header)" >&2; exit 2; }
    for j in "$@"; do
      [[ $j == await-* ]] || grep -qE "^    ([a-z0-9|-]+\|)?$j[|)]" "$0" || { echo "unknown job $j" >&2; exit 2; }
    done
    mkdir -p "$ROOT/flags"
    # the A/B baselines copied out of the working tree, which a later call that does not carry .stage2 leaves
    # without them (header)
    for var in AB_BASELINES AB4K_BASELINES; do
      specs=""
      for spec in ${!var:-}; do
        name=${spec%%=*} dir=${spec#*=}
        [[ -f $dir/__init__.py ]] || { echo "$var: $spec is not NAME=DIR with DIR a copy of kernels/" >&2; exit 2; }
        rm -rf "$ROOT/ab-baselines/$name" && mkdir -p "$ROOT/ab-baselines/$name" \
          && cp -r "$dir/." "$ROOT/ab-baselines/$name/"
        specs+="$name=$ROOT/ab-baselines/$name "
      done
      [[ -z $specs ]] || export "$var=$specs"
    done
    [[ -z $LANE ]] || export CUDA_VISIBLE_DEVICES=$LANE
    source runs/smollm2/device_env.sh >/dev/null
    export OMP_NUM_THREADS=8 ROOT
    export -f job
    setsid nohup bash -c '
      for j in "$@"; do
        echo "=== $(date -u +%T) $j"; job "$j"; echo "=== rc=$? $(date -u +%T)"; touch "$ROOT/flags/$j"
      done
      echo QUEUE-DONE
    ' queue "$@" > "$ROOT/queue${LANE//,/-}.log" 2>&1 < /dev/null &
    echo "queue started ($*): $ROOT/queue${LANE//,/-}.log"
    ;;
  wait)
    end=$((SECONDS + ${2:-540}))
    running() { for log in "$ROOT"/queue*.log; do grep -q QUEUE-DONE "$log" || return 0; done; return 1; }
    while (( SECONDS < end )) && running; do sleep 10; done
    for log in "$ROOT"/queue*.log; do
      echo "--- $log"; grep -E '^(===|\{)|\[smollm2\]|Error|error|passed|failed' "$log" | tail -40
    done
    out=${DEVICE_OUT:-$OUT}
    # checkpoints stay behind: the small FSDP runs' last.ckpt alone made the tarball 4.3 GB (ninth session)
    (cd "$ROOT" && tar czf "$out/bench.tgz" --ignore-failed-read --exclude='*.ckpt' --exclude=checkpoints \
       $(ls -d */results.json */inference.* */profile.md \
       stage2.md kernels/bench_mlstm.* kernels-trace/* kernels-ab/* kernels-ab4k/* kernels-variants/* kernels-segments/* kernels-gates/* queue*.log fsdp/summary.* fsdp/fsdp.png fsdp/logs fsdp/tb \
       ablations/ablations.md ablations/ablations.png ablations/*/summary.json ablations/*/eval/*.json \
       ablations/*/eval/report.md ablations/*/tb 2>/dev/null))
    ;;
  *) echo "usage: $0 start JOB... | wait [seconds]" >&2; exit 2 ;;
esac
