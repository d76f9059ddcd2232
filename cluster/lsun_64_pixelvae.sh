#!/bin/bash
# PixelVAE (encoder + conditional PixelCNN++ decoder, MMD regulariser) on LSUN bedroom at 64 px: 1 node x 4 GPUs
# (32 per GPU, 128 per update: below 27 images per GPU the compiled step waits for the host; docs/performance.md).
# Submit with `sbatch cluster/lsun_64_pixelvae.sh` from the repository root, or run
# `cluster/lsun_64_pixelvae.sh [sbatch options]`, which also honours NODES and GPUS_PER_NODE.
# Settings: see cluster/launch.sh.
#SBATCH --job-name=lsun64-pixelvae
#SBATCH --nodes=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=64
#SBATCH --time=2-00:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

: "${CONFIG:=configs/lsun_64_pixelvae.yaml}"
: "${DATA:=data/lsun_bedroom_64}"
: "${RUN_DIR:=runs/lsun_64_pixelvae}"
: "${ACCEL_CONFIG:=configs/accelerate/ddp.yaml}"

# sbatch runs a copy of this file, so inside the job the repository is the submit directory.
if [[ -n ${SLURM_JOB_ID:-} ]]; then REPO=${REPO:-$SLURM_SUBMIT_DIR}; else REPO=${REPO:-$(cd "$(dirname "$0")/.." && pwd)}; fi
# shellcheck source=cluster/launch.sh
source "$REPO/cluster/launch.sh" "$0" "$@"
