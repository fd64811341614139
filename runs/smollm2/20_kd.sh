#!/usr/bin/env bash
# Stage II (knowledge distillation) from the stage-I export, on the cached teacher logits, in pieces of at
# most CHUNK_SECONDS resuming from ckpt/kd/last.ckpt. Exit 0: exported to $OUT/kd/student; exit 75: again.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# fail here with the fix rather than deep inside the data module
[[ -f $OUT/align/student/config.json ]] || { echo "no stage-I student in $OUT/align: run 10_align.sh" >&2; exit 1; }
[[ -f $LOGITS/train/manifest.json ]] || { echo "no logit cache in $LOGITS: run 00_cache_logits.sh" >&2; exit 1; }
fit_chunk kd
