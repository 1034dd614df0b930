#!/bin/bash
# Train across hosts with Open MPI: mpirun starts one `squeezetrain join` per rank; rank 0 (the
# first slot of the host file) runs the coordinator too.
#
#   NP=4 HOSTFILE=hosts cluster/mpi/run.sh [join options…]       e.g. --epochs 30 --checkpoint-dir /shared/ckpt --resume
#
# Environment:
#   NP               ranks to start (required)
#   HOSTFILE         Open MPI host file (default: none, every rank on this machine)
#   MASTER_ADDR      the host rank 0 runs on, as the others reach it (default: the first host of
#                    HOSTFILE, else 127.0.0.1)
#   MASTER_PORT      the coordinator's port (default 29500)
#   SQUEEZETRAIN     the executable (default: squeezetrain on PATH, on every host)
#   MPIRUN_ARGS      more mpirun options (e.g. --oversubscribe to start more ranks than cores)
#   CIFAR10_DIR, SQUEEZETRAIN_KEY_FILE   passed on to every rank when set
#
# The line it runs, for 4 ranks on the hosts of `hosts`:
#   mpirun -np 4 --hostfile hosts --bind-to none -x MASTER_ADDR=node01 -x MASTER_PORT=29500 squeezetrain join …
# (--bind-to none: join places its threads itself; add join --bind-to core to pin them by local rank.)
set -euo pipefail
np=${NP:?set NP to the number of ranks}
if [ -n "${HOSTFILE:-}" ]; then
    master=${MASTER_ADDR:-$(awk '!/^[[:space:]]*#/ && NF { print $1; exit }' "$HOSTFILE")}
else
    master=${MASTER_ADDR:-127.0.0.1}
fi
args=(-np "$np" --bind-to none -x "MASTER_ADDR=$master" -x "MASTER_PORT=${MASTER_PORT:-29500}")
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")
for v in CIFAR10_DIR SQUEEZETRAIN_KEY_FILE; do [ -n "${!v:-}" ] && args+=(-x "$v"); done
[ "$(id -u)" = 0 ] && args+=(--allow-run-as-root)
# shellcheck disable=SC2086  # MPIRUN_ARGS is a list of words
exec mpirun "${args[@]}" ${MPIRUN_ARGS:-} "${SQUEEZETRAIN:-squeezetrain}" join "$@"
