"""Built-in schedules. Each maps progress ``p`` in ``[0, 1]`` to a factor of the target rate.

``start`` / ``end`` are factors of the target rate at the first and the last step, so
``linear`` with its defaults is the paper's ``kp_t = 1 - (t / T)(1 - kp)``.
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Optional, Sequence

from ..errors import KeyedError
from .registry import register_schedule

__all__ = [
    "constant",
    "linear",
    "cosine",
    "step",
    "multistep",
    "exponential",
    "warmup_hold",
    "piecewise_linear",
]


def _number(key: str, value: Any, lo: float = -math.inf, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (lo <= value <= hi):
        bounds = f"a number in [{lo:g}, {hi:g}]"
        raise KeyedError(f"{key} must be {bounds}", path=(key,), value=value, allowed=bounds)
    return float(value)


def _factor(key: str, value: Any) -> float:
    return _number(key, value, 0.0, 1.0)


def _numbers(key: str, value: Any, lo: float, hi: float) -> list[float]:
    if not isinstance(value, (list, tuple)):
        raise KeyedError(f"{key} must be a list of numbers", path=(key,), value=value)
    return [_number(f"{key}[{i}]", v, lo, hi) for i, v in enumerate(value)]


@register_schedule("constant")
def constant(p: float, value: float = 1.0) -> float:
    """Always ``value`` (timm's ``--drop-block``, the detection code, PP-YOLO)."""
    return _factor("value", value)


@register_schedule("linear")
def linear(p: float, start: float = 0.0, end: float = 1.0) -> float:
    """From ``start`` to ``end`` in a straight line (the paper's schedule)."""
    a, b = _factor("start", start), _factor("end", end)
    return a + (b - a) * p


@register_schedule("cosine")
def cosine(p: float, start: float = 0.0, end: float = 1.0) -> float:
    """Half a cosine from ``start`` to ``end``: slow at both ends."""
    a, b = _factor("start", start), _factor("end", end)
    return a + (b - a) * (1.0 - math.cos(math.pi * p)) / 2.0


@register_schedule("step")
def step(p: float, steps: int = 4, start: float = 0.0, end: float = 1.0) -> float:
    """The linear ramp as ``steps`` equal stairs: ``start`` in the first, ``end`` in the last."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not (2 <= steps <= 10_000):
        raise KeyedError("steps must be an integer in [2, 10000]", path=("steps",), value=steps)
    a, b = _factor("start", start), _factor("end", end)
    k = min(int(p * steps), steps - 1)
    return a + (b - a) * k / (steps - 1)


@register_schedule("multistep")
def multistep(
    p: float,
    milestones: Sequence[float] = (0.5, 0.75),
    values: Optional[Sequence[float]] = None,
    start: float = 0.0,
    end: float = 1.0,
) -> float:
    """``values[i]`` after the ``i``-th milestone (fractions of the schedule, increasing);
    without ``values``, evenly spaced from ``start`` to ``end``."""
    ms = _numbers("milestones", milestones, 0.0, 1.0)
    if any(b <= a for a, b in zip(ms, ms[1:])):
        raise KeyedError("milestones must increase", path=("milestones",), value=list(milestones))
    if values is None:
        a, b = _factor("start", start), _factor("end", end)
        n = len(ms)
        vs = [a + (b - a) * i / n for i in range(n + 1)] if n else [b]
    else:
        vs = _numbers("values", values, 0.0, 1.0)
        if len(vs) != len(ms) + 1:
            raise KeyedError(
                f"values needs len(milestones) + 1 = {len(ms) + 1} entries", path=("values",),
                value=list(values),
            )
    return vs[bisect.bisect_right(ms, p)]


@register_schedule("exponential")
def exponential(p: float, rate: float = 5.0, start: float = 0.0, end: float = 1.0) -> float:
    """From ``start`` to ``end`` along ``1 - exp(-rate * p)`` (normalised to reach ``end``):
    fast early for ``rate > 0``, late for ``rate < 0``, linear at 0."""
    r = _number("rate", rate, -50.0, 50.0)
    a, b = _factor("start", start), _factor("end", end)
    if abs(r) < 1e-9:
        return a + (b - a) * p
    return a + (b - a) * math.expm1(-r * p) / math.expm1(-r)


@register_schedule("warmup-hold")
def warmup_hold(p: float, warmup: float = 0.1, start: float = 0.0, end: float = 1.0) -> float:
    """Linear from ``start`` to ``end`` over the first ``warmup`` of the schedule, then hold
    (mmdet's ``DropBlock(warmup_iters=N)`` is ``{steps: N, params: {warmup: 1.0}}``)."""
    w = _number("warmup", warmup, 0.0, 1.0)
    a, b = _factor("start", start), _factor("end", end)
    if w == 0.0 or p >= w:
        return b
    return a + (b - a) * p / w


@register_schedule("piecewise-linear")
def piecewise_linear(p: float, points: Sequence[Sequence[float]] = ((0.0, 0.0), (1.0, 1.0))) -> float:
    """Straight lines through ``points`` = ``[[progress, factor], ...]`` (progress
    non-decreasing); flat before the first point and after the last."""
    if not isinstance(points, (list, tuple)) or not points:
        raise KeyedError("points must be a non-empty list of [progress, factor]", path=("points",), value=points)
    xs: list[float] = []
    ys: list[float] = []
    for i, pt in enumerate(points):
        if not isinstance(pt, (list, tuple)) or len(pt) != 2:
            raise KeyedError("each point is [progress, factor]", path=("points", i), value=pt)
        xs.append(_number(f"points[{i}][0]", pt[0], 0.0, 1.0))
        ys.append(_factor(f"points[{i}][1]", pt[1]))
    if any(b < a for a, b in zip(xs, xs[1:])):
        raise KeyedError("point progresses must not decrease", path=("points",), value=list(points))
    if p <= xs[0]:
        return ys[0]
    if p >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, p)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y1 if x1 == x0 else y0 + (y1 - y0) * (p - x0) / (x1 - x0)
