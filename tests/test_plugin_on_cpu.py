"""The verl entry point: discovered, loaded by a bare `import verl`, hooks installed, config checked by verl."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE_CONFIG = ROOT / "verl_tor" / "recipes" / "config"
# Enough to pass verl's own validate_config on a 1-GPU layout (it checks batch arithmetic, not hardware).
BASE_OVERRIDES = [
    "algorithm.adv_estimator=grpo",
    "actor_rollout_ref.rollout.n=4",
    "data.train_batch_size=8",
    "actor_rollout_ref.actor.ppo_mini_batch_size=4",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=1",
    "trainer.n_gpus_per_node=1",
]


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def test_entry_point_is_declared():
    eps = importlib.metadata.entry_points(group="verl.plugins")
    tor = [ep for ep in eps if ep.name == "tor"]
    assert len(tor) == 1 and tor[0].value == "verl_tor.integration.plugin"


def test_bare_import_verl_registers_everything():
    code = (
        "import sys, verl\n"
        "assert 'verl_tor.integration.plugin' in sys.modules, 'plugin not loaded by import verl'\n"
        "from verl.trainer.ppo.v1 import get_trainer_cls, PPOTrainerSync, PPOTrainerColocateAsync\n"
        "cls = get_trainer_cls('tor_sync')\n"
        "assert issubclass(cls, PPOTrainerSync), cls\n"
        "assert issubclass(get_trainer_cls('tor_colocate_async'), PPOTrainerColocateAsync)\n"
        "import verl.utils.config as c; assert c.validate_config.__verl_tor__\n"
        "import verl.workers.engine.fsdp.transformer_impl as e\n"
        "assert e.FSDPEngineWithLMHead.prepare_model_outputs.__verl_tor__\n"
        "import verl_tor.integration.plugin as p; p.assert_ready(); print('READY')\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "READY" in proc.stdout


def test_without_plugin_there_is_no_tor_trainer():
    # Proves the registration above comes from the entry point, not from importing verl_tor by hand.
    code = (
        "import verl\nfrom verl.trainer.ppo.v1 import get_trainer_cls\n"
        "try:\n    get_trainer_cls('tor_sync')\nexcept ValueError as e:\n    print('UNKNOWN', e)\n"
    )
    proc = run_python(code, VERL_USE_EXTERNAL_PLUGINS="none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "UNKNOWN" in proc.stdout and "tor_sync" in proc.stdout


def test_plugin_import_error_is_a_warning_not_silence(tmp_path):
    # A broken hook is logged at WARNING (verl itself would only say it at DEBUG) and blocks ToR runs.
    code = (
        "import logging; logging.basicConfig(level=logging.WARNING)\n"
        "import verl_tor.integration.plugin as p\n"
        "def broken():\n    raise ImportError('boom')\n"
        "p.when_imported('logging', broken)\n"
        "try:\n    p.assert_ready()\nexcept RuntimeError as e:\n    print('REFUSED', e)\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hook broken on logging failed" in proc.stderr
    assert "REFUSED" in proc.stdout and "boom" in proc.stdout


def test_version_check_names_range(monkeypatch):
    import re

    import verl

    import verl_tor.integration.hooks as hooks
    import verl_tor.integration.plugin as plugin
    from verl_tor import SUPPORTED_VERL

    assert plugin.check_verl_version() is None  # the pinned verl is installed here
    monkeypatch.setattr(verl, "__version__", "0.11.0")
    reason = plugin.check_verl_version()
    assert reason == f"verl 0.11.0 is outside verl_tor's supported range verl{SUPPORTED_VERL}"
    monkeypatch.setattr(hooks, "_VERSION_ERROR", reason)
    with pytest.raises(RuntimeError, match=re.escape(f"Fix: pip install 'verl{SUPPORTED_VERL}'")):
        plugin.assert_ready()


@pytest.mark.parametrize(
    ("version", "supported"),
    [
        ("0.9.1", True),  # the pinned release
        ("0.10.0.dev", True),  # verl's main branch (verl/version/version), i.e. 0.10.0.dev0
        ("0.10.0.dev0", True),
        ("0.9.0", False),
        ("0.11.0.dev0", False),  # the next minor's dev builds were never checked
        ("0.11.0", False),
    ],
)
def test_supported_range_admits_the_main_branch_pre_release(monkeypatch, version, supported):
    """The version check reads the verl this process imports (``verl.__version__``, right for a source checkout on
    PYTHONPATH too) and admits main's pre-release, which a plain ``<0.11`` bound would skip."""
    import verl

    import verl_tor.integration.plugin as plugin

    monkeypatch.setattr(verl, "__version__", version)
    assert plugin.verl_version() == version
    assert (plugin.check_verl_version() is None) is supported


def compose(*overrides: str, config_name: str = "tor_trainer"):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(RECIPE_CONFIG), version_base=None):
        return hydra_compose(config_name, overrides=[*BASE_OVERRIDES, *overrides])


def validate(cfg):
    import verl  # noqa: F401  - loads the plugin, which wraps validate_config
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    assert getattr(validate_config, "__verl_tor__", False)
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))


def test_recipe_config_composes_and_validates_through_verl():
    cfg = compose("tor.enable=true")
    validate(cfg)
    assert cfg.tor.enable and cfg.trainer.v1.trainer_mode == "tor_sync"


