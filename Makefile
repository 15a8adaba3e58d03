# One-command setup, demo and tests on a fresh machine (Python 3.10+).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned and installed first. pyproject.toml allows a range, so GPU users keep the torch they have.
# On Linux, PyPI's torch wheel is the CUDA build (GBs of CUDA libraries); on a machine without an NVIDIA GPU,
# `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu` installs PyTorch's CPU-only wheel instead.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: setup demo chat-demo test lint bench bench-serve bench-llamacpp soak-serve quality compare clean
.PHONY: install test-needs

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# What running the model needs (torch, then this package and its runtime dependencies): make demo.
$(VENV)/.installed-runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e .
	touch $@

install: $(VENV)/.installed-runtime

# What the tests add: transformers (the numerical oracle), llama-cpp-python (builds llama.cpp from source:
# a C++ compiler and 5-25 minutes on 2 cores), openai, selenium. test-needs says first what pip cannot install.
$(VENV)/.installed: pyproject.toml $(VENV)/.installed-runtime | test-needs
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: test-needs $(VENV)/.installed

test-needs:
	@sh scripts/check_test_needs.sh $(BIN)/python

# The main job on a fresh machine, in under 10 minutes on a 2-core CPU: look at each preset, prepare
# the embedded corpus (the CPython docs that ship with Python), train tiny_10m for ~4 minutes, talk to it.
demo: install
	$(BIN)/sakimi-next --config tiny_5m --mode test --batch-size 1 --seq-len 128
	$(BIN)/sakimi-next --config tiny_10m --mode test --batch-size 1 --seq-len 128
	$(BIN)/sakimi-next --config small_50m --mode test --batch-size 1 --seq-len 128
	$(BIN)/sakimi-next --config tiny_10m --mode prepare_data --out-dir data/demo
	$(BIN)/sakimi-next --config tiny_10m --mode train --data-dir data/demo --out-dir runs/demo \
		--steps 300 --batch-size 8 --seq-len 128 --learning-rate 2e-3 --warmup-steps 30 \
		--eval-every 100 --save-every 100 --print-every 50 --max-minutes 6
	$(BIN)/sakimi-next --mode generate --resume-from runs/demo/latest --prompt "The list" \
		--max-new-tokens 150 --temperature 0.8 --top-k 50 --seed 0

# Talk to it, in ~6 minutes on an idle 2-core CPU: pretrain tiny_10m on English and Chinese stories,
# fine-tune it on English <-> Chinese translation requests (held-out sentences measured before and after),
# then chat with it. Needs a folder of public corpora, SHARED_DATA (docs/benchmarks.md, "The corpora").
SHARED_DATA ?= ../shared/data
CHAT_DEMO := data/chat-demo
chat-demo: install
	@test -d $(SHARED_DATA) || { echo "error: no corpora folder $(SHARED_DATA): pass SHARED_DATA=DIR" \
		"(docs/benchmarks.md, 'The corpora', lists the files)" >&2; exit 2; }
	mkdir -p $(CHAT_DEMO)
	head -n 1200 $(SHARED_DATA)/zh_novels/hongloumeng.txt > $(CHAT_DEMO)/hongloumeng_part.txt
	$(BIN)/python scripts/make_translation_chats.py $(SHARED_DATA)/cmn_eng/cmn.txt --out-dir $(CHAT_DEMO)/chats
	$(BIN)/sakimi-next --config tiny_10m --mode prepare_data --out-dir $(CHAT_DEMO)/pretrain \
		--train-data $(SHARED_DATA)/tinystories/tinystories_mini.txt $(CHAT_DEMO)/hongloumeng_part.txt
	$(BIN)/sakimi-next --config tiny_10m --mode train --data-dir $(CHAT_DEMO)/pretrain --out-dir runs/chat-demo/pretrain \
		--steps 250 --batch-size 8 --seq-len 256 --learning-rate 2e-3 --warmup-steps 25 \
		--eval-every 125 --save-every 125 --print-every 25
	$(BIN)/sakimi-next --mode prepare_data --out-dir $(CHAT_DEMO)/sft --tokenizer runs/chat-demo/pretrain/latest/tokenizer.json \
		--train-data $(CHAT_DEMO)/chats/train.jsonl --val-data $(CHAT_DEMO)/chats/val.jsonl
	$(BIN)/sakimi-next --mode train --data-dir $(CHAT_DEMO)/sft --init-from runs/chat-demo/pretrain/latest \
		--out-dir runs/chat-demo/sft --steps 300 --batch-size 8 --seq-len 128 --learning-rate 1e-3 --warmup-steps 30 \
		--eval-every 100 --save-every 100 --print-every 25
	$(BIN)/python scripts/chat_demo_eval.py --model runs/chat-demo/pretrain/latest --model runs/chat-demo/sft/latest \
		--data-dir $(CHAT_DEMO)/sft --chats $(CHAT_DEMO)/chats/val.jsonl --json runs/chat-demo/eval.json
	printf 'Translate into Chinese: I like cats.\n把这句话翻译成英文：我很高兴。\n/reset\nHow do you say "Where is the station?" in Chinese?\n' | \
		$(BIN)/sakimi-next --mode generate --chat --resume-from runs/chat-demo/sft/latest --temperature 0 --max-new-tokens 40

