"""The recipe schema: where DropBlock goes, how strongly, and on what schedule.

This is the contract between the recipe layer (loading, validation, built-ins) and the
surgery layer (which reads a validated :class:`Recipe`). Field names are public API.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

SiteKind = Literal["conv", "conv_last", "shortcut", "block", "timm"]
SITE_KINDS: tuple[str, ...] = ("conv", "conv_last", "shortcut", "block", "timm")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class OpOptions(_Strict):
    """Options passed to every inserted DropBlock module (see ``drop_block``)."""

    mask: Literal["channel", "shared", "batch"] = "channel"
    seed_region: Literal["valid", "full"] = "valid"
    gamma_scale: float = Field(1.0, ge=0.0)
    scale: Literal["count", "expected", "none"] = "count"
    noise: bool = False
    calibrate: bool = False


class StageSpec(_Strict):
    """One selected stage, with optional overrides of the recipe-wide settings."""

    stage: Union[int, str]
    block_size: Optional[int] = Field(None, ge=1)
    drop_prob: Optional[float] = Field(None, ge=0.0, le=1.0)
    multiplier: Optional[float] = Field(None, ge=0.0)
    sites: Optional[list[SiteKind]] = None
    block_fraction: Optional[float] = Field(None, gt=0.0, le=1.0)
    mask: Optional[Literal["channel", "shared", "batch"]] = None
    seed_region: Optional[Literal["valid", "full"]] = None
    gamma_scale: Optional[float] = Field(None, ge=0.0)
    scale: Optional[Literal["count", "expected", "none"]] = None
    noise: Optional[bool] = None
    calibrate: Optional[bool] = None


class ScheduleSpec(_Strict):
    """How the drop rate moves over training. ``steps`` / ``epochs`` / ``fraction`` give its
    length (at most one; none means the whole run)."""

    name: str = "linear"
    params: dict[str, Any] = Field(default_factory=dict)
    steps: Optional[int] = Field(None, ge=1)
    epochs: Optional[float] = Field(None, gt=0)
    fraction: Optional[float] = Field(None, gt=0.0, le=1.0)


class Recipe(_Strict):
    """A DropBlock recipe.

    Stage indices follow the library's convention: stage ``k`` is the part of the network
    at output stride ``2 ** (k + 1)`` (ResNet-50: ``3`` = layer3, ``4`` = layer4);
    negative indices count from the deepest stage; strings are stage names.

    Example:
        >>> r = Recipe(stages=[3, 4], block_size=7, keep_prob=0.9, stage_multiplier="paper")
        >>> r.rate
        0.1
    """

    name: Optional[str] = None
    description: Optional[str] = None
    target: Optional[str] = None
    stages: list[Union[int, str, StageSpec]] = Field(default_factory=lambda: [-2, -1])
    sites: list[SiteKind] = Field(default_factory=lambda: ["conv", "conv_last", "shortcut"])
    block_size: int = Field(7, ge=1)
    drop_prob: Optional[float] = Field(None, ge=0.0, le=1.0)
    keep_prob: Optional[float] = Field(None, ge=0.0, le=1.0)
    block_fraction: float = Field(1.0, gt=0.0, le=1.0)
    # "paper": stage g gets 1 / 4 ** (deepest_selected - g) of the rate (official TF code).
    stage_multiplier: Union[Literal["none", "paper"], dict[Union[int, str], float]] = "none"
    input_size: list[int] = Field(default_factory=lambda: [3, 224, 224])
    schedule: Optional[ScheduleSpec] = None
    mask: Literal["channel", "shared", "batch"] = "channel"
    seed_region: Literal["valid", "full"] = "valid"
    gamma_scale: float = Field(1.0, ge=0.0)
    scale: Literal["count", "expected", "none"] = "count"
    noise: bool = False
    calibrate: bool = False

    @model_validator(mode="after")
    def _one_rate(self) -> "Recipe":
        if self.drop_prob is not None and self.keep_prob is not None:
            raise ValueError("give drop_prob or keep_prob, not both")
        return self

    @property
    def rate(self) -> float:
        """The target drop rate (``drop_prob``, or ``1 - keep_prob``; default 0.1)."""
        if self.drop_prob is not None:
            return self.drop_prob
        if self.keep_prob is not None:
            return round(1.0 - self.keep_prob, 12)
        return 0.1

    def op_options(self) -> OpOptions:
        """Recipe-wide op options."""
        return OpOptions(
            mask=self.mask, seed_region=self.seed_region, gamma_scale=self.gamma_scale,
            scale=self.scale, noise=self.noise, calibrate=self.calibrate,
        )
