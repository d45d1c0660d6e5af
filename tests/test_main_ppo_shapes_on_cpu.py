"""The CPU recipe in the GPU recipes' shape (``recipes/cpu_tiny/grpo_tor_gpu_shape.sh``): how it differs from the
7B GPU recipe, key by key with the reason, and one short ``main_ppo`` run of it (marked ``loop``): two FSDP ranks,
two ``hf`` rollout replicas behind verl's load balancer, packed sequences, dynamic micro-batches, gradient
checkpointing, the reference policy's parameter offload."""

from __future__ import annotations

import re

import pytest
from loop_support import assert_ok, run
from test_recipes_on_cpu import ROOT, compose, dry_run, flat

GPU_RECIPE = ROOT / "recipes" / "qwen2_5_vl_7b_geo3k" / "grpo_tor.sh"
CPU_RECIPE = ROOT / "recipes" / "cpu_tiny" / "grpo_tor_gpu_shape.sh"

LAPTOP_SCALE = "laptop scale: a tiny model's batch runs a step in seconds on 2 cores (recipes/cpu_tiny/common.sh)"
CPU_PLATFORM = "verl_tor's local backend on a machine without GPUs (recipes/README.md, 'CPU')"
ONE_PROCESS = "one process each on 2 cores"
FIXED_BATCH_UNUSED = "cpu_args' fixed micro-batch, unused under use_dynamic_bsz=True (verl reads the token budget)"
FP32 = "float32 on CPU: bf16 matmuls are slow there and would make rollout and actor log-probs drift"
NO_COMPILE = "compiling costs more than it saves for a few steps on CPU"
CPU_TEST_RUN = "a CPU test run: no validation, checkpoints or resume, a console logger"

EXPLAINED = {
    # the model, the data and the scale
    "actor_rollout_ref.model.path": "the shipped figure reader (1M parameters) instead of Qwen2.5-VL-7B",
    "data.val_files": "the figure task's validation split (verl_tor.local.prepare)",
    "data.train_batch_size": LAPTOP_SCALE,
    "actor_rollout_ref.rollout.n": LAPTOP_SCALE,
    "actor_rollout_ref.actor.ppo_mini_batch_size": LAPTOP_SCALE,
    "data.max_prompt_length": LAPTOP_SCALE,
    "data.max_response_length": LAPTOP_SCALE + "; the figure task's answers take ~29 tokens",
    "actor_rollout_ref.actor.optim.lr": "a 1M-parameter model: 1e-6 would not move it in a few steps",
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu": "token budget scaled to the tiny batch, so a rank's "
    "rollouts still split into several micro-batches (MAX_TOKENS_PER_GPU)",
    "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu": "the same scaled token budget",
    "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu": "the same scaled token budget",
    "trainer.n_gpus_per_node": "two ranks (logical Ray GPU slots) on 2 cores, not 8 GPUs",
    "trainer.total_training_steps": LAPTOP_SCALE,
    # the CPU platform and the hf rollout
    "trainer.device": CPU_PLATFORM,
    "actor_rollout_ref.rollout.name": "hf: Hugging Face generate behind verl's rollout-server interface (no vLLM)",
    "actor_rollout_ref.model.override_config.attn_implementation": "sdpa: no flash-attn on CPU (packed sequences "
    "still run: verl_tor/local/packed.py)",
    "ray_kwargs.ray_init.num_cpus": "TransferQueue, the agent loop and reward workers each reserve a logical CPU",
    "ray_kwargs.ray_init.num_gpus": "the CPU platform places verl's workers on logical Ray GPU slots",
    "ray_kwargs.ray_init.include_dashboard": "start-up: the dashboard's processes take CPU from verl's",
    "ray_kwargs.ray_init._temp_dir": "Ray's own folder (short socket paths; tests run several)",
    "actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype": FP32,
    "actor_rollout_ref.actor.fsdp_config.mixed_precision.reduce_dtype": FP32,
    "actor_rollout_ref.actor.fsdp_config.mixed_precision.buffer_dtype": FP32,
    "actor_rollout_ref.ref.fsdp_config.mixed_precision.param_dtype": FP32,
    "actor_rollout_ref.ref.fsdp_config.mixed_precision.reduce_dtype": FP32,
    "actor_rollout_ref.ref.fsdp_config.mixed_precision.buffer_dtype": FP32,
    "actor_rollout_ref.actor.fsdp_config.use_torch_compile": NO_COMPILE,
    "actor_rollout_ref.ref.fsdp_config.use_torch_compile": NO_COMPILE,
    "actor_rollout_ref.rollout.agent.num_workers": ONE_PROCESS,
    "reward.num_workers": ONE_PROCESS,
    "transfer_queue.backend.SimpleStorage.num_data_storage_units": ONE_PROCESS,
    "data.dataloader_num_workers": ONE_PROCESS + ": the data loader runs in the driver",
    "data.filter_overlong_prompts": "start-up: the figure prompts are far under 256 tokens",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": FIXED_BATCH_UNUSED,
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": FIXED_BATCH_UNUSED,
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": FIXED_BATCH_UNUSED,
    # seeds and bookkeeping
    "data.seed": "seeded (SEED) so test runs reproduce",
    "actor_rollout_ref.rollout.seed": "seeded (SEED) so test runs reproduce",
    "actor_rollout_ref.actor.fsdp_config.seed": "seeded (SEED) so test runs reproduce",
    "trainer.experiment_name": "its own experiment",
    "trainer.default_local_dir": "under CPU_DIR",
    "trainer.logger": CPU_TEST_RUN,
    "trainer.val_before_train": CPU_TEST_RUN,
    "trainer.test_freq": CPU_TEST_RUN,
    "trainer.save_freq": CPU_TEST_RUN,
    "trainer.resume_mode": CPU_TEST_RUN,
}
"""Every key where the CPU recipe in the GPU shape differs from the 7B GPU recipe -> why. Everything else, the
batching and systems settings included (packed sequences, dynamic batches, gradient checkpointing, FSDP2, the
reference offload, the KL loss, every tor.* value), is the GPU recipe's."""

