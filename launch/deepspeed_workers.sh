#!/usr/bin/env bash
# Start shoal headless workers with the DeepSpeed launcher, from a hostfile.
#
#   # hostfile: one line per node, `<host> slots=<devices>`
#   #   node-0 slots=4
#   #   node-1 slots=4
#   # the driver, on any host:
#   shoal serve --distributed-executor-backend external -tp 8 \
#       --driver-host 10.0.0.1 --driver-port 29600
#   # from one node, reaching the others over ssh (pdsh):
#   DRIVER_ADDR=10.0.0.1:29600 HOSTFILE=hostfile launch/deepspeed_workers.sh
#   # or without ssh: the same command on every node, with its NODE_RANK
#   DRIVER_ADDR=10.0.0.1:29600 HOSTFILE=hostfile NO_SSH=1 NODE_RANK=0 MASTER_ADDR=node-0 \
#       launch/deepspeed_workers.sh
#   # one node, no hostfile:
#   DRIVER_ADDR=127.0.0.1:29600 NUM_GPUS=2 launch/deepspeed_workers.sh
#
# Variables: DRIVER_ADDR (required), HOSTFILE, NO_SSH, NODE_RANK, MASTER_ADDR, MASTER_PORT
# (default 29500), NUM_GPUS (without a hostfile), DEEPSPEED (default deepspeed).
set -euo pipefail
: "${DRIVER_ADDR:?set DRIVER_ADDR=HOST:PORT of the driver (--driver-host/--driver-port)}"
DEEPSPEED=${DEEPSPEED:-deepspeed}
args=(--master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then
    args+=(--hostfile "$HOSTFILE")
    if [ -n "${NO_SSH:-}" ]; then
        args+=(--no_ssh --node_rank "${NODE_RANK:?set NODE_RANK with NO_SSH}"
               --master_addr "${MASTER_ADDR:?set MASTER_ADDR with NO_SSH}")
    else
        args+=(--no_ssh_check)
        [ -n "${MASTER_ADDR:-}" ] && args+=(--master_addr "$MASTER_ADDR")
    fi
else
    args+=(--num_gpus "${NUM_GPUS:-1}")
fi
# the launcher sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE and appends --local_rank=N
exec "$DEEPSPEED" "${args[@]}" --module shoal.cli worker --driver-addr "$DRIVER_ADDR"
