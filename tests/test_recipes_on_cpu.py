"""Every recipe's full command line composes through hydra and verl's validate_config (plugin loaded); baseline
and ToR scripts differ only in ToR flags; shellcheck is clean."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "qwen2_5_vl_7b_geo3k": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen2_5_vl_3b_geo3k": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen3_vl_8b_geo3k": "Qwen/Qwen3-VL-8B-Instruct",
    "qwen3_vl_4b_geo3k": "Qwen/Qwen3-VL-4B-Instruct",
}
SCRIPTS = sorted(p for model in MODELS for p in (ROOT / "recipes" / model).glob("*.sh"))
NAMES = {
    "grpo",
    "grpo_tor",
    "dapo",
    "dapo_tor",
    "grpo_tor_reasoning_only",
    "grpo_tor_perception_only",
    "grpo_tor_random",
}


def dry_run(script: Path, *extra: str, **variables: str) -> list[str]:
    env = {**os.environ, "VERL_TOR_DRY_RUN": "print", "DATA_DIR": "/data/geo3k", **variables}
    proc = subprocess.run(["bash", str(script), *extra], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()


def compose(argv: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    assert argv[:3] == ["python3", "-m", "verl.trainer.main_ppo"], argv[:3]
    config_path = argv[3].split("=", 1)[1]
    config_name = argv[4].split("=", 1)[1]
    with initialize_config_dir(config_dir=config_path, version_base=None):
        return hydra_compose(config_name, overrides=argv[5:])


@pytest.fixture(scope="module")
def composed():
    import verl  # noqa: F401  - loads the plugin (wraps validate_config)

    return {script: compose(dry_run(script)) for script in SCRIPTS}


def test_every_model_has_every_arm():
    by_model: dict[str, set[str]] = {}
    for script in SCRIPTS:
        by_model.setdefault(script.parent.name, set()).add(script.stem)
    assert set(by_model) == set(MODELS)
    assert {p.name for p in (ROOT / "recipes").glob("qwen*_geo3k")} == set(MODELS)  # no model directory left out
    assert all(names == NAMES for names in by_model.values())


def test_every_script_validates_through_verl(composed):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    assert validate_config.__verl_tor__
    for script, cfg in composed.items():
        validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
        assert cfg.actor_rollout_ref.rollout.n == 12 and cfg.data.train_batch_size == 512, script
        assert cfg.actor_rollout_ref.actor.ppo_mini_batch_size == 128 and cfg.actor_rollout_ref.actor.optim.lr == 1e-6
        assert cfg.data.max_response_length == 2048 and cfg.trainer.total_epochs == 15
        assert cfg.data.train_files == "/data/geo3k/train.parquet"


def flat(cfg) -> dict:
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return out


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize(
    ("base", "tor"),
    [
        ("grpo", "grpo_tor"),
        ("dapo", "dapo_tor"),
        ("grpo", "grpo_tor_reasoning_only"),
        ("grpo", "grpo_tor_perception_only"),
        ("grpo", "grpo_tor_random"),
    ],
)
def test_baseline_and_tor_differ_only_in_tor_flags(composed, model, base, tor):
    a = flat(composed[ROOT / "recipes" / model / f"{base}.sh"])
    b = flat(composed[ROOT / "recipes" / model / f"{tor}.sh"])
    diff = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    allowed = {"trainer.v1.trainer_mode", "trainer.experiment_name"} | {k for k in diff if k.startswith("tor.")}
    assert diff <= allowed, diff - allowed
    assert a["tor.enable"] is False and b["tor.enable"] is True
    assert (a["trainer.v1.trainer_mode"], b["trainer.v1.trainer_mode"]) == ("sync", "tor_sync")


def test_algorithms_map_to_the_paper_settings(composed):
    grpo = composed[ROOT / "recipes" / "qwen2_5_vl_7b_geo3k" / "grpo_tor.sh"]
    dapo = composed[ROOT / "recipes" / "qwen2_5_vl_7b_geo3k" / "dapo_tor.sh"]
    actor = grpo.actor_rollout_ref.actor
    assert actor.use_kl_loss and actor.kl_loss_coef == 0.01 and actor.kl_loss_type == "low_var_kl"
    actor = dapo.actor_rollout_ref.actor
    assert not actor.use_kl_loss and (actor.clip_ratio_low, actor.clip_ratio_high) == (0.2, 0.28)
    assert actor.loss_agg_mode == "token-mean"
    assert dapo.algorithm.filter_groups.enable and dapo.algorithm.filter_groups.metric == "acc"
    assert dapo.reward.reward_manager.name == "dapo" and dapo.reward.reward_kwargs.overlong_buffer_cfg.enable
    assert grpo.actor_rollout_ref.rollout.name == "vllm" and grpo.actor_rollout_ref.actor.strategy == "fsdp2"


def test_each_model_family_gets_its_own_settings(composed):
    """Same recipe for every model; only the model and the vision patch size verl's data pipeline resizes images
    with differ (Qwen3-VL: 16-px patches; Qwen2.5-VL: verl's default 14, not even on the command line)."""
    reference = flat(composed[ROOT / "recipes" / "qwen2_5_vl_7b_geo3k" / "grpo_tor.sh"])
    for model, hub_id in MODELS.items():
        cfg = composed[ROOT / "recipes" / model / "grpo_tor.sh"]
        assert cfg.actor_rollout_ref.model.path == hub_id
        qwen3 = model.startswith("qwen3_vl")
        assert cfg.data.image_patch_size == (16 if qwen3 else 14)
        assert ("data.image_patch_size=16" in dry_run(ROOT / "recipes" / model / "grpo_tor.sh")) is qwen3
        diff = {k for k, v in flat(cfg).items() if reference.get(k) != v}
        assert diff <= {"actor_rollout_ref.model.path", "trainer.experiment_name", "data.image_patch_size"}, diff


ARM_MODES = {
    "grpo_tor": "tor",
    "dapo_tor": "tor",
    "grpo_tor_reasoning_only": "reasoning_only",
    "grpo_tor_perception_only": "perception_only",
    "grpo_tor_random": "random",
}


def tor_args(argv: list[str]) -> dict:
    """The tor.* overrides of a composed command, typed as hydra types them (the last value of a key wins)."""
    return OmegaConf.to_container(OmegaConf.from_dotlist([a for a in argv if a.startswith("tor.")]))["tor"]


def test_tor_arms_run_the_paper_definitions(composed):
    """Every ToR arm states every paper value on its command line, and the composed config runs exactly them (the
    arm's own tor.mode aside); tor.entropy=top_p gets what it needs (no fused kernels, verl's FSDP engine)."""
    from verl_tor.config import PAPER

    scripts = [s for s in SCRIPTS if s.stem in ARM_MODES]
    assert len(scripts) == 5 * len(MODELS)
    for script in scripts:
        want = {**PAPER, "mode": ARM_MODES[script.stem]}
        stated = tor_args(dry_run(script))
        assert {k: stated.get(k) for k in want} == want, script
        cfg = composed[script]
        assert {k: cfg.tor[k] for k in want} == want and cfg.tor.enable is True, script
        model, actor = cfg.actor_rollout_ref.model, cfg.actor_rollout_ref.actor
        assert model.use_fused_kernels is False and actor.strategy in ("fsdp", "fsdp2"), script


def test_recipes_readme_paper_values_are_the_paper():
    """Every `tor.<field>=<value>` the recipes README marks as "paper" is PAPER's value, and every PAPER field is
    there."""
    import re

    from verl_tor.config import PAPER

    text = (ROOT / "recipes" / "README.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("|") and line.rstrip(" |").endswith("paper")]
    stated = tor_args([m for row in rows for m in re.findall(r"`(tor\.\w+=[^`]+)`", row)])
    assert stated == PAPER


def test_config_defaults_are_the_paper_except_the_entropy():
    """ToRConfig's defaults are the paper's except tor.entropy (full: free, documented as not the paper's)."""
    from verl_tor.config import PAPER, ToRConfig

    defaults = ToRConfig()
    assert {k for k, v in PAPER.items() if getattr(defaults, k) != v} == {"entropy"}
    assert "not the paper's" in ToRConfig.field_docs()["entropy"]
    assert ToRConfig(enable=True, **PAPER).entropy == "top_p"  # the paper's values validate together


def test_overrides_and_env_reach_the_command():
    argv = dry_run(ROOT / "recipes" / "qwen2_5_vl_3b_geo3k" / "grpo_tor.sh", "tor.perception_weight=1.0")
    assert argv[-1] == "tor.perception_weight=1.0"
    env = {**os.environ, "VERL_TOR_DRY_RUN": "print", "NNODES": "4", "MODEL_PATH": "/ckpt/m"}
    out = subprocess.run(
        ["bash", str(ROOT / "recipes/qwen2_5_vl_7b_geo3k/dapo.sh")], capture_output=True, text=True, env=env
    )
    assert "trainer.nnodes=4" in out.stdout.splitlines() and "actor_rollout_ref.model.path=/ckpt/m" in out.stdout


def test_typo_in_an_override_is_caught():
    from hydra.errors import ConfigCompositionException

    argv = dry_run(ROOT / "recipes" / "qwen2_5_vl_7b_geo3k" / "grpo.sh", "actor_rollout_ref.actor.kl_los_coef=0.1")
    with pytest.raises(ConfigCompositionException):
        compose(argv)


def test_dry_run_composes_and_validates_the_config():
    """VERL_TOR_DRY_RUN=1 prints the command and composes + validates its config with the python that would run it:
    a misspelt +tor.* key (which hydra adds silently) fails the dry run, naming the field (values: test_cli_on_cpu)."""
    import sys

    script = ROOT / "recipes" / "qwen2_5_vl_3b_geo3k" / "grpo_tor.sh"
    env = {
        **os.environ,
        "VERL_TOR_DRY_RUN": "1",
        "DATA_DIR": "/data/geo3k",
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    }

    def run(*extra):
        return subprocess.run(["bash", str(script), *extra], capture_output=True, text=True, env=env, timeout=300)

    ok = run()
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "config OK" in ok.stderr and ok.stdout.splitlines()[:3] == ["python3", "-m", "verl.trainer.main_ppo"]
    typo = run("+tor.reasonig_ratio=0.2")
    assert typo.returncode != 0
    assert "tor.reasonig_ratio: unknown field. Fix: did you mean tor.reasoning_ratio?" in typo.stderr


def test_shellcheck_is_clean():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is required (scripts/dev.sh installs Debian's shellcheck)"
    files = [str(p) for folder in ("recipes", "verl_tor/recipes") for p in sorted((ROOT / folder).rglob("*.sh"))]
    files.append(str(ROOT / "scripts" / "dev.sh"))
    files.append(str(ROOT / ".ci" / "run"))
    assert len(files) >= 17
    proc = subprocess.run([shellcheck, "-x", *files], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout


def test_checkout_cpu_recipes_run_the_packaged_ones():
    """recipes/cpu_tiny/*.sh forward to verl_tor/recipes/cpu_tiny/*.sh (package data, what `verl-tor demo` runs from
    a wheel): one copy, so a checkout and an install run the same command, overrides and environment included."""
    from verl_tor.local.launch import RECIPES, recipes_dir

    assert recipes_dir() == ROOT / "verl_tor" / "recipes" / "cpu_tiny"
    assert sorted(p.stem for p in (ROOT / "recipes" / "cpu_tiny").glob("*.sh")) == sorted(RECIPES)
    for recipe in RECIPES:
        wrapper = ROOT / "recipes" / "cpu_tiny" / f"{recipe}.sh"
        assert len(wrapper.read_text(encoding="utf-8").splitlines()) < 10, "a wrapper, not a second copy"
        argv = dry_run(wrapper, "tor.seed=3")
        assert argv == dry_run(recipes_dir() / f"{recipe}.sh", "tor.seed=3") and argv[-1] == "tor.seed=3"
        assert f"--config-path={ROOT / 'verl_tor' / 'recipes' / 'config'}" in argv
        assert f"actor_rollout_ref.model.path={ROOT / 'verl_tor' / 'assets' / 'figure_reader'}" in argv


CPU_SCRIPTS = sorted((ROOT / "verl_tor" / "recipes" / "cpu_tiny").glob("*.sh"))  # the packaged recipes


def test_cpu_recipe_without_its_data_stops_before_ray_naming_the_prepare_command(tmp_path):
    """`bash recipes/cpu_tiny/grpo_tor.sh` before the data exist used to fail 20-30 s in, with a `datasets`
    FileNotFoundError from inside Ray; now the script stops at once (no Python started) with the command."""
    import time

    assert {p.stem for p in CPU_SCRIPTS} == {"common", "grpo", "grpo_tor", "dapo", "dapo_tor", "grpo_tor_gpu_shape"}
    for script in CPU_SCRIPTS:
        if script.stem == "common":
            continue
        env = {k: v for k, v in os.environ.items() if k not in ("VERL_TOR_DRY_RUN", "DATA_DIR", "TRAIN_FILES")}
        env.update(CPU_DIR=str(tmp_path), PATH="/usr/bin:/bin")  # no python3 of the venv on the path: none runs
        start = time.perf_counter()
        proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 2, (script, proc.stderr[-2000:])
        assert time.perf_counter() - start < 30
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {tmp_path}/data/train.parquet does not exist"), last
        assert f"python -m verl_tor.local.prepare --out-dir {tmp_path}" in last


def test_cpu_baselines_and_tor_arms_differ_only_in_tor_flags(tmp_path):
    """`recipes/cpu_tiny/dapo.sh` (stock DAPO, what `verl-tor demo --algorithm dapo tor.enable=false` runs) is
    dapo_tor.sh without ToR, as grpo.sh is grpo_tor.sh without it; and the two algorithms are GRPO and DAPO."""
    import verl  # noqa: F401

    env = {"CPU_DIR": str(tmp_path)}

    def cpu(name):
        argv = dry_run(ROOT / "verl_tor" / "recipes" / "cpu_tiny" / f"{name}.sh", **env)
        return compose(argv)

    configs = {name: cpu(name) for name in ("grpo", "grpo_tor", "dapo", "dapo_tor")}
    for base, tor in (("grpo", "grpo_tor"), ("dapo", "dapo_tor")):
        a, b = flat(configs[base]), flat(configs[tor])
        diff = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
        allowed = {"trainer.v1.trainer_mode", "trainer.experiment_name", "trainer.default_local_dir"}
        assert diff <= allowed | {k for k in diff if k.startswith("tor.")}, diff
        assert (a["tor.enable"], a["trainer.v1.trainer_mode"]) == (False, "sync")
        assert (b["tor.enable"], b["trainer.v1.trainer_mode"]) == (True, "tor_sync")
    assert configs["dapo"].algorithm.filter_groups.enable and configs["dapo"].reward.reward_manager.name == "dapo"
    assert not configs["grpo"].algorithm.filter_groups.enable and configs["grpo"].actor_rollout_ref.actor.use_kl_loss
