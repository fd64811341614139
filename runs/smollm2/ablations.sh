#!/usr/bin/env bash
# Small-budget ablations (issue 10): mixer (hybrid = mLSTM+SWA+sinks, mLSTM+SWA, mLSTM only, linear
# attention; each with its own stage I and stage II at 0.9/0.1) and stage-II loss weighting (0.5/0.5, 0/1,
# from the hybrid arm's stage-I student). Every arm is the recipe with configs/smollm2/ablations/small.yaml
# and its arm file composed on top; all share one token cache and one teacher logit cache (same blocks).
# Writes $ABL_OUT/ablations.{md,png} (ablation_table.py): validation CE/KL (last validation of stage II)
# and α* (default suite, first ABL_EVAL_LIMIT items per task). Re-running skips finished pieces, like the
# recipe. ABL_GPUS=2 runs the hybrid arm and the loss arms on the first card given beside the other mixer arms
# on the second. ABL_ARMS (space-separated arm names, e.g. "mixer-linear") runs only those arms.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ARMS="mixer-hybrid mixer-swa-nosinks mixer-mlstm mixer-linear loss-0.5-0.5 loss-0-1"
for arm in ${ABL_ARMS:-}; do  # ABL_ARMS="mixer-linear ...": only these arms (e.g. one cut by the device time)
  [[ " $ARMS " == *" $arm "* ]] || { echo "ABL_ARMS: unknown arm $arm (arms: $ARMS)" >&2; exit 2; }
done
wanted() { [[ -z ${ABL_ARMS:-} || " $ABL_ARMS " == *" $1 "* ]]; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ABL_OUT=${ABL_OUT:-$REPO/runs/smollm2-ablations}
mkdir -p "$ABL_OUT"
ABL_OUT=$(cd "$ABL_OUT" && pwd)
arms_dir=$REPO/configs/smollm2/ablations
export TOKEN_CACHE=$ABL_OUT/token-cache LOGITS=$ABL_OUT/logits
export EXTRA_CONFIGS="$arms_dir/small.yaml ${EXTRA_CONFIGS:-}"
export EVAL_LIMIT=${ABL_EVAL_LIMIT:-200}   # ~1 min per model on an H100 (docs/evaluation.md)

OUT=$ABL_OUT/mixer-hybrid until_done "$here/00_cache_logits.sh"
# the teacher's suite scores once, before the arms (they share the cache `evaluate` reads)
OUT=$ABL_OUT/mixer-hybrid EVAL_SIDE=teacher until_done "$here/30_eval.sh"

mixer_arm() {  # its own stage I and stage II at 0.9/0.1
  local mixer=$1 step
  wanted "mixer-$mixer" || return 0
  for step in 10_align 20_kd 30_eval 40_plots; do
    OUT=$ABL_OUT/mixer-$mixer EXTRA_CONFIGS="$EXTRA_CONFIGS $arms_dir/mixer-$mixer.yaml" \
      KD_CONFIGS="$arms_dir/loss-0.9-0.1.yaml" until_done "$here/$step.sh"
  done
}
loss_arm() {  # the hybrid arm's stage-I student; only the stage-II loss differs
  local loss=$1 arm=$ABL_OUT/loss-$1 step
  wanted "loss-$loss" || return 0
  # the hybrid arm's stage I (done already unless ABL_ARMS left the hybrid arm out)
  OUT=$ABL_OUT/mixer-hybrid EXTRA_CONFIGS="$EXTRA_CONFIGS $arms_dir/mixer-hybrid.yaml" until_done "$here/10_align.sh"
  mkdir -p "$arm"
  ln -sfn ../mixer-hybrid/align "$arm/align"
  for step in 20_kd 30_eval 40_plots; do
    OUT=$arm EXTRA_CONFIGS="$EXTRA_CONFIGS $arms_dir/mixer-hybrid.yaml" KD_CONFIGS="$arms_dir/loss-$loss.yaml" \
      until_done "$here/$step.sh"
  done
}
lane_hybrid() { mixer_arm hybrid; loss_arm 0.5-0.5; loss_arm 0-1; }
lane_other_mixers() { mixer_arm swa-nosinks; mixer_arm mlstm; mixer_arm linear; }
# two lanes side by side, one GPU each: > 30 min on two H100s of a host busy with other jobs (2026-11-27: all
# but the last arm's evaluation); the suite evaluations (task set-up on the CPU) take most of it
if (( ${ABL_GPUS:-1} >= 2 )); then
  # the first two of the cards given (CUDA_VISIBLE_DEVICES=2,3: physical 2 and 3; unset: 0 and 1)
  IFS=, read -ra given <<<"${CUDA_VISIBLE_DEVICES:-0,1}"
  (( ${#given[@]} >= 2 )) ||
    { echo "ABL_GPUS=2 needs two cards, CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES}" >&2; exit 2; }
  CUDA_VISIBLE_DEVICES=${given[1]} lane_other_mixers &
  other=$!
  CUDA_VISIBLE_DEVICES=${given[0]} lane_hybrid
  wait "$other"
else
  lane_hybrid
  lane_other_mixers
fi

"$PY" "$here/ablation_table.py" "$ABL_OUT" "${EVAL_SUITE:-$REPO/configs/eval/default.yaml}"
