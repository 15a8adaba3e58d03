#!/usr/bin/env bash
# One command on a rented NVIDIA machine: set up, prepare the data, train on every GPU with torchrun,
# and print a sample.
#
#   bash scripts/train_gpu.sh [TEXT ...]     # .txt/.jsonl files, directories or globs
#
# Without TEXT it trains tiny_10m on the embedded CPython docs (a smoke run); with TEXT, small_50m
# (whose 50,304-token vocabulary needs a corpus of tens of MB). Settings (environment variables):
#   PRESET    model preset                       (small_50m with TEXT, else tiny_10m)
#   STEPS     optimiser steps                    (20000)
#   BATCH     sequences per GPU per step         (32)
#   SEQ       tokens per sequence                (1024)
#   LR        peak learning rate                 (6e-4)
#   OUT       run directory                      (runs/$PRESET)
#   FLA       1 = install flash-linear-attention for the Triton kernels (1)
#   FSDP      1 = shard the model with FSDP2 instead of replicating it with DDP (0)
# Re-running the script resumes from the latest checkpoint in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -gt 0 ]; then PRESET=${PRESET:-small_50m}; else PRESET=${PRESET:-tiny_10m}; fi
STEPS=${STEPS:-20000}; BATCH=${BATCH:-32}; SEQ=${SEQ:-1024}; LR=${LR:-6e-4}
OUT=${OUT:-runs/$PRESET}; FLA=${FLA:-1}; FSDP=${FSDP:-0}
VENV=.venv-gpu

command -v nvidia-smi >/dev/null || { echo "error: no nvidia-smi: this script is for NVIDIA GPU machines" >&2; exit 2; }
NGPU=$(nvidia-smi -L | wc -l)
echo "== $NGPU GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs)"

if [ ! -x $VENV/bin/sakimi-next ]; then
  python3 -m venv $VENV
  $VENV/bin/pip install -q --upgrade pip
  $VENV/bin/pip install -q torch            # PyPI's default Linux wheel is the CUDA build
  $VENV/bin/pip install -q -e .
  if [ "$FLA" = 1 ]; then $VENV/bin/pip install -q flash-linear-attention || echo "note: fla not installed; using the chunk kernel"; fi
fi

DATA=data/$PRESET
if [ $# -gt 0 ]; then
  $VENV/bin/sakimi-next --config "$PRESET" --mode prepare_data --train-data "$@" --out-dir "$DATA"
else
  $VENV/bin/sakimi-next --config "$PRESET" --mode prepare_data --out-dir "$DATA"
fi

EXTRA=()
[ "$FSDP" = 1 ] && EXTRA+=(--fsdp)
$VENV/bin/torchrun --standalone --nproc-per-node "$NGPU" -m sakimi_next --config "$PRESET" --mode train \
  --data-dir "$DATA" --out-dir "$OUT" --steps "$STEPS" --batch-size "$BATCH" --seq-len "$SEQ" \
  --learning-rate "$LR" --warmup-steps 1000 --eval-every 500 --save-every 1000 --dtype bf16 \
  --device cuda --kernel auto --resume-from auto "${EXTRA[@]}"

$VENV/bin/sakimi-next --mode generate --resume-from "$OUT/latest" --prompt "" --max-new-tokens 200 --seed 0
