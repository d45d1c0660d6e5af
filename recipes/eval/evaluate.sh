#!/usr/bin/env bash
# Score a checkpoint on MathVerse, MathVision, MathVista, WeMath and HallusionBench from local parquet copies
# (protocol: verl_tor/tools/evaluate.py). Either a Hugging Face checkpoint (MODEL_PATH) or an FSDP actor checkpoint
# (CKPT_DIR), which is merged first with verl's model_merger:
#   MODEL_PATH=/path/to/hf_checkpoint EVAL_DATA_DIR=~/data/eval bash recipes/eval/evaluate.sh [--k 8]
#   CKPT_DIR=checkpoints/verl_tor_geo3k/qwen2_5_vl_7b_geo3k_grpo_tor/global_step_300/actor \
#   EVAL_DATA_DIR=~/data/eval bash recipes/eval/evaluate.sh [--k 8]
# Results go to OUT, rewritten after every benchmark. Default: RESULTS_DIR/<name>.json with RESULTS_DIR=./eval_results
# (in the directory you run from, never inside the model: the shipped model lives in the installed package) and
# <name> the model folder's name, or <experiment>_<global_step_N> for CKPT_DIR.
set -xeuo pipefail

EVAL_DATA_DIR=${EVAL_DATA_DIR:-$HOME/data/eval}
BACKEND=${BACKEND:-vllm}                 # vllm on GPU; hf runs anywhere (slow)
RESULTS_DIR=${RESULTS_DIR:-eval_results}

if [[ -n "${MODEL_PATH:-}" ]]; then
  NAME=$(basename "${MODEL_PATH%/}")
else
  CKPT_DIR=${CKPT_DIR:?set MODEL_PATH to a Hugging Face checkpoint, or CKPT_DIR to an FSDP actor checkpoint dir}
  MERGED_DIR=${MERGED_DIR:-$CKPT_DIR/huggingface_merged}
  STEP_DIR=${CKPT_DIR%/}
  STEP_DIR=${STEP_DIR%/actor}            # .../<experiment>/global_step_N
  NAME=$(basename "$(dirname "$STEP_DIR")")_$(basename "$STEP_DIR")
fi
if [[ -z "${OUT:-}" ]]; then
  mkdir -p "$RESULTS_DIR"
  OUT=$(cd "$RESULTS_DIR" && pwd)/$NAME.json
fi
# check where the results go before merging or loading anything
OUT_DIR="$(dirname "$OUT")"
if [[ ! -d "$OUT_DIR" ]]; then
  echo "OUT=$OUT: the folder $OUT_DIR does not exist. Fix: create it, or set OUT elsewhere" >&2
  exit 2
fi

if [[ -z "${MODEL_PATH:-}" ]]; then
  if [[ ! -f "$MERGED_DIR/config.json" ]]; then
    python3 -m verl.model_merger merge --backend fsdp --local_dir "$CKPT_DIR" --target_dir "$MERGED_DIR"
  fi
  MODEL_PATH=$MERGED_DIR
fi

python3 -m verl_tor.tools.evaluate --model "$MODEL_PATH" --data-dir "$EVAL_DATA_DIR" --backend "$BACKEND" --out "$OUT" "$@"
