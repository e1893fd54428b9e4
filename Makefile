# The two Quickstart commands. Each builds its own virtual environment (.venv) with the pinned
# versions of constraints.txt on first use; nothing else needs to be set up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.llarva-installed

.PHONY: demo test bench-env clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: a bare `torch` requirement would pull a CUDA build of several GB
	$(BIN)/python -m pip install -q -c constraints.txt torch
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)  ## the main job on the embedded simulator: success rate + rollout videos
	$(BIN)/llarva quickstart

test: $(STAMP)  ## the test suite (CPU)
	$(BIN)/python -m pytest -n 2 -q

bench-env: $(STAMP)
	$(BIN)/python benchmarks/env_throughput.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
