"""The result of planning: [`PlanRow`][dropblock_fx.PlanRow] (one DropBlock module) and [`Plan`][dropblock_fx.Plan].

A plan is plain data (picklable): its rows say, for every DropBlock module, the stage, the
feature resolution at the recipe's input size, the module path, the site kind, the block
size after clipping, the target rate and the expected real rate.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Any, Optional

from ..graph.stages import Stage
from ..op.options import DEFAULT_OPTIONS, DropBlockOptions
from ..recipe.schema import Recipe

__all__ = ["PlanRow", "Plan", "legend"]

# What each site kind means, for the legend under plan tables (the recipe's `sites:` words).
SITE_WORDS = {
    "conv": "after a conv + norm (+ act) inside a block",
    "conv_last": "after a residual branch's last conv + norm, before the add",
    "shortcut": "on the shortcut into the residual add",
    "block": "on a block's output",
    "timm": "in timm's own drop_block slots",
}


def legend(kinds: list[str], width: int = 100) -> list[str]:
    """The legend under a plan table: the site kinds shown, and what the two rates are (each
    wrapped at ``width`` characters).

    Examples:
        >>> print(legend(["conv", "shortcut"])[0])
        sites: conv = after a conv + norm (+ act) inside a block; shortcut = on the shortcut into the
          residual add
    """
    words = "; ".join(f"{k} = {SITE_WORDS[k]}" for k in kinds if k in SITE_WORDS)
    lines = ([f"sites: {words}"] if words else []) + [
        "drop rate: the recipe's target (reached at the end of its schedule); real rate: the fraction "
        "expected to be dropped (lower where blocks overlap or are clipped to the map)"]
    return [textwrap.fill(line, width, subsequent_indent="  ") for line in lines]


_SEEN = ("seen_resolution", "seen_block_size", "seen_expected_drop_prob", "skipped_at")


@dataclass(frozen=True)
class PlanRow:
    """One DropBlock module of a plan.

    ``owns_input``: the module is the only reader of a batch or group norm's output, so its
    eager training forwards write into that tensor instead of a new one (same outputs and
    gradients; see `dropblock_fx.modules.Placement`). ``before_relu``: a ReLU alone reads its
    output, so its backward skips applying the mask again (same gradients; see `Placement`).

    The ``seen_*`` fields are filled only in [`describe`][dropblock_fx.describe]'s answer, for a module that
    trained on feature maps of another size than planned: that size, the block size clipped
    to it and the expected real rate there; ``skipped_at``, for a module that did not run at
    some sizes, its block's input sizes there.
    """

    stage: int
    stage_name: str
    resolution: tuple[int, ...]
    path: str
    kind: str
    block_size: tuple[int, ...]
    target_drop_prob: float
    expected_drop_prob: float
    anchor: str
    mechanism: str  # "graph" | "after-norm" | "after-block" | "slot"
    options: DropBlockOptions = DEFAULT_OPTIONS
    seen_resolution: tuple[int, ...] = ()
    seen_block_size: tuple[int, ...] = ()
    seen_expected_drop_prob: Optional[float] = None
    # describe() only: the input sizes of this module's block at which the block ran its original
    # forward (it could not be traced for them), so this module did not run
    skipped_at: tuple[tuple[int, ...], ...] = ()
    owns_input: bool = False
    before_relu: bool = False

    def as_dict(self) -> dict[str, Any]:
        skip = {"options"} if self.seen_resolution or self.skipped_at else {"options", *_SEEN}
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in skip}
        d["options"] = self.options._asdict()
        return d


@dataclass
class Plan:
    """Rows, the validated recipe, the model's stages and notes (fallbacks, skipped stages)."""

    rows: list[PlanRow]
    recipe: Recipe
    stages: list[Stage]
    target: str = ""
    input_shape: tuple[int, ...] = ()
    notes: list[str] = field(default_factory=list)
    # (position, why): places a site finder looked at and left out, for holding no feature map
    left_out: list[tuple[str, str]] = field(default_factory=list)
    # one line, when the input is too small for the plan to mean what its recipe says
    # (apply_dropblock warns with it)
    warning: str = ""
    # the example inputs it was planned with, as meta tensors (shapes and dtypes), or None
    example_inputs: Optional[tuple[tuple[Any, ...], dict[str, Any]]] = field(default=None, repr=False)

    def explain(self) -> str:
        """Why each position a site finder looked at was left out (a gate's branch, attention
        logits, unfolded patches, a window partition), one line each; rows dropped by the
        run check are in `notes`."""
        return "\n".join(f"left out: {where}: {why}" for where, why in self.left_out)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def as_dicts(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.rows]

    def count(self, kind: Optional[str] = None, stage: Optional[int] = None) -> int:
        return sum(1 for r in self.rows if (kind is None or r.kind == kind) and (stage is None or r.stage == stage))

    def __str__(self) -> str:
        head = ["stage", "feature map", "module", "site", "block", "drop rate", "real rate"]
        body = [[f"{r.stage} {r.stage_name}", "x".join(map(str, r.resolution)), r.path, r.kind,
                 "x".join(map(str, r.block_size)), f"{r.target_drop_prob:.4g}", f"{r.expected_drop_prob:.4g}"]
                for r in self.rows]
        if any(r.seen_resolution for r in self.rows):  # describe() after training at another size
            head += ["seen map", "seen block", "seen real rate"]
            for r, cells in zip(self.rows, body):
                cells += (["x".join(map(str, r.seen_resolution)), "x".join(map(str, r.seen_block_size)),
                           f"{r.seen_expected_drop_prob:.4g}"] if r.seen_resolution else ["-"] * 3)
        widths = [max(len(x) for x in col) for col in zip(head, *body)] if body else [len(h) for h in head]
        fmt = "  ".join(f"{{:{'<' if i < 4 else '>'}{w}}}" for i, w in enumerate(widths))
        name = self.recipe.name or "custom recipe"
        lines = [f"DropBlock plan ({name}): {len(self.rows)} modules, input {tuple(self.input_shape)}"
                 + (f", target {self.target!r}" if self.target else "")]
        lines.append("stages: " + ", ".join(
            f"{s.index}={s.name} ({s.rule}, {'x'.join(map(str, s.resolution))}"
            + (f": {s.span_within(72)}" if s.span != s.name else "") + ")" for s in self.stages))
        lines += [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row) for row in body]
        if self.rows:
            lines += legend(sorted({r.kind for r in self.rows}))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<Plan {self.recipe.name or 'custom'}: {len(self.rows)} DropBlock modules>"
