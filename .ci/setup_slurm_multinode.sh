#!/usr/bin/env bash
# A SLURM cluster of N hosts on this one machine: each host a Linux network namespace with its own
# address, hostname and slurmd; the controller in the root namespace; traffic over veth pairs
# joined by a bridge. tests/test_multinode.py trains across these hosts and kills one of them.
#
#   bash .ci/setup_slurm_multinode.sh [up] [N]   # start (idempotent), N hosts (default 2)
#   bash .ci/setup_slurm_multinode.sh down       # stop the daemons, remove namespaces and links
#   bash .ci/setup_slurm_multinode.sh fail K     # host K dies: link cut, every process killed
#   bash .ci/setup_slurm_multinode.sh status     # exit 0 when every host is up and idle
#
# Then point SLURM's commands at this cluster (the one-node cluster of setup_slurm.sh keeps
# /etc/slurm/slurm.conf and runs beside it on other ports):
#   export SLURM_CONF=/etc/slurm-multinode/slurm.conf
#   sbatch -N 2 --ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=1 slurm/stage2.sh
#
# Addresses: only the ones this script creates, 10.77.0.0/24 on bridge mmbr0 (10.77.0.1 the
# controller, 10.77.0.1K host K, named nodeK). Needs root; installs slurm-wlm and munge through
# setup_slurm.sh (which also starts munged, shared by both clusters through its socket file).
# Every namespace shares the root's file systems: the run folder is "shared storage" by
# construction, as on a cluster with a parallel file system. Except /mnt/node-local: each host
# mounts its own small tmpfs there, like a node's local scratch disk (what a run folder must not be).
set -uo pipefail

say() { echo "[slurm-multinode] $*"; }
fail() { echo "[slurm-multinode] cannot start the cluster: $*" >&2; exit 1; }

NET=10.77.0
BRIDGE=mmbr0
CONF_DIR=/etc/slurm-multinode
CONF=$CONF_DIR/slurm.conf
STATE=/var/spool/slurm-multinode
LOGS=/var/log/slurm-multinode
RUN=/run/slurm-multinode
NODE_LOCAL=/mnt/node-local
NODES_FILE=$CONF_DIR/nodes  # N of the running cluster, for `down` and `fail`

ns() { echo "mm$1"; }           # namespace of host K
veth() { echo "mmv$1"; }        # root-side end of host K's link (the host side is its eth0)
addr() { echo "$NET.$((10 + $1))"; }
# A daemon is running when its pid file names a live process: not a zombie (a killed daemon
# stays one until PID 1 reaps it, and `kill -0` still succeeds on it).
running() {
    local pid
    pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null \
        && [ "$(ps -o stat= -p "$pid" 2>/dev/null | cut -c1)" != Z ]
}
cluster() { SLURM_CONF=$CONF "$@"; }

# Every process whose network namespace is host K's: its slurmd, slurmstepd and job tasks.
ns_pids() { ip netns pids "$(ns "$1")" 2>/dev/null; }

