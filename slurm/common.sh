# Shared by slurm/extract.sh and slurm/stage{1,2,3}.sh (sourced, never run): rendezvous from
# SLURM's variables, one process per GPU (or 2 CPU processes), signal forwarding, requeue policy.
#
# Process model: ONE SLURM TASK PER GPU (srun starts every rank), not one torchrun per node.
#  - srun relays a signal to every task it started (the batch shell forwards the B:USR1 warning
#    to srun; SLURM's own TERM reaches every task directly), so all ranks see it at once.
#    torchrun has no SIGUSR1 handler (the default action kills the agent, orphaning the workers)
#    and on TERM gives its workers a fixed grace period before SIGKILL, which a large checkpoint
#    can outlast.
#  - The exit code of srun is the ranks' own code, so "85 = checkpointed, requeue me" survives;
#    torchrun reports any non-zero worker exit as 1.
#  - A dead rank ends the step after EXIT_GRACE seconds (srun --wait) instead of hanging the
#    others until a collective timeout; no second supervisor with its own restart policy.
#  Without SLURM the same model is reproduced by mm_launch_local: N background processes with
#  RANK/LOCAL_RANK/WORLD_SIZE set the way torchrun would set them.
#
# Environment read here (all optional):
#   MAMBAMIA      command that runs the CLI (default: `mambamia`, else `python -m trainer.cli`)
#   NPROC         processes per node without SLURM (default: number of GPUs, or CPU_PROCS)
#   CPU_PROCS     processes when there is no GPU (default 2; gloo on the CPU accelerator)
#   MASTER_ADDR   rendezvous address (default: the first node of the allocation as an IPv4
#                 address, 127.0.0.1 on one node; set it when the node's name resolves to an
#                 address the other nodes cannot reach)
#   MASTER_PORT   rendezvous port (default: derived from the job id; a free port locally)
#   GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME  interface the ranks talk over (default on several
#                 nodes: the one each node reaches MASTER_ADDR through; see slurm/rank.sh)
#   MAMBAMIA_PG_TIMEOUT  seconds any collective waits for the other ranks before the rank fails
#                 (default 900, trainer/dist.py): how long survivors of a dead node wait
#   MAX_ATTEMPTS  starts allowed at the same checkpoint step before giving up (default 3)
#   EXIT_GRACE    seconds the other ranks get after the first one exits (default 600)
# shellcheck shell=bash

REQUEUE_EXIT_CODE=85  # trainer.signals.REQUEUE_EXIT_CODE

mm_log() { echo "[mambamia-slurm $(date -u +%H:%M:%S)] $*"; }
mm_die() { echo "[mambamia-slurm] error: $*" >&2; exit 2; }

# How to call the CLI. Relative paths stay relative to the folder the job was submitted from
# (SLURM's working directory), as a user expects of `sbatch`.
mm_setup() {
    if [ -z "${MAMBAMIA:-}" ]; then
        if command -v mambamia >/dev/null; then
            MAMBAMIA=mambamia
        else  # a checkout without `pip install -e .`
            MAMBAMIA="python -m trainer.cli"
            export PYTHONPATH="$MAMBAMIA_ROOT${PYTHONPATH:+:$PYTHONPATH}"
        fi
    fi
    read -r -a MM_CLI <<<"$MAMBAMIA"
    export PYTHONUNBUFFERED=1  # rank output reaches the job log as it happens, not at exit
    mm_select_device
}

