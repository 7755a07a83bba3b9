"""The recipe schema: where DropBlock goes, how strongly, and on what schedule.

This is the contract between the recipe layer (loading, validation, built-ins) and the
surgery layer (which reads a validated [`Recipe`][dropblock_fx.Recipe]). Field names are public API.
"""

from __future__ import annotations

import weakref
from typing import Annotated, Any, Literal, Mapping, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Strict, Tag, ValidationError, model_validator

from ..errors import KeyedError, RecipeError, RecipeIssue, issues_from_validation, parse_yaml, yaml_line
from ..op.options import DEFAULT_OPTIONS, MaskMode, ScaleMode, SeedRegion, DropBlockOptions
from ..schedule.spec import ScheduleSpec

__all__ = ["Recipe", "StageSpec", "ScheduleSpec", "SITE_KINDS", "validate_recipe", "recipe_source", "line_of"]

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
    mask: Optional[MaskMode] = None
    seed_region: Optional[SeedRegion] = None
    gamma_scale: Optional[float] = Field(None, ge=0.0)
    scale: Optional[ScaleMode] = None
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
    # The op's options (DropBlockOptions: their types and defaults are the op's).
    mask: MaskMode = DEFAULT_OPTIONS.mask
    seed_region: SeedRegion = DEFAULT_OPTIONS.seed_region
    gamma_scale: float = Field(DEFAULT_OPTIONS.gamma_scale, ge=0.0)
    scale: ScaleMode = DEFAULT_OPTIONS.scale
    noise: bool = DEFAULT_OPTIONS.noise
    calibrate: bool = DEFAULT_OPTIONS.calibrate

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

    def stage_options(self, spec: Optional[StageSpec] = None) -> DropBlockOptions:
        """The op options of a stage: the recipe's, with the stage's own overrides
        (``block_size`` included).

        Examples:
            >>> r = Recipe(block_size=7, stages=[3, {"stage": 4, "block_size": 3, "mask": "shared"}])
            >>> r.stage_options(r.stages[1])
            DropBlockOptions(block_size=3, mask='shared', seed_region='valid', gamma_scale=1.0, scale='count', noise=False, calibrate=False, inplace=False)
        """
        def pick(name: str) -> Any:
            value = getattr(spec, name, None) if spec is not None else None
            return getattr(self, name) if value is None else value

        return DropBlockOptions(**{name: pick(name) for name in DropBlockOptions.RECIPE_FIELDS})

    def to_yaml(self, *, header: Optional[str] = None) -> str:
        """The recipe as YAML that [`load_recipe`][dropblock_fx.load_recipe] reads back to an equal recipe: every
        setting (unset overrides left out), in schema order; ``header`` as ``#`` comments.

        Examples:
            >>> Recipe(stages=[4]).to_yaml().splitlines()[:2]
            ['stages: [4]', 'missing_stages: error']
        """
        data = self.model_dump(mode="python", exclude_none=True)
        text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, allow_unicode=True, width=100)
        if header:
            text = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + text
        return text

    @classmethod
    def from_yaml(cls, text: str, *, file: Optional[str] = None) -> "Recipe":
        """Parse and validate YAML text (``yaml.safe_load``); errors are [`RecipeError`][dropblock_fx.RecipeError]
        naming the file and line.

        Examples:
            >>> Recipe.from_yaml("stages: [4]\\nblock_size: 5").block_size
            5
        """
        data = parse_yaml(text, file)
        recipe = validate_recipe({} if data is None else data, file=file, text=text)
        _SOURCES[id(recipe)] = (weakref.ref(recipe, lambda _, key=id(recipe): _SOURCES.pop(key, None)), file, text)
        return recipe


def validate_recipe(data: Any, *, file: Optional[str] = None, text: Optional[str] = None) -> Recipe:
    """Validate a mapping as a [`Recipe`][dropblock_fx.Recipe]; ``text`` (the YAML it came from) adds line numbers.

    Examples:
        >>> validate_recipe({"stages": [4], "block_size": 5}).block_size
        5
    """
    if not isinstance(data, Mapping):
        raise RecipeError(
            [RecipeIssue(reason=f"a recipe is a mapping of settings, not a {type(data).__name__}", value=data)],
            file=file,
        )
    try:
        return Recipe.model_validate(dict(data))
    except ValidationError as e:
        raise RecipeError(issues_from_validation(e, data, Recipe, text), file=file) from None
    except RecipeError:
        raise
    except Exception as e:  # a validator bug must still surface as RecipeError
        raise RecipeError(f"{type(e).__name__}: {e}", file=file) from None


# Where a recipe was read from, so that errors found later (a stage this model does not
# have) can still name file and line. Kept outside the object: equality and YAML ignore it.
_SOURCES: dict[int, tuple["weakref.ref[Recipe]", Optional[str], str]] = {}


def recipe_source(recipe: Recipe) -> Optional[tuple[Optional[str], str]]:
    """``(file, yaml_text)`` the recipe was loaded from, or ``None``.

    Examples:
        >>> recipe_source(Recipe.from_yaml("stages: [4]", file="mine.yaml"))
        ('mine.yaml', 'stages: [4]')
    """
    entry = _SOURCES.get(id(recipe))
    if entry is None or entry[0]() is not recipe:
        return None
    return entry[1], entry[2]


def line_of(recipe: Recipe, path: tuple[Any, ...]) -> Optional[int]:
    """The line of ``path`` in the YAML the recipe was loaded from, or ``None``.

    Examples:
        >>> line_of(Recipe.from_yaml("name: x\\nstages: [3, 4]"), ("stages",))
        2
    """
    source = recipe_source(recipe)
    return None if source is None else yaml_line(source[1], path)
