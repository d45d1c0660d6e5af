"""The verl functions verl_tor hooks or relies on, and a fingerprint of each, recorded per verl version.

A fingerprint is two short hashes of the function's (or class's) source, normalised so that formatting, comments
and docstrings do not count: ``signature`` (arguments, return annotation, decorators; for a class its bases) and
``source`` (the whole definition). ``tests/test_verl_contract_on_cpu.py`` compares the verl in use with the file
recorded for its version (``patches/contract/verl-<version>.json``), so a verl bump fails at the exact function that
changed, by name. How to bump: ``patches/README.md``.

    python -m verl_tor.integration.contract                          # what changed against the recorded files
    python -m verl_tor.integration.contract --write patches/contract  # record the verl in use

Adding a hook means adding its verl target to ``VERL_CONTRACT`` (one line) and recording it (the command above).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib
import inspect
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

__all__ = [
    "VERL_CONTRACT",
    "CONTRACT_DIR",
    "resolve",
    "fingerprint",
    "fingerprint_source",
    "current_fingerprints",
    "load_recorded",
    "compare",
]

VERL_CONTRACT: tuple[str, ...] = (
    # verl_tor/integration/trainer.py: the ToR trainers subclass verl's, present its mode names, run after its advantage
    "verl.trainer.ppo.v1.trainer_base:PPOTrainer.__init__",
    "verl.trainer.ppo.v1.trainer_base:PPOTrainer._build_replay_buffer",
    "verl.trainer.ppo.v1.trainer_base:PPOTrainer._init_dataloader",
    "verl.trainer.ppo.v1.trainer_base:PPOTrainer._load_checkpoint",
    "verl.trainer.ppo.v1.trainer_base:PPOTrainer._save_checkpoint",
    "verl.trainer.ppo.v1.trainer_base:PPOTrainer._reissue_inflight_prompts",
    "verl.trainer.ppo.v1.trainer_base:PPOTrainer._submit_batch_to_rollout",
    "verl.trainer.ppo.v1.trainer_base:PPOTrainer.init",
    "verl.trainer.ppo.v1.trainer_base:PPOTrainer.step",
    "verl.trainer.ppo.v1.trainer_base:PPOTrainer._step_once",
    "verl.trainer.ppo.v1.trainer_base:PPOTrainer._compute_old_log_prob",
    "verl.trainer.ppo.v1.trainer_base:PPOTrainer._compute_advantage",
    "verl.trainer.ppo.v1.trainer_base:register_trainer",
    "verl.trainer.ppo.v1.trainer_base:get_trainer_cls",
    "verl.trainer.ppo.v1.trainer_sync:PPOTrainerSync",
    "verl.trainer.ppo.v1.trainer_colocate_async:PPOTrainerColocateAsync",
    "verl.trainer.ppo.v1.trainer_separate_async:PPOTrainerSeparateAsync._compute_old_log_prob",
    "verl.trainer.ppo.v1.utils:compute_advantage_for_multi_trajectories",
    "verl.trainer.ppo.ray_trainer:compute_advantage",
    "verl.trainer.ppo.utils:need_reference_policy",
    "verl.trainer.main_ppo:TaskRunnerV1.run",
    # verl_tor/integration/plugin.py: validate_config is wrapped
    "verl.utils.config:validate_config",
    "verl.utils.config:omega_conf_to_dataclass",
    # verl_tor/loss.py: tor.apply=loss
    "verl.workers.utils.losses:ppo_loss",
    "verl.workers.engine_workers:ActorRolloutRefWorker.set_loss_fn",
    # verl_tor/integration/engine.py: top-p entropy in the old-policy pass
    "verl.workers.engine.fsdp.transformer_impl:FSDPEngineWithLMHead.prepare_model_outputs",
    "verl.utils.tensordict_utils:get_non_tensor_data",
    # verl_tor/integration/fixes/qwen2_vl.py: the no-pixel fix, and the Qwen3-VL branch that needs none
    "verl.models.transformers.qwen2_vl:_get_input_embeds",
    "verl.models.transformers.qwen3_vl:_get_input_embeds",
    "verl.utils.transformers_compat:unpack_visual_output",
    # verl_tor/stage.py, views.py: response slicing, the image-free view's position ids
    "verl.workers.utils.padding:response_from_nested",
    "verl.experimental.agent_loop.agent_loop:AgentLoopWorker._compute_position_ids",
    # verl_tor/tools/in_process.py: verl's rows and engine forward on CPU
    "verl.experimental.agent_loop.agent_loop:AgentLoopWorker._compute_multi_modal_inputs",
    "verl.experimental.agent_loop.agent_loop:AgentLoopWorker._get_mm_processor_kwargs",
    "verl.workers.engine.fsdp.transformer_impl:FSDPEngineWithLMHead.forward_step",
    "verl.workers.engine.fsdp.transformer_impl:FSDPEngineWithLMHead.prepare_model_inputs",
    "verl.models.transformers.monkey_patch:apply_monkey_patch",
    "verl.utils.torch_functional:entropy_from_logits",
    "verl.utils.tensordict_utils:assign_non_tensor",
    # verl_tor/integration/fixes/mrope.py: equal-length M-RoPE batches
    "verl.utils.tensordict_utils:maybe_fix_3d_position_ids",
    # verl_tor/local/: the CPU platform, verl's FSDP engines for it, the process group, the hf rollout
    "verl.plugin.platform.platform_base:PlatformBase",
    "verl.plugin.platform.platform_manager:PlatformRegistry",
    "verl.plugin.platform.platform_manager:get_platform",
    "verl.workers.engine.base:EngineRegistry",
    "verl.workers.engine.fsdp.transformer_impl:FSDPEngine._build_fsdp_module",
    "verl.workers.engine.fsdp.transformer_impl:FSDPEngineWithValueHead",
    "verl.workers.engine.fsdp.transformer_impl:FSDPEngine.get_per_tensor_param",
    "verl.utils.distributed:initialize_global_process_group_ray",
    "verl.models.transformers.qwen2_vl:qwen2_vl_attn_forward",
    "verl.utils.ulysses:get_ulysses_sequence_parallel_world_size",
    "verl.workers.engine_workers:ActorRolloutRefWorker.init_model",
    "verl.workers.engine_workers:ActorRolloutRefWorker.update_weights",
    "verl.workers.rollout.base:BaseRollout",
    "verl.workers.rollout.base:get_rollout_class",
    "verl.workers.rollout.replica:RolloutReplica",
    "verl.workers.rollout.replica:RolloutReplicaRegistry",
    "verl.workers.rollout.replica:TokenOutput",
    "verl.workers.rollout.utils:qwen2_5_vl_dedup_image_tokens",
    "verl.workers.rollout.llm_server:LLMServerClient.generate",
    "verl.workers.rollout.llm_server:LLMServerManager._initialize_llm_servers",
    "verl.experimental.agent_loop.single_turn_agent_loop:SingleTurnAgentLoop.run",
    "verl.checkpoint_engine.base:CheckpointEngineManager.update_weights",
    "verl.workers.config.model:HFModelConfig",
    # verl_tor/local/sampling.py: DAPO keeps the first dispatched groups (verl's selection, its surplus discard, the
    # kv_list order its metadata snapshot keeps)
    "verl.trainer.ppo.v1.replay_buffer:ReplayBuffer._select_prompt_uids",
    "verl.trainer.ppo.v1.replay_buffer:ReplayBuffer._sync_metadata_from_transfer_queue",
    "verl.trainer.ppo.v1.replay_buffer:ReplayBuffer.sample",
    # verl_tor/stage.py, views.py: the fields of a trajectory's row (no attention_mask), as verl's agent loop puts it
    "verl.trainer.ppo.v1.agent_loop_tq:AgentLoopWorkerTQ._agent_loop_postprocess",
)
"""``module:qualname`` of every verl function or class verl_tor patches, subclasses, calls or copies behaviour from.
Keep one per line, grouped by the verl_tor module that needs it."""

CONTRACT_DIR = Path(__file__).resolve().parents[2] / "patches" / "contract"
"""Where the recorded fingerprints live (one JSON file per verl version), in the source checkout."""


def resolve(name: str) -> Any:
    """``"pkg.module:Class.method"`` -> the function or class verl defines there (wrappers, verl_tor's included,
    unwrapped)."""
    module_name, _, qualname = name.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = inspect.getattr_static(obj, part) if inspect.isclass(obj) else getattr(obj, part)
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    while getattr(obj, "__verl_tor__", False) and hasattr(obj, "__wrapped_original__"):
        obj = obj.__wrapped_original__
    # decorators that keep __wrapped__ (functools.wraps; Ray's actor-method tracing on @ray.remote classes)
    return inspect.unwrap(obj) if callable(obj) and not inspect.isclass(obj) else obj


class _StripDocstrings(ast.NodeTransformer):
    def _strip(self, node):
        self.generic_visit(node)
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
            if isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _strip


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint_source(source: str) -> dict[str, str]:
    """``{"signature": ..., "source": ...}`` of the one ``def`` / ``class`` in ``source`` (formatting, comments and
    docstrings do not count: they are not in the AST dump)."""
    tree = _StripDocstrings().visit(ast.parse(textwrap.dedent(source)))
    node = tree.body[0]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        head = [node.args, node.returns, *node.decorator_list]
    elif isinstance(node, ast.ClassDef):
        head = [*node.bases, *node.keywords, *node.decorator_list]
    else:
        raise ValueError(f"expected one def or class, got {type(node).__name__}")
    signature = "|".join(ast.dump(part) for part in head if part is not None)
    return {"signature": _digest(signature), "source": _digest(ast.dump(node))}


def fingerprint(name: str) -> dict[str, str]:
    """The fingerprint of a ``VERL_CONTRACT`` entry in the verl this process imports."""
    return fingerprint_source(inspect.getsource(resolve(name)))


def current_fingerprints() -> dict[str, dict[str, str]]:
    """Every ``VERL_CONTRACT`` entry's fingerprint; a missing function or class maps to ``{"missing": <error>}``."""
    out: dict[str, dict[str, str]] = {}
    for name in VERL_CONTRACT:
        try:
            out[name] = fingerprint(name)
        except (ImportError, AttributeError, OSError, TypeError) as exc:
            out[name] = {"missing": f"{type(exc).__name__}: {exc}"}
    return out


