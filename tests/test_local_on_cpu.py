"""verl_tor's local backend without the whole loop: opt-in registration, the CPU platform, the config checks that
run before Ray starts, the hf rollout server, the M-RoPE fix and the training-time token map's figure."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SNAPSHOT = r"""
import json, verl
import verl.utils.distributed as dist
import verl.workers.engine.fsdp.transformer_impl as impl
from verl.plugin.platform import PlatformRegistry
from verl.workers.engine.base import EngineRegistry
from verl.workers.rollout.base import _ROLLOUT_REGISTRY
from verl.workers.rollout.replica import RolloutReplicaRegistry
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer
print(json.dumps({
    "platforms": sorted(PlatformRegistry.registered_names()),
    "engines": {m: {b: sorted(map(str, d)) for b, d in bs.items()} for m, bs in EngineRegistry._engines.items()},
    "replicas": sorted(RolloutReplicaRegistry._registry),
    "rollouts": sorted(map(list, _ROLLOUT_REGISTRY)),
    "process_group_fn": getattr(dist.initialize_global_process_group_ray, "__verl_tor__", False),
    "offload_policy": getattr(impl.CPUOffloadPolicy, "__verl_tor__", False),
    "selection_order": getattr(ReplayBuffer._select_prompt_uids, "__verl_tor__", False),
}))
"""


def _snapshot(**env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "VERL_TOR_ROLLOUT")}
    out = subprocess.run(
        [sys.executable, "-c", SNAPSHOT], env={**base, **env}, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_plugin_leaves_verl_as_it_was_unless_the_local_backend_is_selected():
    """``import verl`` with the plugin installed: platforms, engines, rollouts and the process-group function are
    verl's own -- the same as with plugins disabled; ``VERL_PLATFORM=cpu`` / ``VERL_TOR_ROLLOUT=hf`` add them."""
    stock = _snapshot(VERL_USE_EXTERNAL_PLUGINS="none")
    with_plugin = _snapshot()
    assert with_plugin == stock
    assert "cpu" not in stock["platforms"] and "hf" not in stock["replicas"]

    selected = _snapshot(VERL_PLATFORM="cpu", VERL_TOR_ROLLOUT="hf")
    assert selected["platforms"] == sorted([*stock["platforms"], "cpu"])
    assert "cpu" in selected["engines"]["language_model"]["fsdp2"]
    assert "hf" in selected["replicas"] and ["hf", "async"] in selected["rollouts"]
    assert selected["process_group_fn"] and not stock["process_group_fn"]
    assert selected["offload_policy"] and not stock["offload_policy"]
    assert selected["selection_order"] and not stock["selection_order"]


def test_dapo_keeps_the_first_dispatched_groups_whatever_the_uids():
    """verl's sync replay buffer keeps ``train_batch_size`` of the finished DAPO groups by ``sorted(set of uids,
    key=global step)``: ties in a random ``set`` order, uids being uuid4s (issue 17.8). Wrapped, it keeps the first
    dispatched (``kv_list`` order), older steps still first; the surplus it leaves is what verl discards."""
    import random
    import uuid

    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

    from verl_tor.local.sampling import order_selection_by_dispatch

    rng = random.Random(0)
    uids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(40)]  # in dispatch order
    buffer = ReplayBuffer.__new__(ReplayBuffer)  # the selection reads only these two snapshots
    buffer.prompt_global_steps = {"train": {uid: 3 for uid in uids}}
    buffer.prompt_global_steps["train"][uids[30]] = 2  # a group left from an earlier step goes first
    buffer.partitions = {"train": {}}
    sampleable = set(uids[5:]) - {uids[7], uids[11]}  # the first 5 still running, two filtered out
    original = ReplayBuffer._select_prompt_uids
    wrapped_now = order_selection_by_dispatch()
    try:
        assert not order_selection_by_dispatch()  # idempotent
        selected, _, _ = buffer._select_prompt_uids("train", sampleable, 8)
        assert selected == [uids[30], uids[5], uids[6], uids[8], uids[9], uids[10], uids[12], uids[13]]
        assert buffer._select_prompt_uids("train", set(sampleable), 8)[0] == selected
        # verl's own: the same uids in whatever order a set of random strings iterates
        unordered, _, _ = original(buffer, "train", sampleable, 8)
        assert unordered[0] == uids[30] and unordered != selected
    finally:
        if wrapped_now:
            ReplayBuffer._select_prompt_uids = original