test: setup
	$(BIN)/python -m pytest -q

# ruff, as configured in pyproject.toml (pyflakes, pycodestyle, bugbear; lines of 120)
lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/sakimi-next --mode bench --config tiny_10m --compare transformers --compile --quantize int8

# --mode serve: aggregate tokens/s with 1, 4, 8 and 16 streaming clients, time to first token; the default
# (compiled) decoding step in float32 and in int8, then the eager step for comparison
bench-serve: setup
	$(BIN)/python scripts/bench_serve.py --threads 1 --temperature 0 --json bench_serve_fp32.json
	$(BIN)/python scripts/bench_serve.py --threads 1 --temperature 0 --quantize int8 --json bench_serve_int8.json
	$(BIN)/python scripts/bench_serve.py --threads 1 --temperature 0 --quantize int8 --engines 2 --json bench_serve_int8_engines2.json
	$(BIN)/python scripts/bench_serve.py --threads 1 --temperature 0 --compile no --json bench_serve_eager.json

# batch-1 greedy decoding beside llama.cpp (f32 and q8_0) on the same weights, each run in its own process
bench-llamacpp: setup
	$(BIN)/python scripts/bench_llamacpp.py --out bench_llamacpp.json

# --mode serve under 10 minutes of mixed traffic: statuses, p50/p99 latency, memory of both processes
soak-serve: install
	$(BIN)/python scripts/soak_serve.py --minutes 10

# Five texts of $(SHARED_DATA) (Tiny Shakespeare, 红楼梦, 三国演义, the King James Bible, Tatoeba's English-Chinese
# pairs): 90/10 split, default preparation, a 20-minute budget each (~2 hours); prints the held-out bits/byte of
# the best checkpoint and a sample (docs/benchmarks.md, "Quality"). QUALITY_ARGS adds flags, e.g.
# QUALITY_ARGS='--corpus kjv --extra-args="--dropout 0.1"' (results under runs/quality/TAG, one TAG a variant).
# compare: the same beside nanoGPT's character-level baby model, same split and minutes, NANOGPT=a nanoGPT checkout.
QUALITY_ARGS ?=
quality: install
	$(BIN)/python scripts/quality.py --shared-data $(SHARED_DATA) $(QUALITY_ARGS)

compare: install
	@test -n "$(NANOGPT)" || { echo "error: pass NANOGPT=DIR, a nanoGPT checkout (github.com/karpathy/nanoGPT)" >&2; exit 2; }
	$(BIN)/python scripts/compare_nanogpt.py --nanogpt $(NANOGPT) --shared-data $(SHARED_DATA) $(QUALITY_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
