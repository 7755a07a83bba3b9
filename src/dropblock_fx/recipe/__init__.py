"""The recipe layer: schema (and, later, loading, validation and built-in recipes)."""

from .schema import SITE_KINDS, OpOptions, Recipe, ScheduleSpec, StageSpec

__all__ = ["Recipe", "StageSpec", "ScheduleSpec", "OpOptions", "SITE_KINDS"]
