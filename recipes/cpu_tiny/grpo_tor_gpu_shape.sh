#!/usr/bin/env bash
# ToR-GRPO on CPU in the GPU recipes' batching shape: runs the packaged recipe,
# verl_tor/recipes/cpu_tiny/grpo_tor_gpu_shape.sh (one copy; recipes/README.md, "CPU in the GPU recipes' shape").
# VAR=value bash grpo_tor_gpu_shape.sh [hydra overrides]
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/../../verl_tor/recipes/cpu_tiny/grpo_tor_gpu_shape.sh" "$@"
