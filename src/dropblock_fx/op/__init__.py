"""The op layer: [`drop_block`][dropblock_fx.drop_block] and the gamma / calibration helpers."""

from .functional import BACKENDS, MASK_MODES, SCALE_MODES, SEED_REGIONS, drop_block, set_backend
from .gamma import calibrated_gamma, expected_drop_rate, paper_gamma

__all__ = [
    "drop_block",
    "set_backend",
    "paper_gamma",
    "calibrated_gamma",
    "expected_drop_rate",
    "MASK_MODES",
    "SEED_REGIONS",
    "SCALE_MODES",
    "BACKENDS",
]
