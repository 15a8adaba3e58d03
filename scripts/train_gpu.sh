#!/usr/bin/env bash
# Train on a rented NVIDIA machine: a virtual environment with a CUDA torch and flash-linear-attention,
# checked before anything runs, then data preparation, training on every GPU with torchrun, and a sample.
#
#   bash scripts/train_gpu.sh setup              # install and check only
#   bash scripts/train_gpu.sh check              # setup, then scripts/gpu_check.py (fla against the
#                                                #   reference, speed; under 8 minutes on one GPU)
#   bash scripts/train_gpu.sh smoke              # setup, then 200 steps of tiny_10m on the embedded
#                                                #   corpus and a sample: a few minutes
#   bash scripts/train_gpu.sh full [TEXT ...]    # the real run: small_50m on TEXT (.txt/.jsonl files,
#                                                #   directories or globs; tiny_10m on the embedded
#                                                #   corpus without), 20,000 steps; re-running resumes
#
# The venv (.venv-gpu) reuses the system's torch when it is a CUDA build that sees the GPU (and is at
# least 2.7; on a Hopper GPU with fla, its Triton must not be 3.4.0-3.7.0: fla trains wrongly there and
# refuses); otherwise it gets torch 2.13.0 built for the newest CUDA the driver supports (CUDA 13.0
# from driver 580, else CUDA 12.6). flash-linear-attention comes as fla-core, pinned in pyproject.toml's
# `fla` extra. The choice is made and checked by scripts/gpu_env.py.
#
# Settings (environment variables):
#   PRESET       model preset                         (full: small_50m with TEXT, else tiny_10m)
#   STEPS        optimiser steps                      (smoke 200, full 20000)
#   BATCH        sequences per GPU per step           (smoke 16, full 32)
#   SEQ          tokens per sequence                  (smoke 512, full 1024)
#   LR           peak learning rate                   (6e-4)
#   OUT          run directory                        (smoke: a new runs/smoke-DATE; full: runs/$PRESET)
#   FLA          1 = install and require fla, 0 = train with the chunk kernel   (1)
#   FSDP         1 = shard the model with FSDP2 instead of replicating it with DDP (0)
#   TORCH_INDEX  a pip wheel index for torch, instead of the automatic choice
#   PYTHON       the system python                    (python3)
#   DRY_RUN      1 = print the install commands instead of running them, then stop
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-}
case "$MODE" in
  setup|check|smoke|full) shift ;;
  *) echo "error: give a mode: bash scripts/train_gpu.sh setup|check|smoke|full [TEXT ...] (see the header)" >&2
     exit 2 ;;
esac
if [ "$MODE" != full ] && [ $# -gt 0 ]; then echo "error: only 'full' takes TEXT" >&2; exit 2; fi
PY=${PYTHON:-python3}; FLA=${FLA:-1}; FSDP=${FSDP:-0}; DRY_RUN=${DRY_RUN:-0}
VENV=.venv-gpu

run() {  # show each install command; in a dry run, only show it
  echo "+ $*"
  if [ "$DRY_RUN" != 1 ]; then "$@"; fi
}

command -v nvidia-smi >/dev/null || { echo "error: no nvidia-smi: this script is for NVIDIA GPU machines" >&2; exit 2; }
nvidia-smi -L >/dev/null 2>&1 || { echo "error: nvidia-smi fails: is the NVIDIA driver loaded? (nvidia-smi -L)" >&2; exit 2; }
NGPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
echo "== $NGPU GPU(s): $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | sort | uniq -c | xargs)"

NO_FLA=(); [ "$FLA" = 1 ] || NO_FLA=(--no-fla)
if [ "$DRY_RUN" = 1 ] || [ ! -x $VENV/bin/sakimi-next ]; then
  SOURCE=$("$PY" scripts/gpu_env.py plan "${NO_FLA[@]}") || exit 2  # "system", or pip's arguments for a pinned CUDA torch
  if [ "$SOURCE" = system ]; then
    run "$PY" -m venv --system-site-packages $VENV
  else
    run "$PY" -m venv $VENV
    run $VENV/bin/pip install -q --upgrade pip
    # shellcheck disable=SC2086  # SOURCE is "torch==X --index-url URL": several pip arguments
    run $VENV/bin/pip install -q $SOURCE
  fi
  if [ "$FLA" = 1 ]; then run $VENV/bin/pip install -q -e '.[fla]'; else run $VENV/bin/pip install -q -e .; fi
fi
if [ "$DRY_RUN" = 1 ]; then echo "dry run: stopping before the checks"; exit 0; fi
$VENV/bin/python scripts/gpu_env.py verify "${NO_FLA[@]}" || exit 2

case "$MODE" in
  setup) exit 0 ;;
  check) if [ "$FLA" = 1 ]; then KERNEL=fla; else KERNEL=chunk; fi
         exec $VENV/bin/python scripts/gpu_check.py --kernel "$KERNEL" --out gpu_check.json ;;
esac

if [ "$MODE" = smoke ]; then
  PRESET=${PRESET:-tiny_10m}; STEPS=${STEPS:-200}; BATCH=${BATCH:-16}; SEQ=${SEQ:-512}
  OUT=${OUT:-runs/smoke-$(date +%Y%m%d-%H%M%S)}; WARMUP=20; EVERY=100
else
  if [ $# -gt 0 ]; then PRESET=${PRESET:-small_50m}; else PRESET=${PRESET:-tiny_10m}; fi
  STEPS=${STEPS:-20000}; BATCH=${BATCH:-32}; SEQ=${SEQ:-1024}; OUT=${OUT:-runs/$PRESET}; WARMUP=1000; EVERY=500
fi
LR=${LR:-6e-4}

DATA=data/$PRESET
if [ $# -gt 0 ]; then
  $VENV/bin/sakimi-next --config "$PRESET" --mode prepare_data --train-data "$@" --out-dir "$DATA"
else
  $VENV/bin/sakimi-next --config "$PRESET" --mode prepare_data --out-dir "$DATA"
fi

EXTRA=()
if [ "$FSDP" = 1 ]; then EXTRA+=(--fsdp); fi
$VENV/bin/torchrun --standalone --nproc-per-node "$NGPU" -m sakimi_next --config "$PRESET" --mode train \
  --data-dir "$DATA" --out-dir "$OUT" --steps "$STEPS" --batch-size "$BATCH" --seq-len "$SEQ" \
  --learning-rate "$LR" --warmup-steps "$WARMUP" --eval-every "$EVERY" --save-every "$((EVERY * 2))" \
  --dtype bf16 --device cuda --kernel auto --resume-from auto "${EXTRA[@]}"

$VENV/bin/sakimi-next --mode generate --resume-from "$OUT/latest" --prompt "" --max-new-tokens 200 --seed 0
