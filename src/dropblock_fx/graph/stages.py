"""Stages: groups of layers at one output stride, numbered so the paper's groups keep their meaning.

Stage ``k`` is the part of the network at output stride ``2 ** (k + 1)`` (ResNet-50: stage 3
= ``layer3`` at stride 16, stage 4 = ``layer4`` at stride 32); strides 1 and 2 are both
stage 0; a stride where no conv runs (a trailing max-pool) is not a stage. A feature map's
stage comes from its exact shape in the shape pass. Names come
from timm's ``feature_info`` where the model has it, else from the outermost modules whose
every call is at that stride (``layer3``, ``features.4..features.5``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .leaves import is_conv
from .shapes import Call, ShapeRecord

__all__ = ["Stage", "stage_of_shape", "find_stages"]


@dataclass
class Stage:
    index: int
    name: str
    stride: int
    resolution: tuple[int, ...]

    @property
    def reduction(self) -> int:
        return self.stride


def stage_of_shape(input_shape: tuple[int, ...], shape: tuple[int, ...]) -> Optional[int]:
    """Stage of a feature map of ``shape`` for an input of ``input_shape`` (None: not spatial)."""
    if len(shape) != len(input_shape) or len(shape) not in (4, 5) or min(shape[2:]) <= 0:
        return None
    # H and W must be reduced by the same power of two: this also rejects
    # channels-last tensors (N, H, W, C) inside blocks such as ConvNeXt's.
    # (H, W) only: video nets often keep or halve the temporal dim at their own pace.
    logs = {round(math.log2(i / o)) for i, o in zip(input_shape[-2:], shape[-2:])}
    if len(logs) != 1:
        return None
    log = logs.pop()
    return max(0, log - 1) if log >= 0 else None


def _out_shape(call: Call) -> Optional[tuple[int, ...]]:
    out = call.output
    if isinstance(out, torch.Tensor) and out.dim() in (4, 5):
        return tuple(int(s) for s in out.shape)
    return None


def call_stages(record: ShapeRecord) -> dict[int, int]:
    """``{call position in record.calls: stage}`` for calls with a spatial tensor output."""
    out: dict[int, int] = {}
    for i, c in enumerate(record.calls):
        s = _out_shape(c)
        if s is not None and not all(d == 1 for d in s[2:]):
            st = stage_of_shape(record.input_shape, s)
            if st is not None:
                out[i] = st
    return out


def find_stages(root: nn.Module, record: ShapeRecord, stages_by_call: dict[int, int]) -> list[Stage]:
    """The model's stages in order, with names, strides and resolutions."""
    res: dict[int, tuple[int, ...]] = {}
    conv_res: dict[int, tuple[int, ...]] = {}
    for i, st in stages_by_call.items():
        res[st] = _out_shape(record.calls[i])[2:]  # type: ignore[index]
        if is_conv(record.calls[i].module):
            conv_res[st] = res[st]
    # A stride with no conv output (VGG's and AlexNet's last max-pool) is not a stage: the
    # "two deepest stages" of VGG are its two deepest groups of convs. Resolutions come from
    # conv outputs, which are always N, C, H, W (a channels-last N, H, W, C output can pass
    # for a feature map when C is close to W).
    if conv_res:
        res = conv_res
    names = _feature_info_names(root, record)
    if not names:
        names = _module_names(root, record, stages_by_call)
    stages = []
    for st in sorted(res):
        stride = 2 ** (st + 1)
        stages.append(Stage(st, names.get(st, f"stage{st}"), stride, res[st]))
    return stages


def _feature_info_names(root: nn.Module, record: ShapeRecord) -> dict[int, str]:
    info: Any = getattr(root, "feature_info", None)
    if info is None:
        return {}
    try:
        entries = list(info.info) if hasattr(info, "info") else list(info)
        found: dict[int, list[str]] = {}
        for e in entries:
            module, red = e["module"], int(e["reduction"])
            st = max(0, round(math.log2(red)) - 1) if red >= 1 else 0
            found.setdefault(st, []).append(module)
        # two entries of one stage: "a+b"; an isotropic run of blocks (ConvMixer): "first..last"
        return {st: "+".join(ms) if len(ms) <= 2 else f"{ms[0]}..{ms[-1]}" for st, ms in found.items()}
    except Exception:  # noqa: BLE001 - not timm's format: fall back to module names
        return {}


def _module_names(root: nn.Module, record: ShapeRecord, stages_by_call: dict[int, int]) -> dict[int, str]:
    """Outermost modules whose direct children all output feature maps of one stage."""
    position = {id(c): i for i, c in enumerate(record.calls)}
    found: dict[int, list[str]] = {}

    def out_stage(m: nn.Module) -> Optional[int]:
        calls = record.by_module.get(id(m))
        return stages_by_call.get(position[id(calls[-1])]) if calls else None

    def walk(m: nn.Module, path: str) -> None:
        for name, child in m.named_children():
            p = f"{path}.{name}" if path else name
            st = out_stage(child)
            kids = {out_stage(c) for c in child.children()} - {None}
            if st is None and not kids:
                continue
            if st is None or len(kids) > 1:
                walk(child, p)
            else:
                found.setdefault(st, []).append(p)

    walk(root, "")
    return {st: (ps[0] if len(ps) == 1 else f"{ps[0]}..{ps[-1]}") for st, ps in found.items()}
