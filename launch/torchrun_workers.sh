#!/usr/bin/env bash
# Start shoal headless workers on this node with torchrun; run it once on every node.
#
#   # the driver, on any host:
#   shoal serve --distributed-executor-backend external -tp 4 \
#       --driver-host 10.0.0.1 --driver-port 29600
#   # on each of two nodes (NODE_RANK 0 and 1), two workers each:
#   DRIVER_ADDR=10.0.0.1:29600 NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.2 \
#       NPROC_PER_NODE=2 launch/torchrun_workers.sh
#
# Variables: DRIVER_ADDR (required), NPROC_PER_NODE (default: GPUs on this node, else 1),
# NNODES (default 1), NODE_RANK, MASTER_ADDR, MASTER_PORT (torchrun's rendezvous, only
# with NNODES > 1), PYTHON (default python), MAX_RESTARTS (default 0: torchrun restarts
# the node's workers this many times after one dies; the driver takes the new ones
# into a new worker group and its requests carry on, see README "Fault tolerance").
set -euo pipefail
: "${DRIVER_ADDR:?set DRIVER_ADDR=HOST:PORT of the driver (--driver-host/--driver-port)}"
PYTHON=${PYTHON:-python}
NPROC_PER_NODE=${NPROC_PER_NODE:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')}
NNODES=${NNODES:-1}

if [ "$NNODES" -eq 1 ]; then
    where=(--standalone)
else
    : "${MASTER_ADDR:?set MASTER_ADDR (the host of NODE_RANK 0) when NNODES > 1}"
    where=(--nnodes "$NNODES" --node-rank "${NODE_RANK:?set NODE_RANK}"
           --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}")
fi
# torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; LOCAL_SIZE for tools that
# read the DeepSpeed name
export LOCAL_SIZE="$NPROC_PER_NODE"
exec "$PYTHON" -m torch.distributed.run "${where[@]}" --nproc-per-node "$NPROC_PER_NODE" \
    --max-restarts "${MAX_RESTARTS:-0}" \
    -m shoal.cli worker --driver-addr "$DRIVER_ADDR"
