"""The commands of ``dropblock-fx``: each ``cmd_<name>(args) -> exit status``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional

from .args import parse_example_inputs, parse_input_size, parse_overrides, recipe_with, with_overrides
from .format import format_plan, plan_json, stage_summary
from .format import table as format_table

__all__ = [
    "cmd_plan", "cmd_recipes", "cmd_validate", "cmd_schedule", "cmd_masks", "cmd_demo", "cmd_timm_train",
    "parse_overrides", "parse_input_size", "with_overrides", "stage_summary", "schedule_table",
    "format_plan", "plan_json",
]


# ------------------------------------------------------------------------------------ plan


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
    recipe = recipe_with(args, base, extra)
    inputs = parse_example_inputs(getattr(args, "example_inputs", None))
    model = load_model(args.model)
    if getattr(args, "verify", False):
        from ..surgery import apply_dropblock, describe, plan_of

        apply_dropblock(model, recipe, verify="exact", example_inputs=inputs)
        p = describe(model) if plan_of(model) is not None else make_plan(model, recipe, example_inputs=inputs)
        p.notes.append("verified: eval outputs bit-identical to the original's on a random input")
    else:
        p = make_plan(model, recipe, example_inputs=inputs)
    if args.json:
        json.dump(plan_json(p, args.model), sys.stdout, indent=2, default=_json_default)
        sys.stdout.write("\n")
    else:
        print(format_plan(p, args.model, args.modules))
        if getattr(args, "explain", False):
            print(p.explain() or "left out: nothing (every position looked at holds a feature map)")
    if args.png:
        from .plan_picture import draw_plan

        draw_plan(p, model, args.model, args.png)
        print(f"wrote {args.png}", file=sys.stderr if args.json else sys.stdout)
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
    print(format_table(head, body, 0))
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


def cmd_timm_train(args: argparse.Namespace) -> int:
    from .timm_train import run_script

    run_script(args.script, args.args)
    return 0
