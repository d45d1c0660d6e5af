"""The package's layers, read from the source (AST, nothing executed): imports point one way, and none go round.

The layers, lowest first (README "Layout"); a module may import its own layer and the layers below it:

    base         verl_tor/__init__.py, config.py, metrics.py   no torch, no verl (and recipes/: package data)
    ops          verl_tor/ops/                                  pure tensor maths (torch only)
    core         views.py, stage.py, loss.py, viz.py, tiny.py   the ToR stage and its seams; no verl internals
    figures      verl_tor/figures/                              the figure task, its data, the figure reader
    local        verl_tor/local/                                verl's trainer on a laptop (opt-in)
    integration  verl_tor/integration/                          everything that patches or subclasses verl
    tools        verl_tor/tools/                                what a user runs

Every import counts, also one inside a function (a lazy import is still a dependency), so a new module must be
given a layer here before it can land.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "verl_tor"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("verl_tor", "verl_tor.config", "verl_tor.metrics", "verl_tor.recipes")),  # recipes: package data
    ("ops", ("verl_tor.ops",)),
    ("core", ("verl_tor.views", "verl_tor.stage", "verl_tor.loss", "verl_tor.viz", "verl_tor.tiny")),
    ("figures", ("verl_tor.figures",)),
    ("local", ("verl_tor.local",)),
    ("integration", ("verl_tor.integration",)),
    ("tools", ("verl_tor.tools",)),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix that names ``module`` or a package above it."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                if prefix == "verl_tor" and module != "verl_tor":
                    continue  # the package itself is base; its submodules are placed by their own entries
                best, best_len = index, len(prefix)
    if best is None:
        raise KeyError(module)
    return best


def resolve(name: str, modules: dict[str, Path]) -> str:
    """The verl_tor module an imported dotted name lives in (``verl_tor.ops.select_tor_tokens`` -> ``verl_tor.ops``)."""
    while name not in modules:
        name = name.rpartition(".")[0]
    return name


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The verl_tor modules that ``module`` imports anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names]  # a submodule or a name in ``base``
        for name in names:
            if name == "verl_tor" or name.startswith("verl_tor."):
                target = resolve(name, modules)
                if target != module:
                    found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if state.get(nxt) is None:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_every_module_has_a_layer():
    unplaced = []
    for module in all_modules():
        try:
            layer_of(module)
        except KeyError:
            unplaced.append(module)
    assert not unplaced, f"give these modules a layer in tests/test_layers_on_cpu.py LAYERS: {unplaced}"


def test_imports_point_down_the_layers():
    upward = []
    for module, targets in import_graph().items():
        for target in sorted(targets):
            if layer_of(target) > layer_of(module):
                upward.append(
                    f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
                )
    assert not upward, "imports that point up the layers:\n  " + "\n  ".join(upward)


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_what_they_claim():
    """The walker sees lazy and relative imports, names the upward pair and finds a cycle (so green means something)."""
    graph = import_graph()
    assert "verl_tor.ops" in graph["verl_tor.stage"] and "verl_tor.config" in graph["verl_tor.stage"]
    assert "verl_tor.integration.trainer" in graph["verl_tor.integration.plugin"]  # imported inside a function
    assert resolve("verl_tor.ops.select_tor_tokens", all_modules()) == "verl_tor.ops"
    assert layer_of("verl_tor.tools.cli") > layer_of("verl_tor.integration.trainer") > layer_of("verl_tor.stage")
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module", ["verl_tor", "verl_tor.config", "verl_tor.metrics", "verl_tor.ops"])
def test_low_layers_import_without_verl(module):
    """``import verl_tor.ops`` (and the config) works without verl or Ray: checked in a process where both are
    unimportable."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('verl', 'ray'):\n"
        "            raise ImportError(f'blocked: {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"import {module}\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def _names_in(path: Path) -> set[str]:
    """Top-level names a module defines or imports (what ``module.NAME`` may refer to)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    if path.name == "__init__.py":  # submodules, and lazy attributes (a ``_LAZY = {name: module}`` table)
        names.update(p.stem for p in path.parent.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists())
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
                names.update(ast.literal_eval(node.value))
    return names


TEXT_SUFFIXES = {".md", ".py", ".sh", ".cfg", ".toml", ".yaml", ".in", ".txt"}


def test_docs_and_scripts_name_only_existing_modules():
    """No stale module path survives a move: every ``verl_tor/...py`` path and ``verl_tor.x.y`` dotted name in the
    tracked docs, scripts, recipes and sources names a file, module or module attribute that exists."""
    import re
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    modules = all_modules()
    not_modules = {
        "verl_tor.assets.figure_reader": "package data (the shipped checkpoint), not a module",
        "verl_tor.local.cpu_device": "the name of the CPU device module verl_tor.local.platform builds at run time",
    }
    stale = []
    for rel in files:
        if rel == "tests/test_layers_on_cpu.py" or Path(rel).suffix not in {
            ".md",
            ".py",
            ".sh",
            ".cfg",
            ".toml",
            ".yaml",
            ".in",
            ".txt",
        }:
            continue
        text = (ROOT / rel).read_text(errors="replace")
        for match in re.finditer(r"(?<![\w/.-])verl_tor/[\w/]+\.py\b", text):
            if not (ROOT / match.group(0)).exists():
                stale.append(f"{rel}: {match.group(0)}")
        for match in re.finditer(r"(?<![\w/.-])verl_tor(?:\.\w+)+", text):
            name = match.group(0)
            if name in not_modules:
                continue
            module = resolve(name, modules)
            rest = name[len(module) + 1 :].split(".")[0] if name != module else ""
            if (ROOT / name.replace(".", "/")).exists():  # a package-data folder (``verl_tor.recipes.cpu_tiny``)
                continue
            if rest and not rest.startswith("__") and rest not in _names_in(modules[module]):
                stale.append(f"{rel}: {name}")
    assert not stale, "stale verl_tor paths / module names:\n  " + "\n  ".join(sorted(set(stale)))
