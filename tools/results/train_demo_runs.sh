#!/usr/bin/env bash
# Trains the runs behind docs/results.md on the 32 px demo shards, two at a time (one thread each, so a
# 2-core machine is busy but not oversubscribed). Takes ~55 min on 2 cores. Re-running resumes/skips.
#   bash tools/results/train_demo_runs.sh [RUNS_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-runs/results}
PY=${PY:-python}
export OMP_NUM_THREADS=1
[ -f data/demo/shards/manifest.json ] ||
  "$PY" tools/make_shards.py --source demo --out data/demo/shards --resolution 32 --val-fraction 0.1
# train NAME CONFIG [key=value ...]: one run in $RUNS/NAME, its console in $RUNS/NAME.log
train() {
  local name=$1 config=$2
  shift 2
  "$PY" dist_vae/train.py --config "$config" run_dir="$RUNS/$name" "$@" > "$RUNS/$name.log" 2>&1
}
mkdir -p "$RUNS"
(
  for reg in elbo none mmd; do
    train "pixelvae_$reg" configs/demo_pixelvae.yaml model.reg="$reg"
  done
) &
(
  train iterative_t8 configs/demo_iterative.yaml train.steps=1500
  train iterative_t1 configs/demo_iterative.yaml train.steps=1500 model.refine_steps=1 \
    'model.latent_dims=[32,32,32]'
) &
wait
