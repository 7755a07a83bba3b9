"""The commands of ``dropblock-fx``: each ``cmd_<name>(args) -> exit status``."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, Optional

import yaml

__all__ = [
    "cmd_plan", "cmd_recipes", "cmd_validate", "cmd_schedule", "cmd_masks", "cmd_demo",
    "parse_overrides", "parse_input_size", "stage_summary", "schedule_table",
]


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["block_size=5", "stages=[3, 4]"]`` -> ``{"block_size": 5, "stages": [3, 4]}`` (YAML values)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set block_size=5")
        try:
            out[key] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as e:
            raise ValueError(f"--set {item!r}: the value is not valid YAML ({e})") from None
    return out


def parse_input_size(values: Optional[list[str]], channels: int) -> Optional[list[int]]:
    """``["224"]`` -> ``[C, 224, 224]``; ``["3", "224", "224"]``, ``["3x224x224"]``, ``["224x224"]``."""
    if not values:
        return None
    parts: list[str] = []
    for v in values:
        parts += [p for p in re.split(r"[x,\s]+", v.strip()) if p]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--input-size {' '.join(values)}: expected integers, e.g. 224, 3 224 224 or 3x224x224") from None
    if not nums or any(n < 1 for n in nums) or len(nums) > 4:
        raise ValueError(f"--input-size {' '.join(values)}: expected 1 to 4 positive integers")
    if len(nums) == 1:
        return [channels, nums[0], nums[0]]
    if len(nums) == 2:
        return [channels, *nums]
    return nums


def with_overrides(recipe: Any, overrides: dict[str, Any]) -> Any:
    """``recipe`` with ``--set`` fields replaced (errors are ``RecipeError`` naming the key)."""
    from ..surgery.settings import with_overrides as resolve

    return resolve(recipe, overrides, "--set")


def _recipe_with(args: argparse.Namespace, recipe_ref: Any, extra: Optional[dict[str, Any]] = None):
    """The recipe with ``--set`` overrides: the same rules as ``apply_dropblock(**overrides)``."""
    overrides = parse_overrides(getattr(args, "overrides", []) or [])
    overrides.update(extra or {})
    return with_overrides(recipe_ref, overrides)


# ------------------------------------------------------------------------------------ plan


def stage_summary(plan: Any) -> list[dict[str, Any]]:
    """One dict per selected stage: resolution, sites by kind, block sizes, target and expected rates."""
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


def _fmt_list(values: list[Any], fmt=str) -> str:
    return ", ".join(fmt(v) for v in values)


def _table(head: list[str], body: list[list[str]], right_from: int) -> str:
    widths = [max(len(x) for x in col) for col in zip(head, *body)] if body else [len(h) for h in head]
    fmt = "  ".join(f"{{:{'<' if i < right_from else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    return "\n".join(line.rstrip() for line in lines + [fmt.format(*row) for row in body])


def format_plan(plan: Any, model_spec: str, modules: bool) -> str:
    summary = stage_summary(plan)
    name = plan.recipe.name or "custom recipe"
    lines = [f"{model_spec}: recipe {name}, {len(plan.rows)} DropBlock modules, input "
             f"{'x'.join(map(str, plan.input_shape[1:]))}" + (f", target {plan.target}" if plan.target else "")]
    lines.append(_table(["stage", "name", "stride (nominal)", "resolution", "modules (call order)"],
                        [[str(s.index), s.name, s.rule.replace("stride ", ""), "x".join(map(str, s.resolution)),
                          s.span_within(72)] for s in plan.stages], 6))
    lines.append("(a block and its sites are in the stage of the block's output; a dilation that replaced "
                 "a stride counts as that stride)")
    head = ["stage", "name", "resolution(s)", "sites", "block", "target p", "expected p"]
    body = [[str(s["stage"]), s["name"], _fmt_list(s["resolutions"], lambda v: "x".join(map(str, v))),
             _fmt_list([f"{k} x{n}" for k, n in s["sites"].items()]),
             _fmt_list(s["block_sizes"], lambda b: "x".join(map(str, b))),
             _fmt_list(s["target_drop_prob"], lambda v: f"{v:.4g}"),
             _fmt_list(s["expected_drop_prob"], lambda v: f"{v:.4g}")] for s in summary]
    lines.append(_table(head, body, 5))
    if modules and plan.rows:
        lines.append("")
        head = ["module", "site", "block", "target p", "expected p", "anchor"]
        body = [[r.path, r.kind, "x".join(map(str, r.block_size)), f"{r.target_drop_prob:.4g}",
                 f"{r.expected_drop_prob:.4g}", r.anchor] for r in plan.rows]
        lines.append(_table(head, body, 3))
    if not plan.rows:
        lines.append("no DropBlock sites found for this recipe (see the notes)")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def plan_json(plan: Any, model_spec: str) -> dict[str, Any]:
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
    )


def cmd_plan(args: argparse.Namespace) -> int:
    from ..recipe import load_recipe
    from ..surgery import plan as make_plan
    from .models import load_model

    base = load_recipe(args.recipe)
    extra: dict[str, Any] = {}
    size = parse_input_size(args.input_size, base.input_size[0])
    if size is not None:
        extra["input_size"] = size
    if args.target is not None:
        extra["target"] = args.target
    recipe = _recipe_with(args, base, extra)
    model = load_model(args.model)
    if getattr(args, "verify", False):
        from ..surgery import apply_dropblock, describe

        apply_dropblock(model, recipe, verify="exact")
        p = describe(model) if getattr(model, "dropblock_plan", None) is not None else make_plan(model, recipe)
        p.notes.append("verified: eval outputs bit-identical to the original's on a random input")
    else:
        p = make_plan(model, recipe)
    if args.json:
        json.dump(plan_json(p, args.model), sys.stdout, indent=2, default=_json_default)
        sys.stdout.write("\n")
    else:
        print(format_plan(p, args.model, args.modules))
    return 0


def _json_default(v: Any) -> Any:
    if isinstance(v, (tuple, set)):
        return list(v)
    return str(v)


# ------------------------------------------------------------------------ recipes, validate


def cmd_recipes(args: argparse.Namespace) -> int:
    from ..recipe import list_recipes, load_recipe, recipe_file

    if args.name:
        if args.json:
            json.dump(load_recipe(args.name).model_dump(mode="json", exclude_none=True), sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            sys.stdout.write(recipe_file(args.name).read_text(encoding="utf-8"))
        return 0
    recipes = [(n, load_recipe(n)) for n in list_recipes()]
    if args.json:
        json.dump([dict(name=n, description=r.description, file=str(recipe_file(n))) for n, r in recipes],
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    width = max(len(n) for n, _ in recipes)
    for n, r in recipes:
        print(f"{n:<{width}}  {r.description or ''}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from ..recipe import RecipeError, load_recipe

    model = None
    if args.model:
        from .models import load_model

        model = load_model(args.model)
    bad = 0
    for f in args.files:
        try:
            r = load_recipe(f)
            if model is not None:
                from ..surgery import plan as make_plan

                p = make_plan(model, r)
                extra = f"; on {args.model}: {len(p.rows)} modules"
            else:
                extra = ""
            stages = ", ".join(str(s if isinstance(s, (int, str)) else s.stage) for s in r.stages)
            sched = r.schedule.name if r.schedule is not None else "none (constant)"
            print(f"{f}: OK ({r.name or 'unnamed'}: stages {stages}, sites {', '.join(r.sites)}, "
                  f"block {r.block_size}, drop_prob {r.rate:g}, schedule {sched}{extra})")
        except RecipeError as e:
            bad += 1
            for issue in e.issues:
                where = f"{e.file or f}:{issue.line}" if issue.line else (e.file or f)
                print(f"{where}: {issue.describe()}")
        except Exception as e:  # noqa: BLE001 - e.g. a stage the model lacks
            if getattr(args, "debug", False):
                raise
            bad += 1
            print(f"{f}: {' '.join(str(e).split())}")
    return 1 if bad else 0


# ----------------------------------------------------------------------------- schedule


def schedule_table(recipe: Any, steps: int, points: int, model: Any = None,
                   steps_per_epoch: Optional[int] = None) -> dict[str, Any]:
    """Drop rate of each stage at ``points`` evenly spaced steps of a ``steps``-step run."""
    from ..schedule import schedule_length, schedule_value
    from ..recipe import ScheduleSpec

    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    spec = recipe.schedule
    constant = spec is None
    if constant:
        spec = ScheduleSpec(name="constant")
    length = schedule_length(spec, "step", steps, None, steps_per_epoch)
    stage_targets: list[tuple[str, float]] = []
    if model is not None:
        from ..surgery import plan as make_plan

        p = make_plan(model, recipe)
        seen: dict[str, float] = {}
        for r in p.rows:
            seen.setdefault(f"{r.stage} {r.stage_name}", r.target_drop_prob)
        stage_targets = list(seen.items())
    else:
        refs = [s if isinstance(s, (int, str)) else s.stage for s in recipe.stages]
        specs = [None if isinstance(s, (int, str)) else s for s in recipe.stages]
        ints = [r for r in refs if isinstance(r, int)]
        deepest = max(ints) if ints and (all(i >= 0 for i in ints) or all(i < 0 for i in ints)) else None
        for ref, sp in zip(refs, specs):
            if isinstance(ref, int) and deepest is not None:
                rate = recipe.stage_rate(ref, deepest, sp)
            else:
                rate = recipe.stage_rate(0, 0, sp, name=str(ref))  # multiplier by name only
            stage_targets.append((f"stage {ref}", rate))
    n = max(2, points)
    at = sorted({round(i * steps / (n - 1)) for i in range(n)})
    rows = []
    for step in at:
        progress = 1.0 if not length else min(1.0, step / length)
        factor = schedule_value(spec.name, progress, spec.params)
        rows.append(dict(step=step, factor=factor, rates={k: min(1.0, t * factor) for k, t in stage_targets}))
    return dict(schedule=spec.name, constant=constant, params=spec.params, length=length, steps=steps,
                stages=[k for k, _ in stage_targets], targets=dict(stage_targets), rows=rows)


def cmd_schedule(args: argparse.Namespace) -> int:
    from ..recipe import load_recipe

    recipe = load_recipe(args.recipe)
    model = None
    if args.model:
        from .models import load_model

        model = load_model(args.model)
    table = schedule_table(recipe, args.steps, args.points, model, args.steps_per_epoch)
    if args.no_plot:
        args.out = None
    elif args.out is None and not args.json:
        args.out = "dropblock_schedule.png"
    if args.out:
        plot_schedule(recipe, table, args.steps, args.out, model, args.steps_per_epoch)
    if args.json:
        json.dump(table, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    name = recipe.name or args.recipe
    if table["constant"]:
        how = "no schedule: constant at the target rate (attach_schedule would use 'linear')"
    else:
        params = f" {table['params']}" if table["params"] else ""
        if not table["length"] or table["length"] == args.steps:
            span = "the whole run"
        else:
            span = f"the first {table['length']:g} steps, then held"
        how = f"{table['schedule']}{params} over {span}"
    print(f"{name}: {how}; {args.steps} steps")
    head = ["step", "factor"] + table["stages"]
    body = [[str(r["step"]), f"{r['factor']:.3f}"] + [f"{r['rates'][k]:.4f}" for k in table["stages"]]
            for r in table["rows"]]
    print(_table(head, body, 0))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def plot_schedule(recipe: Any, table: dict[str, Any], steps: int, out: str, model: Any,
                  steps_per_epoch: Optional[int]) -> None:
    from .plotting import pyplot

    plt = pyplot()
    dense = schedule_table(recipe, steps, min(steps + 1, 400), model, steps_per_epoch) if steps > 1 else table
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r["step"] for r in dense["rows"]]
    for k in dense["stages"]:
        ax.plot(xs, [r["rates"][k] for r in dense["rows"]], label=k)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("drop rate (1 - keep_prob)")
    ax.set_title(f"{recipe.name or 'recipe'}: {dense['schedule']} schedule")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------- masks, demo


def cmd_masks(args: argparse.Namespace) -> int:
    from .masks import write_masks

    info = write_masks(args.out, image=args.image, drop_prob=args.drop_prob, block_sizes=args.block_sizes,
                       size=args.size, channels=args.channels, seed=args.seed)
    print(f"wrote {args.out}: {info}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args)
    return 0
