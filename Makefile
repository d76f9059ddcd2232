# The README's commands. Each creates the environment first if it is missing.
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
TORCH   ?= torch==2.13.0
RUN_DIR ?= runs/demo

.PHONY: env demo test bench lint clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,deepspeed]"
	touch $@

demo: env
	$(BIN)/python tools/demo.py --run-dir $(RUN_DIR)

test: env
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

bench: env
	$(BIN)/python tools/bench/loader.py
	$(BIN)/python tools/bench/iterative.py
	$(BIN)/python tools/bench/pixelcnnpp.py

lint: env
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs data/demo
