"""The package as a verl user gets it: an sdist and a wheel built from this tree, the wheel installed into a fresh
venv, and its main job run from a directory outside the checkout.

The rest of the suite imports the checkout (``pip install -e`` or ``PYTHONPATH``), so it cannot see a file the wheel
leaves out. Here the wheel is built without the network (setuptools' own build backend, the hooks ``python -m build
--no-isolation`` calls: sdist first, then the wheel from the unpacked sdist, so ``MANIFEST.in`` and
``[options.package_data]`` are both exercised), and installed with ``pip install --no-deps --no-index`` into a venv
of its own. That venv borrows the dependencies already installed in the running environment (verl, torch, ...)
through a ``.pth`` line naming their ``site-packages``: a line in a ``.pth`` file adds a folder to ``sys.path``
without running that folder's own ``.pth`` files, so the running environment's editable install of verl_tor (an
``__editable__`` finder, started from a ``.pth``) stays out, and ``import verl_tor`` can only find the wheel's copy.
Every command runs from an empty temporary folder with ``PYTHONPATH`` unset. Marked ``loop``: one ``main_ppo`` run
(``verl-tor demo --steps 1``), ~1-2 min on 2 cores.
"""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.loop

ROOT = Path(__file__).resolve().parents[1]
# What a build must not read from the working tree: the environment, caches, earlier builds and run outputs.
NOT_SOURCE = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "outputs")
NOT_SOURCE += ("tor_demo_out",)
PACKAGE_DATA = (
    "verl_tor/recipes/common.sh",
    "verl_tor/recipes/cpu_tiny/common.sh",
    "verl_tor/recipes/cpu_tiny/grpo.sh",
    "verl_tor/recipes/cpu_tiny/grpo_tor.sh",
    "verl_tor/recipes/cpu_tiny/dapo.sh",
    "verl_tor/recipes/cpu_tiny/dapo_tor.sh",
    "verl_tor/recipes/config/__init__.py",
    "verl_tor/recipes/config/tor_trainer.yaml",
    "verl_tor/assets/figure_reader/model.safetensors",
)


def build(backend_call: str, source: Path, out: Path) -> Path:
    """Run one of setuptools' PEP 517 hooks in ``source`` (its own process, no network); returns the file made."""
    out.mkdir(parents=True, exist_ok=True)
    code = f"from setuptools import build_meta; print(build_meta.{backend_call}({str(out)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """sdist -> wheel, built from a copy of the tree (the build writes ``*.egg-info`` and ``build/`` where it runs)."""
    tmp = tmp_path_factory.mktemp("wheel_build")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    sdist = build("build_sdist", source, tmp / "dist")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    unpacked = tmp / "unpacked" / sdist.name.removesuffix(".tar.gz")
    wheel = build("build_wheel", unpacked, tmp / "dist")
    return {"sdist": sdist, "wheel": wheel}


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory) -> dict[str, Path]:
    """A fresh venv with the wheel installed and the running environment's dependencies visible (see the module
    docstring); returns its ``python``, its ``bin`` folder, its ``site-packages`` and an empty working folder."""
    tmp = tmp_path_factory.mktemp("wheel_venv")
    home = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(home)], check=True, timeout=120)
    python = home / "bin" / "python"
    purelib = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # the running environment's pip installs into the new interpreter (pip --python): no pip download, no index
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index"]
    proc = subprocess.run(
        [*install, "--no-cache-dir", "--disable-pip-version-check", str(dist["wheel"])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # written after the install, so that pip saw an environment without verl_tor
    borrowed = [p for p in dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"]]) if p]
    (purelib / "zz_borrowed_dependencies.pth").write_text("\n".join(borrowed) + "\n", encoding="utf-8")
    work = tmp / "empty"
    work.mkdir()
    return {"python": python, "bin": home / "bin", "purelib": purelib, "work": work}


def run_in_venv(venv, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``argv`` with the venv's ``bin`` first on ``PATH``, from the empty folder, without ``PYTHONPATH``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join([str(venv["bin"]), env.get("PATH", "")])
    return subprocess.run(list(argv), cwd=venv["work"], env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_and_the_sdist_carry_the_recipes_the_config_and_the_licence(dist):
    import verl_tor

    wheel = zipfile.ZipFile(dist["wheel"])
    names = set(wheel.namelist())
    info = f"verl_tor-{verl_tor.__version__}.dist-info"
    assert set(PACKAGE_DATA) <= names, set(PACKAGE_DATA) - names
    assert f"{info}/licenses/LICENSE" in names
    assert not any(n.startswith(("tests/", "recipes/", "benchmarks/")) for n in names)
    meta = wheel.read(f"{info}/METADATA").decode()
    for line in (
        "License: Apache-2.0",
        "License-File: LICENSE",
        "Requires-Python: >=3.10",
        "Classifier: Programming Language :: Python :: 3.11",
        "Classifier: Programming Language :: Python :: 3.12",
        "Description-Content-Type: text/markdown",
    ):
        assert line in meta.splitlines(), line
    assert meta.split("\n\n", 1)[1].strip() == (ROOT / "README.md").read_text(encoding="utf-8").strip()
    entry_points = wheel.read(f"{info}/entry_points.txt").decode()
    assert "tor = verl_tor.integration.plugin" in entry_points and "verl-tor = verl_tor.tools.cli:main" in entry_points
    licence = wheel.read(f"{info}/licenses/LICENSE").decode()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence and "END OF TERMS" in licence
    with tarfile.open(dist["sdist"]) as tar:
        top = dist["sdist"].name.removesuffix(".tar.gz")
        members = {m.name.removeprefix(f"{top}/") for m in tar.getmembers()}
    assert set(PACKAGE_DATA) | {"LICENSE", "README.md", "setup.cfg", "MANIFEST.in"} <= members


def test_readme_links_read_right_on_an_index():
    """The README is the package's long description: an index renders it away from the repository, so a relative
    link or image would point nowhere. Paths are written as code spans instead."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)", text) + re.findall(r"^\[[^\]]+\]:\s*(\S+)", text, re.M)
    targets += re.findall(r"<(?:img|a)\b[^>]*(?:src|href)=\"([^\"]+)\"", text)
    assert targets, "the README links verl's repository"
    assert all(re.match(r"https?://", t) for t in targets), [t for t in targets if not re.match(r"https?://", t)]


