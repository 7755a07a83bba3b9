"""The mechanism, measured on a trained network: drop a fraction ``p`` of one stage's feature map
with dropout or with DropBlock and see how much of it reaches the next stage and the logits.

The paper's argument: units of a convolutional feature map are spatially correlated, so a
unit dropped alone is filled in from its neighbours by the next convolutions, and dropout
removes little information; a dropped block has no kept neighbours inside it. If that holds,
at the same dropped fraction a block changes the next stage's output and the logits more.

Every method drops the same expected fraction ``p`` (``calibrate=True``: the seed rate solved
for the exact rate on this map, overlaps included) with a mask per sample and channel, and the
output is rescaled by the kept fraction (the paper's normaliser), so only the shape of what is
dropped differs. Dropout is DropBlock with a 1x1 block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["ProbeResult", "stage_module", "relative_change", "probe"]


@dataclass
class ProbeResult:
    """Per method and drop rate: the relative change of the dropped map itself, of the next
    stage's output and of the logits, and the fraction of predictions that changed; one value
    per batch of the validation set."""

    stage: str
    next_stage: str
    resolution: tuple[int, ...]
    rates: list[float]
    methods: list[str]
    blocks: list[int]
    # method -> measure -> one list per rate, one value per batch
    values: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)

    MEASURES = ("map", "next", "logits", "flips")


def stage_module(model: nn.Module, plan: Any, index: int) -> tuple[str, nn.Module]:
    """The module whose output is stage ``index``'s feature map: the stage's last module."""
    for s in plan.stages:
        if s.index == index:
            names = [m for m in s.modules if m != "|"]
            if names:
                return s.name, model.get_submodule(names[-1])
    have = ", ".join(str(s.index) for s in plan.stages)
    raise ValueError(f"--probe-stage {index}: the model's stages are {have}, and a stage after it is needed")


def relative_change(after: torch.Tensor, before: torch.Tensor) -> float:
    """``||after - before|| / ||before||`` over the whole batch.

    Examples:
        >>> round(relative_change(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 0.0])), 4)
        1.3333
    """
    return float((after - before).norm() / before.norm().clamp_min(1e-12))


@torch.no_grad()
def probe(model: nn.Module, plan: Any, x: torch.Tensor, stage: int, rates: Sequence[float],
          blocks: Sequence[int] = (3, 5), batch: int = 60, seed: int = 0) -> ProbeResult:
    """Measure, on ``model`` in eval mode, what dropping ``rates`` of stage ``stage``'s map with
    dropout and with DropBlock of each size in ``blocks`` changes downstream (see the module
    docstring). ``x`` is cut into batches of ``batch``: the spread over batches is reported."""
    from ...op import drop_block

    model.eval()
    name, here = stage_module(model, plan, stage)
    next_name, after = stage_module(model, plan, stage + 1)
    methods = [("dropout", 1)] + [(f"DropBlock {k}x{k}", k) for k in blocks]
    gen = torch.Generator().manual_seed(seed)
    seen: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {"p": 0.0, "k": 1}

    def drop(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        seen["map_clean"] = output.clone()  # later modules may work in place
        out = drop_block(output, state["p"], state["k"], calibrate=True, generator=gen)  # p = 0: output
        seen["map"] = out.clone()
        return out

    def keep(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        seen["next"] = output.clone()

    hooks = [here.register_forward_hook(drop), after.register_forward_hook(keep)]
    res = ProbeResult(name, next_name, (), list(rates), [m for m, _ in methods], list(blocks))
    try:
        for label, _ in methods:
            res.values[label] = {m: [[] for _ in rates] for m in ProbeResult.MEASURES}
        for i in range(0, len(x), batch):
            xb = x[i:i + batch]
            state["p"] = 0.0
            logits0 = model(xb)
            map0, next0 = seen["map_clean"], seen["next"]
            res.resolution = tuple(map0.shape[2:])
            for label, k in methods:
                for j, p in enumerate(rates):
                    state["p"], state["k"] = p, k
                    logits = model(xb)
                    v = res.values[label]
                    v["map"][j].append(relative_change(seen["map"], map0))
                    v["next"][j].append(relative_change(seen["next"], next0))
                    v["logits"][j].append(relative_change(logits, logits0))
                    v["flips"][j].append(float((logits.argmax(1) != logits0.argmax(1)).float().mean()))
    finally:
        for h in hooks:
            h.remove()
    return res
