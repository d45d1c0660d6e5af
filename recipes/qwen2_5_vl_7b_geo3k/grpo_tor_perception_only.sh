#!/usr/bin/env bash
# ToR-GRPO ablation: perception tokens only, Qwen2.5-VL-7B-Instruct on Geometry3K (recipes/README.md). Overrides: VAR=value bash grpo_tor_perception_only.sh [hydra overrides]
set -xeuo pipefail
MODEL_PATH=${MODEL_PATH:-Qwen/Qwen2.5-VL-7B-Instruct}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-qwen2_5_vl_7b_geo3k_grpo_tor_perception_only}
# shellcheck source-path=SCRIPTDIR source=../../verl_tor/recipes/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../verl_tor/recipes/common.sh"

run_tor_recipe grpo "$EXPERIMENT_NAME" perception_only "$@"
