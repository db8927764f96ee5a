#!/usr/bin/env bash
# Start a one-node SLURM (munged + slurmctld + slurmd) on this machine so tests/test_slurm.py can
# submit the real slurm/*.sh scripts. Idempotent: installs Debian's slurm-wlm and munge only when
# missing, rewrites the config only when it changed, starts only the daemons that are not running.
# Needs root (CI machines and the development VMs are root, without systemd).
#
#   bash .ci/setup_slurm.sh          # prints "[slurm] ready: ..." or why it could not start
#
# Exit status 0 = the node is idle and takes jobs; non-zero = SLURM unusable. The SLURM tests skip
# only where sbatch is missing: installed but not running, they fail and show why.
set -uo pipefail

# This script configures and queries the default cluster (/etc/slurm/slurm.conf), not whatever
# cluster the caller's SLURM_CONF points at (e.g. setup_slurm_multinode.sh's).
unset SLURM_CONF

say() { echo "[slurm] $*"; }
fail() { echo "[slurm] cannot start SLURM: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "needs root (apt-get, munge key, daemons); running as $(id -un)"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || fail "slurm-wlm/munge missing and no apt-get to install them"
    say "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # `update` first only when the package lists are empty (fresh CI images ship none).
    if ! apt-cache show slurm-wlm >/dev/null 2>&1; then
        apt-get update -qq >/dev/null || fail "apt-get update failed (no network to the Debian mirror?)"
    fi
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
        || fail "apt-get install slurm-wlm munge failed"
fi

# --- munge: the credential daemon every SLURM RPC is signed with -------------------------------
id munge >/dev/null 2>&1 || fail "the munge package did not create the 'munge' user"
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    (umask 077 && dd if=/dev/urandom of=/etc/munge/munge.key.tmp bs=1 count=1024 status=none \
        && mv /etc/munge/munge.key.tmp /etc/munge/munge.key) || fail "could not write /etc/munge/munge.key"
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- munged || fail "munged did not start (see /var/log/munge/munged.log)"
    for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n </dev/null | unmunge >/dev/null 2>&1 || fail "munged started but a credential does not round-trip"
fi

# --- slurm.conf: one node, this machine, every core ---------------------------------------------
host=$(hostname -s)
# nproc without the OpenMP limits it honours: run from a test process (OMP_NUM_THREADS=1) it
# would otherwise report 1 CPU, rewrite the config and restart the cluster under running jobs.
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
# SLURM's default RealMemory is 1 MB, which makes every --mem request unsatisfiable.
mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
conf_dir=/etc/slurm
install -d -m 0755 "$conf_dir" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
# linuxproc/none: no cgroup hierarchy or systemd inside the container. cred_expire=10 makes a
# requeued job eligible again after ~25 s instead of the default ~2 minutes.
# CR_CPU lets two 1-task jobs share the node; KillWait gives a trainer time to checkpoint after
# the TERM that precedes a kill.
conf=$(cat <<EOF
ClusterName=mambamia-ci
SlurmctldHost=${host}(127.0.0.1)
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
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
KillWait=60
MinJobAge=600
MaxJobCount=10000
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)
restart=0
if [ "$(cat "$conf_dir/slurm.conf" 2>/dev/null)" != "$conf" ]; then
    printf '%s\n' "$conf" > "$conf_dir/slurm.conf.tmp" && mv "$conf_dir/slurm.conf.tmp" "$conf_dir/slurm.conf"
    restart=1
fi

# A daemon is running when its pid file names a live process: not a zombie (a killed daemon
# stays one until PID 1 reaps it, and `kill -0` still succeeds on it).
running() {
    local pid
    pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null \
        && [ "$(ps -o stat= -p "$pid" 2>/dev/null | cut -c1)" != Z ]
}
stop() {  # stop one daemon by its pid file (a config change needs a restart)
    running "$1" || return 0
    kill "$(cat "$1")"
    for _ in $(seq 50); do running "$1" || return 0; sleep 0.1; done
}
if [ "$restart" = 1 ]; then
    stop /run/slurmd.pid
    stop /run/slurmctld.pid
fi
running /run/slurmctld.pid || slurmctld -i || fail "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
running /run/slurmd.pid || slurmd || fail "slurmd did not start (see /var/log/slurm/slurmd.log)"

# The node registers asynchronously; it may come back DOWN after an unclean stop.
for _ in $(seq 100); do
    state=$(sinfo -h -n "$host" -o '%T' 2>/dev/null | head -1)
    case "$state" in
        idle*|mixed*|allocated*|completing*) break ;;
        down*|drain*|fail*) scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 ;;
    esac
    sleep 0.2
done
case "$state" in
    idle*|mixed*|allocated*|completing*) ;;
    *) fail "node $host is '${state:-unknown}' (see /var/log/slurm/slurmd.log and slurmctld.log)" ;;
esac
say "ready: node $host ($cpus CPUs), partition debug, $(sbatch --version)"
