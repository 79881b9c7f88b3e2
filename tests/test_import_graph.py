"""The package's import graph: no module imports itself through others, the test scaffolding stays out of production.

The graph is read from the source (every ``import``, including the ones inside functions), so a cycle that only
closes at run time, in a lazy import, is found as well.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "gold_plugin"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports. ``from a.b import c`` is an edge to ``a.b.c`` if that is a
    module, else to ``a.b``; importing a submodule is not counted as importing its parent packages."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    target = f"{source}.{alias.name}"
                    if target in modules:
                        edges.add(target)
                    elif source in modules:
                        edges.add(source)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "gold_plugin.local.trainer" in graph["gold_plugin.local.launch"]  # imported inside a function
    assert (
        "gold_plugin.integrations.openrlhf.args" in graph["gold_plugin.integrations.openrlhf.cli"]
    )  # relative


def test_no_import_cycles_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# docs/design.md, "Layers": lowest first; a module may import its own layer and the ones before it.
LAYERS = (
    "gold_plugin.packaged_tokenizers",
    "gold_plugin.cli_options",
    "gold_plugin.config",
    "gold_plugin.alignment",
    "gold_plugin.signals",
    "gold_plugin.teacher",
    "gold_plugin.step",
    "gold_plugin.local",
    "gold_plugin.demo",
    "gold_plugin.integrations",
    "gold_plugin.cli",
)
# The backends: side by side, neither imports the other (the front door, gold_plugin.cli, picks one).
BACKENDS = ("gold_plugin.local", "gold_plugin.integrations")
# The demo builds on the local backend; production code outside it enters it only here, lazily, for --demo.
DEMO = "gold_plugin.demo"
DEMO_ENTRY = {("gold_plugin.local.cli", "gold_plugin.demo.run")}
HEAVY = ("ray", "vllm", "deepspeed", "openrlhf", "flash_attn")


def _layer(module: str) -> int | None:
    return next((i for i, p in enumerate(LAYERS) if module == p or module.startswith(p + ".")), None)


def test_imports_point_down_the_layers():
    upward = []
    for module, edges in import_graph().items():
        here = _layer(module)
        for target in edges:
            there = _layer(target)
            if here is not None and there is not None and there > here and (module, target) not in DEMO_ENTRY:
                upward.append(f"{module} -> {target}")
            if target.startswith("gold_plugin.testing") and not module.startswith("gold_plugin.testing"):
                upward.append(f"{module} -> {target} (test scaffolding)")
    assert not upward, upward


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_no_backend_imports_another():
    crossing = [
        f"{module} -> {target}"
        for module, edges in import_graph().items()
        for target in edges
        for here in BACKENDS
        for there in BACKENDS
        if here != there and _within(module, here) and _within(target, there)
    ]
    assert not crossing, crossing
    assert "gold_plugin.local.cli" in import_graph()["gold_plugin.cli"]  # the front door is the one that may


def _loaded_by(modules: str, packages: tuple[str, ...]) -> list[str]:
    """The modules inside ``packages`` that a fresh interpreter has loaded after ``import <modules>``."""
    code = (
        f"import sys, {modules}\n"
        f"print(sorted(m for m in sys.modules if any(m == p or m.startswith(p + '.') for p in {packages!r})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


def test_production_code_enters_the_demo_only_for_demo():
    entries = {
        (module, target)
        for module, edges in import_graph().items()
        for target in edges
        if _within(target, DEMO)
        and not _within(module, DEMO)
        and not module.startswith("gold_plugin.testing")
    }
    assert entries == DEMO_ENTRY
    # ... and lazily: the local backend's command line loads no demo module until --demo runs.
    assert _loaded_by("gold_plugin.local.cli", (DEMO,)) == []


def test_the_front_door_imports_each_backend_only_when_it_runs():
    assert _loaded_by("gold_plugin.cli", BACKENDS + HEAVY) == []


def test_the_core_imports_no_cluster_package():
    assert _loaded_by("gold_plugin.alignment, gold_plugin.signals, gold_plugin.config", HEAVY) == []


@pytest.mark.parametrize(
    "module",
    [
        "gold_plugin.alignment.token_bytes",
        "gold_plugin.alignment.vocab_map",
        "gold_plugin.cli",
        "gold_plugin.local.cli",
        "gold_plugin.demo.run",
    ],
)
def test_module_imports_first_in_a_fresh_interpreter(module):
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