def test_one_flag_on_stock_ppo_trainer_validates():
    import verl

    stock = str(Path(verl.__file__).parent / "trainer" / "config")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=stock, version_base=None):
        cfg = hydra_compose(
            "ppo_trainer", overrides=[*BASE_OVERRIDES, "trainer.v1.trainer_mode=tor_sync", "+tor.enable=true"]
        )
    validate(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["tor.enable=true", "tor.reasoning_ratio=2"], r"tor\.reasoning_ratio=2.0 is invalid.*\[0, 1\]"),
        (["tor.enable=true", "tor.scope=sequenc"], r"tor\.scope='sequenc'.*did you mean 'sequence'"),
        (
            ["tor.enable=true", "trainer.v1.trainer_mode=sync"],
            r"trainer_mode='sync'.*Fix: set trainer\.v1\.trainer_mode=tor_sync",
        ),
        (
            ["tor.enable=true", "actor_rollout_ref.actor.policy_loss.loss_mode=clip_cov"],
            r"loss_mode='clip_cov'.*Fix: set tor\.apply=loss",
        ),
        (
            ["tor.enable=true", "tor.apply=loss", "actor_rollout_ref.actor.policy_loss.loss_mode=geo_mean"],
            r"loss_mode='geo_mean'.*sequence-level",
        ),
        (
            ["tor.enable=true", "tor.entropy=top_p", "actor_rollout_ref.model.use_fused_kernels=true"],
            r"use_fused_kernels=false",
        ),
        (["tor.enable=true", "tor.scorer_policy=ref"], r"no reference policy.*Fix: set tor\.scorer_policy=old"),
        (
            ["tor.enable=true", "trainer.v1.trainer_mode=colocate_async"],
            r"trainer_mode='colocate_async'.*Fix: set trainer\.v1\.trainer_mode=tor_colocate_async",
        ),
        (
            ["tor.enable=true", "trainer.v1.trainer_mode=separate_async"],
            r"trainer_mode='separate_async'.*swapping the π_old weights in and out inside "
            r"PPOTrainerSeparateAsync\._compute_old_log_prob.*current weights.*scoring and selection.*"
            r"Fix: use trainer\.v1\.trainer_mode=tor_colocate_async",
        ),
        (
            ["tor.enable=true", "algorithm.rollout_correction.bypass_mode=true"],
            r"bypass_mode=true: verl then skips the old-policy pass.*Fix",
        ),
        (["tor.enable=true", "algorithm.adv_estimator=remax"], r"adv_estimator='remax'.*reward_baselines.*Fix"),
        (["+tor.reasoning_ratoi=0.2"], r"tor\.reasoning_ratoi: unknown field.*tor\.reasoning_ratio"),
    ],
)
def test_bad_tor_values_fail_verl_validation_with_named_field(overrides, message):
    from verl_tor.config import ToRConfigError

    cfg = compose(*overrides)
    with pytest.raises(ToRConfigError, match=message):
        validate(cfg)


def test_tor_disabled_validates_with_any_trainer_mode():
    validate(compose("trainer.v1.trainer_mode=sync"))


def test_tor_colocate_async_validates_through_verl():
    cfg = compose("tor.enable=true", "trainer.v1.trainer_mode=tor_colocate_async")
    validate(cfg)
    assert cfg.trainer.v1.trainer_mode == "tor_colocate_async"


def test_gae_is_refused_unless_opted_in():
    """Checked with ToR's own validation: verl's would first want a critic model path for gae."""
    from verl_tor.config import ToRConfigError
    from verl_tor.integration.trainer import validate_tor_config

    cfg = compose("tor.enable=true", "algorithm.adv_estimator=gae")
    with pytest.raises(ToRConfigError, match=r"adv_estimator='gae'.*critic still trains.*Fix: .*tor\.allow_gae=true"):
        validate_tor_config(cfg, use_reference_policy=True)
    assert validate_tor_config(
        compose("tor.enable=true", "algorithm.adv_estimator=gae", "tor.allow_gae=true")
    ).allow_gae


def test_top_p_entropy_is_refused_off_the_fsdp_engine():
    """The top-p hook lives on verl's FSDP engine: with another strategy ToR would silently rank by full entropy."""
    from omegaconf import open_dict

    from verl_tor.config import ToRConfigError
    from verl_tor.integration.trainer import validate_tor_config

    cfg = compose("tor.enable=true", "tor.entropy=top_p")
    validate_tor_config(cfg, use_reference_policy=True)  # fsdp: fine
    with open_dict(cfg):
        cfg.actor_rollout_ref.actor.strategy = "megatron"
    with pytest.raises(ToRConfigError, match=r"strategy='megatron'.*silently rank.*Fix: use strategy fsdp or fsdp2"):
        validate_tor_config(cfg, use_reference_policy=True)
    with open_dict(cfg):
        cfg.tor.entropy = "full"
    validate_tor_config(cfg, use_reference_policy=True)  # full entropy comes from any engine


def test_post_import_hook_coexists_with_another_delegating_finder(monkeypatch):
    """Another post-import finder that delegates to ``sys.meta_path`` the same way (another plugin's, or the suite's
    ``local_backend_only``) used to bounce a lookup back and forth with verl_tor's until RecursionError."""
    import importlib
    import importlib.abc
    import sys

    from verl_tor.integration import hooks

    name = "wave"  # a stdlib module nothing in the suite imports
    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(hooks, "_INSTALLED", dict(hooks._INSTALLED))

    class NaiveDelegatingFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != name:
                return None
            for finder in sys.meta_path:  # no guard of its own
                if finder is not self and hasattr(finder, "find_spec"):
                    spec = finder.find_spec(fullname, path, target)
                    if spec is not None:
                        return spec
            return None

    monkeypatch.setattr(sys, "meta_path", [NaiveDelegatingFinder(), *sys.meta_path])
    ran = []

    def record_wave_import():
        ran.append(name)

    hooks.when_imported(name, record_wave_import)
    importlib.import_module(name)
    assert ran == [name]
