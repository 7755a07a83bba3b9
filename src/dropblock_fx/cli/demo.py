"""``dropblock-fx demo``: a regularizer at work, measured over seeds.

A small timm ResNet is trained on a small subset of a real data set that needs no download
(scikit-learn's handwritten digits: 1797 8x8 scans shipped inside scikit-learn, upscaled;
or any ImageFolder with ``--data``), long enough to overfit, in three arms:

- no DropBlock;
- DropBlock: the recipe (default ``last-two-stages`` with block 3, on its linear schedule);
- dropout at the same sites: the same recipe with ``block_size: 1`` (DropBlock with a 1x1
  block is dropout), so the two regularized arms differ only in the block size.

Every arm runs once per seed; a seed fixes the initial weights and the batch order, shared
by the three arms. What is reported is what was measured: validation loss and the gap
between validation and training loss per epoch, mean and spread over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DemoData", "load_digits", "load_image_folder", "train_run", "run_demo", "DEMO_OVERRIDES", "dropout_recipe"]

# The default demo recipe: last-two-stages (the paper's settings on the two deepest stages)
# with block 3, because at 64 px the deepest maps are 4x4 and 2x2 (block 7 would clip to
# the whole map, i.e. SpatialDropout).
DEMO_OVERRIDES: dict[str, Any] = {"block_size": 3}


@dataclass
class DemoData:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    classes: list[str]
    name: str

    @property
    def in_chans(self) -> int:
        return int(self.train_x.shape[1])


def _split(x: torch.Tensor, y: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, ...]:
    """Stratified split: ``val_fraction`` of every class held out, chosen by ``seed``."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    g = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = max(1, round(len(idx) * val_fraction)) if len(idx) > 1 else 0
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    tr, va = torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values
    return x[tr], y[tr], x[va], y[va]


def _subset_per_class(x: torch.Tensor, y: torch.Tensor, per_class: int, seed: int) -> tuple[torch.Tensor, ...]:
    """At most ``per_class`` images of every class, chosen by ``seed`` (0: all of them)."""
    if per_class <= 0:
        return x, y
    g = torch.Generator().manual_seed(seed + 12345)
    keep = []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    idx = torch.cat(keep).sort().values
    return x[idx], y[idx]


def _normalise(d: DemoData) -> DemoData:
    dims = (0, 2, 3)
    mean = d.train_x.mean(dim=dims, keepdim=True)
    std = d.train_x.std(dim=dims, keepdim=True).clamp_min(1e-6)
    d.train_x = (d.train_x - mean) / std
    d.val_x = (d.val_x - mean) / std
    return d


