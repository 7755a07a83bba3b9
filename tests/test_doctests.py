"""Every docstring example in the package runs and prints what it shows.

Modules are found by walking the package, so a new module's examples are collected without
listing it here. A module whose optional dependency is missing (Lightning, Triton) is skipped.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import dropblock_fx

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _module_names() -> list[str]:
    names = [dropblock_fx.__name__]
    for info in pkgutil.walk_packages(dropblock_fx.__path__, prefix="dropblock_fx."):
        if info.name.rsplit(".", 1)[-1] != "__main__":  # importing it would run the CLI
            names.append(info.name)
    return sorted(names)


MODULES = _module_names()


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and not e.name.startswith("dropblock_fx"):
            pytest.skip(f"{name} needs {e.name}")
        raise


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = _import(name)
    assert module.__name__ == name, f"{name} swapped itself into sys.modules ({module.__name__})"
    result = doctest.testmod(module, optionflags=FLAGS)
    assert result.failed == 0, f"{result.failed} failing docstring example(s) in {name}"


def test_every_layer_has_running_examples():
    """The public layers document themselves with examples that run (not skipped)."""
    for name in ("dropblock_fx.op.functional", "dropblock_fx.op.gamma", "dropblock_fx.modules",
                 "dropblock_fx.recipe.schema", "dropblock_fx.recipe.loader", "dropblock_fx.schedule.core",
                 "dropblock_fx.schedule.registry", "dropblock_fx.cli.demo.train", "dropblock_fx.cli.masks"):
        result = doctest.testmod(importlib.import_module(name), optionflags=FLAGS)
        assert result.attempted > 0 and result.failed == 0, name
