# The README's commands. Each creates the environment first if it is missing.
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
TORCH   ?= torch==2.13.0
RUN_DIR ?= runs/demo
SCENES  ?= data/scenes/shards

.PHONY: env demo test bench bench-gpu lint clean

env: $(VENV)/.installed

# -qq: pip's warnings (this machine's unreachable extra indexes, build-backend notices) stay quiet;
# its errors still print.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -qq -U pip
	$(BIN)/python -m pip install -qq "$(TORCH)"
	$(BIN)/python -m pip install -qq -e ".[dev,deepspeed,metrics,wandb,mlflow]"
	TORCH_EXTENSIONS_DIR=$(abspath $(VENV))/torch_extensions $(BIN)/python -c "$(DEEPSPEED_OP)" > /dev/null 2>&1 \
	  || echo "note: DeepSpeed's CPU op was not built now: DeepSpeed builds it at its first launch"
	touch $@

# On a machine without a GPU DeepSpeed compiles its CPU shared-memory op (g++, about a minute) the
# first time it starts: built here once, through DeepSpeed's own call, into the environment's
# extension directory, which tests/conftest.py hands to every process the tests launch.
DEEPSPEED_OP = from deepspeed.comm.torch import build_shm_op; build_shm_op()

# Procedural bedrooms (16 px), their factor probe (trained once, cached beside the shards), a small
# iterative VAE, then the report: the sample grid's path, FID and the probe's scores against val.
demo: env
	$(BIN)/python tools/make_shards.py --source scenes:3000 --out $(SCENES) --resolution 16 --val-fraction 0.1 --workers 2 --no-progress
	test -f $(SCENES)/probe/probe.json || $(BIN)/python tools/probe.py train $(SCENES) --limit 1200 --epochs 6
	$(BIN)/python dist_vae/train.py --config configs/demo_scenes.yaml run_dir=$(RUN_DIR) data.path=$(SCENES)
	$(BIN)/python tools/demo_report.py $(RUN_DIR) --fid 100 --scale 6

# Two pytest workers, one per core; a file's tests stay on one worker (they share module fixtures),
# and files are handed out in tests/conftest.py's order (the slow ones first).
test: env
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q --durations=25 -n 2 --dist loadfile --no-loadscope-reorder

# Each ratio next to its target, measured side by side in one run (docs/performance.md).
bench: env
	test -f data/demo/shards/manifest.json || $(BIN)/python tools/make_shards.py --source demo --out data/demo/shards --resolution 32 --val-fraction 0.1
	$(BIN)/python tools/bench/engine.py
	$(BIN)/python tools/bench/loader.py
	$(BIN)/python tools/bench/remote.py
	$(BIN)/python tools/bench/compile.py
	$(BIN)/python tools/bench/memory.py
	$(BIN)/python tools/bench/iterative.py
	$(BIN)/python tools/bench/pixelcnnpp.py
	$(BIN)/python tools/bench/fid.py
	$(BIN)/python tools/bench/ddp_params.py
	$(if $(BASE),$(BIN)/python tools/bench/speed.py --baseline $(BASE))

# On a GPU machine: the trainer's step per execution mode beside the planner's prediction (DOCS=1
# writes that table into docs/performance.md), then img/s, memory and MFU; with BASE=REV also this
# tree's step time against REV's on the GPU (tools/bench/speed.py, run by gpu.py).
bench-gpu: env
	$(BIN)/python tools/bench/gpu.py $(if $(BASE),--baseline $(BASE)) $(if $(DOCS),--write-docs docs/performance.md)

lint: env
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs data/demo data/scenes
