#!/usr/bin/env bash
# ToR-GRPO (the paper's tor.* values) on CPU: verl's real main_ppo with a tiny Qwen2.5-VL (recipes/README.md, "CPU").
# VAR=value bash grpo_tor.sh [hydra overrides]
set -xeuo pipefail
EXPERIMENT_NAME=${EXPERIMENT_NAME:-cpu_tiny_grpo_tor}
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

cpu_args "$EXPERIMENT_NAME"
run_tor_recipe grpo "$EXPERIMENT_NAME" tor "${CPU_ARGS[@]}" "$@"
