"""verl's own CPU tests of the pieces verl_tor hooks into (policy losses, advantages, loss aggregation) still pass
in a process where ``import verl`` has loaded the verl_tor plugin. verl's wheel ships them as the ``tests`` package."""

from __future__ import annotations

import re
import subprocess
import sys

VERL_TESTS = [
    "tests.trainer.ppo.test_core_algos_on_cpu",
    "tests.trainer.ppo.test_dynamic_policy_losses_on_cpu",
    "tests.trainer.ppo.test_loss_aggregation_on_cpu",
]

RUNNER = """
import sys
import pytest
import verl  # loads the verl.plugins entry points
assert "verl_tor.integration.plugin" in sys.modules, "verl did not load the verl_tor plugin"
import verl.trainer.ppo.v1  # and let the trainer hook run, as in a ToR run
from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY
assert "tor_sync" in TRAINER_REGISTRY
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "--pyargs", *sys.argv[1:]]))
"""


def test_verls_own_cpu_tests_pass_with_the_plugin_loaded(tmp_path):
    # run outside the repository so that `tests` resolves to verl's package, not ours
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, *VERL_TESTS], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= 20, out[-2000:]
    assert not re.search(r"\d+ (failed|error)", out), out[-2000:]
