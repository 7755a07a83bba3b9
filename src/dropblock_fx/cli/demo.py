"""``dropblock-fx demo``: a small timm ResNet trained with and without DropBlock, same seed.

The data needs no download: scikit-learn's handwritten digits (1797 real 8x8 scans of 10
digits, shipped inside the scikit-learn package) upscaled, or any ImageFolder (``--data``).
The two runs differ only in the recipe: same initial weights, same batches, same optimizer.
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

__all__ = ["DemoData", "load_digits", "load_image_folder", "train_run", "run_demo", "DEMO_OVERRIDES"]

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
    modules: int = 0
    train_acc: list[float] = field(default_factory=list)  # running, training mode
    val_acc: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    drop: list[tuple[int, float]] = field(default_factory=list)  # (step, scheduled rate)
    final_train_acc: float = 0.0  # eval mode, whole train set
    seconds: float = 0.0


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> tuple[float, float]:
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

    class _Plain:  # no tqdm: one line per epoch
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


def train_run(
    label: str,
    data: DemoData,
    recipe: Any,
    args: argparse.Namespace,
    max_batches: Optional[int] = None,
) -> RunResult:
    """One training run; ``recipe=None`` is the baseline. Seeds are reset so both runs start
    from the same weights and see the same batches."""
    from ..schedule import attach_schedule
    from ..surgery import apply_dropblock

    torch.manual_seed(args.seed)
    model = build_model(args.model, len(data.classes), data.in_chans, args.width)
    res = RunResult(label, None if recipe is None else (recipe.name or "custom"))
    steps_per_epoch = math.ceil(len(data.train_x) / args.batch_size)
    if max_batches:
        steps_per_epoch = min(steps_per_epoch, max_batches)
    total = steps_per_epoch * args.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.15)
    sched = None
    if recipe is not None:
        apply_dropblock(model, recipe)
        from ..surgery import describe

        res.modules = len(describe(model).rows)
        # a recipe without a schedule is a constant rate (attach_schedule's own default is linear)
        sched = attach_schedule(model, total_steps=total, optimizer=opt, schedule=recipe.schedule or "constant")
    torch.manual_seed(args.seed + 1)  # same DropBlock-free randomness (order) in both runs
    order_gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    step = 0
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(data.train_x), generator=order_gen)
        bar = _progress(steps_per_epoch, f"{label:>12} {epoch + 1}/{args.epochs}", not args.no_progress)
        correct = seen = 0
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch_size:(b + 1) * args.batch_size]
            x, y = data.train_x[idx], data.train_y[idx]
            out = model(x)
            loss = F.cross_entropy(out, y)
            loss_value = loss.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            drop_now = sched.drop_prob if sched is not None else 0.0  # the rate this batch used
            opt.step()  # also advances the DropBlock schedule (optimizer hook)
            lr_sched.step()
            step += 1
            res.drop.append((step, drop_now))
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{correct / seen:.3f}", drop=f"{drop_now:.4f}")
        res.train_acc.append(correct / max(1, seen))
        va, vl = evaluate(model, data.val_x, data.val_y)
        res.val_acc.append(va)
        res.val_loss.append(vl)
        bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{res.train_acc[-1]:.3f}", val=f"{va:.3f}",
                        drop=f"{res.drop[-1][1]:.4f}")
        bar.close()
    res.final_train_acc = evaluate(model, data.train_x, data.train_y)[0]
    res.seconds = time.perf_counter() - start
    return res


def _warm_up(model: nn.Module, data: DemoData, batch: int) -> None:
    """One untimed step at the demo's shapes: the first run must not pay for the CPU
    kernels' one-time setup, or the two runs' times are not comparable."""
    model.train()
    F.cross_entropy(model(data.train_x[:batch]), data.train_y[:batch]).backward()
    evaluate(model, data.val_x[:256], data.val_y[:256])


def plot_runs(runs: list[RunResult], out: str, title: str) -> None:
    from .plotting import pyplot

    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    colors = ["tab:gray", "tab:blue", "tab:orange", "tab:green"]
    for r, c in zip(runs, colors):
        ep = list(range(1, len(r.val_acc) + 1))
        ax1.plot(ep, r.val_acc, "-o", color=c, label=f"{r.label}: validation")
        ax1.plot(ep, r.train_acc, "--", color=c, alpha=0.6, label=f"{r.label}: train (running)")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("accuracy")
    ax1.set_title(title, fontsize=10)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    for r, c in zip(runs, colors):
        if r.drop and any(v for _, v in r.drop):
            ax2.plot([s for s, _ in r.drop], [v for _, v in r.drop], color=c, label=f"{r.label}")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("scheduled drop rate (deepest stage)")
    ax2.set_title("DropBlock schedule", fontsize=10)
    ax2.grid(alpha=0.3)
    if ax2.lines:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run_demo(args: argparse.Namespace) -> list[RunResult]:
    from ..surgery import plan as make_plan
    from .commands import format_plan, parse_overrides, with_overrides

    t0, c0 = time.perf_counter(), time.process_time()
    if args.threads:
        torch.set_num_threads(args.threads)
    max_batches = None
    if args.quick:
        args.epochs, args.image_size, args.width, args.batch_size = 1, 64, 8, 32
        max_batches = 3
    for name in ("epochs", "batch_size", "image_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.data:
        data = load_image_folder(args.data, args.image_size, args.val_fraction, args.seed)
    else:
        data = load_digits(args.image_size, args.val_fraction, args.seed)
    if args.quick:  # a smoke test: a slice of the data is enough
        data.train_x, data.train_y = data.train_x[:max_batches * args.batch_size], data.train_y[:max_batches * args.batch_size]
        data.val_x, data.val_y = data.val_x[:64], data.val_y[:64]
    overrides = dict(DEMO_OVERRIDES) if args.recipe is None else {}
    overrides["input_size"] = [data.in_chans, args.image_size, args.image_size]
    overrides.update(parse_overrides(args.overrides))
    recipe = with_overrides(args.recipe, overrides)
    model_desc = f"timm {args.model}" + (f" (width {args.width})" if args.width else "")
    print(f"data: {data.name}, {len(data.train_x)} train / {len(data.val_x)} validation images, "
          f"{len(data.classes)} classes, {args.image_size}x{args.image_size}x{data.in_chans}")
    print(f"model: {model_desc}; {args.epochs} epochs, batch {args.batch_size}, AdamW lr {args.lr:g}, "
          f"seed {args.seed}, {torch.get_num_threads()} CPU threads")
    probe = build_model(args.model, len(data.classes), data.in_chans, args.width)
    print(format_plan(make_plan(probe, recipe), model_desc, modules=False))
    print()
    _warm_up(probe, data, args.batch_size)
    runs = [train_run("no DropBlock", data, None, args, max_batches),
            train_run(recipe.name or "DropBlock", data, recipe, args, max_batches)]
    print()
    head = f"{'run':<18} {'modules':>7} {'train acc':>9} {'val acc':>8} {'best val':>8} {'val loss':>8} {'time':>7}"
    print(head)
    print("-" * len(head))
    for r in runs:
        print(f"{r.label:<18} {r.modules:>7} {r.final_train_acc:>9.4f} {r.val_acc[-1]:>8.4f} "
              f"{max(r.val_acc):>8.4f} {r.val_loss[-1]:>8.4f} {r.seconds:>6.1f}s")
    print("(train acc: eval mode on the whole train set after the last epoch; val: held-out "
          f"{len(data.val_x)} images; one seed, so differences of a few images are noise)")
    if not args.no_plot:
        plot_runs(runs, args.out, f"{model_desc} on {data.name}, seed {args.seed}")
        print(f"wrote {args.out}")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"total: {wall:.1f} s wall, {cpu:.1f} s CPU")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(runs=[asdict(r) for r in runs], wall_s=wall, cpu_s=cpu,
                           recipe=recipe.model_dump(mode="json", exclude_none=True),
                           args={k: v for k, v in vars(args).items() if k != "func"}), f, indent=2)
    return runs
