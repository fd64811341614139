#!/usr/bin/env bash
# The whole recipe on one machine with two GPUs, in a background process that outlives the device's 10-minute
# command limit (a machine is held up to 30 minutes). The teacher's suite scores do not depend on training, so
# GPU 1 computes them while GPU 0 caches logits and trains; then both GPUs evaluate the student, each on half
# of the suite's time (MMLU alone is about half: docs/evaluation.md); then held-out perplexity and plots.
#
#   GPU 0: 00_cache_logits -> 10_align -> 20_kd -> student on the tasks other than MMLU
#   GPU 1: teacher on all tasks -> student on MMLU (after 20_kd)
#   then:  30_eval (merge, Win-and-Tie report, held-out perplexity) -> 40_plots
# A suite pass is mostly CPU work (lm-eval builds and tokenizes requests; a 135M model leaves the GPU idle), so
# each GPU runs its tasks as concurrent processes: MMLU, HellaSwag (SPLIT_TASKS) and the rest.
#
# On the device machine, after the staging calls and `offline_bundle.sh unpack` (runs/smollm2/README.md):
#   source runs/smollm2/device_env.sh && KD_CONFIGS=configs/smollm2/ablations/loss-0-1.yaml \
#     ALIGN_STEPS=300 KD_STEPS=500 EVAL_LIMIT=0 EVAL_BATCH=64 bash runs/smollm2/two_gpus.sh start
#   bash runs/smollm2/two_gpus.sh wait 540     # in later calls: waits, prints progress, collects into $DEVICE_OUT
# Settings come from the environment as for all.sh (lib.sh); LATE_TASKS are the tasks split off to GPU 1.
# TRAIN_GPU / EVAL_GPU (default 0 / 1) pick the cards called GPU 0 and GPU 1 above, so a 4-GPU machine can run
# the recipe on two of its cards and something else on the other two. TRAIN_GPU = EVAL_GPU runs it all on one
# card; then take EVAL_BATCH=32: at 64, three suite processes beside the logit-cache writer ran out of an H100's
# 80 GB (MMLU's longest batch asks 16.8 GB for its fp32 log-softmax; 2026-11-27).
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${OUT:-$here/../smollm2-out}
LOG=$OUT/two_gpus.log
LATE_TASKS=${LATE_TASKS:-mmlu}
SPLIT_TASKS=${SPLIT_TASKS:-hellaswag}  # of the other tasks, those evaluated in a process of their own
TRAIN_GPU=${TRAIN_GPU:-0} EVAL_GPU=${EVAL_GPU:-1}

run_all() {
  # no piece limit inside one hold: each script runs to its end (75 only if a step is cut; until_done resumes it)
  export CHUNK_SECONDS=${CHUNK_SECONDS:-100000}
  source "$here/lib.sh"  # until_done, the settings (and set -euo pipefail)
  local suite=${EVAL_SUITE:-$REPO/configs/eval/default.yaml} task split="" rest=""
  for task in $(suite_tasks "$suite"); do  # the suite's tasks other than LATE_TASKS: SPLIT_TASKS, and the rest
    [[ " $LATE_TASKS " == *" $task "* ]] && continue
    if [[ " $SPLIT_TASKS " == *" $task "* ]]; then split+=" $task"; else rest+=" $task"; fi
  done
  split=${split# } rest=${rest# }
  step() { echo "=== $(date -u +%T) GPU $1: ${*:2}"; }
  # parts SIDE "tasks" "tasks" ...: one 30_eval.sh process per non-empty task list, all at once; fails if any does
  parts() {
    local side=$1 pids=() list pid failed=0
    shift
    for list in "$@"; do
      [[ -n ${list// } ]] || continue
      EVAL_SIDE=$side EVAL_TASKS=$list until_done "$here/30_eval.sh" &
      pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    return $failed
  }
  ( export CUDA_VISIBLE_DEVICES=$EVAL_GPU
    step 1 teacher scores: $LATE_TASKS / $split / $rest at once
    # best effort: `evaluate` computes any teacher score missing from the cache, so a failed part costs time,
    # not the run (on an H100 shared with training, MMLU's batch of 64 ran out of memory: see the header)
    parts teacher "$LATE_TASKS" "$split" "$rest" ||
      echo "[smollm2] teacher scores: a part failed; evaluate computes what is missing"
    while [[ ! -f $OUT/kd/student/config.json ]]; do kill -0 $$ 2>/dev/null || exit 1; sleep 10; done  # $$: GPU 0's shell
    step 1 student: $LATE_TASKS
    parts both "$LATE_TASKS" ) &
  local gpu1=$!
  export CUDA_VISIBLE_DEVICES=$TRAIN_GPU
  for script in 00_cache_logits 10_align 20_kd; do
    step 0 "$script"
    until_done "$here/$script.sh"
  done
  # GPU 1 has most likely cached the teacher's scores by now; evaluate computes any that is not
  step 0 student: $split / $rest at once
  parts both "$split" "$rest"
  wait "$gpu1"
  step 0 merge, report, held-out perplexity
  until_done "$here/30_eval.sh"
  step 0 plots
  until_done "$here/40_plots.sh"
  echo RECIPE-DONE
}

case ${1:-} in
  start)
    mkdir -p "$OUT" && : > "$LOG"  # the log exists once `start` returns
    # `run` in a new process of its own (it reads its settings afresh, as a foreground run does), detached so it
    # outlives this call; the wrapper marks a failure in the log
    setsid nohup bash -c 'bash "$1" run || echo "RECIPE-FAILED (exit status $?)"' start "$here/two_gpus.sh" \
      > "$LOG" 2>&1 < /dev/null &
    echo "recipe started in the background: $LOG"
    ;;
  run)  # in the foreground (a machine held long enough); `start` runs this
    run_all
    ;;
  wait)
    # collect(): reports, eval results, plots, TensorBoard events -> $DEVICE_OUT. Sourced first: it sets OUT to
    # the run folder `start` used (a call's own OUT is the device's output folder)
    source "$here/device_env.sh"
    LOG=$OUT/two_gpus.log
    end=$((SECONDS + ${2:-540}))
    while (( SECONDS < end )) && ! grep -qE 'RECIPE-(DONE|FAILED)' "$LOG"; do sleep 10; done
    grep -E '^===|RECIPE-|\[smollm2\]|Error|error:' "$LOG" | tail -40
    collect
    cp "$LOG" "$DEVICE_OUT/"
    ;;
  *) echo "usage: $0 start | run | wait [seconds]" >&2; exit 2 ;;
esac
