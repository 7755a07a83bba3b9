"""Command-line values: ``--set KEY=VALUE`` overrides, ``--input-size``, and the recipe they
modify. Torch-free: ``dropblock-fx recipes`` and ``--help`` import no more than this."""

from __future__ import annotations

import argparse
import re
from typing import Any, Optional

__all__ = ["parse_overrides", "parse_input_size", "with_overrides", "recipe_with"]


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``--set`` values as a dict; each value is read as YAML.

    Examples:
        >>> parse_overrides(["block_size=5", "stages=[3, 4]"])
        {'block_size': 5, 'stages': [3, 4]}
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set block_size=5")
        try:
            out[key] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as e:
            raise ValueError(f"--set {item!r}: the value is not valid YAML ({e})") from None
    return out


def parse_input_size(values: Optional[list[str]], channels: int) -> Optional[list[int]]:
    """``--input-size`` as ``[C, H, W]``: one side, two sides, or all three (``3x224x224``).

    Examples:
        >>> parse_input_size(["224"], 3), parse_input_size(["1x32x48"], 3)
        ([3, 224, 224], [1, 32, 48])
    """
    if not values:
        return None
    parts: list[str] = []
    for v in values:
        parts += [p for p in re.split(r"[x,\s]+", v.strip()) if p]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--input-size {' '.join(values)}: expected integers, e.g. 224, 3 224 224 or 3x224x224") from None
    if not nums or any(n < 1 for n in nums) or len(nums) > 4:
        raise ValueError(f"--input-size {' '.join(values)}: expected 1 to 4 positive integers")
    if len(nums) == 1:
        return [channels, nums[0], nums[0]]
    if len(nums) == 2:
        return [channels, *nums]
    return nums


def parse_example_inputs(values: Optional[list[str]]) -> Optional[tuple[Any, ...]]:
    """``--example-inputs``: one Python literal per positional argument of the model's
    forward, in which a tuple of integers is a tensor of that shape without the batch
    (random values, batch 2); lists, tuples and dicts of those keep their structure.

    Examples:
        >>> args = parse_example_inputs(["[(3, 8, 64, 64), (3, 32, 64, 64)]"])  # SlowFast: one list of clips
        >>> [tuple(t.shape) for t in args[0]]
        [(2, 3, 8, 64, 64), (2, 3, 32, 64, 64)]
    """
    import ast

    import torch

    if not values:
        return None
    gen = torch.Generator().manual_seed(0)

    def build(v: Any) -> Any:
        if isinstance(v, tuple) and v and all(isinstance(i, int) and not isinstance(i, bool) for i in v):
            return torch.randn(2, *v, generator=gen)
        if isinstance(v, (list, tuple)):
            return type(v)(build(x) for x in v)
        if isinstance(v, dict):
            return {k: build(x) for k, x in v.items()}
        return v

    out = []
    for text in values:
        try:
            out.append(build(ast.literal_eval(text)))
        except (ValueError, SyntaxError):
            raise ValueError(f"--example-inputs {text!r}: expected a Python literal in which a tuple of integers is "
                             "a tensor's shape without the batch, e.g. \"(3, 224, 224)\" or "
                             "\"[(3, 8, 64, 64), (3, 32, 64, 64)]\"") from None
    return tuple(out)


def with_overrides(recipe: Any, overrides: dict[str, Any]) -> Any:
    """``recipe`` with ``--set`` fields replaced: the rules of ``apply_dropblock(**overrides)``
    (errors are ``RecipeError`` naming the key)."""
    from ..surgery.settings import with_overrides as resolve

    return resolve(recipe, overrides, "--set")


def recipe_with(args: argparse.Namespace, recipe_ref: Any, extra: Optional[dict[str, Any]] = None) -> Any:
    """The recipe of a command with its ``--set`` overrides and ``extra`` fields applied."""
    overrides = parse_overrides(getattr(args, "overrides", []) or [])
    overrides.update(extra or {})
    return with_overrides(recipe_ref, overrides)
