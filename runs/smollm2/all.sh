#!/usr/bin/env bash
# The whole recipe in order; each step is called again while it answers 75 (piece ended at CHUNK_SECONDS),
# exactly as separate device calls resume it. 00 needs only the data, so the teacher pass runs first and
# stage II never waits for it.
# With PIECE_SECONDS set (e.g. 540 under the device's 600 s per command), all.sh itself is one piece: every
# step gets the time left as its CHUNK_SECONDS, no step starts with less than MIN_STEP_SECONDS left, and
# all.sh exits 75 when the piece is used up; calling it again carries on where it stopped.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
here=$(dirname "${BASH_SOURCE[0]}")
PIECE_SECONDS=${PIECE_SECONDS:-}
MIN_STEP_SECONDS=${MIN_STEP_SECONDS:-90}   # start-up of a stage (model load, compile) plus one step
for step in 00_cache_logits 10_align 20_kd 30_eval 40_plots; do
  if [[ -z $PIECE_SECONDS ]]; then
    until_done "$here/$step.sh"
    continue
  fi
  while :; do
    left=$((PIECE_SECONDS - SECONDS))
    (( left >= MIN_STEP_SECONDS )) || { echo "[smollm2] piece used up before $step: run all.sh again"; exit "$AGAIN"; }
    rc=0
    CHUNK_SECONDS=$left bash "$here/$step.sh" || rc=$?
    (( rc == 0 )) && break
    (( rc == AGAIN )) || { echo "[smollm2] $step failed (exit status $rc)" >&2; exit "$rc"; }
  done
done
echo "[smollm2] recipe complete in $OUT"
