#!/usr/bin/env bash
# Stage III at CPU scale with the real SmolLM2-135M-Instruct teacher (float32, live): one stage-I student,
# three stage-II experts from it (prose, code, reference), a generalist with the experts' total token
# budget, the uniform merge (streamed) and the learned merge (MergeModule, learn: true), then the merge
# report (held-out KD loss / perplexity per domain + Win-and-Tie on the quick suite). 57 min measured on 2
# cores with the defaults (docs/merging.md, section 6); EXPERT_STEPS=20 MERGE_STEPS=20: ~38 min (estimate).
# Knobs: OUT, ALIGN_STEPS, EXPERT_STEPS (per expert; the generalist gets 3x), MERGE_STEPS, MIX_TOKENS
# (tokens per domain of the balanced mix), BLOCKS (held-out blocks per domain), EVAL_LIMIT (items per task),
# REPORT_ONLY=1 (skip training: redo the report over the students already in $OUT).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.venv/bin:$PATH"
OUT=${OUT:-runs/stage3-cpu}
ALIGN_STEPS=${ALIGN_STEPS:-80}
EXPERT_STEPS=${EXPERT_STEPS:-40}
MERGE_STEPS=${MERGE_STEPS:-30}
MIX_TOKENS=${MIX_TOKENS:-200000}
BLOCKS=${BLOCKS:-32}
EVAL_LIMIT=${EVAL_LIMIT:-50}
declare -A SOURCE=([prose]=builtin:shakespeare [code]=builtin:python-stdlib [reference]=builtin:gcide)
DOMAINS=(prose code reference)
MIX="[$OUT/mix/prose.jsonl,$OUT/mix/code.jsonl,$OUT/mix/reference.jsonl]"
EXPERTS="[$OUT/experts/prose,$OUT/experts/code,$OUT/experts/reference]"
# every training run: CPU overlay, logs under $OUT, no checkpoints (only the exported students are kept)
RUN=(--trainer.logger.init_args.save_dir "$OUT" --trainer.callbacks '[]' --trainer.enable_checkpointing false)
mkdir -p "$OUT"
TIMES="$OUT/timings.tsv"
[[ ${REPORT_ONLY:-0} == 1 ]] || printf 'step\tseconds\n' > "$TIMES"
START=$(date +%s)
timed() {  # timed NAME COMMAND...: run, append the wall time to $TIMES
  local name=$1 t0
  shift
  echo "== $name ($(date -u +%H:%M:%S) UTC)"
  t0=$(date +%s)
  "$@"
  printf '%s\t%s\n' "$name" "$(($(date +%s) - t0))" >> "$TIMES"
}

if [[ ${REPORT_ONLY:-0} != 1 ]]; then
# A balanced mix (equal tokens of each domain's train split): the data module mixes sources by size
# and prose would be 7 % of a plain mix. Stage I, the generalist and the merge's λ fit read it.
timed "balanced mix" python runs/stage3/balanced_mix.py "$OUT/mix" prose=builtin:shakespeare \
  code=builtin:python-stdlib reference=builtin:gcide --tokens "$MIX_TOKENS"

timed "stage I" lit-xdistill fit --config configs/align.yaml --config configs/demo/cpu.yaml "${RUN[@]}" \
  --trainer.logger.init_args.name align --data.sources "$MIX" \
  --trainer.max_steps "$ALIGN_STEPS" --model.init_args.warmup_steps 10 \
  --model.init_args.export_dir "$OUT/align/student"

# Stage II, LR 1e-4 instead of the paper's 1e-5 (as runs/demo.sh: a run this short has to move).
KD=(--config configs/demo/cpu.yaml "${RUN[@]}" --model.init_args.warmup_steps 5 --model.init_args.lr 1e-4
    --model.init_args.student.init_from "$OUT/align/student")
for d in "${DOMAINS[@]}"; do
  timed "expert $d" lit-xdistill fit --config "configs/experts/$d.yaml" "${KD[@]}" \
    --trainer.logger.init_args.name "expert-$d" --data.sources "[${SOURCE[$d]}]" \
    --trainer.max_steps "$EXPERT_STEPS" --model.init_args.export_dir "$OUT/experts/$d"
done

timed "generalist" lit-xdistill fit --config configs/kd.yaml "${KD[@]}" \
  --trainer.logger.init_args.name generalist --data.sources "$MIX" \
  --trainer.max_steps $((3 * EXPERT_STEPS)) --model.init_args.export_dir "$OUT/generalist/student"

MERGE=(--config configs/merge.yaml --config configs/stage3/merge-cpu.yaml "${RUN[@]}"
       --model.init_args.experts "$EXPERTS" --data.sources "$MIX")
timed "uniform merge" lit-xdistill fit "${MERGE[@]}" --trainer.logger.init_args.name merge-uniform \
  --model.init_args.learn false --model.init_args.export_dir "$OUT/merge-uniform/student"
timed "learned merge" lit-xdistill fit "${MERGE[@]}" --trainer.logger.init_args.name merge-learned \
  --model.init_args.learn true --trainer.max_steps "$MERGE_STEPS" \
  --data.max_train_tokens $((MERGE_STEPS * 4 * 256)) --model.init_args.export_dir "$OUT/merge-learned/student"
fi

MODELS="{\"prose expert\": \"$OUT/experts/prose\", \"code expert\": \"$OUT/experts/code\",
  \"reference expert\": \"$OUT/experts/reference\", \"uniform merge\": \"$OUT/merge-uniform/student\",
  \"learned merge\": \"$OUT/merge-learned/student\", \"generalist\": \"$OUT/generalist/student\",
  \"stage-I student\": \"$OUT/align/student\"}"
HELDOUT='{"prose": ["builtin:shakespeare"], "code": ["builtin:python-stdlib"], "reference": ["builtin:gcide"]}'
# positional: models domains teacher out_dir
timed "report" lit-xdistill merge_report "$MODELS" "$HELDOUT" smollm2-135m-instruct "$OUT" \
  --seq_len 256 --blocks "$BLOCKS" --batch_size 4 --device cpu --suite quick --limit "$EVAL_LIMIT"

[[ ${REPORT_ONLY:-0} == 1 ]] || printf 'total\t%s\n' "$(($(date +%s) - START))" >> "$TIMES"
echo
cat "$OUT/merge_report.md"
echo
cat "$TIMES"
echo "Report: $OUT/merge_report.md, $OUT/merge_report.json, $OUT/merge_report.png (lm-eval files in $OUT/wintie/)"
echo "Learned λ: $OUT/merge-learned/student/merge_coefficients.json"
