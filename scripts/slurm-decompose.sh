#!/bin/bash
# Example SLURM job array: RPCA of every linear weight of a model, split over N tasks
# with `cap-host decompose --shard I/N`, all writing into one shared cache directory.
# Each task processes the matrices j with j mod N + 1 == I; cache files are written
# atomically and keyed by weight and settings, so tasks never clash, a failed task can
# simply be resubmitted, and a final unsharded run finds everything cached (and
# computes whatever a lost task left out).
#
#   sbatch --array=1-16 scripts/slurm-decompose.sh /models/llama-2-7b /scratch/rpca
#   # afterwards (any machine that sees the cache; computes nothing if all tasks finished):
#   cap-host decompose --model /models/llama-2-7b --out /scratch/rpca --json > report.json
#
# Kubernetes indexed Jobs work the same way with I = JOB_COMPLETION_INDEX + 1.
#
#SBATCH --job-name=cap-decompose
#SBATCH --cpus-per-task=16
#SBATCH --mem=64G
#SBATCH --time=12:00:00
#SBATCH --output=cap-decompose-%A_%a.log
set -euo pipefail

MODEL=${1:?usage: sbatch --array=1-N slurm-decompose.sh MODEL CACHE_DIR [extra decompose args]}
CACHE=${2:?usage: sbatch --array=1-N slurm-decompose.sh MODEL CACHE_DIR [extra decompose args]}
shift 2
N=${SLURM_ARRAY_TASK_COUNT:?run as a job array: sbatch --array=1-N}
# SLURM numbers tasks as the --array range says; --array=1-N gives I in 1..N.
I=${SLURM_ARRAY_TASK_ID}

exec cap-host decompose --model "$MODEL" --out "$CACHE" \
    --shard "$I/$N" --threads "${SLURM_CPUS_PER_TASK:-1}" --json "$@" \
    > "$CACHE/report-shard-$I-of-$N.json"
