#!/usr/bin/env bash
# Shared body of every Geometry3K recipe: baseline and ToR scripts differ only in the flags they pass to
# run_recipe (the trainer mode and tor.*). Sourced by the per-model scripts (a checkout's recipes/*_geo3k/*.sh) and
# by cpu_tiny/common.sh; every setting is a variable with a default, overridable from the environment, and any extra
# hydra override can follow the script ("$@"). It ships inside the package (verl_tor/recipes/, with config/
# tor_trainer.yaml next to it), so an installed wheel runs the same command line as a checkout.
# Set VERL_TOR_DRY_RUN=1 to print the command (one argument per line) instead of launching it, and to compose and
# validate its config (hydra + verl's validate_config + the tor block; a misspelt +tor.* key fails);
# VERL_TOR_DRY_RUN=print only prints.

RECIPES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# ---- cluster -----------------------------------------------------------------------------------------------
NNODES=${NNODES:-1}
N_GPUS_PER_NODE=${N_GPUS_PER_NODE:-8}
# ---- data (python recipes/data/geo3k.py --local_save_dir ...) ------------------------------------------------
DATA_DIR=${DATA_DIR:-$HOME/data/geo3k}
TRAIN_FILES=${TRAIN_FILES:-$DATA_DIR/train.parquet}
VAL_FILES=${VAL_FILES:-$DATA_DIR/test.parquet}
# ---- paper / EasyR1 settings ---------------------------------------------------------------------------------
ROLLOUT_BATCH_SIZE=${ROLLOUT_BATCH_SIZE:-512}   # prompts per rollout batch
N_RESPONSES=${N_RESPONSES:-12}                  # rollouts per prompt (GRPO group)
UPDATE_BATCH_SIZE=${UPDATE_BATCH_SIZE:-128}     # prompts per actor update (mini-batch)
LR=${LR:-1e-6}                                  # constant
TEMPERATURE=${TEMPERATURE:-1.0}
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-2048}
MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-2048}
TOTAL_EPOCHS=${TOTAL_EPOCHS:-15}
KL_COEF=${KL_COEF:-0.01}                        # GRPO only: low-variance KL loss
CLIP_LOW=${CLIP_LOW:-0.2}                       # DAPO clip-higher
CLIP_HIGH=${CLIP_HIGH:-0.28}
OVERLONG_BUFFER=${OVERLONG_BUFFER:-512}         # DAPO overlong shaping: last tokens before MAX_RESPONSE_LENGTH
# ---- systems ---------------------------------------------------------------------------------------------------
ROLLOUT_TP=${ROLLOUT_TP:-1}
GPU_MEMORY_UTILIZATION=${GPU_MEMORY_UTILIZATION:-0.6}
MAX_TOKENS_PER_GPU=${MAX_TOKENS_PER_GPU:-16384}
PROJECT_NAME=${PROJECT_NAME:-verl_tor_geo3k}
LOGGER=${LOGGER:-'["console","wandb"]'}          # '["console"]' without a wandb login
SAVE_FREQ=${SAVE_FREQ:-20}
TEST_FREQ=${TEST_FREQ:-5}
# ---- model family ------------------------------------------------------------------------------------------------
# Vision patch size given to verl's data pipeline (qwen-vl-utils resizes images to multiples of 2 x this before the
# processor sees them). Empty: verl's own default, data.image_patch_size=14 (Qwen2-VL / Qwen2.5-VL); Qwen3-VL: 16.
IMAGE_PATCH_SIZE=${IMAGE_PATCH_SIZE:-}

# ---- ToR: the paper's definitions (arXiv 2603.25077) -----------------------------------------------------------
# Every ToR arm passes all of them explicitly, so its command line states what it runs; they equal
# verl_tor.config.PAPER (tests/test_recipes_on_cpu.py checks both). tor.entropy=top_p is the paper's reasoning score
# (needs actor_rollout_ref.model.use_fused_kernels=False, set for every arm below); ToRConfig's own default is the
# free full-vocabulary entropy (recipes/README.md, "tor.entropy"). tor.mode is each arm's own (run_tor_recipe).
TOR_PAPER_ARGS=(
  tor.enable=True
  tor.reasoning_ratio=0.3
  tor.perception_ratio=0.3
  tor.reasoning_weight=1.0
  tor.perception_weight=0.5
  tor.scope=batch
  tor.entropy=top_p
  tor.entropy_top_p=0.95
  tor.sensitivity=abs_log_ratio
  tor.image_view=remove
  tor.scorer_policy=old
  tor.rank_tokens=all
)

# run_tor_recipe ALGO EXPERIMENT MODE [overrides...]: run_recipe with the ToR trainer, the paper's tor.* values and
# tor.mode=MODE (tor, or an ablation arm); overrides after it win (hydra keeps the last value of a key).
run_tor_recipe() {
  local algo=$1 experiment=$2 mode=$3
  shift 3
  run_recipe "$algo" "$experiment" trainer.v1.trainer_mode=tor_sync "${TOR_PAPER_ARGS[@]}" tor.mode="$mode" "$@"
}

