#!/usr/bin/env bash
# Videos (+ annotations) -> feature shards, split over GPUs, nodes and/or a job array, then one
# merge writing OUT/index.json. Arguments are those of `mambamia convert` or `mambamia extract`;
# --rank/--world-size (and --device, unless given) are added here.
#
#   sbatch slurm/extract.sh convert --annotations ann.json --videos /data/v --encoder ENC --out OUT
#   sbatch --array=0-15 --ntasks-per-node=1 --gpus-per-node=1 \
#          slurm/extract.sh extract /data/raw --encoder ENC --out OUT
#   bash slurm/extract.sh convert ...             # this machine: one process per GPU, or NPROC on CPU
#
# Ranks: task SLURM_PROCID of SLURM_NTASKS in each job, times the array index when it is an array
# (rank = array_offset * ntasks + procid). Every rank writes its own shards (deterministic names,
# so a rerun skips the complete ones). The merge: each job, once its ranks succeeded, leaves a
# marker per rank in OUT/.ranks_done/; the job that completes the set runs
# `mambamia convert --merge-only OUT` under a lock, so the last array task writes index.json and
# nothing waits on a task the scheduler has not started. Rerunning a failed array index finishes
# the set and merges. Or merge by hand: `mambamia convert --merge-only OUT`.
#
# Environment overrides:
#   ARRAY_SIZE    rerun single indices of a failed array with their original ranks:
#                 ARRAY_SIZE=16 sbatch --array=3,7 slurm/extract.sh ... (array numbered from 0)
#   NPROC         processes without SLURM (default: number of GPUs, else 1)
#   MAMBAMIA      command that runs the CLI (see slurm/common.sh)
# A time-limit warning (SIGUSR1) or preemption (SIGTERM) stops the ranks and requeues the job;
# the requeued job skips the shards already complete.
#SBATCH --job-name=mambamia-extract
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
set -uo pipefail

if [ -z "${MAMBAMIA_ROOT:-}" ]; then
    here=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
    if [ ! -f "$here/common.sh" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
        # sbatch runs a spooled copy of this file: SLURM remembers the original's path.
        here=$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n 1)")
    fi
    MAMBAMIA_ROOT=$(cd "$here/.." && pwd)
fi
# shellcheck source=slurm/common.sh
source "$MAMBAMIA_ROOT/slurm/common.sh" || exit 2

usage="usage: [sbatch [--array=...]] slurm/extract.sh convert|extract ARGS... --out OUT"
[ $# -ge 1 ] || mm_die "$usage"
sub=$1
shift
case "$sub" in convert | extract) ;; *) mm_die "first argument: expected convert or extract, got '$sub' ($usage)" ;; esac
out=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --out) out=${args[i + 1]:-} ;;
        --out=*) out=${args[i]#--out=} ;;
        --device | --device=*) export MM_USER_DEVICE=1 ;;
        --rank | --rank=* | --world-size | --world-size=*) mm_die "${args[i]}: set by this script from SLURM, do not pass it" ;;
    esac
done
[ -n "$out" ] || mm_die "missing --out OUT ($usage)"

mm_setup
if [ -n "${SLURM_JOB_ID:-}" ]; then
    ntasks=${SLURM_NTASKS:-1}
    offset=0
    world=$ntasks
    if [ -n "${SLURM_ARRAY_TASK_ID:-}" ] && [ -n "${ARRAY_SIZE:-}" ]; then
        # A rerun of some indices of an array submitted as --array=0-(ARRAY_SIZE-1).
        [ "$SLURM_ARRAY_TASK_ID" -lt "$ARRAY_SIZE" ] || mm_die "array index $SLURM_ARRAY_TASK_ID >= ARRAY_SIZE=$ARRAY_SIZE"
        offset=$((SLURM_ARRAY_TASK_ID * ntasks))
        world=$((ntasks * ARRAY_SIZE))
    elif [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
        offset=$(((SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0}) * ntasks))
        world=$((ntasks * ${SLURM_ARRAY_TASK_COUNT:-1}))
    fi
else
    if [ "$MM_GPUS" -gt 0 ]; then ntasks=${NPROC:-$MM_GPUS}; else ntasks=${NPROC:-1}; fi
    offset=0
    world=$ntasks
    MM_NPROC=$ntasks
fi
export MM_RANK_OFFSET=$offset MM_WORLD=$world MM_HAS_GPU=$((MM_GPUS > 0 ? 1 : 0))
mm_log "$sub into $out: ranks $offset..$((offset + ntasks - 1)) of $world (job ${SLURM_JOB_ID:-none (local)})"

done_dir="$out/.ranks_done"
mkdir -p "$done_dir" || mm_die "--out $out: cannot create $done_dir"
for ((r = offset; r < offset + ntasks; r++)); do rm -f "$done_dir/$r-of-$world"; done

# Each rank: its global rank from the launcher's RANK (SLURM_PROCID under srun), its own GPU.
rank_cmd='dev=(--device cpu); [ "$MM_HAS_GPU" = 1 ] && dev=(--device "cuda:$LOCAL_RANK")
[ -n "${MM_USER_DEVICE:-}" ] && dev=()
exec "$@" --rank "$((MM_RANK_OFFSET + RANK))" --world-size "$MM_WORLD" "${dev[@]}"'
mm_launch bash -c "$rank_cmd" mm-rank "${MM_CLI[@]}" "$sub" "${args[@]}"
rc=$?

if [ -n "${MM_SIGNALLED:-}" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    mm_log "stopped by SIG$MM_SIGNALLED: requeueing job $SLURM_JOB_ID (the rerun skips complete shards)"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    exit 1
fi
if [ "$rc" != 0 ]; then
    mm_log "$sub failed with exit code $rc: no merge (rerun this job; complete shards are kept)"
    exit "$rc"
fi
for ((r = offset; r < offset + ntasks; r++)); do : >"$done_dir/$r-of-$world"; done
finished=$(find "$done_dir" -maxdepth 1 -name "*-of-$world" | wc -l)
if [ "$finished" -lt "$world" ]; then
    mm_log "$finished of $world ranks done: the job that finishes the last rank writes index.json"
    exit 0
fi
mm_log "all $world ranks done: writing $out/index.json"
# Two array tasks finishing together may both see the full set: the lock serialises their merges,
# which are idempotent (index.json is replaced atomically).
if command -v flock >/dev/null; then
    flock "$done_dir/merge.lock" "${MM_CLI[@]}" "$sub" --merge-only "$out"
else
    "${MM_CLI[@]}" "$sub" --merge-only "$out"
fi
