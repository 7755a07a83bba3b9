"""Text and JSON output of the commands: aligned tables, the plan of a model."""

from __future__ import annotations

import textwrap
from typing import Any, Callable, Sequence

__all__ = ["table", "stage_summary", "format_plan", "plan_json", "size"]


def size(shape: Sequence[int]) -> str:
    """``(14, 14)`` -> ``"14x14"``.

    Examples:
        >>> size((3, 224, 224))
        '3x224x224'
    """
    return "x".join(map(str, shape))


def table(head: list[str], body: list[list[str]], right_from: int) -> str:
    """Columns aligned under ``head``, left-aligned before column ``right_from``, right from it.

    Examples:
        >>> print(table(["name", "n"], [["a", "1"], ["bcd", "22"]], 1))
        name   n
        ----  --
        a      1
        bcd   22
    """
    widths = [max(len(x) for x in col) for col in zip(head, *body)] if body else [len(h) for h in head]
    fmt = "  ".join(f"{{:{'<' if i < right_from else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    return "\n".join(line.rstrip() for line in lines + [fmt.format(*row) for row in body])


def stage_summary(plan: Any) -> list[dict[str, Any]]:
    """One dict per stage with DropBlock: resolution(s), sites by kind, block sizes, target and
    expected real rates."""
    by_stage: dict[int, list[Any]] = {}
    for r in plan.rows:
        by_stage.setdefault(r.stage, []).append(r)
    stages = {s.index: s for s in plan.stages}
    out = []
    for index in sorted(by_stage):
        rows = by_stage[index]
        kinds: dict[str, int] = {}
        for r in rows:
            kinds[r.kind] = kinds.get(r.kind, 0) + 1
        s = stages.get(index)
        resolutions: list[list[int]] = []
        for r in rows:  # a block's first conv can run before its stride (ResNet conv1)
            if list(r.resolution) not in resolutions:
                resolutions.append(list(r.resolution))
        out.append(dict(
            stage=index,
            name=rows[0].stage_name,
            stride=getattr(s, "stride", 2 ** (index + 1)),
            resolution=list(getattr(s, "resolution", rows[-1].resolution)),
            resolutions=resolutions,
            modules=len(rows),
            sites=kinds,
            block_sizes=sorted({tuple(r.block_size) for r in rows}),
            target_drop_prob=sorted({r.target_drop_prob for r in rows}),
            expected_drop_prob=sorted({round(r.expected_drop_prob, 6) for r in rows}),
        ))
    return out


def _join(values: list[Any], fmt: Callable[[Any], str] = str) -> str:
    return ", ".join(fmt(v) for v in values)


def format_plan(plan: Any, model_spec: str, modules: bool) -> str:
    """The ``plan`` command's tables: the model's stages, then DropBlock per stage (and per
    module with ``modules``), each with a legend line."""
    from ..surgery.rows import legend

    summary = stage_summary(plan)
    name = plan.recipe.name or "custom recipe"
    lines = [f"{model_spec}: recipe {name}, {len(plan.rows)} DropBlock modules, input "
             f"{size(plan.input_shape[1:])}" + (f", target {plan.target}" if plan.target else "")]
    lines.append(table(["stage", "name", "output stride", "feature map", "modules (in call order)"],
                       [[str(s.index), s.name, s.rule.replace("stride ", ""), size(s.resolution),
                         s.span_within(72)] for s in plan.stages], 6))
    lines.append(textwrap.fill("output stride: input side / map side (a dilation that replaced a stride counts "
                               "as that stride); a block's DropBlock modules are in the stage of its output",
                               100, subsequent_indent="  "))
    head = ["stage", "name", "feature map(s)", "DropBlock modules", "block", "drop rate", "real rate"]
    body = [[str(s["stage"]), s["name"], _join(s["resolutions"], size),
             _join([f"{k} x{n}" for k, n in s["sites"].items()]),
             _join(s["block_sizes"], size),
             _join(s["target_drop_prob"], lambda v: f"{v:.4g}"),
             _join(s["expected_drop_prob"], lambda v: f"{v:.4g}")] for s in summary]
    if plan.rows:
        lines.append(table(head, body, 5))
    if modules and plan.rows:
        lines.append("")
        head = ["module", "site", "where", "block", "drop rate", "real rate"]
        body = [[r.path, r.kind, r.anchor, size(r.block_size), f"{r.target_drop_prob:.4g}",
                 f"{r.expected_drop_prob:.4g}"] for r in plan.rows]
        lines.append(table(head, body, 3))
    if plan.rows:
        lines += legend(sorted({r.kind for r in plan.rows}))
    else:
        lines.append("no DropBlock sites found for this recipe (see the notes)")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def plan_json(plan: Any, model_spec: str) -> dict[str, Any]:
    """The ``plan --json`` document: model, recipe, input shape, stages, summary, rows, notes and
    the positions left out for holding no feature map (``Plan.explain``)."""
    return dict(
        model=model_spec,
        recipe=plan.recipe.model_dump(mode="json", exclude_none=True),
        input_shape=list(plan.input_shape),
        target=plan.target,
        stages=[dict(index=s.index, name=s.name, stride=s.stride, resolution=list(s.resolution),
                     dilation=s.dilation, rule=s.rule, modules=[m for m in s.modules if m != "|"], span=s.span)
                for s in plan.stages],
        summary=stage_summary(plan),
        rows=plan.as_dicts(),
        notes=list(plan.notes),
        left_out=[dict(position=where, why=why) for where, why in plan.left_out],
    )
