#!/usr/bin/env bash
# ToR-GRPO ablation: reasoning tokens only, Qwen3-VL-4B-Instruct on Geometry3K (recipes/README.md). Overrides: VAR=value bash grpo_tor_reasoning_only.sh [hydra overrides]
set -xeuo pipefail
MODEL_PATH=${MODEL_PATH:-Qwen/Qwen3-VL-4B-Instruct}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-qwen3_vl_4b_geo3k_grpo_tor_reasoning_only}
IMAGE_PATCH_SIZE=${IMAGE_PATCH_SIZE:-16}  # Qwen3-VL: 16-px patches (Qwen2/2.5-VL: 14)
# shellcheck source-path=SCRIPTDIR source=../../verl_tor/recipes/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../verl_tor/recipes/common.sh"

run_tor_recipe grpo "$EXPERIMENT_NAME" reasoning_only "$@"