def test_the_installed_package_is_the_wheel_and_knows_its_paths(venv):
    import verl_tor

    proc = run_in_venv(
        venv,
        str(venv["python"]),
        "-c",
        "import verl_tor, verl_tor.recipes as r; print(verl_tor.__file__, r.config_dir())",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    module, config = proc.stdout.split()
    assert Path(module).is_relative_to(venv["purelib"]), module  # not the checkout
    assert Path(config) == venv["purelib"] / "verl_tor" / "recipes" / "config"
    version = run_in_venv(venv, "verl-tor", "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"verl-tor {verl_tor.__version__}", version
    path = run_in_venv(venv, "verl-tor", "config-path")
    assert path.returncode == 0 and Path(path.stdout.strip()) == Path(config), path


def test_verls_main_ppo_composes_the_tor_trainer_config_from_the_package(venv):
    """`--config-path=pkg://verl_tor.recipes.config`: verl's own entry point finds the config by package name, from
    any folder (hydra's ``--cfg job`` prints the composed config and stops before any training)."""
    proc = run_in_venv(
        venv,
        str(venv["python"]),
        "-m",
        "verl.trainer.main_ppo",
        "--config-path=pkg://verl_tor.recipes.config",
        "--config-name=tor_trainer",
        "--cfg",
        "job",
        "tor.enable=true",
        "tor.perception_weight=1.0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from omegaconf import OmegaConf

    first_key = re.search(r"^\w+:", proc.stdout, re.M)  # hydra prints the YAML alone; a warning may precede it
    assert first_key, proc.stdout[-3000:]
    cfg = OmegaConf.create(proc.stdout[first_key.start() :])
    assert cfg.tor.enable is True and cfg.tor.perception_weight == 1.0 and cfg.tor.reasoning_ratio == 0.3
    assert cfg.trainer.v1.trainer_mode == "tor_sync" and "actor_rollout_ref" in cfg  # verl's ppo_trainer underneath


def test_verl_tor_demo_runs_verls_trainer_from_the_wheel(venv, tmp_path):
    """The main job, installed: ``verl-tor demo --steps 1`` in an empty folder runs verl's ``main_ppo`` with ToR on
    the packaged CPU recipe, config and figure reader, and logs the ``tor/*`` metrics."""
    out = tmp_path / "demo"
    proc = run_in_venv(venv, "verl-tor", "demo", "--steps", "1", "--out-dir", str(out), timeout=900)
    log = out / "runs" / "grpo_tor-1" / "main_ppo.log"  # the first run folder (one per run)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "[demo] step 1/1" in proc.stdout and "tor/reasoning_frac" in proc.stdout, proc.stdout[-3000:]
    from verl_tor.local.launch import read_metrics

    steps = read_metrics(str(out / "runs" / "grpo_tor-1" / "metrics.jsonl"))
    assert [s["step"] for s in steps] == [1]
    assert {"tor/reasoning_frac", "tor/perception_frac", "tor/weight_mean"} <= set(steps[0])
    text = log.read_text(encoding="utf-8", errors="replace")
    package = venv["purelib"] / "verl_tor"
    assert f"--config-path={package / 'recipes' / 'config'}" in text  # the recipe's trace (set -x)
    assert f"actor_rollout_ref.model.path={package / 'assets' / 'figure_reader'}" in text
    assert str(ROOT / "verl_tor") not in text and str(ROOT / "recipes") not in text