# GPU when nvidia-smi lists one, otherwise the CPU accelerator with gloo.
mm_select_device() {
    MM_GPUS=0
    if command -v nvidia-smi >/dev/null && [ "${CUDA_VISIBLE_DEVICES-unset}" != "" ]; then
        MM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') || MM_GPUS=0
        if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
            MM_GPUS=$(awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES")
        fi
    fi
    if [ "$MM_GPUS" -gt 0 ]; then
        # Async error handling turns a collective that can no longer complete (a rank died, a
        # link failed) into an exception in every rank, so the step ends instead of hanging
        # until the job's time limit.
        export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
        # WARN, not INFO: one line when NCCL falls back from InfiniBand/NVLink to TCP sockets,
        # the usual cause of a 10x slower run, without flooding the log.
        export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
        # NCCL picks the first non-loopback interface for bootstrap; on nodes with several (IPoIB,
        # ethernet, docker bridges) a mismatch between nodes hangs at init: set
        # NCCL_SOCKET_IFNAME (e.g. ib0) in the job environment when that happens.
        # A checkpoint of a 7B model under ZeRO-3 can keep ranks out of collectives for minutes.
        export TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC=${TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC:-1800}
        mm_log "device: $MM_GPUS GPU(s) per node, NCCL"
    else
        export DS_ACCELERATOR=cpu
        mm_log "device: no GPU: CPU processes (gloo, DS_ACCELERATOR=cpu)"
    fi
}

# MASTER_ADDR = the first node of the allocation (the one this batch script runs on) as an
# address: SLURM's NodeAddr for it, resolved here once so every rank connects to the same address.
# A name that resolves to loopback on its own node (Debian's 127.0.1.1 line) would make the
# others connect to themselves: refused with a message instead.
mm_master_addr() {
    local first addr
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    addr=$(scontrol show node "$first" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)
    addr=${addr:-$first}
    if ! [[ "$addr" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
        addr=$(getent ahostsv4 "$addr" | awk 'NR == 1 {print $1}')
    fi
    if [ -z "$addr" ]; then
        echo "[mambamia-slurm] error: node $first (first of $SLURM_JOB_NODELIST) has no IPv4 address: set MASTER_ADDR" >&2
        return 1
    fi
    if [[ "$addr" == 127.* ]]; then
        echo "[mambamia-slurm] error: node $first resolves to $addr (loopback), which the other nodes cannot reach: set MASTER_ADDR to its cluster address" >&2
        return 1
    fi
    MASTER_ADDR=$addr
}

# MASTER_ADDR/MASTER_PORT/WORLD_SIZE for the ranks; MM_NNODES/MM_NODE_RANK/MM_NPROC for the log.
mm_rendezvous() {
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        if [ -n "${MASTER_ADDR:-}" ]; then
            :  # set by the user: passed through
        elif [ "${SLURM_JOB_NUM_NODES:-1}" = 1 ]; then
            # One node: loopback, which needs no name resolution (containers often lack their own).
            MASTER_ADDR=127.0.0.1
        else
            mm_master_addr || exit 2
        fi
        # Same on every node without communication, different for jobs sharing a node; a
        # requeued job keeps its id and so its port (its previous processes are gone by then).
        MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 40000))}
        MM_NNODES=${SLURM_JOB_NUM_NODES:-1}
        MM_NODE_RANK=${SLURM_NODEID:-0}
        WORLD_SIZE=${SLURM_NTASKS:?SLURM_NTASKS is not set: submit with --ntasks-per-node}
        MM_NPROC=$((WORLD_SIZE / MM_NNODES))
    else
        MASTER_ADDR=127.0.0.1
        MASTER_PORT=${MASTER_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
        MM_NNODES=1
        MM_NODE_RANK=0
        if [ "$MM_GPUS" -gt 0 ]; then MM_NPROC=${NPROC:-$MM_GPUS}; else MM_NPROC=${NPROC:-${CPU_PROCS:-2}}; fi
        WORLD_SIZE=$MM_NPROC
    fi
    if [ "$MM_GPUS" = 0 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
        # CPU ranks share the node's cores; without this each one starts a thread per core.
        local cores=${SLURM_CPUS_PER_TASK:-$(($(nproc) / MM_NPROC))}
        export OMP_NUM_THREADS=$((cores > 0 ? cores : 1))
    fi
    export MASTER_ADDR MASTER_PORT WORLD_SIZE
    mm_log "rendezvous: $MASTER_ADDR:$MASTER_PORT, $MM_NNODES node(s) x $MM_NPROC process(es), world size $WORLD_SIZE, this node rank $MM_NODE_RANK"
}

# Signals that ask the ranks to checkpoint and stop. bash runs a trap only between commands, so
# the work runs in the background and the script sits in `wait`, which a trap interrupts.
mm_forward_signal() {
    MM_INTERRUPTED=1
    MM_SIGNALLED=$1
    mm_log "got SIG$1: forwarding to the ranks (they checkpoint at the next step boundary and exit $REQUEUE_EXIT_CODE)"
    local pid
    for pid in "${MM_PIDS[@]}"; do kill -s "$1" "$pid" 2>/dev/null; done
}
trap 'mm_forward_signal USR1' USR1
trap 'mm_forward_signal TERM' TERM

# Wait for one background pid, surviving trap interruptions; prints nothing, returns its code.
mm_wait_pid() {
    local pid=$1 rc
    while :; do
        MM_INTERRUPTED=0
        wait "$pid"
        rc=$?
        # After a trap `wait` returns early (>128) with the child still running or unreaped.
        if [ "$MM_INTERRUPTED" = 1 ] && [ "$rc" -gt 128 ]; then continue; fi
        return "$rc"
    done
}

# mm_launch CMD ARGS...: run CMD once per rank (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_* set);
# returns 0 when all ranks finished, 85 when they checkpointed on a signal, else a failure code.
mm_launch() {
    if [ -n "${SLURM_JOB_ID:-}" ]; then mm_launch_srun "$@"; else mm_launch_local "$@"; fi
}

mm_launch_srun() {
    local opts=(--kill-on-bad-exit=0 --wait="${EXIT_GRACE:-600}")
    # Since SLURM 22.05 srun no longer inherits --cpus-per-task from the batch allocation.
    [ -n "${SLURM_CPUS_PER_TASK:-}" ] && opts+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    # Every task sees all GPUs of its node and takes the one at LOCAL_RANK: per-task GPU binding
    # hides the peers from each other and disables CUDA IPC / NVLink peer-to-peer in NCCL.
    # --label: every line of the job log says which rank wrote it; slurm/rank.sh sets the rank's
    # variables and interface, and logs where it ran and how it ended.
    srun "${opts[@]}" --label bash "$MAMBAMIA_ROOT/slurm/rank.sh" "$@" &
    MM_PIDS=($!)
    mm_wait_pid "${MM_PIDS[0]}"
}

mm_launch_local() {
    local r rc worst=0 pid deadline=""
    MM_PIDS=()
    for ((r = 0; r < MM_NPROC; r++)); do
        RANK=$r LOCAL_RANK=$r LOCAL_WORLD_SIZE=$MM_NPROC "$@" &
        MM_PIDS+=($!)
    done
    # Poll rather than wait for rank 0 first: a crashed rank must stop the others, which would
    # otherwise block in a collective until its timeout.
    local -A done_rc=()
    while [ "${#done_rc[@]}" -lt "${#MM_PIDS[@]}" ]; do
        for pid in "${MM_PIDS[@]}"; do
            [ -n "${done_rc[$pid]:-}" ] && continue
            kill -0 "$pid" 2>/dev/null && continue
            mm_wait_pid "$pid"
            rc=$?
            done_rc[$pid]=$rc
            [ "$rc" != 0 ] && [ "$worst" = 0 ] && worst=$rc
            if [ "$rc" != 0 ] && [ "$rc" != "$REQUEUE_EXIT_CODE" ] && [ -z "$deadline" ] \
                && ! { [ -n "${MM_SIGNALLED:-}" ] && [ "$rc" -gt 128 ]; }; then
                worst=$rc  # a crash outranks "requeue me": the run must not look resumable
                deadline=$((SECONDS + ${EXIT_GRACE:-600}))
                mm_log "rank with pid $pid failed (exit $rc): killing the others in ${EXIT_GRACE:-600} s"
            fi
        done
        if [ -n "$deadline" ] && [ "$SECONDS" -ge "$deadline" ]; then
            for pid in "${MM_PIDS[@]}"; do
                [ -z "${done_rc[$pid]:-}" ] && kill -KILL "$pid" 2>/dev/null
            done
        fi
        sleep 1 &
        wait $! 2>/dev/null  # a trap can interrupt this wait, not a foreground sleep
    done
    return "$worst"
}

# The checkpoint step a (re)started job resumes from, as the trainer wrote it ("none" if fresh).
mm_latest_step() {
    local f
    for f in "$1/checkpoints/latest" "$1/latest"; do
        if [ -s "$f" ]; then tr -d '[:space:]' <"$f"; return; fi
    done
    echo none
}

# Count starts at the same checkpoint step in RUN_DIR/slurm_attempts ("<step> <count>"). A job
# that MAX_ATTEMPTS starts did not move past a step (a crash loop after automatic requeues, a
# signal storm, a step that cannot finish before the warning) refuses to start again.
mm_begin_attempt() {
    local run_dir=$1 file="$1/slurm_attempts" step prev_step="" prev_count=0 count
    mkdir -p "$run_dir" || mm_die "RUN_DIR=$run_dir: cannot create it"
    step=$(mm_latest_step "$run_dir")
    if [ -s "$file" ]; then read -r prev_step prev_count <"$file"; fi
    if [ "$prev_step" = "$step" ]; then count=$((prev_count + 1)); else count=1; fi
    if [ "$count" -gt "${MAX_ATTEMPTS:-3}" ]; then
        mm_log "giving up: $((count - 1)) attempts already started from checkpoint step $step without saving a newer one (MAX_ATTEMPTS=${MAX_ATTEMPTS:-3}; delete $file to allow more)"
        return 1
    fi
    printf '%s %s\n' "$step" "$count" >"$file.tmp.$$" && mv -f "$file.tmp.$$" "$file"
    MM_ATTEMPT=$count
    MM_START_STEP=$step
}

# What to do with the ranks' exit code: 0 done, 85 requeue (under SLURM), anything else fail.
# Returns the code the batch script should exit with.
mm_requeue_or_finish() {
    local rc=$1 run_dir=$2 step
    step=$(mm_latest_step "$run_dir")
    if [ "$rc" = 0 ]; then
        mm_log "training finished (checkpoint step $step)"
        return 0
    fi
    if [ -n "${MM_SIGNALLED:-}" ] && { [ "$rc" = $((128 + 10)) ] || [ "$rc" = $((128 + 15)) ]; }; then
        # Killed by the forwarded USR1/TERM itself: the signal came before the ranks installed
        # their handlers (still starting up). Nothing new was saved; resume from the last save.
        mm_log "ranks ended by SIG$MM_SIGNALLED before they could checkpoint (exit $rc): treated as a stop request"
        rc=$REQUEUE_EXIT_CODE
    fi
    if [ "$rc" != "$REQUEUE_EXIT_CODE" ]; then
        mm_log "training failed with exit code $rc: not requeued (a real error; see the rank output above)"
        return "$rc"
    fi
    if [ -z "${SLURM_JOB_ID:-}" ]; then
        mm_log "stopped on a signal, checkpoint step $step; run the same command again to resume"
        return "$rc"
    fi
    if [ "$step" = "$MM_START_STEP" ] && [ "$MM_ATTEMPT" -ge "${MAX_ATTEMPTS:-3}" ]; then
        mm_log "not requeueing: attempt $MM_ATTEMPT of ${MAX_ATTEMPTS:-3} ended at the step it started from ($step)"
        return 1
    fi
    mm_log "stopped at checkpoint step $step: requeueing job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0} -> $((${SLURM_RESTART_COUNT:-0} + 1)))"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        mm_log "scontrol requeue failed: resubmit this script with the same RUN_DIR to resume"
        return "$rc"
    fi
    return 0
}

# One training stage: CONFIG, RUN_DIR, INIT_FROM, EXTRA, EXPORT_DIR come from the stage script.
mm_run_stage() {
    mm_setup
    [ -f "$CONFIG" ] || mm_die "CONFIG=$CONFIG: no such file (a YAML from configs/)"
    mm_rendezvous
    mm_begin_attempt "$RUN_DIR" || exit 1
    local overrides=("run_dir=$RUN_DIR") extra=() rc
    [ -n "${INIT_FROM:-}" ] && overrides+=("init_from=$INIT_FROM")
    read -r -a extra <<<"${EXTRA:-}"
    export MM_RANK_LOG_DIR=$RUN_DIR/logs  # one file per rank and host (slurm/rank.sh)
    mm_log "train $CONFIG into $RUN_DIR: attempt $MM_ATTEMPT, checkpoint step $MM_START_STEP, job ${SLURM_JOB_ID:-none (local)}"
    mm_launch "${MM_CLI[@]}" train "$CONFIG" "${overrides[@]}" "${extra[@]}"
    rc=$?
    mm_requeue_or_finish "$rc" "$RUN_DIR" || exit
    [ "$rc" = 0 ] || exit 0
    if [ -n "${EXPORT_DIR:-}" ]; then
        mm_log "export $RUN_DIR -> $EXPORT_DIR"
        "${MM_CLI[@]}" export "$RUN_DIR" "$EXPORT_DIR" || { mm_log "export failed"; exit 1; }
    fi
    exit 0
}