def _version_key(path: Path):
    from packaging.version import Version

    return Version(path.stem.removeprefix("verl-"))


def load_recorded(directory: Path = CONTRACT_DIR) -> dict[str, dict]:
    """verl version -> its recorded file's content, oldest first."""
    files = sorted(directory.glob("verl-*.json"), key=_version_key)
    return {path.stem.removeprefix("verl-"): json.loads(path.read_text()) for path in files}


def compare(recorded: dict[str, dict[str, str]], current: dict[str, dict[str, str]]) -> list[str]:
    """One line per contract entry that differs: ``<name>: <what changed>``; empty when all agree."""
    problems = []
    for name in VERL_CONTRACT:
        now, then = current.get(name), recorded.get(name)
        if now is None or "missing" in now:
            problems.append(f"{name}: not found in this verl ({now['missing'] if now else 'not computed'})")
        elif then is None:
            problems.append(f"{name}: not recorded for this verl version (new contract entry?)")
        elif now["signature"] != then["signature"]:
            problems.append(f"{name}: signature changed")
        elif now["source"] != then["source"]:
            problems.append(f"{name}: body changed (same signature)")
    for name in sorted(set(recorded) - set(VERL_CONTRACT)):
        problems.append(f"{name}: recorded but no longer in VERL_CONTRACT")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fingerprints of the verl functions verl_tor relies on")
    parser.add_argument("--write", metavar="DIR", help="record the verl in use as DIR/verl-<version>.json")
    args = parser.parse_args(argv)
    import verl

    from verl_tor.integration.hooks import verl_version

    version = verl_version() or verl.__version__
    current = current_fingerprints()
    missing = [name for name, fp in current.items() if "missing" in fp]
    if args.write:
        if missing:
            print(f"not writing: {len(missing)} contract entries are missing in verl {version}: {missing}")
            return 1
        path = Path(args.write) / f"verl-{version}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"verl": version, "functions": current}, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(current)} fingerprints of verl {version} ({verl.__file__}) in {path}")
        return 0
    for recorded_version, content in load_recorded().items():
        problems = compare(content["functions"], current)
        print(f"verl {version} ({verl.__file__}) against the recorded verl {recorded_version}: ", end="")
        print("identical" if not problems else f"{len(problems)} differ")
        for line in problems:
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
