"""Time ``plan`` and ``apply_dropblock`` on common timm and torchvision CNNs (CPU; no weights downloaded).

Each model is built once; every repetition plans and applies on a fresh ``copy.deepcopy``
of it (the copy is not timed), after one untimed warm-up (imports, code caches). Reports
the median and the minimum; the minimum is the least disturbed by other load on the box.
Planning includes its verification of every rewritten unit; ``exact`` is
``apply_dropblock(..., verify="exact")`` (two real eval forward passes at the recipe's
input size, batch 1, on top).

Usage::

    python benchmarks/bench_plan.py                 # all models, 5 repetitions
    python benchmarks/bench_plan.py --models tv:resnet50 timm:resnet50 --repeat 9
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

import dropblock_fx as dbx

TV = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "regnet_y_400mf", "efficientnet_b0",
      "mobilenet_v3_large", "densenet121", "convnext_tiny", "vgg11_bn", "resnet152"]
TIMM = ["resnet50", "resnet50d", "efficientnet_b0", "mobilenetv3_large_100", "convnext_atto", "regnetx_002",
        "cspresnet50", "repvgg_a2", "dla34"]


def build(spec: str) -> torch.nn.Module:
    lib, name = spec.split(":", 1)
    if lib == "tv":
        import torchvision

        return torchvision.models.get_model(name, weights=None)
    import timm

    return timm.create_model(name, pretrained=False)


def time_one(model: torch.nn.Module, recipe: str, repeat: int) -> dict:
    plans, applies, exacts = [], [], []
    dbx.apply_dropblock(copy.deepcopy(model), recipe)  # warm-up
    rows = 0
    for _ in range(repeat):
        m, m2 = copy.deepcopy(model), copy.deepcopy(model)
        t0 = time.perf_counter()
        p = dbx.plan(m, recipe)
        t1 = time.perf_counter()
        dbx.apply_dropblock(m, recipe)
        t2 = time.perf_counter()
        dbx.apply_dropblock(m2, recipe, verify="exact")
        t3 = time.perf_counter()
        plans.append(t1 - t0)
        applies.append(t2 - t1)
        exacts.append(t3 - t2)
        rows = len(p.rows)
    return dict(rows=rows, plan_median_s=statistics.median(plans), plan_min_s=min(plans),
                apply_median_s=statistics.median(applies), apply_min_s=min(applies),
                exact_median_s=statistics.median(exacts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=[f"tv:{n}" for n in TV] + [f"timm:{n}" for n in TIMM])
    ap.add_argument("--recipe", default="last-two-stages")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "bench_plan.json"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    results = {}
    print(f"{'model':28s} {'rows':>4s} {'plan med':>9s} {'plan min':>9s} {'apply med':>10s} {'apply min':>10s} "
          f"{'exact med':>10s}")
    for spec in args.models:
        recipe = "paper-resnet50" if spec.endswith("resnet50") else args.recipe
        r = time_one(build(spec), recipe, args.repeat)
        r["recipe"] = recipe
        results[spec] = r
        print(f"{spec:28s} {r['rows']:4d} {r['plan_median_s']:9.3f} {r['plan_min_s']:9.3f} "
              f"{r['apply_median_s']:10.3f} {r['apply_min_s']:10.3f} {r['exact_median_s']:10.3f}")
    meta = dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), torch=torch.__version__,
                threads=torch.get_num_threads(), load_average=os.getloadavg())
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    print(f"load average {meta['load_average']}; wrote {args.json}")


if __name__ == "__main__":
    main()