def load_digits(image_size: int, val_fraction: float, seed: int) -> DemoData:
    """scikit-learn's digits, upscaled (bilinear) to ``image_size`` and normalised."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "the demo's data set is scikit-learn's digits: install the demo extra (from a clone "
            "of dropblock-fx: pip install -e '.[demo]'), or pass --data DIR (an ImageFolder)", name=e.name) from None
    digits = sk_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.long)
    tx, ty, vx, vy = _split(x, y, val_fraction, seed)
    return _normalise(DemoData(tx, ty, vx, vy, [str(i) for i in range(10)], "scikit-learn digits"))


def load_image_folder(root: str, image_size: int, val_fraction: float, seed: int) -> DemoData:
    """An ImageFolder (``root/CLASS/*.jpg``), resized to ``image_size`` squares, RGB, in memory."""
    from torchvision import datasets, transforms

    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(2, "no such directory", root)
    tf = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor()])
    ds = datasets.ImageFolder(root, transform=tf)
    if len(ds.classes) < 2:
        raise ValueError(f"{root}: an ImageFolder needs at least 2 class folders, found {len(ds.classes)}")
    xs, ys = zip(*[ds[i] for i in range(len(ds))])
    x, y = torch.stack(xs), torch.tensor(ys, dtype=torch.long)
    tx, ty, vx, vy = _split(x, y, val_fraction, seed)
    return _normalise(DemoData(tx, ty, vx, vy, list(ds.classes), os.path.basename(root.rstrip("/")) or root))


def build_model(name: str, num_classes: int, in_chans: int, width: int) -> nn.Module:
    import timm

    kwargs: dict[str, Any] = dict(num_classes=num_classes, in_chans=in_chans, pretrained=False)
    if width:
        kwargs.update(channels=(width, 2 * width, 4 * width, 8 * width), stem_width=max(8, width // 8 * 8))
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:
        if width:
            raise ValueError(f"--width works with timm ResNets; {name!r} does not take it (use --width 0)") from e
        raise


@dataclass
class RunResult:
    label: str
    recipe: Optional[str]
    seed: int = 0
    modules: int = 0
    train_loss: list[float] = field(default_factory=list)  # eval mode, whole train subset, per epoch
    train_acc: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    drop: list[tuple[int, float]] = field(default_factory=list)  # (step, scheduled rate)
    seconds: float = 0.0

    @property
    def gap(self) -> list[float]:
        """Validation loss minus training loss, per epoch (both in eval mode)."""
        return [v - t for v, t in zip(self.val_loss, self.train_loss)]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` in eval mode."""
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(x), batch):
        out = model(x[i:i + batch])
        loss += float(F.cross_entropy(out, y[i:i + batch], reduction="sum"))
        correct += int((out.argmax(1) == y[i:i + batch]).sum())
    return correct / max(1, len(x)), loss / max(1, len(x))


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True, file=sys.stderr)
        except ModuleNotFoundError:
            pass

    class _Plain:  # no tqdm: one line per run
        def __init__(self) -> None:
            self.postfix: dict[str, Any] = {}

        def update(self, n: int = 1) -> None:
            pass

        def set_postfix(self, **kw: Any) -> None:
            self.postfix = kw

        def close(self) -> None:
            if enabled:
                print(f"{desc}: " + ", ".join(f"{k}={v}" for k, v in self.postfix.items()), file=sys.stderr)

    return _Plain()


def dropout_recipe(recipe: Any) -> Any:
    """``recipe`` with every block size set to 1: dropout at the same sites, rates and schedule.

    Example:
        >>> from dropblock_fx import load_recipe
        >>> r = dropout_recipe(load_recipe("timm-resnet"))
        >>> r.name, r.block_size, [s.block_size for s in r.stages], r.sites
        ('dropout', 1, [1, 1], ['timm'])
    """
    from ..recipe import validate_recipe

    data = recipe.model_dump(mode="python", exclude_unset=True)
    data["block_size"] = 1
    if isinstance(data.get("stages"), list):
        data["stages"] = [dict(s, block_size=1) if isinstance(s, dict) and "block_size" in s else s
                          for s in data["stages"]]
    data["name"] = "dropout"
    return validate_recipe(data)


def train_run(
    label: str,
    data: DemoData,
    recipe: Any,
    args: argparse.Namespace,
    max_batches: Optional[int] = None,
    seed: Optional[int] = None,
) -> RunResult:
    """One training run; ``recipe=None`` is the baseline. The seed fixes the initial weights
    and the batch order, so the arms of one seed differ only in their regularizer."""
    from ..schedule import attach_schedule
    from ..surgery import apply_dropblock, describe

    seed = args.seed if seed is None else seed
    torch.manual_seed(seed)
    model = build_model(args.model, len(data.classes), data.in_chans, args.width)
    res = RunResult(label, None if recipe is None else (recipe.name or "custom"), seed)
    steps_per_epoch = math.ceil(len(data.train_x) / args.batch_size)
    if max_batches:
        steps_per_epoch = min(steps_per_epoch, max_batches)
    total = steps_per_epoch * args.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.15)
    sched = None
    if recipe is not None:
        apply_dropblock(model, recipe)
        res.modules = len(describe(model).rows)
        # a recipe without a schedule is a constant rate (attach_schedule's own default is linear)
        sched = attach_schedule(model, total_steps=total, optimizer=opt, schedule=recipe.schedule or "constant")
    torch.manual_seed(seed + 1)  # the masks' randomness starts from the same state in every arm
    order_gen = torch.Generator().manual_seed(seed)
    bar = _progress(total, f"{label[:22]:>22} seed {seed}", not args.no_progress)
    start = time.perf_counter()
    step = 0
    for _ in range(args.epochs):
        model.train()
        perm = torch.randperm(len(data.train_x), generator=order_gen)
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch_size:(b + 1) * args.batch_size]
            loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            drop_now = sched.drop_prob if sched is not None else 0.0  # the rate this batch used
            opt.step()  # also advances the DropBlock schedule (optimizer hook)
            lr_sched.step()
            step += 1
            res.drop.append((step, drop_now))
            bar.update(1)
        ta, tl = evaluate(model, data.train_x, data.train_y)
        va, vl = evaluate(model, data.val_x, data.val_y)
        res.train_acc.append(ta)
        res.train_loss.append(tl)
        res.val_acc.append(va)
        res.val_loss.append(vl)
        bar.set_postfix(val_loss=f"{vl:.3f}", gap=f"{vl - tl:.3f}", drop=f"{drop_now:.4f}")
    bar.close()
    res.seconds = time.perf_counter() - start
    return res


def _warm_up(model: nn.Module, data: DemoData, batch: int) -> None:
    """One untimed step at the demo's shapes: the first run must not pay for the CPU
    kernels' one-time setup, or the runs' times are not comparable."""
    model.train()
    F.cross_entropy(model(data.train_x[:batch]), data.train_y[:batch]).backward()
    evaluate(model, data.val_x[:256], data.val_y[:256])


def _mean_spread(rows: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    """Per epoch: mean, min and max over seeds (``rows``: one list of values per seed).

    Example:
        >>> _mean_spread([[1.0, 0.5], [3.0, 0.25]])
        ([2.0, 0.375], [1.0, 0.25], [3.0, 0.5])
    """
    cols = list(zip(*rows))
    return ([sum(c) / len(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols])


def _zoom(ax: Any, series: list[list[float]], first: int) -> None:
    """y-limits from epoch ``first`` on (1-based), where the curves differ; the early epochs'
    large losses would otherwise flatten them."""
    tail = [v for s in series for v in s[first - 1:]]
    if not tail:
        return
    lo, hi = min(tail), max(tail)
    pad = 0.08 * (hi - lo) or 0.05 * (abs(hi) or 1.0)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlim(first - 0.3, max(len(s) for s in series) + 0.3)


def plot_runs(arms: list[list[RunResult]], out: str, title: str) -> None:
    """Validation loss, the validation - training loss gap and validation accuracy per epoch:
    mean over seeds (line) and min..max (band), zoomed to the epochs where the arms differ."""
    from .plotting import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    colors = ["tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red"]
    epochs = len(arms[0][0].val_loss)
    first = epochs // 2 + 1 if epochs >= 6 else 1  # the second half: where training has converged
    panels = [("val_loss", "validation loss (cross-entropy)"),
              ("gap", "validation loss - training loss"),
              ("val_acc", "validation accuracy")]
    for ax, (key, ylabel) in zip(axes, panels):
        shown = []
        for runs, c in zip(arms, colors):
            rows = [getattr(r, key) for r in runs]
            mean, lo, hi = _mean_spread(rows)
            ep = list(range(1, len(mean) + 1))
            ax.plot(ep, mean, "-o", ms=3, color=c, label=f"{runs[0].label} (n={len(runs)})")
            if len(runs) > 1:
                ax.fill_between(ep, lo, hi, color=c, alpha=0.18, linewidth=0)
            shown += [mean, lo, hi]
        _zoom(ax, shown, first)
        ax.set_xlabel("epoch" + (f" (from {first}: zoomed)" if first > 1 else ""))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title + ": mean over seeds (line), min..max (band)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _paired(base: list[RunResult], other: list[RunResult], key: str) -> str:
    """``other - base`` of the last epoch's ``key``, per seed: mean, range, how many lower."""
    diffs = [getattr(o, key)[-1] - getattr(b, key)[-1] for b, o in zip(base, other)]
    lower = sum(d < 0 for d in diffs)
    return (f"{sum(diffs) / len(diffs):+.4f} (per seed {min(diffs):+.4f}..{max(diffs):+.4f}; "
            f"lower in {lower} of {len(diffs)})")


def run_demo(args: argparse.Namespace) -> list[RunResult]:
    from ..surgery import plan as make_plan
    from .commands import format_plan, parse_overrides, with_overrides

    t0, c0 = time.perf_counter(), time.process_time()
    if args.threads:
        torch.set_num_threads(args.threads)
    max_batches = None
    if args.quick:
        args.epochs, args.image_size, args.width, args.batch_size, args.seeds = 1, 64, 8, 32, 1
        max_batches = 3
    for name in ("epochs", "batch_size", "image_size", "seeds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.data:
        data = load_image_folder(args.data, args.image_size, args.val_fraction, args.seed)
    else:
        data = load_digits(args.image_size, args.val_fraction, args.seed)
    data.train_x, data.train_y = _subset_per_class(data.train_x, data.train_y, args.train_per_class, args.seed)
    if args.quick:  # a smoke test: a slice of the data is enough
        data.train_x, data.train_y = data.train_x[:max_batches * args.batch_size], data.train_y[:max_batches * args.batch_size]
        data.val_x, data.val_y = data.val_x[:64], data.val_y[:64]
    overrides = dict(DEMO_OVERRIDES) if args.recipe is None else {}
    overrides["input_size"] = [data.in_chans, args.image_size, args.image_size]
    overrides.update(parse_overrides(args.overrides))
    recipe = with_overrides(args.recipe, overrides)
    arms: list[tuple[str, Any]] = [("no DropBlock", None), (recipe.name or "DropBlock", recipe)]
    if not args.no_dropout_arm:
        arms.append(("dropout, same sites", dropout_recipe(recipe)))
    seeds = [args.seed + i for i in range(args.seeds)]
    threads = torch.get_num_threads()
    model_desc = f"timm {args.model}" + (f" (width {args.width})" if args.width else "")
    print(f"data: {data.name}, {len(data.train_x)} train / {len(data.val_x)} validation images, "
          f"{len(data.classes)} classes, {args.image_size}x{args.image_size}x{data.in_chans}")
    print(f"model: {model_desc}; {args.epochs} epochs, batch {args.batch_size}, AdamW lr {args.lr:g}, "
          f"seeds {', '.join(map(str, seeds))}, {threads} CPU thread{'s' if threads != 1 else ''}")
    probe = build_model(args.model, len(data.classes), data.in_chans, args.width)
    print(format_plan(make_plan(probe, recipe), model_desc, modules=False))
    if len(arms) > 2:
        print(f"third arm: the same sites, rates and schedule with block_size 1 (dropout)")
    print()
    _warm_up(probe, data, args.batch_size)
    results: list[list[RunResult]] = [[] for _ in arms]
    for seed in seeds:
        for i, (label, r) in enumerate(arms):
            results[i].append(train_run(label, data, r, args, max_batches, seed=seed))
    print()
    head = (f"{'arm':<22} {'modules':>7} {'val loss':>15} {'best val loss':>15} {'val acc':>15} "
            f"{'gap (val-train)':>15} {'s/run':>6}")
    print(f"last epoch, mean +- std over {len(seeds)} seed(s); best val loss: the lowest epoch")
    print(head)
    print("-" * len(head))

    def ms(values: list[float]) -> str:
        m = sum(values) / len(values)
        sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        return f"{m:.4f} +-{sd:.4f}"

    for runs in results:
        print(f"{runs[0].label[:22]:<22} {runs[0].modules:>7} {ms([r.val_loss[-1] for r in runs]):>15} "
              f"{ms([min(r.val_loss) for r in runs]):>15} {ms([r.val_acc[-1] for r in runs]):>15} "
              f"{ms([r.gap[-1] for r in runs]):>15} {sum(r.seconds for r in runs) / len(runs):>5.1f}s")
    print()
    for runs in results[1:]:
        print(f"{runs[0].label} - no DropBlock, last epoch: val loss {_paired(results[0], runs, 'val_loss')}; "
              f"gap {_paired(results[0], runs, 'gap')}")
    print(f"(val: {len(data.val_x)} held-out images; gap: validation loss minus training loss, both in "
          f"eval mode; a difference smaller than the spread over seeds is not a result)")
    if not args.no_plot:
        plot_runs(results, args.out, f"{model_desc}, {len(data.train_x)} {data.name} training images")
        print(f"wrote {args.out}")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"total: {wall:.1f} s wall, {cpu:.1f} s CPU")
    flat = [r for runs in results for r in runs]
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(runs=[dict(asdict(r), gap=r.gap) for r in flat], wall_s=wall, cpu_s=cpu,
                           recipe=recipe.model_dump(mode="json", exclude_none=True),
                           args={k: v for k, v in vars(args).items() if k != "func"}), f, indent=2)
    return flat
