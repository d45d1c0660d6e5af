#!/usr/bin/env bash
# verl's real trainer on a laptop: the Geometry3K recipe body (../common.sh) scaled to a tiny Qwen2.5-VL on CPU,
# with verl_tor's local backend (verl_tor/local/: the `cpu` platform, the `hf` rollout). Sourced by grpo.sh,
# grpo_tor.sh, dapo.sh and dapo_tor.sh; every setting is a variable with a default, and extra hydra overrides follow the script
# ("$@", last). These files are package data (verl_tor/recipes/): `verl-tor demo` runs them from an installed wheel,
# and a checkout's recipes/cpu_tiny/*.sh forward to them. Prepare the data once:
# python -m verl_tor.local.prepare --out-dir "$CPU_DIR" (`verl-tor demo` does it for you).

export VERL_PLATFORM=cpu              # verl's platform switch -> verl_tor's CPU platform (set before Python starts)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread per Ray worker: the actor, rollout and reward share the cores
# ---- the tiny model and data (verl_tor.local.prepare) ---------------------------------------------------------
CPU_DIR=${CPU_DIR:-/tmp/verl_tor_cpu}
# the shipped figure reader (verl_tor/assets/figure_reader/README.md): a 1M-parameter Qwen2.5-VL that reads its figure
MODEL_PATH=${MODEL_PATH:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/assets/figure_reader}
DATA_DIR=${DATA_DIR:-$CPU_DIR/data}
TRAIN_FILES=${TRAIN_FILES:-$DATA_DIR/train.parquet}
VAL_FILES=${VAL_FILES:-$DATA_DIR/val.parquet}
# ---- laptop scale (the paper's values are in ../common.sh) ----------------------------------------------------------
N_GPUS_PER_NODE=${N_GPUS_PER_NODE:-1}           # logical Ray GPU slots (ray_init.num_gpus), one FSDP worker
ROLLOUT_BATCH_SIZE=${ROLLOUT_BATCH_SIZE:-4}     # prompts per step
N_RESPONSES=${N_RESPONSES:-4}                   # rollouts per prompt
UPDATE_BATCH_SIZE=${UPDATE_BATCH_SIZE:-4}       # prompts per actor update: one update per step
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-16}        # trajectories per forward (no dynamic batch size on CPU)
LR=${LR:-1e-5}
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-256}
MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-48}        # the task's answers take ~29 tokens
OVERLONG_BUFFER=${OVERLONG_BUFFER:-12}
TOTAL_STEPS=${TOTAL_STEPS:-4}
SEED=${SEED:-1}
LOGGER=${LOGGER:-'["console"]'}
SAVE_FREQ=${SAVE_FREQ:--1}
TEST_FREQ=${TEST_FREQ:--1}
OUT_DIR=${OUT_DIR:-$CPU_DIR/runs}
RAY_TMP=${RAY_TMP:-/tmp/verl_tor_ray}

# shellcheck source-path=SCRIPTDIR source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

# cpu_args EXPERIMENT: sets CPU_ARGS, what a CPU needs on top of ../common.sh's command line. The scripts pass it to
# run_recipe / run_tor_recipe before "$@", after the GPU settings it replaces (hydra keeps the last value of a key).
cpu_args() {
  local experiment=$1
  check_cpu_data
  # shellcheck disable=SC2034  # read by the scripts that source this file
  CPU_ARGS=(
    trainer.device=cpu
    trainer.total_training_steps="$TOTAL_STEPS"
    trainer.val_before_train=False
    trainer.default_local_dir="$OUT_DIR/$experiment"
    trainer.resume_mode=disable
    data.seed="$SEED"
    data.dataloader_num_workers=0
    actor_rollout_ref.rollout.name=hf
    actor_rollout_ref.rollout.full_determinism=True
    actor_rollout_ref.rollout.seed="$SEED"
    actor_rollout_ref.rollout.agent.num_workers=1
    actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=False
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu="$MICRO_BATCH_SIZE"
    actor_rollout_ref.model.use_remove_padding=False
    actor_rollout_ref.model.enable_gradient_checkpointing=False
    +actor_rollout_ref.model.override_config.attn_implementation=sdpa
    actor_rollout_ref.actor.use_dynamic_bsz=False
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu="$MICRO_BATCH_SIZE"
    "+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}"
    actor_rollout_ref.actor.fsdp_config.use_torch_compile=False
    actor_rollout_ref.actor.fsdp_config.seed="$SEED"
    actor_rollout_ref.ref.log_prob_use_dynamic_bsz=False
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu="$MICRO_BATCH_SIZE"
    actor_rollout_ref.ref.fsdp_config.param_offload=False
    "+actor_rollout_ref.ref.fsdp_config.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}"
    actor_rollout_ref.ref.fsdp_config.use_torch_compile=False
    reward.num_workers=1
    transfer_queue.backend.SimpleStorage.num_data_storage_units=1
    data.filter_overlong_prompts=False
    ray_kwargs.ray_init.num_cpus=32
    +ray_kwargs.ray_init.include_dashboard=False
    +ray_kwargs.ray_init.num_gpus="$N_GPUS_PER_NODE"
    +ray_kwargs.ray_init._temp_dir="$RAY_TMP"
  )
}

# check_cpu_data: exit 2 with the prepare command when the data files are missing. verl reads them only inside its
# Ray task runner, where a missing file is a `datasets` traceback 20-30 s after start-up. A dry run
# (VERL_TOR_DRY_RUN) reads no data and is not checked.
check_cpu_data() {
  [[ "${VERL_TOR_DRY_RUN:-0}" != "0" ]] && return 0
  local file
  for file in "$TRAIN_FILES" "$VAL_FILES"; do
    if [[ ! -f "$file" ]]; then
      { set +x; } 2>/dev/null
      echo "error: $file does not exist: the CPU recipes train on the figure task's problems, which" \
        "verl_tor.local.prepare writes once. Fix: python -m verl_tor.local.prepare --out-dir $CPU_DIR, then run" \
        "this again with CPU_DIR=$CPU_DIR; or point DATA_DIR (or TRAIN_FILES, VAL_FILES) at existing files." >&2
      exit 2
    fi
  done
}
