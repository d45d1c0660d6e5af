#!/usr/bin/env bash
# ToR-GRPO (the paper's tor.* values) on CPU: runs the packaged recipe,
# verl_tor/recipes/cpu_tiny/grpo_tor.sh (one copy, the one `verl-tor demo` runs from a wheel; recipes/README.md, "CPU").
# VAR=value bash grpo_tor.sh [hydra overrides]
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/../../verl_tor/recipes/cpu_tiny/grpo_tor.sh" "$@"
