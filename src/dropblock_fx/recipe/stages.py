"""Checking a recipe's stage references against the stages a model actually has.

The surgery layer finds a model's stages; this module turns the recipe's references
(``3``, ``-1``, ``"layer4"``) into the model's stage indices, and when one does not exist
says which stages the model has.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from ..errors import RecipeError, RecipeIssue, closest
from .schema import Recipe, StageSpec, line_of, recipe_source

__all__ = ["ModelStage", "resolve_stage", "resolve_stages"]


class ModelStage:
    """A stage of a model as this module needs it: index, and optionally name and stride."""

    __slots__ = ("index", "name", "stride")

    def __init__(self, index: int, name: Optional[str] = None, stride: Optional[int] = None) -> None:
        self.index, self.name, self.stride = index, name, stride

    def __repr__(self) -> str:
        return f"ModelStage({self.index}, {self.name!r}, stride={self.stride})"


StagesLike = Union[Mapping[int, Any], Iterable[Any]]


def _as_stages(model_stages: StagesLike) -> list[ModelStage]:
    """Accepts ``{index: name}``, ``[(index, name), ...]``, ``[index, ...]`` or objects with
    ``.index`` (and ``.name``, ``.stride`` / ``.reduction``), e.g. the surgery layer's."""
    out: list[ModelStage] = []
    items = model_stages.items() if isinstance(model_stages, Mapping) else model_stages
    for item in items:
        if isinstance(item, ModelStage):
            out.append(item)
        elif isinstance(item, int):
            out.append(ModelStage(item))
        elif isinstance(item, tuple):
            out.append(ModelStage(int(item[0]), None if len(item) < 2 or item[1] is None else str(item[1])))
        else:
            stride = getattr(item, "stride", None) or getattr(item, "reduction", None)
            out.append(ModelStage(int(item.index), getattr(item, "name", None), stride))
    return sorted(out, key=lambda s: s.index)


def _describe(stages: Sequence[ModelStage]) -> str:
    parts = []
    for s in stages:
        text = str(s.index)
        extra = [x for x in (s.name and repr(s.name), s.stride and f"stride {s.stride}") if x]
        if extra:
            text += f" ({', '.join(extra)})"
        parts.append(text)
    return ", ".join(parts) if parts else "none found"


def resolve_stage(
    ref: Union[int, str, StageSpec],
    model_stages: StagesLike,
    *,
    path: Sequence[Any] = ("stages",),
    file: Optional[str] = None,
    line: Optional[int] = None,
) -> int:
    """The model's stage index that ``ref`` means; ``RecipeError`` listing the model's stages
    if it has no such stage.

    Integers are stage indices (stage ``k`` at output stride ``2 ** (k + 1)``), negative ones
    count from the deepest stage (``-1`` = deepest); strings are stage names.

    Examples:
        >>> resolve_stage(-1, {1: "layer1", 2: "layer2", 3: "layer3", 4: "layer4"})
        4
        >>> resolve_stage("layer3", [(3, "layer3"), (4, "layer4")])
        3
    """
    stages = _as_stages(model_stages)
    raw = ref.stage if isinstance(ref, StageSpec) else ref
    key_path = tuple(path) + (("stage",) if isinstance(ref, StageSpec) else ())
    if isinstance(raw, bool):
        raw = None  # never a stage
    if isinstance(raw, int):
        indices = [s.index for s in stages]
        if raw < 0 and -raw <= len(stages):
            return indices[raw]
        if raw >= 0 and raw in indices:
            return raw
    elif isinstance(raw, str):
        for s in stages:
            if s.name == raw:
                return s.index
    names = [s.name for s in stages if s.name]
    hint = closest(raw, names) if isinstance(raw, str) else ""
    raise RecipeError(
        [RecipeIssue(
            path=key_path,
            reason=f"this model has no stage {raw!r}{hint}",
            value=raw,
            allowed=f"the model's stages: {_describe(stages)}; or -1 .. -{len(stages)} from the deepest",
            line=line,
        )],
        file=file,
    )


def resolve_stages(
    recipe: Recipe, model_stages: StagesLike, *, file: Optional[str] = None,
    skipped: Optional[list[Union[int, str]]] = None,
) -> list[tuple[int, Optional[StageSpec]]]:
    """``[(model stage index, its StageSpec or None), ...]`` for every stage of the recipe, in
    the recipe's order; a stage reached twice (``3`` and ``-2``) is an error too. Errors name
    the recipe's file and line when it was loaded from YAML.

    With ``recipe.missing_stages == "skip"`` a stage the model lacks is left out (and its
    reference appended to ``skipped``) unless that leaves no stage at all.

    Examples:
        >>> r = Recipe(stages=[-2, -1], missing_stages="skip")
        >>> left_out = []
        >>> resolve_stages(r, {0: "blocks"}, skipped=left_out), left_out
        ([(0, None)], [-2])
    """
    source = recipe_source(recipe)
    if file is None and source is not None:
        file = source[0]
    out: list[tuple[int, Optional[StageSpec]]] = []
    seen: dict[int, int] = {}
    first_error: Optional[RecipeError] = None
    missing: list[Union[int, str]] = []
    for i, item in enumerate(recipe.stages):
        key = ("stages", i, "stage") if isinstance(item, StageSpec) else ("stages", i)
        try:
            index = resolve_stage(item, model_stages, path=("stages", i), file=file, line=line_of(recipe, key))
        except RecipeError as e:
            if recipe.missing_stages != "skip":
                raise
            first_error = first_error or e
            missing.append(item.stage if isinstance(item, StageSpec) else item)
            continue
        if index in seen:
            raise RecipeError(
                [RecipeIssue(
                    path=("stages", i),
                    reason=f"stages[{seen[index]}] and stages[{i}] both mean stage {index}",
                    value=item.stage if isinstance(item, StageSpec) else item,
                    line=line_of(recipe, ("stages", i)),
                )],
                file=file,
            )
        seen[index] = i
        out.append((index, item if isinstance(item, StageSpec) else None))
    if not out and first_error is not None:
        raise first_error
    if skipped is not None:
        skipped.extend(missing)
    return out
