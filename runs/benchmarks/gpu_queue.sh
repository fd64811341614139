#!/usr/bin/env bash
# One device machine, several benchmarks back to back in a background process that outlives the 10-minute
# command limit (the machine is held up to 30 minutes; each call polls and collects). Every comparison runs
# whole in one process on this card: teacher and student rows of one table are never merged across machines.
# Rows already measured on this machine are kept when a piece is repeated (--resume).
#
#   call 1: carry .stage1:  mkdir -p /root/stage1 && cp .stage1/* /root/stage1/
#   call 2: carry .stage2:  eval "$(bash .stage2/install.sh)" && bash runs/benchmarks/gpu_queue.sh start
#   later:  bash runs/benchmarks/gpu_queue.sh wait 540      # waits up to 540 s, then collects into $OUT
#
# The queue, most needed first (a machine is held 30 minutes at most): issue 9's SmolLM2 table (teacher, student,
# and the student with its compiled decode step), with profiles of prefill and a decode step at 4k and 64k; issue 4's
# stage II eager and with compiled blocks, profiled; a memory snapshot of the student's decode phase; the mLSTM
# kernels with a state-tile sweep (issue 3); the Llama-3.1-8B shape at the targets' points; the GPU-marked tests.
# The teacher's decode step is compiled anew for every (context, batch) point (~45 s each, its cache length
# differs); the student's once per batch size.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=/root/bench
case ${1:-} in
  start)
    mkdir -p "$ROOT"
    source runs/smollm2/device_env.sh >/dev/null
    export OMP_NUM_THREADS=8
    setsid nohup bash -c '
      B="python3 runs/benchmarks/bench_inference.py"
      run() { echo "=== $(date -u +%T) $*"; "$@"; echo "=== rc=$? $(date -u +%T)"; }
      S="--models teacher student student_compiled --resume"
      run $B --shape smollm2 --contexts 1024 4096 16384 32768 65536 --batches 1 8 32 $S --out '$ROOT'/smollm2 --profile 4096 65536
      run python3 runs/benchmarks/bench_stage2.py --seq-len 4096 --batch 4 --steps 6 --warmup 2 --compile-blocks --profile --out '$ROOT'/stage2.md
      run $B --shape smollm2 --contexts 1024 16384 65536 --batches 8 --models student --memory-snapshot --out '$ROOT'/smollm2-memory
      mkdir -p '$ROOT'/kernels && run python3 kernels/benchmarks/bench_mlstm.py --out '$ROOT'/kernels --state-blocks 16,32,64
      run $B --shape llama8b --contexts 4096 32768 65536 --batches 1 8 $S --out '$ROOT'/llama8b
      run python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/inference
      echo QUEUE-DONE
    ' > "$ROOT/queue.log" 2>&1 < /dev/null &
    echo "queue started: $ROOT/queue.log"
    ;;
  wait)
    end=$((SECONDS + ${2:-540}))
    while (( SECONDS < end )) && ! grep -q QUEUE-DONE "$ROOT/queue.log"; do sleep 10; done
    grep -E '^(===|\{)|Error|error' "$ROOT/queue.log" | tail -60
    out=${DEVICE_OUT:-$OUT}
    (cd "$ROOT" && tar czf "$out/bench.tgz" --ignore-failed-read $(ls -d */results.json */inference.* */profile.md stage2.md kernels/bench_mlstm.* 2>/dev/null) queue.log)
    ;;
  *) echo "usage: $0 start | wait [seconds]" >&2; exit 2 ;;
esac
