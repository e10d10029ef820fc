#!/usr/bin/env bash
# Multi-node training without SLURM: run this once on every node, with the same rendezvous address; torchrun
# starts one process per GPU there and Lightning picks up rank and world size from torchrun's environment.
#
#   # node 0 (its address is the rendezvous point)      # node 1
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 \          NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 \
#     scripts/torchrun.sh --config configs/trainer/multinode.yaml --config configs/lm/tiny.yaml
#
# Variables (defaults in brackets): NNODES [1], NODE_RANK [0], NPROC_PER_NODE [GPUs on this node, else 1],
# MASTER_ADDR [127.0.0.1], MASTER_PORT [29500], POLYFORMER [polyformer: the command to run].
# Everything after the script name goes to `polyformer fit`; num_nodes and devices are appended from the variables,
# because Lightning refuses to run when they disagree with what torchrun started.
set -euo pipefail

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE="$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)"
    [[ "$NPROC_PER_NODE" -ge 1 ]] || NPROC_PER_NODE=1
fi
POLYFORMER="${POLYFORMER:-polyformer}"
# torchrun would otherwise leave every process all cores' worth of threads: oversubscription on CPU nodes.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# Static rendezvous (--node-rank given): every node must start; a missing node makes the others wait, then fail.
exec torchrun \
    --nnodes="$NNODES" \
    --node-rank="$NODE_RANK" \
    --nproc-per-node="$NPROC_PER_NODE" \
    --master-addr="$MASTER_ADDR" \
    --master-port="$MASTER_PORT" \
    --no-python \
    "$POLYFORMER" fit "$@" --trainer.num_nodes="$NNODES" --trainer.devices="$NPROC_PER_NODE"
