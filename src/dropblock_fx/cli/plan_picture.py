"""``dropblock-fx plan MODEL --png FILE``: a plan as a picture.

One box per stage, its height growing with the feature map's side, labelled with the map and
its channels; above each stage with DropBlock, one square per module coloured by site kind,
with the block size and the drop rates.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from .format import size

__all__ = ["stage_channels", "draw_plan"]

SITE_COLORS = {"conv": "tab:blue", "conv_last": "tab:orange", "shortcut": "tab:green", "block": "tab:purple",
               "timm": "tab:red"}


def stage_channels(plan: Any, model: Any) -> dict[int, Optional[int]]:
    """Channels of each stage's output, read from one eval forward of the planned module at the
    plan's input size (a zero image); ``None`` where that forward or a module is not available.

    Examples:
        >>> import torch.nn as nn
        >>> from dropblock_fx import plan
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
        ...                     nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        >>> p = plan(net, input_size=(3, 32, 32))
        >>> sorted(stage_channels(p, net).items())
        [(0, 8), (1, 16)]
    """
    import torch

    root = model.get_submodule(plan.target) if plan.target else model
    out: dict[int, Optional[int]] = {s.index: None for s in plan.stages}
    hooks = []

    def keep(index: int):
        def hook(module: Any, inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.dim() >= 3:
                out[index] = int(output.shape[1])
        return hook

    for s in plan.stages:
        names = [m for m in s.modules if m != "|"]
        if not names:
            continue
        try:
            last = root.get_submodule(names[-1])
        except AttributeError:
            continue
        hooks.append(last.register_forward_hook(keep(s.index)))
    was_training = root.training
    try:
        root.eval()
        with torch.no_grad():
            root(torch.zeros(tuple(plan.input_shape)))
    except Exception:  # noqa: BLE001 - a module that needs other inputs: channels stay unknown
        pass
    finally:
        for h in hooks:
            h.remove()
        root.train(was_training)
    return out


def draw_plan(plan: Any, model: Any, model_spec: str, out: str) -> None:
    """Write the picture of ``plan`` (made on ``model``) to ``out`` (PNG, or any format
    matplotlib writes from the file's extension)."""
    from .plotting import pyplot

    plt = pyplot()
    from matplotlib.patches import Patch, Rectangle

    channels = stage_channels(plan, model)
    stages = list(plan.stages)
    rows_by_stage: dict[int, list[Any]] = {}
    for r in plan.rows:
        rows_by_stage.setdefault(r.stage, []).append(r)
    n = max(1, len(stages))
    sides = [max(s.resolution) if s.resolution else 1 for s in stages]
    top = max(sides, default=1)

    def height(side: int) -> float:  # 1 at the largest map, shrinking with log2 of the side
        return 0.35 + 0.65 * (math.log2(side) + 1) / (math.log2(top) + 1)

    per_row = 10  # module squares per row above a stage
    most = max((len(v) for v in rows_by_stage.values()), default=0)
    square_rows = math.ceil(most / per_row) if most else 0
    fig_h = 3.6 + 0.16 * square_rows
    fig, ax = plt.subplots(figsize=(max(6.5, 1.55 * n + 1.0), fig_h))
    box_w, gap = 1.0, 0.45
    for i, s in enumerate(stages):
        x = i * (box_w + gap)
        h = height(sides[i])
        rows = rows_by_stage.get(s.index, [])
        ax.add_patch(Rectangle((x, 0), box_w, h, facecolor="#fde4c8" if rows else "#e8e8e8",
                               edgecolor="#b36b00" if rows else "#888888", linewidth=1.4 if rows else 0.8))
        ch = channels.get(s.index)
        label = f"{size(s.resolution)}" + (f"\n{ch} ch" if ch else "")
        ax.text(x + box_w / 2, h / 2, label, ha="center", va="center", fontsize=8.5)
        name = s.name if len(s.name) <= 16 else s.name[:15] + "…"
        ax.text(x + box_w / 2, -0.06, f"stage {s.index}\n{name}\nstride {s.stride}", ha="center", va="top",
                fontsize=7.5, color="#333333")
        if not rows:
            continue
        block = max(max(r.block_size) for r in rows)
        frac = min(1.0, block / max(1, sides[i]))  # the block drawn to the map's scale
        ax.add_patch(Rectangle((x + box_w * (1 - frac), 0), box_w * frac, h * frac, facecolor="none",
                               edgecolor="#b36b00", linestyle="--", linewidth=0.9, hatch="///", alpha=0.5))
        q = box_w / per_row
        for j, r in enumerate(rows):
            col, row = j % per_row, j // per_row
            ax.add_patch(Rectangle((x + col * q + q * 0.1, h + 0.05 + row * q * 1.1), q * 0.8, q * 0.8,
                                   facecolor=SITE_COLORS.get(r.kind, "tab:gray"), linewidth=0))
        blocks = sorted({size(r.block_size) for r in rows})
        targets = sorted({r.target_drop_prob for r in rows})
        real = [r.expected_drop_prob for r in rows]
        text = (f"{len(rows)} modules, block {', '.join(blocks)}\n"
                f"drop rate {', '.join(f'{t:g}' for t in targets)}\n"
                f"real rate {min(real):.3g}" + (f"-{max(real):.3g}" if max(real) - min(real) > 5e-4 else ""))
        ax.text(x + box_w / 2, h + 0.1 + math.ceil(len(rows) / per_row) * q * 1.1, text, ha="center",
                va="bottom", fontsize=7.5)
    kinds = [k for k in SITE_COLORS if any(r.kind == k for r in plan.rows)]
    if kinds:
        ax.legend(handles=[Patch(color=SITE_COLORS[k], label=k) for k in kinds], loc="upper right",
                  fontsize=8, title="DropBlock sites", title_fontsize=8, frameon=False)
    ax.set_xlim(-0.2, n * (box_w + gap) - gap + 0.2 + (1.0 if kinds else 0))
    ax.set_ylim(-0.6, 1.75 + 0.16 * square_rows)
    ax.axis("off")
    recipe = plan.recipe.name or "custom recipe"
    where = f", target {plan.target}" if plan.target else ""
    ax.set_title(f"{model_spec}: recipe {recipe}, {len(plan.rows)} DropBlock modules, input "
                 f"{size(plan.input_shape[1:])}{where}\nstage boxes: feature map (side, channels); "
                 "squares: one DropBlock module each; hatched: one block, to the map's scale", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
