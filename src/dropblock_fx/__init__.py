"""dropblock-fx: paper-faithful DropBlock for the CNNs you already use."""

from .modules import DropBlock2d, DropBlock3d, DropBlockNd
from .op import calibrated_gamma, drop_block, expected_drop_rate, paper_gamma, set_backend

__version__ = "0.1.0"

__all__ = [
    "drop_block",
    "DropBlock2d",
    "DropBlock3d",
    "DropBlockNd",
    "paper_gamma",
    "calibrated_gamma",
    "expected_drop_rate",
    "set_backend",
]
