#!/usr/bin/env bash
# DAPO baseline, Qwen2.5-VL-7B-Instruct on Geometry3K (recipes/README.md). Overrides: VAR=value bash dapo.sh [hydra overrides]
set -xeuo pipefail
MODEL_PATH=${MODEL_PATH:-Qwen/Qwen2.5-VL-7B-Instruct}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-qwen2_5_vl_7b_geo3k_dapo}
# shellcheck source-path=SCRIPTDIR source=../../verl_tor/recipes/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../verl_tor/recipes/common.sh"

run_recipe dapo "$EXPERIMENT_NAME" \
  trainer.v1.trainer_mode=sync \
  tor.enable=False \
  "$@"
