"""Phase 6, selection: ``block_fraction`` keeps the last fraction of each stage's blocks."""

from __future__ import annotations

import math

from .candidates import Candidate
from .settings import StageSettings

__all__ = ["select"]


def select(candidates: list[Candidate], settings: dict[int, StageSettings], notes: list[str]) -> list[Candidate]:
    """The candidates that stay, in their original order; notes stages left without any."""
    keep: set[int] = set()
    for st, cfg in settings.items():
        mine = [i for i, c in enumerate(candidates) if c.stage == st]
        blocks = list(dict.fromkeys(candidates[i].block for i in mine))
        n_keep = math.ceil(cfg.fraction * len(blocks) - 1e-9)
        kept = set(blocks[len(blocks) - n_keep:]) if n_keep else set()
        keep.update(i for i in mine if candidates[i].block in kept)
        if not mine:
            notes.append(f"stage {st} ({cfg.stage.name}): no sites of kinds {sorted(cfg.sites)}")
    return [c for i, c in enumerate(candidates) if i in keep]
