#!/usr/bin/env bash
# DAPO baseline on CPU (stock verl: trainer_mode=sync, ToR off; clip-higher, dynamic sampling, overlong shaping).
# VAR=value bash dapo.sh [hydra overrides]
set -xeuo pipefail
EXPERIMENT_NAME=${EXPERIMENT_NAME:-cpu_tiny_dapo}
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

cpu_args "$EXPERIMENT_NAME"
run_recipe dapo "$EXPERIMENT_NAME" trainer.v1.trainer_mode=sync tor.enable=False "${CPU_ARGS[@]}" "$@"
