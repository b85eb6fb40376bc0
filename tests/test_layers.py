"""The import graph of ``src/plsynth``: no cycle, and every import points down the layers.

Layers, lowest first (a module may import its own layer and the ones below it):

0. foundation: ``plsynth`` (the package), ``plsynth.errors``, ``config``, ``atomic``, ``hashing``, ``torch_setup``
1. ``plsynth.data``, ``plsynth.models``, ``plsynth.metrics``
2. ``plsynth.bundles``: every on-disk format handed between stages
3. ``plsynth.synth_service``
4. ``plsynth.training`` and ``plsynth.deploy``: siblings that never import each other
   (training may use synth_service; deploy never imports training)
5. command-line faces: ``plsynth.cli``, ``plsynth.demo``, ``plsynth.training.ray_entry`` and every
   ``cli`` / ``*_cli`` module. The faces that live inside a sub-package (``data.cli``,
   ``training.cli``, ``training.synth_cli``, ``deploy.export_cli``, ``deploy.infer_cli``) belong
   to this layer, not to their package's: nothing below imports them. They still keep their
   package's sibling rule, so ``deploy.infer_cli`` and ``deploy.export_cli`` never import training.

Every import counts, the lazy ones inside functions included (read with ``ast``, nothing is run).
A second test imports every ``plsynth.deploy`` module in a fresh interpreter with
``plsynth.training`` blocked, so the rule holds for what Python actually loads too.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
FOUNDATION = {"plsynth", "plsynth.errors", "plsynth.config", "plsynth.atomic", "plsynth.hashing", "plsynth.torch_setup"}
FACES = {"plsynth.cli", "plsynth.demo", "plsynth.training.ray_entry"}
SIBLINGS = {"plsynth.training": "plsynth.deploy", "plsynth.deploy": "plsynth.training"}


def module_names() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "plsynth").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = module_names()


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def layer(module: str) -> int:
    last = module.rsplit(".", 1)[-1]
    if module in FACES or last == "cli" or last.endswith("_cli"):
        return 5
    if module in FOUNDATION:
        return 0
    return {"plsynth.data": 1, "plsynth.models": 1, "plsynth.metrics": 1, "plsynth.bundles": 2,
            "plsynth.synth_service": 3, "plsynth.training": 4, "plsynth.deploy": 4}[package_of(module)]


def imports_of(module: str, path: Path) -> set[str]:
    """plsynth modules imported anywhere in ``path`` (top level or inside functions)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from plsynth.data import lungs` imports the module plsynth.data.lungs
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name.startswith("plsynth") and name != module:
                found.add(name)
    return found


GRAPH = {module: imports_of(module, path) for module, path in MODULES.items()}


def test_the_layer_table_covers_every_module():
    for module in MODULES:
        assert 0 <= layer(module) <= 5, module


def test_no_import_points_up_a_layer_or_across_training_and_deploy():
    wrong = []
    for module, targets in GRAPH.items():
        for target in sorted(targets):
            if layer(target) > layer(module):
                wrong.append(f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})")
            elif SIBLINGS.get(package_of(module)) == package_of(target):
                wrong.append(f"{module} imports {target}: training and deploy never import each other")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    """Depth-first search over the module graph; a back edge is a cycle (named in the failure)."""
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert not cycles, "\n".join(cycles)


def test_the_graph_reader_sees_lazy_and_package_relative_imports(tmp_path: Path):
    """The checks above are only as good as the reader: it must see an import inside a function."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from plsynth.training.loop import train\n    from plsynth.data import lungs\n")
    assert imports_of("plsynth.deploy.probe", probe) == {"plsynth.training.loop", "plsynth.data.lungs"}
    assert "plsynth.bundles.segmenter" in GRAPH["plsynth.training.loop"]  # a lazy import in the real tree


BLOCKER = """
import importlib, pkgutil, sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name == "plsynth.training" or name.startswith("plsynth.training."):
            raise ImportError(f"deploy imported {name}")
        return None

sys.meta_path.insert(0, Blocked())
import plsynth.deploy
names = [m.name for m in pkgutil.walk_packages(plsynth.deploy.__path__, "plsynth.deploy.")]
for name in names:
    importlib.import_module(name)
assert not [m for m in sys.modules if m.startswith("plsynth.training")]
print(len(names))
"""


def test_every_deploy_module_imports_with_training_blocked():
    """Python's own loader, not the ast reader: deploy (CLI included) loads without plsynth.training."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.strip().splitlines()[-1]) >= 8  # every deploy module was imported


def test_the_blocker_does_block():
    """A deploy module that did import training would fail the test above (checked on a probe)."""
    code = BLOCKER.replace("import plsynth.deploy\n", "import plsynth.deploy\nimport plsynth.training.loop\n", 1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0 and "deploy imported plsynth.training" in result.stderr
