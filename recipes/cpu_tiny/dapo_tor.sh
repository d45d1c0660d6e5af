#!/usr/bin/env bash
# ToR-DAPO (clip-higher, dynamic sampling, overlong shaping; the paper's tor.* values) on CPU: runs the packaged recipe,
# verl_tor/recipes/cpu_tiny/dapo_tor.sh (one copy, the one `verl-tor demo` runs from a wheel; recipes/README.md, "CPU").
# VAR=value bash dapo_tor.sh [hydra overrides]
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/../../verl_tor/recipes/cpu_tiny/dapo_tor.sh" "$@"