def test_cpu_platform_runs_verl_device_calls_and_a_gloo_process_group():
    code = r"""
import os, torch
import verl
from verl.plugin.platform import get_platform
from verl.utils.device import get_device_name, get_nccl_backend, get_torch_device, get_device_id
from verl.utils.distributed import initialize_global_process_group_ray
from verl.workers.engine.base import EngineRegistry
p = get_platform()
dev = get_torch_device()
assert (p.device_name, get_device_name(), get_nccl_backend()) == ("cpu", "cpu", "gloo")
assert torch.ones(2).to(get_device_id()).device.type == "cpu"
assert dev.memory_allocated() == 0 and dev.get_device_name() == "cpu" and dev.mem_get_info()[1] > 0
state = dev.get_rng_state(); a = torch.rand(3); dev.set_rng_state(state); assert torch.equal(a, torch.rand(3))
try:
    dev.some_new_cuda_call()
    raise SystemExit("no error")
except AttributeError as e:
    assert "some_new_cuda_call" in str(e) and "verl_tor/local/platform.py" in str(e)
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29591", RANK="0", WORLD_SIZE="1")
initialize_global_process_group_ray()  # verl's own call: cpu:gloo,cpu:gloo without the fix
assert torch.distributed.get_backend() == "gloo"
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
assert EngineRegistry.get_engine_cls("language_model", "fsdp2") is FSDPEngineWithLMHead
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "VERL_TOR_ROLLOUT"}
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, "VERL_PLATFORM": "cpu"}, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# ---------------------------------------------------------------------- config checks, before Ray starts
def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    base = [
        "algorithm.adv_estimator=grpo",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=1",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "verl_tor" / "recipes" / "config"), version_base=None):
        return compose("tor_trainer", overrides=base + list(overrides))


CPU_OK = (
    "trainer.device=cpu",
    "actor_rollout_ref.rollout.name=hf",
    "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
    "actor_rollout_ref.model.use_remove_padding=False",
    "trainer.n_gpus_per_node=1",
    "ray_kwargs.ray_init.num_cpus=32",
    "+ray_kwargs.ray_init.num_gpus=1",
)


@pytest.fixture
def local_env(monkeypatch):
    """A clean environment for the local backend's switches, restored afterwards (``validate_local_config`` exports
    ``VERL_TOR_ROLLOUT`` into ``os.environ`` for the Ray workers a run starts)."""
    saved = {k: os.environ.get(k) for k in ("VERL_PLATFORM", "VERL_TOR_ROLLOUT")}
    monkeypatch.delenv("VERL_PLATFORM", raising=False)
    monkeypatch.delenv("VERL_TOR_ROLLOUT", raising=False)
    yield monkeypatch
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.mark.parametrize(
    ("platform", "overrides", "message"),
    [
        (None, CPU_OK, "export VERL_PLATFORM=cpu"),
        ("cpu", (*CPU_OK, "trainer.device=cuda"), "Fix: set trainer.device=cpu"),
        ("cpu", (*CPU_OK, "actor_rollout_ref.rollout.name=vllm"), "actor_rollout_ref.rollout.name=hf"),
        (
            "cpu",
            (
                *CPU_OK,
                "actor_rollout_ref.model.use_remove_padding=True",
                "actor_rollout_ref.ref.ulysses_sequence_parallel_size=2",
            ),
            "actor_rollout_ref.ref.ulysses_sequence_parallel_size=1",
        ),
        ("cpu", CPU_OK[:-1], "+ray_kwargs.ray_init.num_gpus=1"),
        ("cpu", (*CPU_OK, "ray_kwargs.ray_init.num_cpus=2"), "ray_kwargs.ray_init.num_cpus=32"),
        ("cpu", (*CPU_OK, "actor_rollout_ref.rollout.tensor_model_parallel_size=2"), "tensor_model_parallel_size=1"),
        ("cpu", (*CPU_OK, "+actor_rollout_ref.rollout.custom.sync_weights=yes"), "custom.sync_weights='yes'"),
        (None, (*CPU_OK[1:3], "actor_rollout_ref.hybrid_engine=False"), "hybrid_engine=true"),
    ],
)
def test_bad_local_settings_fail_before_ray_starts(local_env, tiny_checkpoint, platform, overrides, message):
    """verl's own ``validate_config`` (wrapped by the plugin, called by main_ppo before ray.init) refuses them."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from verl_tor.local import LocalBackendError

    if platform:
        local_env.setenv("VERL_PLATFORM", platform)
    config = _compose(f"actor_rollout_ref.model.path={tiny_checkpoint}", *overrides)
    with pytest.raises(LocalBackendError) as err:
        validate_config(config, need_reference_policy(config), need_critic(config))
    assert message in str(err.value)
    assert "VERL_TOR_ROLLOUT" not in os.environ  # nothing exported for a refused run