GPU_SHAPE = {
    "actor_rollout_ref.model.use_remove_padding": True,
    "actor_rollout_ref.model.enable_gradient_checkpointing": True,
    "actor_rollout_ref.actor.strategy": "fsdp2",
    "actor_rollout_ref.actor.use_dynamic_bsz": True,
    "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz": True,
    "actor_rollout_ref.ref.log_prob_use_dynamic_bsz": True,
    "actor_rollout_ref.ref.fsdp_config.param_offload": True,
    "actor_rollout_ref.actor.use_kl_loss": True,
    "tor.entropy": "top_p",
}


@pytest.fixture(scope="module")
def configs():
    import verl  # noqa: F401  - loads the plugin

    return {name: flat(compose(dry_run(path))) for name, path in (("gpu", GPU_RECIPE), ("cpu", CPU_RECIPE))}


def test_cpu_recipe_differs_from_the_gpu_recipe_only_where_explained(configs):
    gpu, cpu = configs["gpu"], configs["cpu"]
    missing = object()
    differ = {k for k in gpu.keys() | cpu.keys() if gpu.get(k, missing) != cpu.get(k, missing)}
    unexplained = sorted(differ - set(EXPLAINED))
    assert not unexplained, (
        "the CPU recipe differs from the GPU recipe here, without a reason in EXPLAINED: "
        + ", ".join(f"{k} ({gpu.get(k, '<absent>')!r} -> {cpu.get(k, '<absent>')!r})" for k in unexplained)
    )
    stale = sorted(set(EXPLAINED) - differ)
    assert not stale, f"EXPLAINED lists keys that no longer differ: {stale}"
    for key, value in GPU_SHAPE.items():
        assert gpu[key] == cpu[key] == value, key


def test_cpu_recipe_in_the_gpu_shape_validates(configs, tmp_path):
    """The dry run composes and validates it as main_ppo would (verl's validate_config, tor.*, the local backend)."""
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "VERL_TOR_DRY_RUN": "1",
        "CPU_DIR": str(tmp_path),
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    }
    proc = subprocess.run(["bash", str(CPU_RECIPE)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "config OK" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.loop
def test_gpu_shaped_cpu_recipe_through_main_ppo(cpu_dir):
    """Two ToR steps with two FSDP ranks and two hf rollout replicas: the tor/* metrics each step, an update that
    trains, and both replicas serving requests in both steps (verl's load balancer in front of them)."""
    # RAY_DEDUP_LOGS=0: Ray would fold the replicas' log lines into one ("[repeated 2x across cluster]")
    result = run(cpu_dir, "grpo_tor_gpu_shape", "gpu_shape", LR="1e-3", RAY_DEDUP_LOGS="0")
    assert_ok(result, 2)
    for step in result.steps:
        assert step["tor/reasoning_frac"] == pytest.approx(0.3, abs=0.02)
        assert step["tor/perception_frac"] == pytest.approx(0.3, abs=0.02)
        assert 0 < step["tor/weight_mean"] < 1
        assert step["tor/sensitivity_mean/selected"] > step["tor/sensitivity_mean/rest"]
        assert step["tor/noimg_scored_frac"] == pytest.approx(1.0)
    assert any(abs(s["actor/pg_loss"]) > 1e-6 for s in result.steps)
    log = result.tail(100000)
    served = re.findall(r"hf rollout replica (\d+): served (\d+) requests on the weights of step (\d+)", log)
    # both replicas, on the initial weights (step 1's rollouts) and on step 1's update (step 2's)
    assert {(int(r), int(s)) for r, n, s in served if int(n) > 0} == {(0, 0), (1, 0), (0, 1), (1, 1)}, served
    assert "Monkey patch Qwen2_5_VLForConditionalGeneration attention layer" in log  # verl's packed-path patch ran
