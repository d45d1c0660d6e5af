#!/usr/bin/env bash
# ToR-GRPO on CPU: verl's real main_ppo with a tiny Qwen2.5-VL (recipes/README.md, "CPU"). VAR=value bash grpo_tor.sh [overrides]
set -xeuo pipefail
EXPERIMENT_NAME=${EXPERIMENT_NAME:-cpu_tiny_grpo_tor}
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

run_cpu_recipe grpo "$EXPERIMENT_NAME" \
  trainer.v1.trainer_mode=tor_sync \
  tor.enable=True \
  "$@"
