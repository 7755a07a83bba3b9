"""Imports run downward through the layers (docs/design.md), with no circle.

Two checks: every import statement of the package (also those inside functions and under
``TYPE_CHECKING``) names a module of its own layer or of a lower one, and the module graph
they make has no circle; and, in a fresh process, each layer imports with every higher layer
refused (an import hook), from the bottom layer up.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "dropblock_fx"

# Bottom to top; a module belongs to the first layer with a matching prefix (longest wins).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("dropblock_fx._version", "dropblock_fx.errors", "dropblock_fx.registry", "dropblock_fx.modes")),
    ("op", ("dropblock_fx.op",)),
    ("modules", ("dropblock_fx.modules",)),
    ("graph", ("dropblock_fx.graph",)),
    ("schedule", ("dropblock_fx.schedule",)),
    ("recipe", ("dropblock_fx.recipe", "dropblock_fx.recipes")),
    ("surgery", ("dropblock_fx.surgery",)),
    # schedule/lightning.py is the old name of integrations/lightning.py: a re-export
    ("integrations", ("dropblock_fx.integrations", "dropblock_fx.schedule.lightning", "dropblock_fx.testing")),
    ("cli", ("dropblock_fx.cli", "dropblock_fx.__main__", "dropblock_fx.timm_train")),
    ("top", ("dropblock_fx.timm", "dropblock_fx.torchvision", "dropblock_fx")),
]

def layer_of(module: str) -> int:
    best, level = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    assert level >= 0, f"{module} is in no layer: add it to LAYERS (and to docs/design.md)"
    return level


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # "from pkg import sub" imports the submodule pkg.sub when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in MODULES and t != name)
    return out


GRAPH = {name: imports_of(name) for name in MODULES}


def test_every_import_runs_downward():
    upward = [f"{src} ({LAYERS[layer_of(src)][0]}) imports {dst} ({LAYERS[layer_of(dst)][0]})"
              for src, dsts in GRAPH.items() for dst in dsts if layer_of(dst) > layer_of(src)]
    assert not upward, "\n".join(upward)


def _circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[frozenset[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert [sorted(c) for c in _circles(GRAPH)] == []


def test_the_checks_see_an_upward_import_and_a_circle():
    """The two checks above can fail: on a made-up graph they do."""
    made_up = {"dropblock_fx.modules": {"dropblock_fx.surgery.apply"}, "dropblock_fx.surgery.apply":
               {"dropblock_fx.modules"}}
    assert layer_of("dropblock_fx.surgery.apply") > layer_of("dropblock_fx.modules")
    assert _circles(made_up) == [frozenset(made_up)]
    assert imports_of("dropblock_fx.schedule.core") >= {"dropblock_fx.modules", "dropblock_fx.schedule.hooks"}


LAYER_SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, json, sys, types
    src, layers, torch_free, order = sys.argv[1], *map(json.loads, sys.argv[2:])
    # The package's own __init__ (the top layer) is not run: a bare package object stands for it.
    root = types.ModuleType("dropblock_fx")
    root.__path__ = [src + "/dropblock_fx"]
    sys.modules["dropblock_fx"] = root
    allowed = [len(layers)]

    def layer_of(module):
        best, level = -1, -1
        for i, prefixes in enumerate(layers):
            for p in prefixes:
                if (module == p or module.startswith(p + ".")) and len(p) > best:
                    best, level = len(p), i
        return level

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.startswith("dropblock_fx.") and layer_of(name) > allowed[0]:
                raise ImportError(f"{name} (layer {layer_of(name)}) is above the layer being imported "
                                  f"({allowed[0]})")
            return None

    sys.meta_path.insert(0, Refuse())
    # 1. what the command line reads to list recipes: no torch, numpy or timm
    for name in torch_free:
        importlib.import_module(name)
    heavy = sorted(m for m in ("torch", "numpy", "timm") if m in sys.modules)
    # 2. each layer, bottom up, with every higher layer refused
    failures = []
    for level, names in order:
        allowed[0] = level
        for name in names:
            try:
                importlib.import_module(name)
            except ImportError as e:
                failures.append(f"{name}: {e}")
    print(json.dumps({"heavy": heavy, "failures": failures}))
    """
)
# Imported by the command line's `recipes` (the recipe layer, the schedule specs, the options).
TORCH_FREE = ["dropblock_fx.recipe", "dropblock_fx.op", "dropblock_fx.op.options", "dropblock_fx.schedule"]
# Integrations that only import a third-party library on top of lower layers (the static check
# above covers their imports): left out of the run, which they would slow by seconds.
THIRD_PARTY_ONLY = {"dropblock_fx.integrations.hf", "dropblock_fx.integrations.lightning",
                    "dropblock_fx.schedule.lightning"}


@pytest.fixture(scope="module")
def layered_import() -> dict:
    import json

    order: dict[int, list[str]] = {}
    for name in MODULES:
        level = layer_of(name)
        if LAYERS[level][0] == "top" or name.endswith("__main__") or name in THIRD_PARTY_ONLY:
            continue  # the package root runs everything; __main__ runs the command
        order.setdefault(level, []).append(name)
    layers = [list(prefixes) for _, prefixes in LAYERS]
    proc = subprocess.run([sys.executable, "-c", LAYER_SCRIPT, str(SRC), json.dumps(layers), json.dumps(TORCH_FREE),
                           json.dumps(sorted(order.items()))], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_each_layer_imports_without_the_layers_above(layered_import):
    assert layered_import["failures"] == []


def test_recipes_and_op_options_import_without_torch(layered_import):
    """The command line lists recipes without loading torch: the recipe layer, the schedule
    specs and DropBlockOptions import none of it (the package root is left out, as above)."""
    assert layered_import["heavy"] == []
