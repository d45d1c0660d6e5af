#!/usr/bin/env bash
# GRPO baseline on CPU (stock verl: trainer_mode=sync, ToR off). VAR=value bash grpo.sh [hydra overrides]
set -xeuo pipefail
EXPERIMENT_NAME=${EXPERIMENT_NAME:-cpu_tiny_grpo}
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

cpu_args "$EXPERIMENT_NAME"
run_recipe grpo "$EXPERIMENT_NAME" trainer.v1.trainer_mode=sync tor.enable=False "${CPU_ARGS[@]}" "$@"
