#!/bin/bash
# Example SLURM job array: `cap-host compress --stream` of a model larger than one
# machine's patience, its blocks split over N tasks with `--shard I/N`, all filling one
# block cache on shared storage. Each task computes a contiguous slice of the blocks
# (starting from the source model's outputs at its first block) and writes each block
# atomically, checksummed and keyed by the run's settings; a failed task can simply be
# resubmitted (it computes only what its slice still lacks). A last run without
# --shard assembles the .cap from the cache without recomputing, measures it and
# stores its self-test figure.
#
#   sbatch --array=1-8 scripts/slurm-compress.sh /models/llama-2-7b /scratch/blocks \
#       --method cap --ratio 0.5 --calib data/c4/c4_sample.json
#   # afterwards, the same arguments without --shard:
#   cap-host compress --model /models/llama-2-7b --stream --block-cache /scratch/blocks \
#       --method cap --ratio 0.5 --calib data/c4/c4_sample.json -o llama-2-7b.cap
#
# Every task must get the same arguments (the block cache refuses blocks made with
# others). Kubernetes indexed Jobs work the same way: see scripts/k8s-compress.yaml.
#
#SBATCH --job-name=cap-compress
#SBATCH --cpus-per-task=16
#SBATCH --mem=32G
#SBATCH --time=12:00:00
#SBATCH --output=cap-compress-%A_%a.log
set -euo pipefail

MODEL=${1:?usage: sbatch --array=1-N slurm-compress.sh MODEL BLOCK_CACHE compress-args...}
CACHE=${2:?usage: sbatch --array=1-N slurm-compress.sh MODEL BLOCK_CACHE compress-args...}
shift 2
N=${SLURM_ARRAY_TASK_COUNT:?run as a job array: sbatch --array=1-N}
# --array=1-N gives I in 1..N, as --shard wants.
I=${SLURM_ARRAY_TASK_ID}

mkdir -p "$CACHE"
exec cap-host compress --model "$MODEL" --stream --block-cache "$CACHE" \
    --shard "$I/$N" --threads "${SLURM_CPUS_PER_TASK:-1}" \
    --json "$@" > "$CACHE/report-shard-$I-of-$N.json"