kill_host_processes() {
    local pids
    pids=$(ns_pids "$1")
    [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
    for _ in $(seq 50); do [ -z "$(ns_pids "$1")" ] && return 0; sleep 0.1; done
}

write_conf() {  # N -> slurm.conf (rewritten only when it changed; returns 1 when it did)
    local n=$1 host mem_mb k nodes="" conf
    host=$(hostname -s)
    mem_mb=$(awk -v n="$n" '/^MemTotal:/ {print int($2 / 1024 * 0.9 / n)}' /proc/meminfo)
    for ((k = 1; k <= n; k++)); do nodes+="NodeName=node$k NodeAddr=$(addr "$k") CPUs=2 RealMemory=$mem_mb State=UNKNOWN"$'\n'; done
    # Own ClusterName, ports, state, spool and pid files: the one-node cluster runs beside it.
    # %n: every slurmd of this machine needs its own spool folder, pid file and log.
    # SlurmdTimeout=30: a dead host is marked DOWN (and a --requeue job requeued) 30-45 s after
    # it stopped answering. cred_expire=10: a requeued job may start again after ~25 s.
    # CPUs=2 per host whatever the machine has: one host can take a 2-rank job by itself.
    conf="ClusterName=mambamia-mn
SlurmctldHost=${host}($NET.1)
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdTimeout=30
KillWait=10
MinJobAge=600
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
SlurmctldPort=6827
SlurmdPort=6828
${nodes}PartitionName=mn Nodes=node[1-$n] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
    install -d -m 0755 "$CONF_DIR" "$STATE/ctld" "$LOGS" "$RUN"
    for ((k = 1; k <= n; k++)); do install -d -m 0755 "$STATE/node$k"; done
    [ "$(cat "$CONF" 2>/dev/null)" = "$conf" ] && return 0
    printf '%s\n' "$conf" >"$CONF.tmp" && mv "$CONF.tmp" "$CONF"
    return 1
}

# Host K's files: /etc/hosts naming every host (without it each reverse lookup waits ~10 s and
# gloo may advertise 127.0.0.1) and a resolv.conf that answers at once.
write_host_files() {
    local n=$1 k
    {
        echo "127.0.0.1 localhost"
        echo "$NET.1 $(hostname -s)"
        for ((k = 1; k <= n; k++)); do echo "$(addr "$k") node$k"; done
    } >"$CONF_DIR/hosts"
    echo "nameserver 127.0.0.1" >"$CONF_DIR/resolv.conf"
}

network_up() {  # bridge + one namespace and veth pair per host (each step only when missing)
    local n=$1 k
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge || fail "ip link add $BRIDGE type bridge failed"
    fi
    ip addr show dev "$BRIDGE" | grep -F "inet $NET.1/24" >/dev/null || ip addr add "$NET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for ((k = 1; k <= n; k++)); do
        [ -e "/run/netns/$(ns "$k")" ] || ip netns add "$(ns "$k")" || fail "ip netns add $(ns "$k") failed"
        if ! ip link show "$(veth "$k")" >/dev/null 2>&1; then
            ip link add "$(veth "$k")" type veth peer name "mmh$k" netns "$(ns "$k")" \
                || fail "veth pair for host $k failed"
            ip -n "$(ns "$k")" link set "mmh$k" name eth0
        fi
        ip link set "$(veth "$k")" master "$BRIDGE" up
        ip -n "$(ns "$k")" addr show dev eth0 | grep -F "inet $(addr "$k")/24" >/dev/null \
            || ip -n "$(ns "$k")" addr add "$(addr "$k")/24" dev eth0
        ip -n "$(ns "$k")" link set lo up
        ip -n "$(ns "$k")" link set eth0 up
        ip -n "$(ns "$k")" route replace default via "$NET.1"
    done
}

# slurmd of host K inside its namespace: nsenter, not `ip netns exec` (which remounts /sys, and
# slurmd then fails on cgroups); a private UTS and mount namespace for its hostname and files.
start_slurmd() {
    local k=$1
    running "$RUN/slurmd-node$k.pid" && return 0
    nsenter --net="/run/netns/$(ns "$k")" unshare --uts --mount sh -c \
        "mount --bind $CONF_DIR/hosts /etc/hosts && mount --bind $CONF_DIR/resolv.conf /etc/resolv.conf \
         && mkdir -p $NODE_LOCAL && mount -t tmpfs -o size=64m tmpfs $NODE_LOCAL \
         && hostname node$k && exec slurmd -f $CONF -N node$k" \
        || fail "slurmd of node$k did not start (see $LOGS/slurmd-node$k.log)"
}

stop_daemon() {
    local pid
    running "$1" || return 0
    pid=$(cat "$1")
    kill "$pid"
    for _ in $(seq 50); do running "$1" || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
}

wait_idle() {  # N: every host registered and idle; resumes hosts left DOWN by a failure
    local n=$1 states down
    for _ in $(seq 150); do
        states=$(cluster sinfo -h -N -o '%N %T' 2>/dev/null)
        [ "$(grep -cE ' (idle|mixed|allocated|completing)' <<<"$states")" = "$n" ] && return 0
        down=$(awk '$2 ~ /^(down|drain|fail)/ {print $1}' <<<"$states" | paste -sd, -)
        [ -n "$down" ] && cluster scontrol update NodeName="$down" State=RESUME >/dev/null 2>&1
        sleep 0.2
    done
    fail "hosts not idle after 30 s: $(tr '\n' ' ' <<<"$states") (see $LOGS/)"
}

# Host to host over the bridge (the controller only proves host to root): host 1 connects to
# a closed port of every other host, which answers at once with a reset. Silence instead means a
# host firewall drops bridged traffic (br_netfilter with a DROP forward policy, as Docker
# installs): better found here than as a hung job.
check_links() {
    local n=$1 k
    for ((k = 2; k <= n; k++)); do
        nsenter --net="/run/netns/$(ns 1)" timeout 5 bash -c "exec 3<>/dev/tcp/$(addr "$k")/9" 2>/dev/null
        [ $? != 124 ] || fail "node1 gets no answer from node$k ($(addr "$k")) over $BRIDGE: is bridged traffic filtered (net.bridge.bridge-nf-call-iptables)?"
    done
}

cmd_up() {
    local n=${1:-2} k started restart=0
    [[ "$n" =~ ^[1-9]$ ]] || fail "N: expected 1-9 hosts, got '$n'"
    if [ -s "$NODES_FILE" ] && [ "$(cat "$NODES_FILE")" != "$n" ]; then
        say "cluster has $(cat "$NODES_FILE") hosts, $n asked: rebuilding"
        cmd_down
    fi
    bash "$(dirname "$0")/setup_slurm.sh" >/dev/null || fail "the one-node setup (packages, munge) failed: run .ci/setup_slurm.sh"
    if ! command -v ip >/dev/null || ! command -v nsenter >/dev/null; then  # minimal images lack them
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iproute2 util-linux >/dev/null \
            || fail "ip/nsenter missing and apt-get install iproute2 util-linux failed"
    fi
    started=$(date +%s.%N)
    write_conf "$n" || restart=1
    write_host_files "$n"
    echo "$n" >"$NODES_FILE"
    network_up "$n"
    if [ "$restart" = 1 ]; then
        for ((k = 1; k <= n; k++)); do stop_daemon "$RUN/slurmd-node$k.pid"; done
        stop_daemon "$RUN/slurmctld.pid"
    fi
    running "$RUN/slurmctld.pid" || slurmctld -f "$CONF" -i || fail "slurmctld did not start (see $LOGS/slurmctld.log)"
    # slurmctld returns before it listens; a slurmd that registers too early is only heard
    # again at the controller's next ping, tens of seconds later.
    for _ in $(seq 100); do cluster scontrol ping 2>/dev/null | grep -F "is UP" >/dev/null && break; sleep 0.1; done
    for ((k = 1; k <= n; k++)); do start_slurmd "$k"; done
    wait_idle "$n"
    check_links "$n"
    say "ready: $n hosts idle in $(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') s" \
        "($(for ((k = 1; k <= n; k++)); do printf 'node%s=%s ' "$k" "$(addr "$k")"; done)controller $NET.1); export SLURM_CONF=$CONF"
}

cmd_down() {
    local n k
    n=$(cat "$NODES_FILE" 2>/dev/null || echo 9)
    for ((k = 1; k <= n; k++)); do
        kill_host_processes "$k"
        ip netns del "$(ns "$k")" 2>/dev/null
        ip link del "$(veth "$k")" 2>/dev/null
    done
    stop_daemon "$RUN/slurmctld.pid"
    ip link del "$BRIDGE" 2>/dev/null
    # Forget the jobs and node states of this cluster: the next `up` starts clean.
    rm -rf "$STATE" "$NODES_FILE"
    say "down"
}

cmd_fail() {  # host K as if powered off: link first (no reset reaches the peers), then processes
    local k=${1:?usage: fail K}
    ip link set "$(veth "$k")" down || fail "no host $k"
    kill_host_processes "$k"
    say "host node$k is dead: link $(veth "$k") down, its processes killed (revive: up)"
}

cmd_status() {
    local n
    n=$(cat "$NODES_FILE" 2>/dev/null) || { say "not set up"; return 1; }
    cluster sinfo -N -o '%N %T' 2>/dev/null || { say "controller not answering"; return 1; }
    [ "$(cluster sinfo -h -N -o '%T' 2>/dev/null | grep -cE '^(idle|mixed|allocated)')" = "$n" ]
}

[ "$(id -u)" = 0 ] || fail "needs root (namespaces, links, daemons); running as $(id -un)"
case "${1:-up}" in
    up) cmd_up "${2:-2}" ;;
    down) cmd_down ;;
    fail) cmd_fail "${2:-}" ;;
    status) cmd_status ;;
    [0-9]) cmd_up "$1" ;;
    *) echo "usage: $0 [up [N] | down | fail K | status]" >&2; exit 2 ;;
esac
