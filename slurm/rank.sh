#!/usr/bin/env bash
# One rank of a job step: `srun ... bash slurm/rank.sh CMD ARGS...` (slurm/common.sh's
# mm_launch_srun), run by SLURM on every node of the allocation. Not for users to call.
#
#  - RANK / LOCAL_RANK / NODE_RANK from SLURM's task ids (WORLD_SIZE and MASTER_* come from the
#    batch script through srun's environment);
#  - on several nodes, GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME (unless already set) name the
#    interface this node reaches MASTER_ADDR through: otherwise gloo advertises whatever the
#    hostname resolves to (often 127.0.x.1 in /etc/hosts) and the other nodes cannot connect;
#  - the rank's output also goes to MM_RANK_LOG_DIR/job<id>-rank<R>-<host>.log when that is set;
#  - a first line says where the rank runs, a last line its exit code and the time.
set -uo pipefail

export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID NODE_RANK=$SLURM_NODEID
host=$(hostname -s)

# The interface holding the source address of the route to MASTER_ADDR (on the master node
# itself the route is "local ... dev lo": the interface holding MASTER_ADDR is still the answer).
route_ifname() {
    command -v ip >/dev/null || return 0
    local src
    src=$(ip -o route get "$MASTER_ADDR" 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p')
    [ -n "$src" ] || return 0
    ip -o -4 addr show | awk -v a="$src" '{split($4, p, "/")} p[1] == a {print $2; exit}'
}

# (extract.sh's ranks work alone: no MASTER_ADDR, nothing to choose.)
if [ "${SLURM_JOB_NUM_NODES:-1}" -gt 1 ] && [ -n "${MASTER_ADDR:-}" ]; then
    ifname=$(route_ifname)
    if [ -n "$ifname" ]; then
        export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$ifname} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$ifname}
    fi
fi

if [ -n "${MM_RANK_LOG_DIR:-}" ] && mkdir -p "$MM_RANK_LOG_DIR"; then
    # tee ignores the stop signals SLURM sends to every process of the step: it must outlive
    # the rank to write its last lines (the checkpoint, the exit code).
    exec > >(trap '' USR1 TERM INT; exec tee -a "$MM_RANK_LOG_DIR/job${SLURM_JOB_ID}-rank${RANK}-${host}.log") 2>&1
fi
echo "[rank $RANK on $host] node rank $NODE_RANK, local rank $LOCAL_RANK, master ${MASTER_ADDR:-none}:${MASTER_PORT:-none}," \
    "interface ${GLOO_SOCKET_IFNAME:-${NCCL_SOCKET_IFNAME:-default}}, started $(date -u +%T)"

# The rank handles USR1/TERM itself (checkpoint, exit 85); this shell only waits for its code.
# A trap (not an ignore) leaves the signals' default action in the child.
trap 'interrupted=1' USR1 TERM
"$@" &
pid=$!
while :; do
    interrupted=0
    wait "$pid"
    rc=$?
    [ "$interrupted" = 1 ] && [ "$rc" -gt 128 ] && continue  # the trap returned early, not the rank
    break
done
echo "[rank $RANK on $host] exit code $rc at $(date -u +%T)"
exit "$rc"
