#!/usr/bin/env bash
# Merge an FSDP checkpoint (verl's model_merger) and score it on MathVerse, MathVision, MathVista, WeMath and
# HallusionBench from local parquet copies (protocol: verl_tor/evaluate.py).
#   CKPT_DIR=checkpoints/verl_tor_geo3k/qwen2_5_vl_7b_geo3k_grpo_tor/global_step_300/actor \
#   EVAL_DATA_DIR=~/data/eval bash recipes/eval/evaluate.sh [--k 8]
set -xeuo pipefail

CKPT_DIR=${CKPT_DIR:?set CKPT_DIR to an FSDP actor checkpoint dir (or MODEL_PATH to a HF checkpoint)}
EVAL_DATA_DIR=${EVAL_DATA_DIR:-$HOME/data/eval}
BACKEND=${BACKEND:-vllm}                 # vllm on GPU; hf runs anywhere (slow)
MERGED_DIR=${MERGED_DIR:-$CKPT_DIR/huggingface_merged}
OUT=${OUT:-$MERGED_DIR/eval_results.json}

if [[ -z "${MODEL_PATH:-}" ]]; then
  if [[ ! -f "$MERGED_DIR/config.json" ]]; then
    python3 -m verl.model_merger merge --backend fsdp --local_dir "$CKPT_DIR" --target_dir "$MERGED_DIR"
  fi
  MODEL_PATH=$MERGED_DIR
fi

python3 -m verl_tor.evaluate --model "$MODEL_PATH" --data-dir "$EVAL_DATA_DIR" --backend "$BACKEND" --out "$OUT" "$@"
