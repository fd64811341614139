#!/usr/bin/env bash
# Launch one node's share of an FSDP run with torchrun; run it on every node with the same settings.
#
#   STAGE=configs/kd.yaml TEACHER=configs/teachers/llama3.1-8b.yaml runs/multinode/torchrun.sh
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 runs/multinode/torchrun.sh --trainer.max_steps 100   # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 runs/multinode/torchrun.sh --trainer.max_steps 100   # on node1
#
# Config order: stage, teacher (optional), configs/fsdp.yaml, then the node layout, then "$@" (later wins).
# torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; Lightning sees them (TorchElasticEnvironment) and does not
# start processes itself. Run from the repository root (configs and runs/ are relative paths).
set -euo pipefail

STAGE=${STAGE:-configs/kd.yaml}
TEACHER=${TEACHER:-}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi --list-gpus | wc -l)}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

configs=(--config "$STAGE")
if [[ -n "$TEACHER" ]]; then
  configs+=(--config "$TEACHER")
fi
configs+=(--config configs/fsdp.yaml)

exec torchrun \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m lit_xdistill.cli fit "${configs[@]}" \
  --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC_PER_NODE" \
  "$@"