def test_a_valid_local_config_exports_the_rollout_choice_for_the_workers(local_env, tiny_checkpoint):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    local_env.setenv("VERL_PLATFORM", "cpu")
    config = _compose(f"actor_rollout_ref.model.path={tiny_checkpoint}", *CPU_OK)
    validate_config(config, need_reference_policy(config), need_critic(config))
    assert os.environ["VERL_TOR_ROLLOUT"] == "hf"
    assert RolloutReplicaRegistry.get("hf").__name__ == "HFReplica"


def test_the_packed_path_is_accepted_on_cpu(local_env, tiny_checkpoint):
    """use_remove_padding=true runs on the CPU platform (verl_tor.local.packed; tests/test_packed_on_cpu.py)."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    local_env.setenv("VERL_PLATFORM", "cpu")
    config = _compose(
        f"actor_rollout_ref.model.path={tiny_checkpoint}", *CPU_OK, "actor_rollout_ref.model.use_remove_padding=True"
    )
    validate_config(config, need_reference_policy(config), need_critic(config))


# ---------------------------------------------------------------------- the hf rollout server, in-process
@pytest.fixture(scope="module")
def server_factory(tiny_checkpoint):
    from verl_tor.local.rollout import HFRolloutServer

    def make(**rollout):
        config = _compose(
            "actor_rollout_ref.rollout.name=hf",
            f"actor_rollout_ref.model.path={tiny_checkpoint}",
            "actor_rollout_ref.rollout.response_length=12",
            "actor_rollout_ref.rollout.prompt_length=256",
            *(f"actor_rollout_ref.rollout.{k}={v}" for k, v in rollout.items()),
        )
        return HFRolloutServer(config.actor_rollout_ref.rollout, config.actor_rollout_ref.model)

    return make


def _prompt(processor, image):
    from verl_tor.tools.demo import encode_prompt

    item = {"image": image, "question": "Find the area."}
    ids = encode_prompt(processor, item)["input_ids"][0].tolist()
    from verl.workers.rollout.utils import qwen2_5_vl_dedup_image_tokens

    return qwen2_5_vl_dedup_image_tokens(ids, processor), ids  # as verl's agent loop sends it; expanded


def test_hf_server_generates_from_the_image_with_the_policy_log_probs(server_factory, tiny_processor, geometry_images):
    server = server_factory(full_determinism=True)
    collapsed, expanded = _prompt(tiny_processor, geometry_images[0])
    out = asyncio.run(
        server.generate(
            prompt_ids=collapsed,
            sampling_params={"temperature": 0.7, "logprobs": True},
            request_id="a",
            image_data=[geometry_images[0]],
        )
    )
    assert 1 <= len(out.token_ids) <= 12 and isinstance(out.extra_fields["global_steps"], int)
    assert not set(out.token_ids) & set(server.banned_ids)
    # the returned log-probs are the temperature-scaled policy's at the sampled tokens (what the actor recomputes)
    enc = tiny_processor(
        text=[tiny_processor.tokenizer.decode(collapsed)], images=[geometry_images[0]], return_tensors="pt"
    )
    ids = torch.tensor([expanded + out.token_ids])
    assert torch.equal(enc["input_ids"][0], torch.tensor(expanded))
    with torch.no_grad():
        logits = server.model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=enc["pixel_values"],
            image_grid_thw=enc["image_grid_thw"],
            mm_token_type_ids=(ids == tiny_processor.image_token_id).long(),
        ).logits[0, len(expanded) - 1 : -1]
    want = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(out.token_ids)[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(out.log_probs), want, atol=2e-4, rtol=0)


def test_hf_server_seeds_are_reproducible_and_tell_identical_requests_apart(
    server_factory, tiny_processor, geometry_images
):
    collapsed, _ = _prompt(tiny_processor, geometry_images[1])

    def sample(server, n):
        params = {"temperature": 1.0}
        return [
            asyncio.run(server.generate(collapsed, dict(params), f"r{i}", image_data=[geometry_images[1]])).token_ids
            for i in range(n)
        ]

    first, second = sample(server_factory(full_determinism=True), 4), sample(server_factory(full_determinism=True), 4)
    assert first == second
    assert len({tuple(t) for t in first}) > 1  # the n rollouts of a prompt are not copies of one sample


def test_hf_server_refuses_video_and_loads_pushed_weights(server_factory, tiny_processor, geometry_images):
    server = server_factory()
    collapsed, _ = _prompt(tiny_processor, geometry_images[0])
    with pytest.raises(ValueError, match="video"):
        asyncio.run(server.generate(collapsed, {}, "v", image_data=[geometry_images[0]], video_data=[object()]))
    name, param = next(iter(server.model.named_parameters()))
    before = asyncio.run(server.get_weights_checksum())
    assert asyncio.run(server.update_weights([(name, param.detach() + 1.0)])) == 1
    assert asyncio.run(server.get_weights_checksum()) == pytest.approx(before + param.numel(), rel=1e-6)
    with pytest.raises(KeyError, match="does not have"):
        asyncio.run(server.update_weights([("not.a.weight", torch.zeros(1))]))


# ---------------------------------------------------------------------- the M-RoPE fix
def _equal_rows(n=3, length=6):
    return [torch.arange(4 * length).reshape(4, length) + i for i in range(n)]


def test_mrope_bug_is_present_in_verl_and_the_fix_repairs_only_that_layout():
    from tensordict import TensorDict
    from verl.utils import tensordict_utils

    from verl_tor.integration.fixes.mrope import apply_mrope_fix, is_mrope_bug_present, revert_mrope_fix

    revert_mrope_fix()
    try:
        assert is_mrope_bug_present()
        rows = _equal_rows()
        broken = TensorDict({"position_ids": torch.nested.as_nested_tensor(rows, layout=torch.jagged)}, batch_size=3)
        tensordict_utils.maybe_fix_3d_position_ids(broken)
        with pytest.raises(RuntimeError):
            broken["position_ids"].unbind()

        assert apply_mrope_fix()
        fixed = TensorDict({"position_ids": torch.nested.as_nested_tensor(rows, layout=torch.jagged)}, batch_size=3)
        tensordict_utils.maybe_fix_3d_position_ids(fixed)
        assert all(torch.equal(a, b) for a, b in zip(fixed["position_ids"].unbind(), rows))
        # rows of different lengths, and a tensor that lost its ragged index in a pickle round trip: verl's own path
        uneven = [torch.arange(4 * n).reshape(4, n) for n in (5, 7)]
        nested = torch.nested.as_nested_tensor(uneven, layout=torch.jagged)
        nested._ragged_idx = 1  # what a pickle round trip leaves (values (4, 12), offsets over dim 2)
        data = TensorDict({"position_ids": nested}, batch_size=2)
        tensordict_utils.maybe_fix_3d_position_ids(data)
        assert all(torch.equal(a, b) for a, b in zip(data["position_ids"].unbind(), uneven))
    finally:
        apply_mrope_fix()


def test_mrope_patch_applies_to_the_installed_verl_and_matches_the_runtime_fix(tmp_path):
    import importlib.util

    import verl
    from tensordict import TensorDict

    patch_file = ROOT / "patches" / "0002-tensordict_utils-equal-length-mrope-position-ids.patch"
    assert shutil.which("patch"), "GNU patch is needed"
    root = tmp_path / "site"
    (root / "verl" / "utils").mkdir(parents=True)
    target = root / "verl" / "utils" / "tensordict_utils.py"
    shutil.copy(Path(verl.__file__).parent / "utils" / "tensordict_utils.py", target)
    subprocess.run(["patch", "-p1", "-d", str(root), "-i", str(patch_file)], check=True, capture_output=True)
    spec = importlib.util.spec_from_file_location("patched_tensordict_utils", target)
    patched = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(patched)
    rows = _equal_rows(2, 9)
    data = TensorDict({"position_ids": torch.nested.as_nested_tensor(rows, layout=torch.jagged)}, batch_size=2)
    patched.maybe_fix_3d_position_ids(data)
    assert all(torch.equal(a, b) for a, b in zip(data["position_ids"].unbind(), rows))


# ---------------------------------------------------------------------- the training-time token map's figure
def test_token_map_rebuilds_the_figure_exactly_from_verl_multi_modal_inputs(tiny_processor, geometry_images):
    import numpy as np

    from verl_tor.viz import first_image, prompt_text

    image = geometry_images[2]
    mm = dict(tiny_processor.image_processor(images=[image], return_tensors="pt"))
    rebuilt = first_image(mm, tiny_processor)
    grid = mm["image_grid_thw"][0].tolist()
    expected = np.asarray(image.resize((grid[2] * 14, grid[1] * 14)))  # the processor's resize, then exact pixels
    assert np.abs(np.asarray(rebuilt).astype(int) - expected.astype(int)).max() <= 1
    assert first_image({}, tiny_processor) is None
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "<image>Find x."}]}]
    assert prompt_text(messages) == "Find x."


def test_answer_token_counts_are_the_figure_readers():
    """``ANSWER_TOKENS`` (the demo's response-length warnings) recounted with the shipped model's tokenizer."""
    from transformers import AutoTokenizer

    from verl_tor.figures import FIGURE_READER_CHECKPOINT
    from verl_tor.figures.task import SIDES, build_target
    from verl_tor.local.prepare import ANSWER_TOKENS

    tokenizer = AutoTokenizer.from_pretrained(FIGURE_READER_CHECKPOINT)
    counts = [len(tokenizer(build_target(w, h)[0])["input_ids"]) for w in SIDES for h in SIDES]
    assert (min(counts), max(counts)) == ANSWER_TOKENS


FAKE_RECIPE = r"""#!/usr/bin/env bash
# stands in for main_ppo: a driver that leaves the recipe's process group as Ray's does at ray.init (os.setpgrp),
# writes into the Ray temp folder, logs one step and keeps running
python3 - <<'PY' &
import json, os, time
os.setpgrp()
with open(os.path.join(os.environ["RAY_TMP"], "driver.pid"), "w") as f:
    f.write(str(os.getpid()))
with open(os.path.join(os.environ["CPU_DIR"], "ray_tmp.txt"), "w") as f:
    f.write(os.environ["RAY_TMP"])
with open(os.environ["VERL_FILE_LOGGER_PATH"], "w") as f:
    f.write(json.dumps({"step": 1, "data": {"actor/pg_loss": 0.0}}) + "\n")
time.sleep(300)
PY
wait
"""


def is_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process: not gone and not a zombie (a killed process whose reaper is the machine's
    pid 1 stays a zombie where that pid 1 never reaps, as in some containers)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def test_interrupted_recipe_leaves_no_process_and_no_ray_temp_folder(tmp_path, monkeypatch):
    """Ctrl-C during `verl-tor demo` left main_ppo's Ray temp folder (and, since Ray's driver makes itself a
    process-group leader, a driver that killing the recipe's process group does not reach)."""
    import verl_tor.local.launch as launch

    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "grpo_tor.sh").write_text(FAKE_RECIPE)
    monkeypatch.setattr(launch, "recipes_dir", lambda: recipes)
    seen: dict = {}

    def on_step(step):
        seen["ray_tmp"] = Path((tmp_path / "cpu" / "ray_tmp.txt").read_text())
        seen["driver"] = int((seen["ray_tmp"] / "driver.pid").read_text())
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        launch.run_cpu_recipe("grpo_tor", cpu_dir=str(tmp_path / "cpu"), experiment="x", on_step=on_step, timeout=120)
    assert not seen["ray_tmp"].exists()
    assert not is_alive(seen["driver"])