# run_recipe ALGO EXPERIMENT [overrides...]: ALGO is grpo or dapo; the rest are hydra overrides (ToR flags, "$@").
run_recipe() {
  local algo=$1 experiment=$2
  shift 2
  local args=(
    python3 -m verl.trainer.main_ppo
    --config-path="$RECIPES_DIR/config"
    --config-name=tor_trainer
    algorithm.adv_estimator=grpo
    data.train_files="$TRAIN_FILES"
    data.val_files="$VAL_FILES"
    data.train_batch_size="$ROLLOUT_BATCH_SIZE"
    data.max_prompt_length="$MAX_PROMPT_LENGTH"
    data.max_response_length="$MAX_RESPONSE_LENGTH"
    data.filter_overlong_prompts=True
    data.truncation=error
    data.image_key=images
    actor_rollout_ref.model.path="$MODEL_PATH"
    actor_rollout_ref.model.use_remove_padding=True
    actor_rollout_ref.model.use_fused_kernels=False
    actor_rollout_ref.model.enable_gradient_checkpointing=True
    actor_rollout_ref.actor.strategy=fsdp2
    actor_rollout_ref.actor.optim.lr="$LR"
    actor_rollout_ref.actor.ppo_mini_batch_size="$UPDATE_BATCH_SIZE"
    actor_rollout_ref.actor.use_dynamic_bsz=True
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu="$MAX_TOKENS_PER_GPU"
    actor_rollout_ref.actor.entropy_coeff=0
    actor_rollout_ref.actor.loss_agg_mode=token-mean
    actor_rollout_ref.actor.fsdp_config.param_offload=False
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=False
    actor_rollout_ref.rollout.name=vllm
    actor_rollout_ref.rollout.n="$N_RESPONSES"
    actor_rollout_ref.rollout.temperature="$TEMPERATURE"
    actor_rollout_ref.rollout.tensor_model_parallel_size="$ROLLOUT_TP"
    actor_rollout_ref.rollout.gpu_memory_utilization="$GPU_MEMORY_UTILIZATION"
    actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True
    actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu="$MAX_TOKENS_PER_GPU"
    actor_rollout_ref.ref.log_prob_use_dynamic_bsz=True
    actor_rollout_ref.ref.log_prob_max_token_len_per_gpu="$MAX_TOKENS_PER_GPU"
    actor_rollout_ref.ref.fsdp_config.param_offload=True
    trainer.logger="$LOGGER"
    trainer.project_name="$PROJECT_NAME"
    trainer.experiment_name="$experiment"
    trainer.nnodes="$NNODES"
    trainer.n_gpus_per_node="$N_GPUS_PER_NODE"
    trainer.total_epochs="$TOTAL_EPOCHS"
    trainer.save_freq="$SAVE_FREQ"
    trainer.test_freq="$TEST_FREQ"
    trainer.val_before_train=True
  )
  case "$algo" in
    grpo)
      args+=(
        actor_rollout_ref.actor.use_kl_loss=True
        actor_rollout_ref.actor.kl_loss_coef="$KL_COEF"
        actor_rollout_ref.actor.kl_loss_type=low_var_kl
        algorithm.use_kl_in_reward=False
      )
      ;;
    dapo)
      args+=(
        actor_rollout_ref.actor.use_kl_loss=False
        algorithm.use_kl_in_reward=False
        actor_rollout_ref.actor.clip_ratio_low="$CLIP_LOW"
        actor_rollout_ref.actor.clip_ratio_high="$CLIP_HIGH"
        algorithm.filter_groups.enable=True
        algorithm.filter_groups.metric=acc
        reward.reward_manager.name=dapo
        +reward.reward_kwargs.max_resp_len="$MAX_RESPONSE_LENGTH"
        +reward.reward_kwargs.overlong_buffer_cfg.enable=True
        +reward.reward_kwargs.overlong_buffer_cfg.len="$OVERLONG_BUFFER"
        +reward.reward_kwargs.overlong_buffer_cfg.penalty_factor=1.0
        +reward.reward_kwargs.overlong_buffer_cfg.log=False
      )
      ;;
    *)
      echo "run_recipe: unknown algorithm '$algo' (grpo or dapo)" >&2
      return 2
      ;;
  esac
  if [[ -n "$IMAGE_PATCH_SIZE" ]]; then
    args+=(data.image_patch_size="$IMAGE_PATCH_SIZE")
  fi
  args+=("$@")
  if [[ "${VERL_TOR_DRY_RUN:-0}" != "0" ]]; then
    printf '%s\n' "${args[@]}"
    # 1: also compose the config with hydra and validate it as main_ppo would (verl's validate_config + tor.*),
    # with the python that would run it; print: the command only
    if [[ "${VERL_TOR_DRY_RUN}" != "print" ]]; then
      "${args[0]}" -m verl_tor.tools.cli check-config -- "${args[@]:3}" || return 2
    fi
    return 0
  fi
  "${args[@]}"
}
