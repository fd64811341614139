#!/usr/bin/env bash
# The whole recipe in order on a machine without a per-command limit; each step is called again while it
# answers 75 (piece ended at CHUNK_SECONDS), exactly as separate device calls resume it.
# 00 needs only the data, so the teacher pass runs first and stage II never waits for it.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
here=$(dirname "${BASH_SOURCE[0]}")
for step in 00_cache_logits 10_align 20_kd 30_eval 40_plots; do
  until_done "$here/$step.sh"
done
