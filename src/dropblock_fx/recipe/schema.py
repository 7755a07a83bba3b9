"""The recipe schema: where DropBlock goes, how strongly, and on what schedule.

This is the contract between the recipe layer (loading, validation, built-ins) and the
surgery layer (which reads a validated [`Recipe`][dropblock_fx.Recipe]). Field names are public API.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Strict, Tag, model_validator

from ..keypath import KeyedError
from ..schedule.spec import ScheduleSpec

SiteKind = Literal["conv", "conv_last", "shortcut", "block", "timm"]
SITE_KINDS: tuple[str, ...] = ("conv", "conv_last", "shortcut", "block", "timm")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _stage_ref_kind(value: Any) -> str:
    # Tagged union: a YAML ``true`` or ``3.0`` must not silently become stage 1 or 3.
    return "name" if isinstance(value, str) else "index"


def _stage_item_kind(value: Any) -> str:
    if isinstance(value, (dict, StageSpec)):
        return "spec"
    return _stage_ref_kind(value)


def _multiplier_kind(value: Any) -> str:
    return "preset" if isinstance(value, str) else "table"


# A stage: an index (stage ``k`` is at output stride ``2 ** (k + 1)``; negative from the
# deepest) or a stage name. Plain ``int`` / ``str`` at run time.
StageRef = Annotated[
    Union[Annotated[int, Strict(), Tag("index")], Annotated[str, Tag("name")]],
    Discriminator(_stage_ref_kind),
]


class StageSpec(_Strict):
    """One selected stage, with optional overrides of the recipe-wide settings (``keep_prob``
    is accepted as ``1 - drop_prob``)."""

    stage: StageRef
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

    @model_validator(mode="before")
    @classmethod
    def _keep_prob(cls, data: Any) -> Any:
        # The paper's keep_prob is accepted per stage too; it is stored as drop_prob.
        if not isinstance(data, dict) or "keep_prob" not in data:
            return data
        data = dict(data)
        keep = data.pop("keep_prob")
        if "drop_prob" in data:
            raise KeyedError("give drop_prob or keep_prob, not both", path=("keep_prob",), value=keep,
                             allowed="drop_prob alone or keep_prob alone (keep_prob = 1 - drop_prob)")
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 <= keep <= 1.0:
            raise KeyedError("keep_prob must be a number in [0, 1]", path=("keep_prob",), value=keep,
                             allowed="a number in [0, 1]")
        data["drop_prob"] = round(1.0 - keep, 12)
        return data


class Recipe(_Strict):
    """A DropBlock recipe.

    Stage indices follow the library's convention: stage ``k`` is the part of the network
    at output stride ``2 ** (k + 1)`` (ResNet-50: ``3`` = layer3, ``4`` = layer4);
    negative indices count from the deepest stage; strings are stage names.

    Examples:
        >>> r = Recipe(stages=[3, 4], block_size=7, keep_prob=0.9, stage_multiplier="paper")
        >>> r.rate
        0.1
    """

    name: Optional[str] = None
    description: Optional[str] = None
    target: Optional[str] = None
    stages: list[
        Annotated[
            Union[
                Annotated[int, Strict(), Tag("index")],
                Annotated[str, Tag("name")],
                Annotated[StageSpec, Tag("spec")],
            ],
            Discriminator(_stage_item_kind),
        ]
    ] = Field(default_factory=lambda: [-2, -1], min_length=1)
    # "error": a stage the model does not have is a RecipeError naming the model's stages;
    # "skip": it is left out (the plan notes it) as long as at least one stage exists, so
    # "the two deepest stages" also fits an isotropic network with one stage (ConvMixer).
    missing_stages: Literal["error", "skip"] = "error"
    sites: list[SiteKind] = Field(default_factory=lambda: ["conv", "conv_last", "shortcut"], min_length=1)
    block_size: int = Field(7, ge=1)
    drop_prob: Optional[float] = Field(None, ge=0.0, le=1.0)
    keep_prob: Optional[float] = Field(None, ge=0.0, le=1.0)
    block_fraction: float = Field(1.0, gt=0.0, le=1.0)
    # "paper": stage g gets 1 / 4 ** (deepest_selected - g) of the rate (official TF code).
    stage_multiplier: Annotated[
        Union[
            Annotated[Literal["none", "paper"], Tag("preset")],
            Annotated[dict[StageRef, Annotated[float, Field(ge=0.0)]], Tag("table")],
        ],
        Discriminator(_multiplier_kind),
    ] = "none"
    # (C, H, W) or (C, D, H, W): the example input that planning propagates shapes with.
    input_size: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [3, 224, 224], min_length=3, max_length=4
    )
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
            raise KeyedError(
                "give drop_prob or keep_prob, not both", path=("keep_prob",), value=self.keep_prob,
                allowed="drop_prob alone or keep_prob alone (keep_prob = 1 - drop_prob)",
            )
        return self

    @model_validator(mode="after")
    def _distinct(self) -> "Recipe":
        seen: dict[Any, int] = {}
        for i, item in enumerate(self.stages):
            ref = item.stage if isinstance(item, StageSpec) else item
            if ref in seen:
                raise KeyedError(
                    f"stage {ref!r} is listed twice (also stages[{seen[ref]}])", path=("stages", i),
                    value=ref, allowed="each stage once; put per-stage settings in one mapping",
                )
            seen[ref] = i
        for i, site in enumerate(self.sites):
            if site in self.sites[:i]:
                raise KeyedError(f"site {site!r} is listed twice", path=("sites", i), value=site)
        return self

    @property
    def rate(self) -> float:
        """The target drop rate (``drop_prob``, or ``1 - keep_prob``; default 0.1)."""
        if self.drop_prob is not None:
            return self.drop_prob
        if self.keep_prob is not None:
            return round(1.0 - self.keep_prob, 12)
        return 0.1

    def stage_rate(
        self, stage: int, deepest: int, spec: Optional[StageSpec] = None, name: Optional[str] = None
    ) -> float:
        """Target rate of stage ``stage`` (named ``name``) at full schedule strength.

        A stage's own ``drop_prob`` is its rate (times its own ``multiplier``, if any);
        otherwise the recipe's rate times the stage multiplier: ``spec.multiplier``, else
        ``"paper"``: ``1 / 4 ** (deepest - stage)`` with ``deepest`` the deepest selected stage
        (the official TF code), else the table entry for the stage's index or name, else 1.

        Examples:
            >>> Recipe(stages=[3, 4], keep_prob=0.9, stage_multiplier="paper").stage_rate(3, 4)
            0.025
        """
        if spec is not None and spec.drop_prob is not None:
            target = spec.drop_prob * (spec.multiplier if spec.multiplier is not None else 1.0)
            return min(1.0, round(target, 12))
        if spec is not None and spec.multiplier is not None:
            mult = spec.multiplier
        elif self.stage_multiplier == "paper":
            mult = 1.0 / 4 ** (deepest - stage)
        elif isinstance(self.stage_multiplier, dict):
            table = self.stage_multiplier
            keys = [k for k in (stage, name, str(stage)) if k is not None and k in table]
            mult = float(table[keys[0]]) if keys else 1.0
        else:
            mult = 1.0
        return min(1.0, round(self.rate * mult, 12))

    def to_yaml(self, *, header: Optional[str] = None) -> str:
        """The recipe as YAML that [`load_recipe`][dropblock_fx.load_recipe] reads back to an equal recipe."""
        from .loader import recipe_to_yaml

        return recipe_to_yaml(self, header=header)

    @classmethod
    def from_yaml(cls, text: str, *, file: Optional[str] = None) -> "Recipe":
        """Parse and validate YAML text (``yaml.safe_load``); errors are [`RecipeError`][dropblock_fx.RecipeError]."""
        from .loader import recipe_from_yaml

        return recipe_from_yaml(text, file=file)
