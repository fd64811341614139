# Sourced by the runs/smollm2 scripts: settings from the environment, the per-run overlay, chunked fit.
#
# Environment (all optional):
#   OUT            run folder; the CLI runs inside it, so the recipe's relative paths land there
#                  (default runs/smollm2-out; on the device machine use /root/smollm2: it survives calls)
#   TEACHER        teacher name or folder (default: the configs' smollm2-135m-instruct)
#   STEPS          max_steps of both stages (ALIGN_STEPS / KD_STEPS set one stage); the data subset is
#                  resized to steps x batch x seq_len so the logit cache holds exactly the trained blocks
#   SEQ_LEN, BATCH data.seq_len, data.batch_size
#   EXTRA_CONFIGS  space-separated config files appended to every composition (ablation arms, smoke test)
#   KD_CONFIGS     like EXTRA_CONFIGS, stage II only (loss weightings: AlignmentModule has no ce/kl weights)
#   EXTRA_ARGS     extra arguments of `lit-xdistill fit` (cache_logits takes the config files only)
#   CHUNK_SECONDS  wall-clock length of one piece (default 480: the device allows 600 s per command, and
#                  start-up, the last step and the checkpoint write must fit in the remainder)
#   LOGITS         teacher top-k cache folder (default logits inside OUT; ablation arms share one)
#   TOKEN_CACHE    token cache folder (default token-cache inside OUT; ablation arms share one)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=${OUT:-$REPO/runs/smollm2-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
CHUNK_SECONDS=${CHUNK_SECONDS:-480}
LOGITS=${LOGITS:-$OUT/logits}
XD=${XD:-lit-xdistill}
PY=${PYTHON:-python3}
# exit status of a script whose stage is not finished yet: call it again (EX_TEMPFAIL)
AGAIN=75

# suite_tasks SUITE_YAML: the suite's task names, space-separated, in order.
suite_tasks() {
  "$PY" -c 'import sys, yaml; print(*(t["task"] for t in yaml.safe_load(open(sys.argv[1]))["tasks"]))' "$1"
}

# configs STAGE: the --config chain of a stage (align or kd), ending with the environment overlay.
configs() {
  local stage=$1 extra
  CONFIGS=("$REPO/configs/$stage.yaml" "$REPO/configs/smollm2/data.yaml" "$REPO/configs/smollm2/$stage.yaml")
  local extras=${EXTRA_CONFIGS:-}
  [[ $stage == kd ]] && extras+=" ${KD_CONFIGS:-}"
  for extra in $extras; do
    CONFIGS+=("$(cd "$(dirname "$extra")" && pwd)/$(basename "$extra")")
  done
  env_overlay "$stage"
  CONFIGS+=("$OUT/$stage.env.yaml")
}

# env_overlay STAGE: write $OUT/STAGE.env.yaml from the environment. A file rather than CLI flags because
# cache_logits reads config files only, and it must see the same data settings as the stage it serves.
env_overlay() {
  local stage=$1 steps
  if [[ $stage == align ]]; then steps=${ALIGN_STEPS:-${STEPS:-}}; else steps=${KD_STEPS:-${STEPS:-}}; fi
  TOKEN_CACHE=${TOKEN_CACHE:-} STAGE=$stage STAGE_STEPS=$steps LOGITS=$LOGITS CONFIGS_JOINED="${CONFIGS[*]}" "$PY" - "$OUT/$stage.env.yaml" <<'PY'
import os, sys
import yaml

overlay = {"trainer": {}, "model": {"init_args": {}}, "data": {}}
if os.environ.get("TEACHER"):
    overlay["model"]["init_args"]["teacher"] = {"name": os.environ["TEACHER"]}
    overlay["data"]["tokenizer"] = os.environ["TEACHER"]
if os.environ.get("TOKEN_CACHE"):
    overlay["data"]["cache_dir"] = os.environ["TOKEN_CACHE"]
for env, key in (("SEQ_LEN", "seq_len"), ("BATCH", "batch_size")):
    if os.environ.get(env):
        overlay["data"][key] = int(os.environ[env])
if os.environ["STAGE"] == "kd":
    overlay["data"]["logit_cache"] = os.environ["LOGITS"]
if os.environ["STAGE_STEPS"]:
    # the data subset follows the step count: one pass, and a logit cache of exactly the trained blocks
    merged = {}
    for path in os.environ["CONFIGS_JOINED"].split():
        merged.update(yaml.safe_load(open(path)).get("data") or {})
    merged.update(overlay["data"])
    steps = int(os.environ["STAGE_STEPS"])
    overlay["trainer"] = {"max_steps": steps, "val_check_interval": max(1, min(steps, 250))}
    overlay["data"]["max_train_tokens"] = steps * merged["batch_size"] * merged["seq_len"]
yaml.safe_dump({k: v for k, v in overlay.items() if v and v != {"init_args": {}}}, open(sys.argv[1], "w"))
PY
}

# fit_chunk STAGE: one piece of a stage, at most CHUNK_SECONDS. Resumes from last.ckpt when present.
# Returns 0 when the stage's export exists (finished), AGAIN when another piece is needed.
fit_chunk() {
  local stage=$1 rc=0
  local export_dir="$OUT/$stage/student" last="$OUT/ckpt/$stage/last.ckpt"
  if [[ -f $export_dir/config.json ]]; then
    echo "[smollm2] $stage: finished earlier ($export_dir)"; return 0
  fi
  configs "$stage"
  local args=()
  for c in "${CONFIGS[@]}"; do args+=(--config "$c"); done
  [[ -f $last ]] && args+=(--ckpt_path last)
  # SIGTERM at the deadline: Lightning finishes the running step, PreemptionCheckpoint writes last.ckpt
  # and the process exits 0; timeout then reports 124. --kill-after bounds a hung exit.
  (cd "$OUT" && timeout --signal=TERM --kill-after=60 "$CHUNK_SECONDS" \
     "$XD" fit "${args[@]}" ${EXTRA_ARGS:-}) || rc=$?
  if [[ -f $export_dir/config.json ]]; then
    echo "[smollm2] $stage: finished, student exported to $export_dir"; return 0
  fi
  if [[ $rc == 0 || $rc == 124 || $rc == 137 ]] && [[ -f $last ]]; then
    echo "[smollm2] $stage: piece ended at the time limit; run the script again to continue"; return $AGAIN
  fi
  echo "[smollm2] $stage: failed (exit status $rc)" >&2
  return "$rc"
}

# until_done SCRIPT: call a step again while it answers AGAIN (a piece ended at CHUNK_SECONDS), as
# separate device calls would; fail with its status otherwise.
until_done() {
  local rc
  until rc=0; bash "$1" || rc=$?; (( rc != AGAIN )); do :; done
  (( rc == 0 )) || { echo "[smollm2] $1 failed (exit status $rc)" >&2; return "$rc"; }
}
