# shellcheck shell=bash
# The body of every sbatch script in this directory. A script sets its defaults (CONFIG, DATA, RUN_DIR,
# ACCEL_CONFIG, REPO) and sources this file, which then does one of two things:
#   outside a Slurm job  (`cluster/lsun_256.sh [sbatch options]`): submits that script with sbatch, turning
#                        NODES and GPUS_PER_NODE into --nodes and --gres and putting the log in RUN_DIR;
#   inside the job       (sbatch started it): runs one accelerate launcher per node (cluster/node.sh) and
#                        carries the job through preemption: warning signal -> every trainer process
#                        checkpoints and exits -> `scontrol requeue` -> the requeued job resumes (resume=auto),
#                        and through crashes and hangs (a bounded number of requeues each), and an object
#                        store that stayed unreachable (requeued after STORE_RETRY_DELAY seconds).
# Settings (environment variables; the script's defaults apply where unset):
#   CONFIG, DATA, RUN_DIR, ACCEL_CONFIG  trainer config, shard directory or URL (s3://, gs://, az://,
#                        https://), run directory, accelerate config
#   EXTRA                space-separated key=value overrides passed to dist_vae/train.py
#   NODES                machines: N, or MIN-MAX to let Slurm start (and requeue) the job on what is free;
#                        inside the job the allocation decides, and a run resumed on another node count
#                        continues from the same checkpoint (the trainer adapts to the new world size, as
#                        train.resize says). The scripts ask for no task count (--ntasks-per-node): Slurm
#                        derives one from the minimum node count and then allocates only MIN nodes.
#   GPUS_PER_NODE        GPUs per machine (0: none requested, CPU runs)
#   PROCS_PER_NODE       trainer processes per machine (GPUS_PER_NODE; 0: the accelerate config's count)
#   PYTHON               interpreter with dist_vae's dependencies (python3)
#   SETUP                a file sourced by the batch shell before launching (module load, conda activate)
#   MAIN_ADDR, MAIN_PORT rendezvous address and port (first node of the job, 20000 + job id % 10000)
#   MAX_CRASH_REQUEUES   how often one job is requeued after a crash (1)
#   MAX_HANG_REQUEUES    how often one job is requeued after a hang: a trainer's watchdog wrote
#                        RUN_DIR/hang/rank-R.txt (exit 5) (2)
#   WARNING_REPEAT       seconds between repeats of the warning until the launchers exit (30)
#   STORE_RETRY_DELAY    seconds to wait before requeueing a run whose object store stayed unreachable
#                        through the trainer's retries (it checkpointed and exited 6); not counted as a
#                        crash, so a store down for hours costs waits, not the job (300)
#   LEASE_WAIT           seconds to wait, before launching, for the run directory's lease (RUN_DIR/.lease.json)
#                        to be released or to expire: a requeued job can start while the trainers of its
#                        previous run still exit; after that the job fails with exit 2 naming the holder (180)
#   LAUNCH_ARGS          extra arguments for `accelerate launch`

set -euo pipefail

# The trainer's protocol with this script: the markers and hang/ of dist_vae/run_layout.py's RunDir
# (dist_vae/engine/stops.py writes them) and dist_vae/errors.py's ExitCode (tests/test_exit_codes.py).
REQUEUE_MARKER="requeue"
DONE_MARKER="done"
DIVERGED_MARKER="diverged"
HANG_DIR="hang" # rank-R.txt: the stacks a hung rank wrote before exiting with HANG_EXIT
LEASE_FILE=".lease.json" # RunDir.lease: the trainer's rank 0 holds it while it runs
REFUSED_EXIT=2
DIVERGED_EXIT=4
HANG_EXIT=5
STORE_UNREACHABLE_EXIT=6
UNREACHABLE_REASON="store-unreachable" # the requeue marker's reason line after STORE_UNREACHABLE_EXIT
INTERRUPTED_EXIT=130 # Ctrl-C (SIGINT): the trainer checkpointed as asked; a stop, not a preemption

log() { printf '[cluster %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() {
	log "error: $*" >&2
	exit "$REFUSED_EXIT"
}

