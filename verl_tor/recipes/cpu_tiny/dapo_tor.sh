#!/usr/bin/env bash
# ToR-DAPO (clip-higher, dynamic sampling, overlong shaping; the paper's tor.* values) on CPU.
# VAR=value bash dapo_tor.sh [hydra overrides]
set -xeuo pipefail
EXPERIMENT_NAME=${EXPERIMENT_NAME:-cpu_tiny_dapo_tor}
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

cpu_args "$EXPERIMENT_NAME"
run_tor_recipe dapo "$EXPERIMENT_NAME" tor "${CPU_ARGS[@]}" "$@"
