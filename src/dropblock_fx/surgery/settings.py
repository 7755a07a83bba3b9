"""Phase 3, the stages the recipe selects and what each gets (rate, block size, site kinds)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ..graph.stages import Stage
from ..op.gamma import clip_block, expected_drop_rate, paper_gamma
from ..op.options import DropBlockOptions
from ..recipe import RecipeLike, resolve_stages
from ..recipe.schema import Recipe, StageSpec
from .target import SurgeryError

__all__ = ["StageSettings", "RecipeLike", "resolve_recipe", "with_overrides", "stage_settings", "expected_rate",
           "small_map_note"]


@dataclass(frozen=True)
class StageSettings:
    """What the recipe asks for in one selected stage."""

    stage: Stage
    target: float
    block_size: int
    sites: frozenset[str]
    fraction: float
    options: DropBlockOptions  # the stage's, overrides applied

    def expected(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], float]:
        """Block size after clipping and expected dropped fraction on a map of ``shape``."""
        return expected_rate(self.target, shape, self.block_size, self.options)


def resolve_recipe(recipe: RecipeLike = None, **overrides: Any) -> Recipe:
    """A validated [`Recipe`][dropblock_fx.Recipe] from a name, path, dict or Recipe, with ``overrides`` applied.

    ``stages=`` without ``missing_stages=`` resets ``missing_stages`` to its default: a
    recipe's ``skip`` was about its own stage list.

    Examples:
        >>> resolve_recipe("paper-resnet50", drop_prob=0.2).drop_prob
        0.2
    """
    return with_overrides(recipe, overrides, "overrides of apply_dropblock")


def with_overrides(recipe: RecipeLike, overrides: dict[str, Any], source: str) -> Recipe:
    """`resolve_recipe` with the overrides as a dict; ``source`` names them in errors
    (the command line's ``--set``, or ``apply_dropblock``'s keywords)."""
    from ..recipe.loader import load_recipe, validate_recipe

    if isinstance(recipe, Recipe):
        base = recipe
    elif recipe is None:
        base = load_recipe(None)
    elif isinstance(recipe, Mapping):
        base = validate_recipe(recipe)
    elif isinstance(recipe, str) or hasattr(recipe, "__fspath__"):
        base = load_recipe(recipe)
    else:
        raise SurgeryError(f"recipe must be None, a name, a path, a dict or a Recipe, not {type(recipe).__name__}")
    if not overrides:
        return base
    data = base.model_dump(exclude_unset=True)
    if "drop_prob" in overrides:
        data.pop("keep_prob", None)
    if "keep_prob" in overrides:
        data.pop("drop_prob", None)
    if "stages" in overrides and "missing_stages" not in overrides:
        data.pop("missing_stages", None)
    data.update(overrides)
    # RecipeError (key path, bad value, allowed values), never a raw pydantic error
    return validate_recipe(data, file=source)


def expected_rate(target: float, shape: tuple[int, ...], block_size: int,
                  options: DropBlockOptions) -> tuple[tuple[int, ...], float]:
    """Block size after clipping and the expected dropped fraction at ``shape``."""
    spatial = tuple(shape[2:])
    block = clip_block(spatial, (block_size,) * len(spatial))
    if options.calibrate:
        return block, min(1.0, target * options.gamma_scale)
    gamma = paper_gamma(target, spatial, block, options.gamma_scale)
    return block, expected_drop_rate(gamma, spatial, block, options.seed_region)


def _one(recipe: Recipe, stage: Stage, spec: Optional[StageSpec], deepest: int) -> StageSettings:
    def pick(name: str) -> Any:
        value = getattr(spec, name, None) if spec is not None else None
        return getattr(recipe, name) if value is None else value

    target = recipe.stage_rate(stage.index, deepest, spec, stage.name)
    return StageSettings(
        stage=stage,
        target=min(1.0, max(0.0, round(target, 12))),
        block_size=pick("block_size"),
        sites=frozenset(pick("sites")),
        fraction=pick("block_fraction"),
        options=recipe.stage_options(spec),
    )


def stage_settings(recipe: Recipe, stages: list[Stage], notes: list[str]) -> dict[int, StageSettings]:
    """``{stage index: settings}`` for the stages the recipe selects (notes skipped ones)."""
    skipped: list[Any] = []
    selected = dict(resolve_stages(recipe, stages, skipped=skipped))
    if skipped:
        have = ", ".join(str(s.index) for s in stages)
        notes.append(f"recipe stage(s) {', '.join(map(repr, skipped))} skipped: the model has "
                     f"{len(stages)} stage(s) ({have}) and the recipe says missing_stages: skip")
    deepest = max(selected)
    by_index = {s.index: s for s in stages}
    settings = {i: _one(recipe, by_index[i], spec, deepest) for i, spec in selected.items()}
    notes += [n for n in (small_map_note(cfg, tuple(recipe.input_size)) for cfg in settings.values()) if n]
    return settings


def small_map_note(cfg: StageSettings, input_size: tuple[int, ...]) -> str:
    """A plan note when the stage's map at ``input_size`` is 1x1 or smaller than the block
    (the block is clipped; a block covering the whole map drops whole feature maps); ``''``
    otherwise.

    Examples:
        >>> from dropblock_fx.graph.stages import Stage
        >>> cfg = StageSettings(Stage(4, "layer4", 32, (1, 1)), 0.1, 7, frozenset({"conv"}), 1.0,
        ...                     DropBlockOptions(7))
        >>> small_map_note(cfg, (3, 32, 32)).split("; ")[0]
        'stage 4 (layer4): 1x1 at input_size (3, 32, 32): its 1x1 maps get no DropBlock (there is no block to drop)'
    """
    res = tuple(cfg.stage.resolution)
    block = clip_block(res, (cfg.block_size,) * len(res))
    if not res or (block == (cfg.block_size,) * len(res) and any(s > 1 for s in res)):
        return ""
    where = f"stage {cfg.stage.index} ({cfg.stage.name}): {'x'.join(map(str, res))} at input_size {input_size}"
    fix = "drop it from stages= or plan at the size you train at"
    opts = cfg.options
    if all(s == 1 for s in res):
        return f"{where}: its 1x1 maps get no DropBlock (there is no block to drop); {fix}"
    if block == res and opts.seed_region == "valid":
        # one seed position, a block over the whole map: each map is dropped whole or kept
        what = "channel dropout" if opts.mask == "channel" else "whole-map dropout"
        return f"{where}, smaller than block_size {cfg.block_size}: DropBlock there is {what}; {fix}"
    return (f"{where}, smaller than block_size {cfg.block_size} (clipped to {'x'.join(map(str, block))}): "
            f"the expected rate is for the clipped block; {fix}")
