"""The demo's report: the tables it prints and the figure it writes."""

from __future__ import annotations

import math
from typing import Sequence

from ..format import table
from .mechanism import ProbeResult
from .train import RunResult

__all__ = ["mean_spread", "mean_std", "mechanism_table", "training_table", "paired", "plot"]

# dropout orange, DropBlock blues, no regularizer gray: the same in every panel
_METHOD_COLORS = {"dropout": "tab:orange", "no regularizer": "tab:gray"}
_BLUES = ["tab:blue", "navy", "tab:cyan", "tab:purple"]


def _color(label: str, index: int) -> str:
    for key, c in _METHOD_COLORS.items():
        if label.startswith(key):
            return c
    return _BLUES[index % len(_BLUES)]


def mean_spread(rows: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    """Per position: mean, min and max over the lists (one list per seed or batch).

    Examples:
        >>> mean_spread([[1.0, 0.5], [3.0, 0.25]])
        ([2.0, 0.375], [1.0, 0.25], [3.0, 0.5])
    """
    cols = list(zip(*rows))
    return ([sum(c) / len(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value).

    Examples:
        >>> mean_std([1.0, 2.0, 3.0])
        (2.0, 1.0)
    """
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def _ms(values: Sequence[float], digits: int = 3) -> str:
    m, sd = mean_std(values)
    return f"{m:.{digits}f} +-{sd:.{digits}f}"


def mechanism_table(res: ProbeResult) -> str:
    """Per drop rate and method: the relative change of the map, the next stage and the logits,
    and the predictions changed (mean +- std over batches)."""
    head = ["p", "method", f"{res.stage} map", f"{res.next_stage} output", "logits", "predictions changed"]
    body = []
    for j, p in enumerate(res.rates):
        for m in res.methods:
            v = res.values[m]
            body.append([f"{p:g}", m, _ms(v["map"][j]), _ms(v["next"][j]), _ms(v["logits"][j]),
                         _ms(v["flips"][j])])
    return table(head, body, 2)


def training_table(arms: list[list[RunResult]]) -> str:
    """Last epoch per arm: validation loss, best validation loss, accuracy, the gap between
    validation and training loss (mean +- std over seeds) and seconds per run."""
    head = ["arm", "modules", "val loss", "best val loss", "val acc", "val - train loss", "s/run"]
    body = [[runs[0].label, str(runs[0].modules), _ms([r.val_loss[-1] for r in runs], 4),
             _ms([min(r.val_loss) for r in runs], 4), _ms([r.val_acc[-1] for r in runs], 4),
             _ms([r.gap[-1] for r in runs], 4), f"{sum(r.seconds for r in runs) / len(runs):.1f}"]
            for runs in arms]
    return table(head, body, 1)


def paired(base: list[RunResult], other: list[RunResult], key: str) -> str:
    """``other - base`` of the last epoch's ``key``, seed by seed: mean, range, how many lower."""
    diffs = [getattr(o, key)[-1] - getattr(b, key)[-1] for b, o in zip(base, other)]
    lower = sum(d < 0 for d in diffs)
    return (f"{sum(diffs) / len(diffs):+.4f} (per seed {min(diffs):+.4f}..{max(diffs):+.4f}; "
            f"lower in {lower} of {len(diffs)})")


def plot(mech: ProbeResult | None, arms: list[list[RunResult]], out: str, title: str) -> None:
    """Top row: the mechanism (relative change vs drop rate, mean and std over batches).
    Bottom row: the training runs, every epoch (mean over seeds, band min..max), and the drop
    rate of each stage over the steps."""
    from ..plotting import pyplot

    plt = pyplot()
    rows = 2 if mech is not None else 1
    fig, axes = plt.subplots(rows, 3, figsize=(15, 4.3 * rows), squeeze=False)
    if mech is not None:
        side = "x".join(map(str, mech.resolution))
        panels = [("map", f"(a) the dropped map ({mech.stage}, {side})"),
                  ("next", f"(b) the next stage's output ({mech.next_stage})"),
                  ("logits", "(c) the logits")]
        for ax, (key, name) in zip(axes[0], panels):
            for i, m in enumerate(mech.methods):
                stats = [mean_std(v) for v in mech.values[m][key]]
                ax.errorbar(mech.rates, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", ms=4,
                            capsize=3, color=_color(m, i), label=m)
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("fraction of the map dropped (p)")
            ax.set_ylabel("relative change ||after - before|| / ||before||")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8, title="the same p dropped by", title_fontsize=8)
    ax_loss, ax_acc, ax_rate = axes[rows - 1]
    epochs = list(range(1, len(arms[0][0].val_loss) + 1))
    for i, runs in enumerate(arms):
        c = _color(runs[0].label, i)
        n = f" (n={len(runs)})" if len(runs) > 1 else ""
        for key, style, label in (("val_loss", "-", f"{runs[0].label}{n}"), ("train_loss", "--", None)):
            mean, lo, hi = mean_spread([getattr(r, key) for r in runs])
            ax_loss.plot(epochs, mean, style, color=c, label=label, marker="o" if style == "-" else None, ms=2.5)
            if len(runs) > 1:
                ax_loss.fill_between(epochs, lo, hi, color=c, alpha=0.15, linewidth=0)
        mean, lo, hi = mean_spread([r.val_acc for r in runs])
        ax_acc.plot(epochs, mean, "-o", ms=2.5, color=c, label=runs[0].label)
        if len(runs) > 1:
            ax_acc.fill_between(epochs, lo, hi, color=c, alpha=0.15, linewidth=0)
    # the drop rate of each stage: the regularized arms share it (the same recipe but the block)
    shown: dict[str, tuple[list[float], list[str]]] = {}
    for runs in arms:
        for stage, rates in runs[0].stage_drop.items():
            if stage in shown and shown[stage][0] == rates:
                shown[stage][1].append(runs[0].label)
            else:
                shown[f"{stage}" if stage not in shown else f"{stage} ({runs[0].label})"] = (rates, [runs[0].label])
    for j, (stage, (rates, labels)) in enumerate(shown.items()):
        ax_rate.plot(range(1, len(rates) + 1), rates, color=["tab:red", "tab:brown", "tab:pink", "tab:olive"][j % 4],
                     label=f"{stage}: {' and '.join(labels)}")
    ax_loss.set_yscale("log")
    ax_loss.set_title("(d) loss per epoch: validation (solid), training (dashed)", fontsize=10)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy (eval mode, log scale)")
    ax_loss.legend(fontsize=8)
    ax_acc.set_title("(e) validation accuracy", fontsize=10)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    accs = [v for runs in arms for r in runs for v in r.val_acc[len(epochs) // 3:]]
    if accs:
        ax_acc.set_ylim(max(0.0, min(accs) - 0.02), min(1.0, max(accs) + 0.01))
    ax_rate.set_title("(f) drop rate of each stage over training", fontsize=10)
    ax_rate.set_xlabel("optimizer step")
    ax_rate.set_ylabel("drop rate")
    if shown:
        ax_rate.legend(fontsize=7)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
