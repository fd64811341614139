#!/usr/bin/env bash
# One device machine, several benchmarks back to back in a background process that outlives the 10-minute
# command limit (the machine is held up to 30 minutes; each call polls and collects). Rows already measured
# (carried in .bench/<name>/results.json) are kept: every benchmark here resumes.
#
#   call 1: carry .stage1:  mkdir -p /root/stage1 && cp .stage1/* /root/stage1/
#   call 2: carry .stage2 .bench:  eval "$(bash .stage2/install.sh)" && bash runs/benchmarks/gpu_queue.sh start
#   later:  bash runs/benchmarks/gpu_queue.sh wait 540      # waits up to 540 s, then collects into $OUT
#
# The queue (issue 9 first: SmolLM2 student rows, then stage II with its profile (issue 4), then the
# Llama-3.1-8B shape at the targets' points, then its other points, then the GPU-marked tests).
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=/root/bench
case ${1:-} in
  start)
    mkdir -p "$ROOT" && cp -r .bench/. "$ROOT"/ 2>/dev/null
    source runs/smollm2/device_env.sh >/dev/null
    export OMP_NUM_THREADS=8
    setsid nohup bash -c '
      B="python3 runs/benchmarks/bench_inference.py"
      run() { echo "=== $(date -u +%T) $*"; "$@"; echo "=== rc=$? $(date -u +%T)"; }
      run $B --shape smollm2 --contexts 1024 4096 16384 32768 65536 131072 --batches 1 8 32 --out '$ROOT'/smollm2 --resume
      run python3 runs/benchmarks/bench_stage2.py --seq-len 4096 --batch 4 --steps 6 --warmup 2 --profile --out '$ROOT'/stage2.md
      run $B --shape llama8b --contexts 4096 32768 65536 --batches 1 8 --out '$ROOT'/llama8b --resume
      run $B --shape llama8b --contexts 1024 4096 16384 32768 65536 --batches 1 8 32 --out '$ROOT'/llama8b --resume
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
    (cd "$ROOT" && tar czf "$out/bench.tgz" --ignore-failed-read $(ls -d */results.json */inference.* stage2.md 2>/dev/null) queue.log)
    ;;
  *) echo "usage: $0 start | wait [seconds]" >&2; exit 2 ;;
esac
