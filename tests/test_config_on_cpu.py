"""ToRConfig: defaults are the paper's, errors name field/value/fix, omegaconf/hydra blocks construct it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from verl_tor.config import CHOICES, ToRConfig, ToRConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_papers():
    cfg = ToRConfig()
    assert cfg.enable is False
    assert (cfg.reasoning_ratio, cfg.perception_ratio) == (0.3, 0.3)  # ρ_r, ρ_p
    assert (cfg.reasoning_weight, cfg.perception_weight) == (1.0, 0.5)  # γ_r, γ_p
    assert cfg.entropy_top_p == 0.95
    assert (cfg.sensitivity, cfg.image_view, cfg.scorer_policy, cfg.mode) == ("abs_log_ratio", "remove", "old", "tor")
    assert cfg.scope == "batch"


def test_every_field_documented_once():
    docs = ToRConfig.field_docs()
    names = [f.name for f in dataclasses.fields(ToRConfig)]
    assert sorted(docs) == sorted(names)
    for name, doc in docs.items():
        assert len(doc) > 30, f"tor.{name} doc too short: {doc!r}"


def test_choices_are_first_default():
    cfg = ToRConfig()
    for name, choices in CHOICES.items():
        assert getattr(cfg, name) == choices[0]


def test_import_without_torch():
    code = "import sys, verl_tor.config, verl_tor.metrics, verl_tor; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize(
    ("block", "field", "fix"),
    [
        ({"reasoning_ratio": 1.5}, "tor.reasoning_ratio=1.5", "[0, 1]"),
        ({"perception_ratio": -0.1}, "tor.perception_ratio=-0.1", "[0, 1]"),
        ({"perception_weight": -1}, "tor.perception_weight=-1", ">= 0"),
        ({"reasoning_weight": float("nan")}, "tor.reasoning_weight=nan", "finite"),
        ({"entropy_top_p": 0.0}, "tor.entropy_top_p=0.0", "(0, 1]"),
        ({"scope": "batc"}, "tor.scope='batc'", "did you mean 'batch'"),
        ({"sensitivity": "kl"}, "tor.sensitivity='kl'", "abs_log_ratio, prob_diff, entropy_diff, k3"),
        ({"mode": "perception"}, "tor.mode='perception'", "perception_only"),
        ({"apply": "grad"}, "tor.apply='grad'", "advantage, loss"),
        ({"enable": "yes"}, "tor.enable='yes'", "true or false"),
        ({"seed": -1}, "tor.seed=-1", "integer >= 0"),
        ({"log_token_maps_rollouts": 0}, "tor.log_token_maps_rollouts=0", "integer >= 1"),
        ({"reasoning_ratio": 0, "perception_ratio": 0}, "tor.mode='tor'", "every token gets weight 0"),
        ({"mode": "reasoning_only", "reasoning_weight": 0}, "tor.mode='reasoning_only'", "reasoning_weight > 0"),
        ({"reasonig_ratio": 0.2}, "tor.reasonig_ratio", "did you mean tor.reasoning_ratio"),
        # finite in float64 but not in the float32 tensors ToR computes with
        ({"reasoning_weight": 1e39}, "tor.reasoning_weight=1e+39", "float32"),
        ({"perception_weight": 1e-46}, "tor.perception_weight=1e-46", "float32"),
        ({"entropy_top_p": 1e-300}, "tor.entropy_top_p=1e-300", "float32"),
        ({"noise_std": 1e-40}, "tor.noise_std=1e-40", "float32"),
        ({"seed": 2**64}, "tor.seed=18446744073709551616", "< 9223372036854775808"),
        ({"rank_tokens": "nonzero"}, "tor.rank_tokens='nonzero'", "all, informative"),
    ],
)
def test_errors_name_field_value_and_fix(block, field, fix):
    with pytest.raises(ToRConfigError) as err:
        ToRConfig.from_mapping(block)
    message = str(err.value)
    assert field in message and "Fix:" in message and fix in message, message


def test_from_omegaconf_block_and_int_coercion():
    block = OmegaConf.create({"enable": True, "reasoning_ratio": 1, "scope": "group", "seed": 3})
    cfg = ToRConfig.from_mapping(block)
    assert cfg.enable and cfg.reasoning_ratio == 1.0 and isinstance(cfg.reasoning_ratio, float)
    assert cfg.scope == "group" and cfg.seed == 3
    assert ToRConfig.from_mapping(None) == ToRConfig()
    with pytest.raises(ToRConfigError, match="expected a mapping"):
        ToRConfig.from_mapping([1, 2])


def test_numpy_numbers_are_accepted_as_the_numbers_they_print_as():
    import numpy as np

    cfg = ToRConfig(
        reasoning_ratio=np.float32(0.3),
        perception_ratio=np.float64(0.3),
        perception_weight=np.float16(0.5),
        seed=np.int64(7),
        log_token_maps=np.int32(2),
    )
    assert cfg.reasoning_ratio == 0.3 and type(cfg.reasoning_ratio) is float  # not 0.30000001192092896
    assert cfg.perception_ratio == 0.3 and cfg.perception_weight == 0.5
    assert cfg.seed == 7 and type(cfg.seed) is int and cfg.log_token_maps == 2
    largest = ToRConfig(reasoning_weight=3e38, seed=2**63 - 1)  # the edges float32 / int64 still hold
    assert largest.reasoning_weight == 3e38 and largest.seed == 2**63 - 1


def test_frozen_and_replace_validates():
    cfg = ToRConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.enable = True  # type: ignore[misc]
    with pytest.raises(ToRConfigError, match="tor.scope"):
        cfg.replace(scope="nope")


def test_needs_image_free_pass():
    assert ToRConfig().needs_image_free_pass
    assert not ToRConfig(mode="reasoning_only").needs_image_free_pass
    assert not ToRConfig(mode="all_tokens").needs_image_free_pass
    assert ToRConfig(mode="random").needs_image_free_pass
    assert not ToRConfig(perception_weight=0.0).needs_image_free_pass  # T_p \\ T_r would get weight 0
    assert ToRConfig(mode="random", perception_weight=0.0).needs_image_free_pass
    assert ToRConfig(sensitivity="entropy_diff").needs_image_free_entropy
    assert not ToRConfig().needs_image_free_entropy


def test_recipe_yaml_tor_block_equals_dataclass_defaults():
    yaml = OmegaConf.load(ROOT / "verl_tor" / "recipes" / "config" / "tor_trainer.yaml")
    assert OmegaConf.to_container(yaml.tor) == ToRConfig().to_dict()
    assert yaml.trainer.v1.trainer_mode == "tor_sync"


def test_readme_tables_are_generated_from_the_code():
    from verl_tor.tools.cli import render_readme

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert render_readme(text) == text, "README tables are stale: run `verl-tor docs --write README.md`"
    for name in ToRConfig.field_docs():
        assert f"`tor.{name}`" in text


def test_every_metric_is_in_the_readme():
    from verl_tor import metrics

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(metrics.ALL_METRICS) >= 14
    for key in metrics.ALL_METRICS:
        assert key.startswith(("tor/", "timing_s/tor_")) and f"`{key}`" in text, key
