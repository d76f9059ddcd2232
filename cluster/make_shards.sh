#!/bin/bash
# Build one shard set with a Slurm array job: task I of PARTS runs `make_shards --part I/PARTS`, and a
# second job, started once every task has succeeded (--dependency=afterok), runs `make_shards --finish
# PARTS`, which writes the manifest. Run it from the repository root, outside a job; it submits both:
#   SOURCE=lmdb:/data/lsun/bedroom_train_lmdb OUT=s3://bucket/lsun/bedroom256 RESOLUTION=256 PARTS=16 \
#       cluster/make_shards.sh [sbatch options, for both jobs]
# Settings (environment variables):
#   SOURCE, OUT, RESOLUTION  make_shards' --source, --out and --resolution (required)
#   PARTS        array tasks, one part of the shards each (8)
#   SHARD_ARGS   further make_shards options, the same for every task (--shard-size 1000 --format png)
#   WORKERS      processes per task (make_shards --workers; default: the task's CPUs)
#   LOG_DIR      the jobs' logs (logs/make_shards)
#   PYTHON       interpreter with dist_vae's dependencies (python3)
#   SETUP        a file sourced by each job before make_shards (module load, conda activate)
#   REPO         repository root (the script's parent); relative paths start there
# A local OUT must be on a file system every node shares; an s3:// gs:// az:// OUT needs none (each task
# builds its shards in make_shards' --stage, by default under $TMPDIR, and uploads them). A failed task
# cancels the finish job: run the script again, and the parts already built are only checked.
# Inside a job it runs one step: an array task its part, MAKE_SHARDS_STEP=finish the finish, else the
# whole build in one process.
#SBATCH --job-name=make-shards
#SBATCH --nodes=1
#SBATCH --cpus-per-task=16
#SBATCH --time=1-00:00:00

set -euo pipefail

REFUSED_EXIT=2
log() { printf '[make_shards %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() {
	log "error: $*" >&2
	exit "$REFUSED_EXIT"
}

check_settings() {
	local name
	for name in SOURCE OUT RESOLUTION; do
		[[ -n ${!name:-} ]] || die "$name is not set (make_shards --${name,,}); see the top of $0"
	done
	[[ $PARTS =~ ^[1-9][0-9]*$ ]] || die "PARTS=$PARTS: expected a positive integer"
}

: "${PARTS:=8}"
: "${LOG_DIR:=logs/make_shards}"
: "${PYTHON:=python3}"
if [[ -z ${SLURM_JOB_ID:-} ]]; then
	REPO=${REPO:-$(cd "$(dirname "$0")/.." && pwd)}
	export REPO SOURCE OUT RESOLUTION PARTS LOG_DIR PYTHON
	check_settings
	cd "$REPO"
	mkdir -p "$LOG_DIR"
	array=$(sbatch --parsable --array="0-$((PARTS - 1))" --chdir="$REPO" \
		--output="$LOG_DIR/make_shards-%A_%a.out" "$@" "$REPO/cluster/make_shards.sh")
	array=${array%%;*}
	finish=$(sbatch --parsable --dependency="afterok:$array" --kill-on-invalid-dep=yes --chdir="$REPO" \
		--export=ALL,MAKE_SHARDS_STEP=finish --output="$LOG_DIR/make_shards-%j-finish.out" "$@" \
		"$REPO/cluster/make_shards.sh")
	finish=${finish%%;*}
	log "submitted parts 0-$((PARTS - 1)) of $OUT as array job $array and the finish as job $finish" \
		"(after every part succeeded); logs in $LOG_DIR"
	exit 0
fi

# Inside a job: sbatch ran a copy of this file, with the environment the submitter exported.
REPO=${REPO:-$SLURM_SUBMIT_DIR}
check_settings
cd "$REPO"
if [[ -n ${SETUP:-} ]]; then
	# shellcheck source=/dev/null
	source "$SETUP"
fi
read -ra extra <<<"${SHARD_ARGS:-}"
cmd=("$PYTHON" tools/make_shards.py --source "$SOURCE" --out "$OUT" --resolution "$RESOLUTION"
	--no-progress "${extra[@]}")
workers=${WORKERS:-${SLURM_CPUS_PER_TASK:-1}}
if [[ -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
	[[ ${SLURM_ARRAY_TASK_COUNT:-$PARTS} == "$PARTS" ]] ||
		die "the array has $SLURM_ARRAY_TASK_COUNT tasks but PARTS=$PARTS: submit with --array=0-$((PARTS - 1))"
	log "part $SLURM_ARRAY_TASK_ID/$PARTS of $OUT on $(hostname -s), $workers worker(s)"
	exec "${cmd[@]}" --workers "$workers" --part "$SLURM_ARRAY_TASK_ID/$PARTS"
elif [[ ${MAKE_SHARDS_STEP:-} == finish ]]; then
	log "finishing $OUT: the manifest of its $PARTS parts"
	exec "${cmd[@]}" --finish "$PARTS"
fi
log "building $OUT in one process on $(hostname -s), $workers worker(s)"
exec "${cmd[@]}" --workers "$workers"
