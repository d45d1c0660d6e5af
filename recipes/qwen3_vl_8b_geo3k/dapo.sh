#!/usr/bin/env bash
# DAPO baseline, Qwen3-VL-8B-Instruct on Geometry3K (recipes/README.md). Overrides: VAR=value bash dapo.sh [hydra overrides]
set -xeuo pipefail
MODEL_PATH=${MODEL_PATH:-Qwen/Qwen3-VL-8B-Instruct}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-qwen3_vl_8b_geo3k_dapo}
IMAGE_PATCH_SIZE=${IMAGE_PATCH_SIZE:-16}  # Qwen3-VL: 16-px patches (Qwen2/2.5-VL: 14)
# shellcheck source-path=SCRIPTDIR source=../../verl_tor/recipes/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../verl_tor/recipes/common.sh"

run_recipe dapo "$EXPERIMENT_NAME" \
  trainer.v1.trainer_mode=sync \
  tor.enable=False \
  "$@"
