#!/usr/bin/env bash
# Stage 1 (alignment): train the MambaMia compressor and projector, LLM frozen; then export.
#
#   sbatch slurm/stage1.sh                                   # on a cluster (edit #SBATCH below)
#   bash slurm/stage1.sh                                     # this machine: its GPUs, or 2 CPU ranks
#   sbatch -N 2 slurm/stage1.sh                              # two nodes: shared RUN_DIR (slurm/README.md)
#   CONFIG=configs/tiny/stage1.yaml RUN_DIR=runs/tiny1 EXTRA="schedule.total_steps=20" sbatch slurm/stage1.sh
#
# Environment overrides (sbatch passes the submitting shell's environment to the job):
#   CONFIG        stage YAML                        (default configs/stage1.yaml)
#   RUN_DIR       run folder; a requeued or resubmitted job resumes from its `latest`
#                                                   (default runs/stage1)
#   EXPORT_DIR    where the finished model is exported for stage 2; empty = no export
#                                                   (default exports/stage1, which
#                 configs/stage2.yaml's init_from names)
#   INIT_FROM     passed as init_from=... when set  (default: the config's own)
#   EXTRA         more dotted overrides, space separated: "optimizer.lr=1e-4 data.batch_size=2"
#   NODES         not an env variable: sbatch reads the #SBATCH lines before the script runs,
#                 so pass `sbatch --nodes=N` (the ranks follow the allocation)
#   MAX_ATTEMPTS  starts allowed from the same checkpoint step (default 3)
#   MAMBAMIA, NPROC, CPU_PROCS, MASTER_PORT, EXIT_GRACE: see slurm/common.sh
#
# One task per GPU: --ntasks-per-node must equal --gpus-per-node (slurm/common.sh says why).
# The job gets SIGUSR1 10 minutes before its time limit (B: = the batch shell, which forwards it
# to every rank); the ranks checkpoint and exit 85; this script requeues the job, which resumes.
#SBATCH --job-name=mambamia-stage1
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
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

CONFIG=${CONFIG:-$MAMBAMIA_ROOT/configs/stage1.yaml}
RUN_DIR=${RUN_DIR:-runs/stage1}
EXPORT_DIR=${EXPORT_DIR-exports/stage1}
mm_run_stage
