# One-command setup, demo and tests on a fresh machine (Python 3.10+).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of torch is pinned here so pip never pulls a multi-GB CUDA build on a CPU machine;
# pyproject.toml allows a range, so GPU users keep the torch they have.
TORCH ?= torch==2.13.0

.PHONY: setup demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/sakimi-next --config tiny_5m --mode test
	$(BIN)/sakimi-next --config tiny_10m --mode test
	$(BIN)/sakimi-next --config small_50m --mode test --batch-size 1

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/sakimi-next --mode bench --config tiny_10m --compare transformers

clean:
	rm -rf $(VENV) *.egg-info
