#!/bin/bash
# Started by srun (cluster/launch.sh), one per node: `accelerate launch` of dist_vae/train.py with this
# node's machine rank. Every setting arrives through the environment that launch.sh exports.
set -euo pipefail

# The preemption warning reaches every process of the step (scancel --signal=USR1 signals the whole step).
# USR1 terminates a process that does not handle it, so the launchers (accelerate, torchrun) ignore it;
# an ignored signal stays ignored across exec and fork, and the trainer installs its own handler. torchrun
# is not asked to forward USR1 (--signals_to_handle): it would SIGKILL the trainers 30 s later, which may
# be before a large checkpoint is written.
trap '' USR1

cd "$REPO"
# With DeepSpeed on several machines accelerate would start the `deepspeed` runner over pdsh/ssh; srun has
# already put one launcher on every node, so each must run torchrun locally ("standard"). Other configs
# ignore the option.
args=(--config_file "$ACCEL_CONFIG" --num_machines "$NODES" --machine_rank "$SLURM_NODEID"
	--main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT" --deepspeed_multinode_launcher standard)
if ((PROCS_PER_NODE > 0)); then
	args+=(--num_processes "$((NODES * PROCS_PER_NODE))")
fi
read -ra accelerate_opts <<<"$LAUNCH_ARGS"
read -ra overrides <<<"$EXTRA"
exec "$PYTHON" -m accelerate.commands.launch "${args[@]}" "${accelerate_opts[@]}" dist_vae/train.py \
	--config "$CONFIG" data.path="$DATA" run_dir="$RUN_DIR" resume=auto "${overrides[@]}"
