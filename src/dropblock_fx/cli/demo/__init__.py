"""``dropblock-fx demo``: why DropBlock and not dropout, measured.

Two parts, on a small timm ResNet and a small real data set that needs no download
(scikit-learn's handwritten digits, upscaled; or any ImageFolder with ``--data``):

1. **The mechanism** (``mechanism.py``): on the network trained without a regularizer, drop
   the same fraction of one stage's feature map with dropout and with DropBlock (blocks 3 and
   5), and measure how much the next stage's output and the logits change.
2. **Training** (``train.py``), long enough to overfit, in three arms that share the initial
   weights and batch order of each seed: no regularizer; DropBlock (the recipe); dropout at
   the same sites, rates and schedule (the recipe with ``block_size: 1``).

``report.py`` prints the tables and draws the figure; ``data.py`` loads the images. What is
reported is what was measured, whatever it shows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from typing import Any

__all__ = ["run_demo", "DEMO_OVERRIDES", "PROBE_RATES"]

# The default setting: at 64 px the stride-8 and stride-16 stages (2 and 3) are 8x8 and 4x4, so
# a 3x3 block is 3/8 and 3/4 of their side, about what the paper's 7x7 block is on ImageNet's
# 14x14 and 7x7 maps of its groups 3 and 4. The deepest stage (2x2 at 64 px) would make any
# block the whole map: channel dropout, not DropBlock.
DEMO_OVERRIDES: dict[str, Any] = {"stages": [2, 3], "block_size": 3}
PROBE_RATES = (0.05, 0.1, 0.2, 0.3)


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished child processes (the workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _settings(args: argparse.Namespace) -> Any:
    from .train import Settings

    if args.quick:  # a smoke test: one epoch of a few batches, a tiny model, one seed
        args.epochs, args.width, args.batch_size, args.seeds, args.jobs = 1, 8, 32, 1, 1
    for name in ("epochs", "batch_size", "image_size", "seeds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    return Settings(model=args.model, width=args.width, epochs=args.epochs, batch_size=args.batch_size,
                    lr=args.lr, max_batches=3 if args.quick else None, threads=args.threads)


def _data(args: argparse.Namespace) -> Any:
    from .data import load_digits, load_image_folder, subset_per_class

    if args.data:
        data = load_image_folder(args.data, args.image_size, args.val_fraction, args.seed)
    else:
        data = load_digits(args.image_size, args.val_fraction, args.seed)
    data.train_x, data.train_y = subset_per_class(data.train_x, data.train_y, args.train_per_class, args.seed)
    if args.quick:
        n = 3 * args.batch_size
        data.train_x, data.train_y = data.train_x[:n], data.train_y[:n]
        data.val_x, data.val_y = data.val_x[:64], data.val_y[:64]
    return data


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run the demo as the command line's ``args`` say; print the report, write the figure
    (``args.out``) and the JSON (``args.json``); return the JSON's content."""
    import torch

    from ...surgery import plan as make_plan
    from ..args import parse_overrides, with_overrides
    from ..format import format_plan
    from . import report
    from .mechanism import probe
    from .train import Arm, build_model, dropout_recipe, run_all

    t0, c0 = time.perf_counter(), _cpu_seconds()
    settings = _settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = _data(args)
    overrides = dict(DEMO_OVERRIDES) if args.recipe is None else {}
    overrides["input_size"] = [data.in_chans, args.image_size, args.image_size]
    overrides.update(parse_overrides(args.overrides))
    recipe = with_overrides(args.recipe, overrides)
    blocks = sorted({recipe.block_size} | {s.block_size for s in recipe.stages
                                           if not isinstance(s, (int, str)) and s.block_size})
    db_label = "DropBlock" + (f" (block {', '.join(map(str, blocks))})" if blocks else "")
    arms = [Arm("no regularizer"), Arm(db_label, recipe)]
    if not args.no_dropout_arm:
        arms.append(Arm("dropout (same sites)", dropout_recipe(recipe)))
    seeds = [args.seed + i for i in range(args.seeds)]
    model_desc = f"timm {args.model}" + (f" (width {args.width})" if args.width else "")
    probe_model = build_model(args.model, len(data.classes), data.in_chans, args.width)
    the_plan = make_plan(probe_model, recipe)
    stage = args.probe_stage
    if stage is None:
        stage = min((r.stage for r in the_plan.rows), default=2)
    tasks = [(arm, seed, arm.recipe is None and seed == seeds[0]) for seed in seeds for arm in arms]
    jobs = args.jobs or min(os.cpu_count() or 1, len(tasks), 4)

    print(f"data: {data.name}, {len(data.train_x)} train / {len(data.val_x)} validation images, "
          f"{len(data.classes)} classes, {args.image_size}x{args.image_size}x{data.in_chans}")
    print(f"model: {model_desc}; {args.epochs} epochs, batch {args.batch_size}, AdamW lr {args.lr:g}, "
          f"seeds {', '.join(map(str, seeds))}; {len(tasks)} runs in {jobs} process{'es' if jobs > 1 else ''} "
          f"of {settings.threads or torch.get_num_threads()} torch thread(s)")
    print(format_plan(the_plan, model_desc, modules=False))
    print(f"arms: {', '.join(a.label for a in arms)}" + ("; dropout: the same sites, rates and schedule with "
          "block_size 1" if not args.no_dropout_arm else ""))
    print()

    def done(r: Any, k: int, n: int) -> None:
        if not args.no_progress:
            print(f"[{k}/{n}] {r.label}, seed {r.seed}: {r.seconds:.1f} s, val loss {r.val_loss[-1]:.4f}, "
                  f"drop rate at the end {r.drop[-1][1]:.4g}", file=sys.stderr, flush=True)

    outcomes = run_all(tasks, data, settings, jobs, done)
    results: list[list[Any]] = [[] for _ in arms]
    weights = None
    for (arm, _, keep), (res, w) in zip(tasks, outcomes):
        results[arms.index(arm)].append(res)
        if keep:
            weights = w

    # the mechanism, on the network trained without a regularizer (the first seed)
    probe_model.load_state_dict(weights)
    rates = (0.1, 0.3) if args.quick else PROBE_RATES
    mech = probe(probe_model, the_plan, data.val_x, stage, rates, blocks=(3, 5), seed=args.seed)
    side = "x".join(map(str, mech.resolution))
    print(f"\nthe mechanism: on the network trained without a regularizer (seed {seeds[0]}), the same fraction p "
          f"of stage {stage}'s map ({mech.stage}, {side}) dropped by each method; relative change "
          f"||after - before|| / ||before||, mean +- std over {len(mech.values['dropout']['map'][0])} batches "
          f"of the {len(data.val_x)} validation images")
    print(report.mechanism_table(mech))
    for m in mech.methods[1:]:
        ratios = [sum(a) / max(1e-12, sum(b)) for a, b in zip(mech.values[m]["logits"], mech.values["dropout"]["logits"])]
        print(f"logits change, {m} / dropout: {', '.join(f'{r:.2f}x' for r in ratios)} at p = "
              f"{', '.join(f'{p:g}' for p in mech.rates)}")
    print(f"\ntraining: last epoch, mean +- std over {len(seeds)} seed(s); best val loss: the lowest epoch")
    print(report.training_table(results))
    print()
    for runs in results[1:]:
        print(f"{runs[0].label} - no regularizer, last epoch: val loss {report.paired(results[0], runs, 'val_loss')}; "
              f"val - train loss {report.paired(results[0], runs, 'gap')}")
    print(f"(val: {len(data.val_x)} held-out images; losses in eval mode; a difference smaller than the spread "
          "over seeds is not a result)")
    if not args.no_plot:
        title = (f"{model_desc}, {len(data.train_x)} {data.name} training images, {args.image_size} px\n"
                 f"top: the mechanism, on the network trained without a regularizer (mean and std over batches); "
                 f"bottom: training (mean over {len(seeds)} seeds, band min..max)")
        report.plot(mech, results, args.out, title)
        print(f"wrote {args.out}")
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    print(f"total: {wall:.1f} s wall, {cpu:.1f} s CPU (this process and its workers)")
    doc = dict(
        runs=[dict(asdict(r), gap=r.gap) for runs in results for r in runs],
        mechanism=asdict(mech),
        wall_s=wall, cpu_s=cpu, jobs=jobs,
        recipe=recipe.model_dump(mode="json", exclude_none=True),
        args={k: v for k, v in vars(args).items() if k != "func"},
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
    return doc
