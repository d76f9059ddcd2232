#!/usr/bin/env bash
# Evaluates and samples every run that train_demo_runs.sh made, for docs/results.md: eval/ema-val-iw16.json,
# eval/ema-train-iw0.json (train split, for the MI estimate's higher log N ceiling), the PNG grids copied into
# docs/results/, then the markdown tables on stdout. Uses the EMA weights.
#   bash tools/results/evaluate_demo_runs.sh [RUNS_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-runs/results}
PY=${PY:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
for run in "$RUNS"/*/; do
  run=${run%/}
  name=$(basename "$run")
  "$PY" tools/evaluate.py "$run" --ema --split val --iw-samples 16 --fuzz-samples 16 --chain-steps 4 \
    --no-progress > /dev/null
  "$PY" tools/evaluate.py "$run" --ema --split train --iw-samples 0 --fuzz-samples 2 --chain-steps 0 \
    --no-progress > /dev/null
  "$PY" tools/sample.py "$run" --ema --n 8 --chain-steps 6 --out "docs/results/$name" > /dev/null
done
"$PY" tools/results/tables.py "$RUNS"
