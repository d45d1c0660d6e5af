"""The verl contract: every verl function verl_tor hooks or relies on still has the fingerprint recorded for this
verl version (``patches/contract/verl-<version>.json``), so a verl bump fails here, naming the function that changed.

How to bump verl: ``patches/README.md``. The fingerprints are normalised (AST without docstrings): formatting and
comments never fail this test, code does.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from verl_tor.integration.contract import (
    VERL_CONTRACT,
    compare,
    current_fingerprints,
    fingerprint_source,
    load_recorded,
    resolve,
)

ROOT = Path(__file__).resolve().parents[1]
VERL_FACING = [
    "integration/plugin",
    "integration/trainer",
    "integration/engine",
    "integration/fixes/qwen2_vl",
    "integration/fixes/mrope",
    "integration/support",
    "loss",
    "stage",
    "views",
    "tools/in_process",
    "local/__init__",
    "local/packed",
    "local/platform",
    "local/rollout",
    "local/sampling",
]
"""The verl_tor modules whose ``from verl... import name`` must each be covered by a contract entry."""

NOT_CODE = {
    "verl.trainer.ppo.v1.trainer_base:TRAINER_REGISTRY": "a dict, written through register_trainer / read by "
    "get_trainer_cls (both fingerprinted)",
    "verl.trainer.ppo.core_algos:ADV_ESTIMATOR_REGISTRY": "a dict: its keys are checked by the estimator matrix test",
    "verl.trainer.ppo.core_algos:POLICY_LOSS_REGISTRY": "a dict: its keys are checked by the estimator matrix test",
    "verl.workers.rollout.base:_ROLLOUT_REGISTRY": "a dict, read by get_rollout_class (fingerprinted); the hf entry is "
    "tested by tests/test_local_on_cpu.py",
}


def verl_version() -> str:
    from verl_tor.integration.plugin import verl_version

    return verl_version()


def test_fingerprints_match_the_record_of_this_verl_version():
    recorded = load_recorded()
    assert recorded, "no recorded fingerprints in patches/contract/"
    version = verl_version()
    current = current_fingerprints()
    if version not in recorded:
        newest = list(recorded)[-1]
        problems = compare(recorded[newest]["functions"], current)
        pytest.fail(
            f"no fingerprints recorded for verl {version}. Against the newest recorded verl {newest}, "
            f"{len(problems)} of {len(VERL_CONTRACT)} contract entries differ:\n  "
            + "\n  ".join(problems or ["(none)"])
            + "\nReview what verl_tor does with each (patches/README.md, 'Bumping verl'), then record this verl: "
            "python -m verl_tor.integration.contract --write patches/contract"
        )
    problems = compare(recorded[version]["functions"], current)
    assert not problems, (
        f"verl {version} differs from its recorded contract:\n  " + "\n  ".join(problems) + "\nIf this verl is a new "
        "build of the same version, review each function above, then re-record (patches/README.md)."
    )


def test_every_contract_entry_resolves_to_verls_own_code():
    import inspect

    for name in VERL_CONTRACT:
        obj = resolve(name)
        assert inspect.getsourcefile(obj).startswith(str(Path(importlib.import_module("verl").__file__).parent)), name
        assert not getattr(obj, "__verl_tor__", False), f"{name}: fingerprinted verl_tor's wrapper, not verl's code"


def test_hooked_targets_are_unwrapped_to_verls_original():
    """The plugin wraps validate_config, prepare_model_outputs and (on this verl) _get_input_embeds: the contract
    fingerprints verl's function underneath, so installing the hooks does not change the fingerprint."""
    import verl.models.transformers.qwen2_vl as qwen2_vl
    import verl.utils.config as verl_config
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    assert verl_config.validate_config.__verl_tor__ and FSDPEngineWithLMHead.prepare_model_outputs.__verl_tor__
    assert resolve("verl.utils.config:validate_config") is verl_config.validate_config.__wrapped_original__
    assert qwen2_vl._get_input_embeds.__verl_tor__
    assert (
        resolve("verl.models.transformers.qwen2_vl:_get_input_embeds")
        is qwen2_vl._get_input_embeds.__wrapped_original__
    )


def test_normalisation_ignores_formatting_comments_and_docstrings_but_not_code():
    base = fingerprint_source("def f(a, b=1):\n    return a + b\n")
    same = fingerprint_source(
        'def f(\n    a,  # the first\n    b = 1,\n):\n    """Adds."""\n    # a comment\n    return (a + b)\n'
    )
    assert same == base
    body = fingerprint_source("def f(a, b=1):\n    return a - b\n")
    assert body["signature"] == base["signature"] and body["source"] != base["source"]
    sig = fingerprint_source("def f(a, b=2):\n    return a + b\n")
    assert sig["signature"] != base["signature"]
    method = fingerprint_source("    def f(self):\n        '''doc'''\n        return 1\n")  # indented, as getsource
    assert method == fingerprint_source("def f(self):\n    return 1\n")
    cls_a = fingerprint_source("class A(B):\n    '''doc'''\n    x = 1\n")
    assert cls_a == fingerprint_source("class A(B):\n    x = 1\n")
    assert cls_a["signature"] != fingerprint_source("class A(C):\n    x = 1\n")["signature"]


def test_compare_names_each_changed_function():
    current = {name: {"signature": "s", "source": "b"} for name in VERL_CONTRACT}
    recorded = {name: dict(fp) for name, fp in current.items()}
    assert compare(recorded, current) == []
    first, second, third = VERL_CONTRACT[:3]
    recorded[first]["source"] = "other"
    recorded[second]["signature"] = "other"
    del recorded[third]
    recorded["verl.gone:f"] = {"signature": "s", "source": "b"}
    assert compare(recorded, current) == [
        f"{first}: body changed (same signature)",
        f"{second}: signature changed",
        f"{third}: not recorded for this verl version (new contract entry?)",
        "verl.gone:f: recorded but no longer in VERL_CONTRACT",
    ]
    current[first] = {"missing": "AttributeError: no f"}
    assert compare(recorded, current)[0] == f"{first}: not found in this verl (AttributeError: no f)"


def _verl_imports(module_name: str) -> set[str]:
    """``module:name`` of every ``from verl... import name`` in a verl_tor module (functions included)."""
    tree = ast.parse((ROOT / "verl_tor" / f"{module_name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "verl":
            for alias in node.names:
                found.add(f"{node.module}:{alias.name}")
    return found


def test_contract_covers_every_verl_name_the_verl_facing_modules_import():
    """Adding a hook that imports a verl function without fingerprinting it fails here, naming the import."""
    uncovered = []
    for module_name in VERL_FACING:
        for ref in sorted(_verl_imports(module_name)):
            module, _, name = ref.partition(":")
            if ref in NOT_CODE:
                continue
            try:  # a submodule (`from verl.utils import tensordict_utils`): its functions are listed one by one
                importlib.import_module(f"{module}.{name}")
                continue
            except ImportError:
                pass
            if not any(entry == ref or entry.startswith(ref + ".") for entry in VERL_CONTRACT):
                uncovered.append(f"verl_tor/{module_name}.py imports {ref}")
    assert not uncovered, "add to VERL_CONTRACT (verl_tor/integration/contract.py) and re-record:\n  " + "\n  ".join(
        uncovered
    )
