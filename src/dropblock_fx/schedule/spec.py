"""``ScheduleSpec``: a schedule as data (name, params, length), as recipes and
``attach_schedule`` take it. The recipe schema uses it for its ``schedule`` field."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import KeyedError, RecipeError, RecipeIssue, closest, issues_from_validation
from .registry import canonical_name, check_schedule, list_schedules

__all__ = ["ScheduleSpec", "ScheduleLike", "validate_schedule", "as_schedule_spec"]


class ScheduleSpec(BaseModel):
    """How the drop rate moves over training. ``steps`` / ``epochs`` / ``fraction`` give its
    length (at most one; none means the whole run). After its length the schedule holds its
    final value.

    ``name`` is a registered schedule (``dropblock_fx.list_schedules()``); ``params`` are its
    keyword arguments. A schedule maps progress in ``[0, 1]`` to a factor in ``[0, 1]`` of
    every module's target rate, so ``linear`` (0 -> 1) is the paper's
    ``kp_t = 1 - (t / T)(1 - kp)``.

    Examples:
        >>> ScheduleSpec(name="cosine", fraction=0.5).name
        'cosine'
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    name: str = "linear"
    params: dict[str, Any] = Field(default_factory=dict)
    steps: Optional[int] = Field(None, ge=1)
    epochs: Optional[float] = Field(None, gt=0)
    fraction: Optional[float] = Field(None, gt=0.0, le=1.0)

    @field_validator("params", mode="before")
    @classmethod
    def _plain_params(cls, params: Any) -> Any:
        # Tuples become lists: what YAML gives back, so a recipe round-trips unchanged.
        def plain(v: Any) -> Any:
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v

        return plain(params)

    @field_validator("name")
    @classmethod
    def _known_name(cls, name: str) -> str:
        canon = canonical_name(name)
        known = list_schedules()
        if canon not in known:
            raise KeyedError(
                f"unknown schedule {name!r}{closest(canon, known)}", value=name, allowed=", ".join(known)
            )
        return canon

    @model_validator(mode="after")
    def _check(self) -> "ScheduleSpec":
        given = [k for k in ("steps", "epochs", "fraction") if getattr(self, k) is not None]
        if len(given) > 1:
            raise KeyedError(
                f"give at most one schedule length, got {' and '.join(given)}",
                path=(given[1],), value=getattr(self, given[1]), allowed="one of steps, epochs, fraction",
            )
        check_schedule(self.name, self.params)
        return self


# What attach_schedule(schedule=...) takes: a name, a mapping, a ScheduleSpec, or None.
ScheduleLike = Union[None, str, Mapping[str, Any], ScheduleSpec]


def validate_schedule(data: Any) -> ScheduleSpec:
    """Validate a schedule mapping; errors are ``RecipeError`` s whose key paths start at
    ``schedule`` (``schedule.params.x``).

    Examples:
        >>> validate_schedule({"name": "cosine", "fraction": 0.5}).fraction
        0.5
    """
    if not isinstance(data, Mapping):
        raise RecipeError([RecipeIssue(path=("schedule",), reason="a schedule is a mapping", value=data)])
    try:
        return ScheduleSpec.model_validate(dict(data))
    except ValidationError as e:
        raise RecipeError(issues_from_validation(e, data, ScheduleSpec, prefix=("schedule",))) from None


def as_schedule_spec(schedule: ScheduleLike) -> Optional[ScheduleSpec]:
    """``schedule`` as a [`ScheduleSpec`][dropblock_fx.ScheduleSpec]: a name, a mapping or a spec (``None`` stays).

    Examples:
        >>> as_schedule_spec("warmup_hold").name
        'warmup-hold'
    """
    if schedule is None or isinstance(schedule, ScheduleSpec):
        return schedule
    return validate_schedule({"name": schedule} if isinstance(schedule, str) else schedule)
