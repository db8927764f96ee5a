#!/usr/bin/env bash
# Stage 2 (instruction tuning): compressor, projector and LLM train, starting from stage 1's export.
#
#   sbatch slurm/stage2.sh                                   # on a cluster (edit #SBATCH below)
#   sbatch --dependency=afterok:$STAGE1_JOB slurm/stage2.sh  # start when stage 1 succeeded
#   bash slurm/stage2.sh                                     # this machine: its GPUs, or 2 CPU ranks
#   sbatch -N 2 slurm/stage2.sh                              # two nodes: shared RUN_DIR (slurm/README.md)
#   CONFIG=configs/tiny/stage2.yaml RUN_DIR=runs/tiny2 EXTRA="schedule.total_steps=20" sbatch slurm/stage2.sh
#
# Environment overrides (sbatch passes the submitting shell's environment to the job):
#   CONFIG        stage YAML                        (default configs/stage2.yaml)
#   RUN_DIR       run folder; a requeued or resubmitted job resumes from its `latest`
#                                                   (default runs/stage2)
#   EXPORT_DIR    where the finished model is exported for stage 3; empty = no export
#                                                   (default exports/stage2, which
#                 configs/stage3.yaml's init_from names)
#   INIT_FROM     the export this stage starts from, passed as init_from=...
#                 (default: the config's own, exports/stage1)
#   EXTRA         more dotted overrides, space separated: "optimizer.lr=1e-4 data.batch_size=2"
#   NODES         not an env variable: sbatch reads the #SBATCH lines before the script runs,
#                 so pass `sbatch --nodes=N` (the ranks follow the allocation)
#   MAX_ATTEMPTS  starts allowed from the same checkpoint step (default 3)
#   MAMBAMIA, NPROC, CPU_PROCS, MASTER_PORT, EXIT_GRACE: see slurm/common.sh
#
# One task per GPU: --ntasks-per-node must equal --gpus-per-node (slurm/common.sh says why).
# The job gets SIGUSR1 10 minutes before its time limit (B: = the batch shell, which forwards it
# to every rank); the ranks checkpoint and exit 85; this script requeues the job, which resumes.
#SBATCH --job-name=mambamia-stage2
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

CONFIG=${CONFIG:-$MAMBAMIA_ROOT/configs/stage2.yaml}
RUN_DIR=${RUN_DIR:-runs/stage2}
EXPORT_DIR=${EXPORT_DIR-exports/stage2}
mm_run_stage
