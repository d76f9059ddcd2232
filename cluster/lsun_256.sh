#!/bin/bash
# Iterative latent-injection VAE on LSUN bedroom at 256 px: 1 node x 4 GPUs, DDP (128 per GPU, 512
# per update: below 81 images per GPU the compiled step waits for the host; docs/performance.md).
# Submit with `sbatch cluster/lsun_256.sh` from the repository root, or run `cluster/lsun_256.sh
# [sbatch options]`, which also honours NODES and GPUS_PER_NODE. Settings: see cluster/launch.sh.
#SBATCH --job-name=lsun256-ivae
#SBATCH --nodes=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=64
#SBATCH --time=2-00:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

: "${CONFIG:=configs/lsun_256_iterative.yaml}"
: "${DATA:=data/lsun_bedroom_256}"
: "${RUN_DIR:=runs/lsun_256_iterative}"
: "${ACCEL_CONFIG:=configs/accelerate/ddp.yaml}"

# sbatch runs a copy of this file, so inside the job the repository is the submit directory.
if [[ -n ${SLURM_JOB_ID:-} ]]; then REPO=${REPO:-$SLURM_SUBMIT_DIR}; else REPO=${REPO:-$(cd "$(dirname "$0")/.." && pwd)}; fi
# shellcheck source=cluster/launch.sh
source "$REPO/cluster/launch.sh" "$0" "$@"