# Every input is checked before submitting and again on the node (a requeued job may find files moved).
check_inputs() {
	[[ -f $REPO/dist_vae/train.py ]] ||
		die "REPO=$REPO has no dist_vae/train.py: submit from the repository root or set REPO"
	local name
	for name in CONFIG ACCEL_CONFIG; do
		[[ -f ${!name} ]] || die "$name=${!name}: no such file (relative paths start at REPO=$REPO)"
	done
	[[ $DATA == *://* || -d $DATA ]] || die "DATA=$DATA: no such directory (relative paths start at REPO=$REPO)"
	[[ ${NODES:-1} =~ ^[1-9][0-9]*(-[1-9][0-9]*)?$ ]] ||
		die "NODES=$NODES: expected a positive integer or a range MIN-MAX"
	[[ ${GPUS_PER_NODE:-0} =~ ^[0-9]+$ ]] || die "GPUS_PER_NODE=$GPUS_PER_NODE: expected an integer >= 0"
	[[ ${PROCS_PER_NODE:-0} =~ ^[0-9]+$ ]] || die "PROCS_PER_NODE=$PROCS_PER_NODE: expected an integer >= 0"
	[[ ${MAX_CRASH_REQUEUES:-1} =~ ^[0-9]+$ ]] || die "MAX_CRASH_REQUEUES=$MAX_CRASH_REQUEUES: expected an integer >= 0"
	[[ ${MAX_HANG_REQUEUES:-2} =~ ^[0-9]+$ ]] || die "MAX_HANG_REQUEUES=$MAX_HANG_REQUEUES: expected an integer >= 0"
	[[ ${WARNING_REPEAT:-30} =~ ^[1-9][0-9]*$ ]] || die "WARNING_REPEAT=$WARNING_REPEAT: expected seconds >= 1"
	[[ ${LEASE_WAIT:-180} =~ ^[0-9]+$ ]] || die "LEASE_WAIT=$LEASE_WAIT: expected seconds >= 0"
	[[ ${STORE_RETRY_DELAY:-300} =~ ^[0-9]+$ ]] || die "STORE_RETRY_DELAY=$STORE_RETRY_DELAY: expected seconds >= 0"
}

submit() {
	local script=$1
	shift
	local -a args=(--chdir="$REPO" --output="$RUN_DIR/slurm-%j.out")
	if [[ -n ${NODES:-} ]]; then
		args+=(--nodes="$NODES")
	fi
	if [[ -n ${GPUS_PER_NODE:-} ]]; then
		if ((GPUS_PER_NODE > 0)); then args+=(--gres="gpu:$GPUS_PER_NODE"); else args+=(--gres=none); fi
	fi
	mkdir -p "$RUN_DIR"
	export REPO CONFIG DATA RUN_DIR ACCEL_CONFIG
	exec sbatch "${args[@]}" "$@" "$script"
}

newest_checkpoint() {
	local dir newest=none
	for dir in "$RUN_DIR"/checkpoints/step-*/; do
		[[ -e ${dir}COMPLETE ]] && newest=$(basename "$dir")
	done
	echo "$newest"
}

# Wait (at most LEASE_WAIT seconds) until no live trainer holds the run directory: released, or its
# holder gone (dead pid on this host, or no heartbeat for the lease timeout, 60 s). The trainer would
# refuse to start while it is held; a requeued job waits for its predecessor instead of failing.
wait_for_lease() {
	local waited=0 holder
	while holder=$(PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m dist_vae.lease "$RUN_DIR/$LEASE_FILE") &&
		[[ -n $holder ]]; do
		((waited < LEASE_WAIT)) ||
			die "run dir $RUN_DIR is still in use after LEASE_WAIT=$LEASE_WAIT s, by $holder"
		((waited > 0)) || log "run dir $RUN_DIR is in use by $holder: waiting for it (LEASE_WAIT=$LEASE_WAIT s)"
		sleep 2
		waited=$((waited + 2))
	done
	((waited == 0)) || log "run dir $RUN_DIR released after ${waited} s"
}

# A marker counts only if the trainer wrote it during this run of the job.
fresh() { [[ -e $RUN_DIR/$1 && $RUN_DIR/$1 -nt $STAMP ]]; }

requeue() {
	trap - USR1 TERM
	log "requeueing job $SLURM_JOB_ID ($1); the next run resumes from $(newest_checkpoint) (resume=auto)"
	scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed"
	exit 0
}

# shellcheck disable=SC2317  # trap handler
on_warning() {
	((WARNED)) && return
	WARNED=1
	log "received SIGUSR1 (preemption warning): forwarding it to every process of the job's steps" \
		"(scancel --signal=USR1 $SLURM_JOB_ID); trainers checkpoint at the next step boundary"
	scancel --signal=USR1 "$SLURM_JOB_ID" || log "warning: scancel --signal=USR1 $SLURM_JOB_ID failed"
	# A trainer still starting up has not installed its handler and ignores USR1 like its launcher does;
	# repeat the warning until the launchers exit (one more signal only sets the trainer's flag again).
	(
		while sleep "$WARNING_REPEAT"; do
			log "repeating the warning: launchers still running"
			scancel --signal=USR1 "$SLURM_JOB_ID" || true
		done
	) &
	REPEATER=$!
}

# shellcheck disable=SC2317  # trap handler
on_term() {
	TERMINATED=1
	log "received SIGTERM: Slurm is ending the job (scancel, time limit or preemption); the steps got" \
		"SIGTERM too, so trainers checkpoint if they can"
}

# Stack files the trainers' watchdogs wrote during this run of the job, one a line.
hang_files() {
	if [[ -d $RUN_DIR/$HANG_DIR ]]; then find "$RUN_DIR/$HANG_DIR" -name 'rank-*.txt' -newer "$STAMP" | sort; fi
}

# Requeue after a crash or a hang unless this job was already requeued MAX times for it (counted by job
# id in RUN_DIR/slurm-KIND-requeues, which survives the requeue).
requeue_bounded() {
	local kind=$1 past=$2 max_name=$3 status=$4 file count
	file=$RUN_DIR/slurm-$kind-requeues
	count=$(grep -c "^$SLURM_JOB_ID " "$file" 2>/dev/null || true)
	count=${count:-0}
	if ((count < ${!max_name})); then
		echo "$SLURM_JOB_ID $(date -u +%FT%TZ) status=$status" >>"$file"
		requeue "$kind $((count + 1)) of at most ${!max_name}"
	fi
	log "$past (status $status) and already requeued $count time(s) after a $kind" \
		"($max_name=${!max_name}): not requeueing"
}

# After the launchers exit: finished, preempted (requeue), object store unreachable (requeue after
# STORE_RETRY_DELAY), hung (requeue at most MAX_HANG_REQUEUES) or crashed (requeue at most MAX_CRASH_REQUEUES).
decide() {
	local status=$1 hung
	if [[ -n $REPEATER ]]; then kill "$REPEATER" 2>/dev/null || true; fi
	log "launchers exited with status $status; newest complete checkpoint: $(newest_checkpoint)"
	if fresh "$DONE_MARKER"; then
		log "training finished ($RUN_DIR/$DONE_MARKER written): not requeueing"
		exit 0
	fi
	if fresh "$DIVERGED_MARKER"; then
		log "training diverged ($RUN_DIR/$DIVERGED_MARKER: $(tr '\n' ' ' <"$RUN_DIR/$DIVERGED_MARKER")): not requeueing"
		exit "$DIVERGED_EXIT"
	fi
	# After a warning, a SIGTERM is the time limit that came before the checkpoint did: still requeue.
	if ((WARNED)); then
		if fresh "$REQUEUE_MARKER"; then
			log "trainer checkpointed for preemption ($RUN_DIR/$REQUEUE_MARKER: $(tr '\n' ' ' <"$RUN_DIR/$REQUEUE_MARKER"))"
			requeue "preempted"
		fi
		requeue "warned, but the trainer wrote no $REQUEUE_MARKER marker"
	fi
	if ((TERMINATED)); then
		log "job ended by Slurm without a warning: not requeueing"
		exit "$((status == 0 ? 1 : status))"
	fi
	# The launchers replace the trainer's exit code by their own: the marker's reason says it too.
	if ((status == STORE_UNREACHABLE_EXIT)) ||
		{ fresh "$REQUEUE_MARKER" && grep -qx "reason $UNREACHABLE_REASON" "$RUN_DIR/$REQUEUE_MARKER"; }; then
		log "object store unreachable through the trainer's retries ($RUN_DIR/$REQUEUE_MARKER:" \
			"$(tr '\n' ' ' <"$RUN_DIR/$REQUEUE_MARKER")): requeueing in STORE_RETRY_DELAY=$STORE_RETRY_DELAY s"
		sleep "$STORE_RETRY_DELAY" &
		wait $! || true # returns early on a trapped signal
		if ((TERMINATED)); then
			log "job ended by Slurm while waiting: not requeueing"
			exit "$STORE_UNREACHABLE_EXIT"
		fi
		requeue "object store unreachable"
	fi
	if fresh "$REQUEUE_MARKER"; then
		log "trainer checkpointed after a signal sent to it directly ($RUN_DIR/$REQUEUE_MARKER)"
		requeue "preempted"
	fi
	if ((status == INTERRUPTED_EXIT)); then
		log "trainer interrupted (SIGINT, e.g. scancel --signal=INT): checkpointed as asked, not requeueing"
		exit "$INTERRUPTED_EXIT"
	fi
	hung=$(hang_files)
	if [[ -n $hung ]]; then
		log "trainer hung (its watchdog stopped it); stacks of all threads: $(tr '\n' ' ' <<<"$hung")"
		requeue_bounded hang hung MAX_HANG_REQUEUES "$status"
		exit "$HANG_EXIT"
	fi
	requeue_bounded crash crashed MAX_CRASH_REQUEUES "$status"
	exit "$((status == 0 ? 1 : status))"
}

run_job() {
	if [[ -n ${SETUP:-} ]]; then
		# shellcheck source=/dev/null
		source "$SETUP"
	fi
	NODES=${NODES:-$SLURM_JOB_NUM_NODES}
	GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
	PROCS_PER_NODE=${PROCS_PER_NODE:-$GPUS_PER_NODE}
	MAX_CRASH_REQUEUES=${MAX_CRASH_REQUEUES:-1}
	MAX_HANG_REQUEUES=${MAX_HANG_REQUEUES:-2}
	WARNING_REPEAT=${WARNING_REPEAT:-30}
	LEASE_WAIT=${LEASE_WAIT:-180}
	STORE_RETRY_DELAY=${STORE_RETRY_DELAY:-300}
	check_inputs
	# A range lets Slurm choose (a requeued job may get fewer or more nodes); a number must match.
	if [[ $NODES == *-* ]]; then
		((SLURM_JOB_NUM_NODES >= ${NODES%-*} && SLURM_JOB_NUM_NODES <= ${NODES#*-})) ||
			die "NODES=$NODES but the job has $SLURM_JOB_NUM_NODES node(s)"
		NODES=$SLURM_JOB_NUM_NODES
	fi
	((NODES == SLURM_JOB_NUM_NODES)) ||
		die "NODES=$NODES but the job has $SLURM_JOB_NUM_NODES node(s): run the script itself with NODES set" \
			"(it submits with --nodes) or sbatch --nodes=$NODES"
	MAIN_ADDR=${MAIN_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
	MAIN_PORT=${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
	PYTHON=${PYTHON:-python3}
	export REPO CONFIG DATA RUN_DIR ACCEL_CONFIG EXTRA NODES GPUS_PER_NODE PROCS_PER_NODE MAIN_ADDR MAIN_PORT PYTHON LAUNCH_ARGS

	mkdir -p "$RUN_DIR"
	STAMP=$RUN_DIR/.slurm-run-$SLURM_JOB_ID
	touch "$STAMP"
	WARNED=0
	TERMINATED=0
	REPEATER=
	trap on_warning USR1
	trap on_term TERM

	log "job $SLURM_JOB_ID, run $((${SLURM_RESTART_COUNT:-0} + 1)) (restart count ${SLURM_RESTART_COUNT:-0})" \
		"on $SLURM_JOB_NODELIST: $NODES node(s) x $GPUS_PER_NODE GPU(s), $PROCS_PER_NODE process(es) per node, rendezvous $MAIN_ADDR:$MAIN_PORT"
	log "config $CONFIG, data $DATA, run dir $RUN_DIR, accelerate $ACCEL_CONFIG, extra: ${EXTRA:-none}"
	wait_for_lease
	log "resuming from newest complete checkpoint: $(newest_checkpoint)"

	# Steps do not inherit --cpus-per-task from the job (Slurm >= 22.05): pass it, or each launcher gets one CPU.
	local -a step=(--nodes="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1)
	if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then step+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
	srun "${step[@]}" bash "$REPO/cluster/node.sh" &
	local srun_pid=$! status
	# `wait` returns early whenever a trapped signal arrives; keep waiting until srun itself has exited.
	while kill -0 "$srun_pid" 2>/dev/null; do
		wait "$srun_pid" || true
	done
	wait "$srun_pid" && status=0 || status=$?
	decide "$status"
}

: "${EXTRA:=}" "${LAUNCH_ARGS:=}"
cd "$REPO"
[[ $RUN_DIR == /* ]] || RUN_DIR=$REPO/$RUN_DIR
if [[ -z ${SLURM_JOB_ID:-} ]]; then
	check_inputs
	submit "$@"
fi
run_job
