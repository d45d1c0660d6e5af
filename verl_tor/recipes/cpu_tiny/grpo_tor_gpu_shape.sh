#!/usr/bin/env bash
# ToR-GRPO on CPU in the GPU recipes' batching shape (package data like the other CPU recipes; recipes/README.md,
# "CPU in the GPU recipes' shape"): what grpo_tor.sh runs, plus the GPU recipes' systems settings that cpu_args turns off for speed -- two FSDP ranks (and so
# two `hf` rollout replicas behind verl's load balancer), packed sequences (use_remove_padding), dynamic micro-batches
# under a token budget for the old, reference and image-free passes and the update, gradient checkpointing, and the
# reference policy's parameter offload. tests/test_main_ppo_shapes_on_cpu.py runs it and lists every key where it
# still differs from recipes/qwen2_5_vl_7b_geo3k/grpo_tor.sh, with the reason.
# VAR=value bash grpo_tor_gpu_shape.sh [hydra overrides]
set -xeuo pipefail
EXPERIMENT_NAME=${EXPERIMENT_NAME:-cpu_tiny_grpo_tor_gpu_shape}
N_GPUS_PER_NODE=${N_GPUS_PER_NODE:-2}           # two FSDP ranks, two rollout replicas (logical Ray GPU slots)
MAX_TOKENS_PER_GPU=${MAX_TOKENS_PER_GPU:-600}   # a rank's 8 rollouts (~200 tokens each) split into micro-batches
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

cpu_args "$EXPERIMENT_NAME"
GPU_SHAPE_ARGS=(
  actor_rollout_ref.model.use_remove_padding=True
  actor_rollout_ref.model.enable_gradient_checkpointing=True
  actor_rollout_ref.actor.use_dynamic_bsz=True
  actor_rollout_ref.actor.ppo_max_token_len_per_gpu="$MAX_TOKENS_PER_GPU"
  actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True
  actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu="$MAX_TOKENS_PER_GPU"
  actor_rollout_ref.ref.log_prob_use_dynamic_bsz=True
  actor_rollout_ref.ref.log_prob_max_token_len_per_gpu="$MAX_TOKENS_PER_GPU"
  actor_rollout_ref.ref.fsdp_config.param_offload=True
  # verl's load balancer: least in-flight requests. Under full determinism verl 0.9.1 routes by request id instead,
  # and its V1 agent loop gives every request the id det-0, so one replica would serve them all.
  actor_rollout_ref.rollout.full_determinism=False
)
run_tor_recipe grpo "$EXPERIMENT_NAME" tor "${CPU_ARGS[@]}" "${GPU_SHAPE_ARGS[@]}" "$@"
