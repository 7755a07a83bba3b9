"""The ``dropblock-fx`` command: ``plan``, ``recipes``, ``validate``, ``masks``, ``schedule``, ``demo``.

Run ``dropblock-fx --help`` (or ``python -m dropblock_fx.cli --help``).
"""

from .main import build_parser, main

__all__ = ["main", "build_parser"]
