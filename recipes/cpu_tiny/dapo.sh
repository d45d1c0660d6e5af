#!/usr/bin/env bash
# DAPO baseline on CPU (stock verl: trainer_mode=sync, ToR off): runs the packaged recipe,
# verl_tor/recipes/cpu_tiny/dapo.sh (one copy, the one `verl-tor demo` runs from a wheel; recipes/README.md, "CPU").
# VAR=value bash dapo.sh [hydra overrides]
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/../../verl_tor/recipes/cpu_tiny/dapo.sh" "$@"
