#!/usr/bin/env bash
# ToR-DAPO on CPU (clip-higher, dynamic sampling, overlong shaping). VAR=value bash dapo_tor.sh [overrides]
set -xeuo pipefail
EXPERIMENT_NAME=${EXPERIMENT_NAME:-cpu_tiny_dapo_tor}
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

run_cpu_recipe dapo "$EXPERIMENT_NAME" \
  trainer.v1.trainer_mode=tor_sync \
  tor.enable=True \
  "$@"
