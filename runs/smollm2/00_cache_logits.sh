#!/usr/bin/env bash
# Teacher top-256 log-probs of every stage-II training and validation block, computed once, so stage II
# (and every ablation arm sharing LOGITS) needs no live teacher. Exit 0: both splits cached; exit 75:
# the piece hit CHUNK_SECONDS, run again (write_topk_cache resumes after the last finished shard).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
TOPK=${TOPK:-256}
CACHE_BATCH=${CACHE_BATCH:-16}   # blocks per teacher forward: 16 x 4096 tokens keeps the top-k chunks small
configs kd
start=$SECONDS
for split in train val; do
  [[ -f $LOGITS/$split/manifest.json ]] && { echo "[smollm2] logits/$split: cached earlier"; continue; }
  left=$((CHUNK_SECONDS - (SECONDS - start)))
  (( left > 30 )) || exit $AGAIN
  rc=0
  (cd "$OUT" && timeout --signal=TERM --kill-after=30 "$left" "$XD" cache_logits \
     "[$(IFS=,; echo "${CONFIGS[*]}")]" "$LOGITS" --split "$split" --k "$TOPK" --batch_size "$CACHE_BATCH") || rc=$?
  if [[ $rc == 124 || $rc == 137 ]]; then
    echo "[smollm2] logits/$split: piece ended at the time limit; run the script again to continue"
    exit $AGAIN
  fi
  (( rc == 0 )) || exit "$rc"
done
echo "[smollm2] teacher logits cached in $LOGITS"
