"""The demo's training runs: one arm (no regularizer, DropBlock, dropout) on one seed per run,
run one after the other or in worker processes (one torch thread each)."""

from __future__ import annotations

import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .data import DemoData

__all__ = ["Settings", "Arm", "RunResult", "build_model", "evaluate", "dropout_recipe", "train_run", "run_all"]


@dataclass(frozen=True)
class Settings:
    """What every run of one demo shares."""

    model: str = "resnet10t"
    width: int = 16
    epochs: int = 24
    batch_size: int = 16
    lr: float = 2e-3
    max_batches: Optional[int] = None  # per epoch (``--quick``)
    threads: int = 1


@dataclass(frozen=True)
class Arm:
    """One arm: its name in tables and legends, and its recipe (``None``: no regularizer)."""

    label: str
    recipe: Any = None


@dataclass
class RunResult:
    """One run's curves: per epoch (eval mode, whole subsets) and the drop rate per step."""

    label: str
    recipe: Optional[str]
    seed: int = 0
    modules: int = 0
    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    drop: list[tuple[int, float]] = field(default_factory=list)  # (step, the largest module rate)
    stage_drop: dict[str, list[float]] = field(default_factory=dict)  # stage -> its rate at each step
    seconds: float = 0.0

    @property
    def gap(self) -> list[float]:
        """Validation loss minus training loss, per epoch (both in eval mode)."""
        return [v - t for v, t in zip(self.val_loss, self.train_loss)]


def build_model(name: str, num_classes: int, in_chans: int, width: int) -> nn.Module:
    """A timm model from scratch; ``width``: channels of the first stage, doubled per stage
    (timm ResNets only; 0 keeps timm's own)."""
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


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` in eval mode."""
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(x), batch):
        out = model(x[i:i + batch])
        loss += float(F.cross_entropy(out, y[i:i + batch], reduction="sum"))
        correct += int((out.argmax(1) == y[i:i + batch]).sum())
    return correct / max(1, len(x)), loss / max(1, len(x))


def dropout_recipe(recipe: Any) -> Any:
    """``recipe`` with every block size set to 1: dropout at the same sites, rates and schedule.

    Examples:
        >>> from dropblock_fx import load_recipe
        >>> r = dropout_recipe(load_recipe("timm-resnet"))
        >>> r.name, r.block_size, [s.block_size for s in r.stages], r.sites
        ('dropout', 1, [1, 1], ['timm'])
    """
    from ...recipe import validate_recipe

    data = recipe.model_dump(mode="python", exclude_unset=True)
    data["block_size"] = 1
    if isinstance(data.get("stages"), list):
        data["stages"] = [dict(s, block_size=1) if isinstance(s, dict) and "block_size" in s else s
                          for s in data["stages"]]
    data["name"] = "dropout"
    return validate_recipe(data)


def train_run(arm: Arm, data: DemoData, settings: Settings, seed: int,
              keep_weights: bool = False) -> tuple[RunResult, Optional[dict[str, torch.Tensor]]]:
    """One run of ``arm`` from ``seed``. The seed fixes the initial weights, the batch order and
    the masks' random stream, the same in every arm, so the arms of one seed differ only in
    their regularizer. Returns the result and, with ``keep_weights``, the trained weights."""
    from ...schedule import attach_schedule
    from ...surgery import apply_dropblock, describe

    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(seed)
    model = build_model(settings.model, len(data.classes), data.in_chans, settings.width)
    res = RunResult(arm.label, None if arm.recipe is None else (arm.recipe.name or "custom"), seed)
    steps_per_epoch = math.ceil(len(data.train_x) / settings.batch_size)
    if settings.max_batches:
        steps_per_epoch = min(steps_per_epoch, settings.max_batches)
    total = steps_per_epoch * settings.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.05)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=total, pct_start=0.15)
    sched = None
    stage_of: dict[str, str] = {}
    if arm.recipe is not None:
        apply_dropblock(model, arm.recipe)
        rows = describe(model).rows
        res.modules = len(rows)
        stage_of = {r.path: f"stage {r.stage} ({r.stage_name})" for r in rows}
        # a recipe without a schedule is a constant rate (attach_schedule's own default is linear)
        sched = attach_schedule(model, total_steps=total, optimizer=opt, schedule=arm.recipe.schedule or "constant")
    torch.manual_seed(seed + 1)  # the masks' randomness starts from the same state in every arm
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    step = 0
    for _ in range(settings.epochs):
        model.train()
        perm = torch.randperm(len(data.train_x), generator=order)
        for b in range(steps_per_epoch):
            idx = perm[b * settings.batch_size:(b + 1) * settings.batch_size]
            loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            rates = sched.rates() if sched is not None else {}  # the rates this batch used
            opt.step()  # also advances the DropBlock schedule (optimizer hook)
            lr_sched.step()
            step += 1
            res.drop.append((step, max(rates.values(), default=0.0)))
            by_stage: dict[str, float] = {}
            for path, rate in rates.items():
                key = stage_of.get(path, "other")
                by_stage[key] = max(by_stage.get(key, 0.0), rate)
            for key, rate in by_stage.items():
                res.stage_drop.setdefault(key, []).append(rate)
        ta, tl = evaluate(model, data.train_x, data.train_y)
        va, vl = evaluate(model, data.val_x, data.val_y)
        res.train_acc.append(ta)
        res.train_loss.append(tl)
        res.val_acc.append(va)
        res.val_loss.append(vl)
    res.seconds = time.perf_counter() - start
    weights = None
    if keep_weights:
        if arm.recipe is not None:
            from ...surgery import remove_dropblock

            remove_dropblock(model)
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return res, weights


def _init_worker(threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)


def run_all(
    tasks: list[tuple[Arm, int, bool]],
    data: DemoData,
    settings: Settings,
    jobs: int = 1,
    on_done: Optional[Callable[[RunResult, int, int], None]] = None,
) -> list[tuple[RunResult, Optional[dict[str, torch.Tensor]]]]:
    """Every ``(arm, seed, keep_weights)`` task, in order; with ``jobs > 1`` in that many worker
    processes (spawned: each imports torch afresh), each on ``settings.threads`` threads. The
    results do not depend on ``jobs``: every run seeds its own random streams."""
    results: list[Any] = [None] * len(tasks)
    done = 0
    if jobs <= 1 or len(tasks) <= 1:
        for i, (arm, seed, keep) in enumerate(tasks):
            results[i] = train_run(arm, data, settings, seed, keep)
            done += 1
            if on_done:
                on_done(results[i][0], done, len(tasks))
        return results
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(settings.threads,)) as pool:
        futures = {pool.submit(train_run, arm, data, settings, seed, keep): i
                   for i, (arm, seed, keep) in enumerate(tasks)}
        for f in as_completed(futures):
            i = futures[f]
            results[i] = f.result()
            done += 1
            if on_done:
                on_done(results[i][0], done, len(tasks))
    return results
