# One-command setup, demo and tests on a fresh machine (Python 3.10+).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of torch is pinned here so pip never pulls a multi-GB CUDA build on a CPU machine;
# pyproject.toml allows a range, so GPU users keep the torch they have.
TORCH ?= torch==2.13.0

.PHONY: setup demo test bench quality clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# The main job on a fresh machine, in under 10 minutes on a 2-core CPU: look at each preset, prepare
# the embedded corpus (the CPython docs that ship with Python), train tiny_10m for ~4 minutes, talk to it.
demo: setup
	$(BIN)/sakimi-next --config tiny_5m --mode test --batch-size 1 --seq-len 128
	$(BIN)/sakimi-next --config tiny_10m --mode test --batch-size 1 --seq-len 128
	$(BIN)/sakimi-next --config small_50m --mode test --batch-size 1 --seq-len 128
	$(BIN)/sakimi-next --config tiny_10m --mode prepare_data --out-dir data/demo
	$(BIN)/sakimi-next --config tiny_10m --mode train --data-dir data/demo --out-dir runs/demo \
		--steps 300 --batch-size 8 --seq-len 128 --learning-rate 2e-3 --warmup-steps 30 \
		--eval-every 100 --save-every 100 --print-every 50 --max-minutes 6
	$(BIN)/sakimi-next --mode generate --resume-from runs/demo/latest --prompt "The list" \
		--max-new-tokens 150 --temperature 0.8 --top-k 50 --seed 0

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/sakimi-next --mode bench --config tiny_10m --compare transformers --compile

# Tiny Shakespeare and 红楼梦 from ../shared/data: 90/10 split, default preparation, 20-minute budget each;
# prints the held-out bits/byte of the best checkpoint and a sample (README, "Quality in a fixed time").
quality: setup
	$(BIN)/python scripts/quality.py

clean:
	rm -rf $(VENV) *.egg-info
