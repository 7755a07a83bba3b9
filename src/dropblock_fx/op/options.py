"""``DropBlockOptions``: the op's options, validated once, used everywhere they are needed.

The op (`dropblock_fx.drop_block`), the modules (``module.options``), the recipe schema
(its option fields take their types and defaults from here) and plan rows (``row.options``)
all hold this one frozen value. Imports no torch: the recipe layer and the command line read
it without loading torch.
"""

# No ``from __future__ import annotations``: TorchScript reads OptionFields' annotations as
# types, not as strings.
import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, Tuple, Union

__all__ = [
    "DropBlockOptions",
    "DEFAULT_OPTIONS",
    "BlockSize",
    "MaskMode",
    "SeedRegion",
    "ScaleMode",
    "MASK_MODES",
    "SEED_REGIONS",
    "SCALE_MODES",
    "check_drop_prob",
    "normalize_block_size",
]

MaskMode = Literal["channel", "shared", "batch"]
SeedRegion = Literal["valid", "full"]
ScaleMode = Literal["count", "expected", "none"]
# One size for every spatial dim, or one per dim (2-D and 3-D maps). Written with Tuple so that
# TorchScript reads it (a scripted module reads its options).
BlockSize = Union[int, Tuple[int, int], Tuple[int, int, int]]

MASK_MODES: tuple[str, ...] = ("channel", "shared", "batch")
SEED_REGIONS: tuple[str, ...] = ("valid", "full")
SCALE_MODES: tuple[str, ...] = ("count", "expected", "none")


def check_drop_prob(drop_prob: Any) -> float:
    """Validate a drop probability and return it as a float.

    Examples:
        >>> check_drop_prob(0.1)
        0.1
    """
    if isinstance(drop_prob, bool) or not isinstance(drop_prob, (int, float)):
        raise ValueError(f"drop_prob={drop_prob!r} is not valid; expected a number in [0, 1]")
    p = float(drop_prob)
    if not (0.0 <= p <= 1.0):  # also rejects NaN
        raise ValueError(f"drop_prob={drop_prob!r} is not valid; expected a number in [0, 1]")
    return p


def _block_size(block_size: Any) -> BlockSize:
    """``block_size`` as stored: an int >= 1, or a tuple of 2 or 3 ints >= 1."""
    bad = (f"block_size={block_size!r} is not valid; expected an integer >= 1 "
           "or a sequence of 2 or 3 integers >= 1")
    if isinstance(block_size, bool):
        raise ValueError(bad)
    if isinstance(block_size, int):
        sizes: tuple[int, ...] = (block_size,)
        value: BlockSize = block_size
    elif isinstance(block_size, Sequence) and not isinstance(block_size, str) and len(block_size) in (2, 3) and all(
        isinstance(b, int) and not isinstance(b, bool) for b in block_size
    ):
        sizes = tuple(block_size)
        value = sizes  # type: ignore[assignment]
    else:
        raise ValueError(bad)
    if any(b < 1 for b in sizes):
        raise ValueError(f"block_size={block_size!r} is not valid; every size must be >= 1")
    return value


def normalize_block_size(block_size: Any, n_spatial: int) -> tuple[int, ...]:
    """Validate ``block_size`` (an int, or one int per spatial dim) and return one per dim.

    Examples:
        >>> normalize_block_size(7, 2), normalize_block_size((3, 5), 2)
        ((7, 7), (3, 5))
    """
    value = _block_size(block_size) if not isinstance(block_size, list) else _block_size(tuple(block_size))
    if isinstance(value, int):
        return (value,) * n_spatial
    if len(value) != n_spatial:
        raise ValueError(
            f"block_size={block_size!r} is not valid; expected an integer >= 1 "
            f"or a sequence of {n_spatial} integers >= 1"
        )
    return tuple(value)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not valid; expected True or False")
    return value


class OptionFields(NamedTuple):
    """The fields of [`DropBlockOptions`][dropblock_fx.DropBlockOptions] (build that one: it validates)."""

    block_size: BlockSize = 7
    mask: str = "channel"
    seed_region: str = "valid"
    gamma_scale: float = 1.0
    scale: str = "count"
    noise: bool = False
    calibrate: bool = False
    inplace: bool = False


class DropBlockOptions(OptionFields):
    """The options of a DropBlock op or module, validated when built; frozen and hashable.

    Fields (see `dropblock_fx.drop_block` for what each does): ``block_size`` (an int,
    or one per spatial dim), ``mask`` (``"channel"``, ``"shared"``, ``"batch"``),
    ``seed_region`` (``"valid"``, ``"full"``), ``gamma_scale`` (a finite number >= 0),
    ``scale`` (``"count"``, ``"expected"``, ``"none"``), ``noise``, ``calibrate``, ``inplace``.

    Examples:
        >>> opts = DropBlockOptions(5, mask="shared")
        >>> opts.block_size, opts.mask
        (5, 'shared')
        >>> opts.replace(seed_region="full").seed_region
        'full'
        >>> DropBlockOptions(mask="per-pixel")
        Traceback (most recent call last):
        ...
        ValueError: mask='per-pixel' is not valid; choose one of 'channel', 'shared', 'batch'
    """

    __slots__ = ()

    # The options a recipe sets (inplace is the caller's choice, not a recipe's).
    RECIPE_FIELDS = ("block_size", "mask", "seed_region", "gamma_scale", "scale", "noise", "calibrate")

    def __new__(
        cls,
        block_size: Any = 7,
        mask: Any = "channel",
        seed_region: Any = "valid",
        gamma_scale: Any = 1.0,
        scale: Any = "count",
        noise: Any = False,
        calibrate: Any = False,
        inplace: Any = False,
    ) -> "DropBlockOptions":
        if isinstance(gamma_scale, bool) or not isinstance(gamma_scale, (int, float)) or not (
            0.0 <= float(gamma_scale) < math.inf
        ):
            raise ValueError(f"gamma_scale={gamma_scale!r} is not valid; expected a finite number >= 0")
        return super().__new__(
            cls,
            _block_size(tuple(block_size) if isinstance(block_size, list) else block_size),
            _choice("mask", mask, MASK_MODES),
            _choice("seed_region", seed_region, SEED_REGIONS),
            float(gamma_scale),
            _choice("scale", scale, SCALE_MODES),
            _flag("noise", noise),
            _flag("calibrate", calibrate),
            _flag("inplace", inplace),
        )

    def replace(self, **changes: Any) -> "DropBlockOptions":
        """A copy with ``changes`` applied, validated again."""
        unknown = set(changes) - set(self._fields)
        if unknown:
            raise TypeError(f"DropBlockOptions has no option {sorted(unknown)[0]!r}; options: {', '.join(self._fields)}")
        return DropBlockOptions(**{**self._asdict(), **changes})

    _replace = replace  # NamedTuple's name for it: validated too

    def changed(self) -> dict[str, Any]:
        """The options that differ from the defaults (what a repr shows).

        Examples:
            >>> DropBlockOptions(7, scale="none").changed()
            {'scale': 'none'}
        """
        return {k: v for k, v in self._asdict().items() if k != "block_size" and v != getattr(DEFAULT_OPTIONS, k)}

    def __reduce__(self) -> tuple[Any, ...]:
        return (DropBlockOptions, tuple(self))


DEFAULT_OPTIONS = DropBlockOptions()
