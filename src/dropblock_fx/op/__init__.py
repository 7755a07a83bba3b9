"""The op layer: [`drop_block`][dropblock_fx.drop_block], [`DropBlockOptions`][dropblock_fx.DropBlockOptions] and the gamma / calibration helpers.

``dropblock_fx.op.options`` imports no torch, and neither does this package until one of the
torch names below is asked for (the command line lists recipes without loading torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .options import MASK_MODES, SCALE_MODES, SEED_REGIONS, DropBlockOptions

if TYPE_CHECKING:  # what type checkers and the API reference see: the eager imports
    from .functional import drop_block
    from .gamma import calibrated_gamma, expected_drop_rate, paper_gamma
    from .masks import BACKENDS, set_backend

__all__ = [
    "drop_block",
    "set_backend",
    "paper_gamma",
    "calibrated_gamma",
    "expected_drop_rate",
    "DropBlockOptions",
    "MASK_MODES",
    "SEED_REGIONS",
    "SCALE_MODES",
    "BACKENDS",
]

_LAZY = {
    "drop_block": "functional",
    "set_backend": "masks",
    "BACKENDS": "masks",
    "paper_gamma": "gamma",
    "calibrated_gamma": "gamma",
    "expected_drop_rate": "gamma",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
