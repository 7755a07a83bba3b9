"""Stages: groups of layers at one *nominal* output stride, numbered so the paper's groups keep
their meaning on every family.

The rule, in three parts:

1. **Stage index.** Stage ``k`` is the part of the network at nominal output stride
   ``2 ** (k + 1)`` (ResNet-50: stage 3 = ``layer3`` at stride 16, stage 4 = ``layer4`` at
   stride 32); strides 1 and 2 are both stage 0; a stride where no conv runs (VGG's trailing
   max-pool) is not a stage, nor is a stride past every other, entered by pooling, where only
   pointwise layers (1x1 convs, norms, activations) make maps: a pyramid-pooling branch
   (PSPNet, UPerNet, AHNet) belongs to the stage it returns to. A map a stride collapsed to
   1x1 is a stage (with no site); squeeze-excitation vectors, pooled maps and maps pooled to
   a fixed number of bins (adaptive pools: PSPNet's 1, 2, 3, 6) are not feature maps.
2. **Nominal stride.** A feature map's nominal stride is its real stride times the dilation
   that replaced the missing strides (DeepLab, ``replace_stride_with_dilation``, timm's
   ``output_stride``). That dilation is read per *group*: the outermost module whose every
   call runs at one real stride (``layer3`` of a dilated ResNet). A group's dilation is the
   smallest dilation of its spatial convs, not counting its first conv-holding child (the
   block where the stride was removed keeps the previous dilation): a power of two ``d > 1``
   there means the group runs at ``d`` times its real stride. Everything downstream of a
   dilated group (a head fed by it) keeps its factor until an upsampling resets it. Parallel
   branches that mix dilations (selective-kernel nets) or non-power-of-two rates (ASPP) are
   not a replaced stride.
3. **Blocks.** A block (a module with its own ``forward``, one feature-map output, whose
   inside runs at its output's stage or the one before) and every site inside it belong to
   the stage of the block's *output*: ResNet's ``layer4.0.conv1`` at 14x14 is stage 4, as is
   EfficientNet's first block of the stride-32 group. A module whose inside runs deeper than
   its output (a nested U-Net's skip block, a decoder block that convolves before it
   upsamples) is not a block: each part keeps its own stage. Loose layers (in plain
   ``nn.Sequential`` containers or at the top level) belong to the stage of their own output.

Names come from timm's ``feature_info`` where the model has it, else from the outermost
modules of the stage (``layer3``, ``features.4..features.5``); ``Stage.modules`` always
lists the outermost modules whose every call is in the stage.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .feature_maps import FeatureMaps
from .leaves import is_act_module, is_container, is_conv, is_identity, is_norm
from .shapes import Call, ShapeRecord

__all__ = ["Stage", "StageMap", "stage_of_shape", "map_stages", "find_stages"]


@dataclass
class Stage:
    """One stage: its index, name, nominal stride, real feature-map size, the dilation that
    stands for the missing stride (1: none), its outermost modules in call order and its
    real stride per spatial axis (input size / map size: not a power of two with valid
    padding, different per axis on a net that pools one axis only)."""

    index: int
    name: str
    stride: int
    resolution: tuple[int, ...]
    dilation: int = 1
    modules: tuple[str, ...] = ()
    real_stride: tuple[float, ...] = ()

    @property
    def reduction(self) -> int:
        return self.stride

    @property
    def rule(self) -> str:
        """Why these maps are this stage: their real stride, or the real stride times the
        dilation that replaced the missing strides; the real stride per axis where it is not
        the nominal one.

        Examples:
            >>> Stage(4, "block8", 32, (3, 3), real_stride=(53.3, 53.3)).rule
            'stride 32 (real 53.3)'
            >>> Stage(3, "layer3", 16, (2, 16), real_stride=(16.0, 2.0)).rule
            'stride 16 (real 16x2)'
        """
        if self.dilation > 1:
            text = f"stride {self.stride} = {self.stride // self.dilation} x dilation {self.dilation}"
        else:
            text = f"stride {self.stride}"
        real = self.stride // self.dilation
        if self.real_stride and any(abs(r - real) > 0.05 for r in self.real_stride):
            shown = [f"{r:g}" for r in self.real_stride]
            text += f" (real {shown[0] if len(set(shown)) == 1 else 'x'.join(shown)})"
        return text

    @property
    def span(self) -> str:
        """The stage's modules as call-order runs: ``layer3.0..layer3.5``; runs that other
        stages interrupt (a U-Net's encoder and decoder) are joined with ``+``."""
        return " + ".join(a if a == b else f"{a}..{b}" for a, b in _runs(self.modules)) or self.name


    def span_within(self, width: int = 72) -> str:
        """[`span`][dropblock_fx.graph.stages.Stage.span] cut after the last whole run that fits in about ``width`` characters,
        saying how many runs are left (HRNet's stages interleave in every module).

        Examples:
            >>> Stage(3, "stage3", 16, (14, 14), modules=("a", "|", "b", "|", "c")).span_within(6)
            'a + b + 1 more'
        """
        runs = self.span.split(" + ")
        out = runs[0]
        for i, r in enumerate(runs[1:], 1):
            if len(out) + 3 + len(r) > width:
                return f"{out} + {len(runs) - i} more"
            out += " + " + r
        return out


def _runs(modules: tuple[str, ...]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for m in modules:
        if m.startswith("|"):  # a break marker: the next module starts a new run
            out.append(("", ""))
            continue
        if out and out[-1][0]:
            out[-1] = (out[-1][0], m)
        else:
            if out and not out[-1][0]:
                out.pop()
            out.append((m, m))
    return [r for r in out if r[0]]


def _ratio_log(input_shape: tuple[int, ...], shape: tuple[int, ...]) -> Optional[int]:
    """log2 of the real reduction of a feature map, by its size alone (None: not a feature map
    of this input); see :class:`Steps` for the main path's own steps."""
    if len(shape) != len(input_shape) or len(shape) not in (4, 5) or min(shape[2:]) <= 0:
        return None
    # H and W must be reduced by the same power of two: this also rejects
    # channels-last tensors (N, H, W, C) inside blocks such as ConvNeXt's.
    # (H, W) only: video nets often keep or halve the temporal dim at their own pace.
    logs = {round(math.log2(i / o)) for i, o in zip(input_shape[-2:], shape[-2:])}
    return logs.pop() if len(logs) == 1 else None


_PADS = tuple(getattr(nn.modules.padding, n) for n in
              ("_ConstantPadNd", "_ReflectionPadNd", "_ReplicationPadNd", "_CircularPadNd")
              if hasattr(nn.modules.padding, n))


def _layer_steps(m: nn.Module) -> Optional[int]:
    """How many halvings a strided layer (a conv, a pooling layer) makes: log2 of its largest
    stride (``stride=(2, 1)`` halves one axis: one step); 0 for a padding layer (a padded map
    is its input's, made larger: efficientnet_pytorch's TF "same" padding). None for anything
    else."""
    if isinstance(m, _PADS):
        return 0
    stride = getattr(m, "stride", None)
    if not isinstance(m, nn.Module) or stride is None or isinstance(stride, bool):
        return None
    try:
        s = max(int(x) for x in stride) if isinstance(stride, (tuple, list)) else int(stride)
    except (TypeError, ValueError):
        return None
    return round(math.log2(s)) if s >= 1 else None


class Steps:
    """The downsampling steps of the main path: for each spatial size (H, W) of its maps, how
    many halvings of the input it took (log2 of the nominal stride).

    Sizes are visited in the order they were produced; a new size made by a strided layer
    (a conv or pooling layer) is its input's steps plus log2 of the layer's stride, whatever
    its padding (a valid 3x3 stride-2 conv takes 160 px to 79, 38, 17, 8, 3: one step each)
    and whichever axis it shrinks (``MaxPool2d((2, 1))`` halves the height: one step). A
    stride-1 layer that shrinks a map (valid padding) adds none, nor does a padding layer
    that enlarges one. Sizes made otherwise
    (functional pooling inside a custom module) count ``round(log2(input / size))`` steps when
    both axes agree.

    Examples:
        >>> from dropblock_fx.graph.shapes import record_calls
        >>> m = nn.Sequential(nn.Conv2d(3, 8, 3, 2), nn.Conv2d(8, 8, 3, 2), nn.MaxPool2d((2, 1)))
        >>> steps = Steps(record_calls(m, (3, 160, 160)))
        >>> sorted(steps.table.items(), key=lambda kv: kv[1])
        [((160, 160), 0), ((79, 79), 1), ((39, 39), 2), ((19, 39), 3)]
    """

    def __init__(self, record: ShapeRecord) -> None:
        self.input_shape = record.input_shape
        inp = tuple(record.input_shape[-2:])
        table: dict[tuple[int, ...], int] = {inp: 0}
        self.lost = 0  # strided layers that ran on 1x1 maps: steps the input was too small for
        for c in sorted(record.calls, key=lambda c: c.end):  # a producer ends before its users
            s = _out_shape(c)
            if s is None or len(s) != len(record.input_shape) or s[0] != record.input_shape[0]:
                continue
            size = s[-2:]
            if not record.on_main_path(c.output):
                continue
            if all(d == 1 for d in size) and (_layer_steps(c.module) or 0) > 0 and is_conv(c.module):
                first = next((t for t in _tensors((c.args, c.kwargs)) if t.dim() == len(s)), None)
                self.lost += first is not None and all(d == 1 for d in first.shape[-2:])
            if size in table or min(size) <= 0:
                continue
            n = _layer_steps(c.module)
            if n is None:
                continue  # not a strided layer: its size is looked up by the ratio (see log)
            first = next((t for t in _tensors((c.args, c.kwargs)) if t.dim() == len(s)), None)
            source = tuple(first.shape[-2:]) if first is not None else None
            base = table.get(source) if source is not None else None
            if base is None and source is not None:
                base = _ratio_log(self.input_shape, first.shape)
            if base is not None and all(d == 1 for d in size) and not any(d > 1 for d in source or ()):
                continue  # a 1x1 from a 1x1: no map
            if base is not None:
                table[size] = base + n
        self.table = table

    def log(self, shape: tuple[int, ...]) -> Optional[int]:
        """Steps of a feature map of ``shape`` (None: not a feature map of this input)."""
        if len(shape) != len(self.input_shape) or len(shape) not in (4, 5) or min(shape[2:]) <= 0:
            return None
        found = self.table.get(tuple(shape[-2:]))
        return found if found is not None else _ratio_log(self.input_shape, shape)


def _stage(log: int) -> Optional[int]:
    return max(0, log - 1) if log >= 0 else None


def stage_of_shape(input_shape: tuple[int, ...], shape: tuple[int, ...]) -> Optional[int]:
    """Stage of a feature map of ``shape`` for an input of ``input_shape`` by its real stride
    (None: not spatial). `map_stages` adds dilation and the block rule.

    Examples:
        >>> stage_of_shape((1, 3, 224, 224), (1, 1024, 14, 14))
        3
    """
    log = _ratio_log(input_shape, shape)
    return None if log is None else _stage(log)


def _out_shape(call: Call) -> Optional[tuple[int, ...]]:
    out = call.output
    if isinstance(out, torch.Tensor) and out.dim() in (4, 5):
        return tuple(int(s) for s in out.shape)
    return None


def _feature_log(record: ShapeRecord, call: Call, steps: "Steps",
                 collapsed: frozenset[int] = frozenset()) -> Optional[int]:
    """log2 of the call's output stride; None for no feature map. A 1x1 output is a feature map
    only where a stride collapsed a real map (``collapsed``): SE vectors and pooled maps are not;
    nor is a tensor of another batch (windows) or on a side branch (a pooled gate, attention
    logits): see ``graph.feature_maps``."""
    s = _out_shape(call)
    if s is None or (all(d == 1 for d in s[2:]) and id(call.output) not in collapsed):
        return None
    if s[0] != record.input_shape[0] or not record.on_main_path(call.output):
        return None  # a window partition or per-head tensor; a side branch
    return steps.log(s)


_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d)


def _collapsed(record: ShapeRecord, steps: Steps) -> frozenset[int]:
    """Ids of 1x1 outputs that are feature maps: a strided conv that reduced a real map to 1x1
    (ResNet's ``layer4`` at a 32 px input), and what is computed from those, one stride past
    the deepest real map (a conv whose kernel covers the map, as VGG's ``ConvMlp``, is a head)."""
    ids: set[int] = set()
    deepest = max((log for c in record.calls if (log := _feature_log(record, c, steps)) is not None), default=None)
    if deepest is None:
        return frozenset()
    for c in sorted(record.calls, key=lambda c: c.end):  # a producer ends before its users
        s = _out_shape(c)
        if s is None or not all(d == 1 for d in s[2:]) or steps.log(s) != deepest + 1:
            continue
        first = next((t for t in _tensors((c.args, c.kwargs)) if t.dim() in (4, 5)), None)
        if first is None:
            continue
        if isinstance(c.module, _GLOBAL_POOLS):
            continue  # the classifier's pooled vector is not a feature map, even of a 1x1 stage
        strided = is_conv(c.module) and max(c.module.stride) > 1  # not a kernel covering the map (VGG's ConvMlp)
        if id(first) in ids or (strided and any(d > 1 for d in first.shape[2:])):
            ids.add(id(c.output))
    return frozenset(ids)


@dataclass
class StageMap:
    """Every recorded call's stage, and the model's stages.

    ``by_call`` (call index -> stage) is what sites use: nominal stride, block rule applied.
    ``nominal`` is before the block rule; ``factor`` the dilation factor of each call.
    """

    record: ShapeRecord
    stages: list[Stage]
    by_call: dict[int, int]
    nominal: dict[int, int]
    factor: dict[int, int]
    steps: Optional[Steps] = None

    def __post_init__(self) -> None:
        if self.steps is None:
            self.steps = Steps(self.record)

    def of_call(self, call: Optional[Call]) -> Optional[int]:
        return None if call is None else self.by_call.get(self.record.position[id(call)])

    def factor_of(self, call: Optional[Call]) -> int:
        return 1 if call is None else self.factor.get(self.record.position[id(call)], 1)

    def feature_maps(self) -> FeatureMaps:
        """The stage maps (spatial sizes of each stage's main-path maps, block rule applied)
        and the recorded batch: what ``graph.feature_maps`` compares a site's tensor with."""
        by_stage: dict[int, set[tuple[int, ...]]] = {}
        # conv outputs only: they are always N, C, H, W, while a channels-last N, H, W, C
        # output can pass for a map (H, W) when C is close to W
        convs = [i for i in self.by_call if is_conv(self.record.calls[i].module)]
        for i in convs or self.by_call:
            s = _out_shape(self.record.calls[i])
            if s is not None:
                by_stage.setdefault(self.by_call[i], set()).add(s[-2:])
        return FeatureMaps(self.record.input_shape[0], {k: frozenset(v) for k, v in by_stage.items()})

    def of_shape(self, shape: tuple[int, ...], near: Optional[Call] = None) -> Optional[int]:
        """The stage of a feature map of ``shape`` computed next to ``near`` (same dilation)."""
        log = self.steps.log(shape)  # type: ignore[union-attr]
        if log is None:
            return None
        return _stage(log + int(math.log2(self.factor_of(near))))


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _dilation(conv: nn.Module) -> Optional[int]:
    """A spatial conv's dilation over H, W (None: 1x1 kernel, where dilation means nothing)."""
    k, d = tuple(conv.kernel_size), tuple(conv.dilation)
    if max(k[-2:]) <= 1:
        return None
    return max(d[-2:])


def _children(m: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    return [(f"{path}.{n}" if path else n, c) for n, c in m.named_children()]


def _dilation_factors(root: nn.Module, record: ShapeRecord, end: list[int],
                      logs: dict[int, Optional[int]], steps: Steps) -> dict[int, int]:
    """Call index -> the dilation that stands for strides removed upstream (rule part 2);
    ``logs``: each call's output stride as a power of two (None: no feature map)."""
    calls = record.calls
    position = record.position

    def indices(m: nn.Module) -> list[int]:
        return [position[id(c)] for c in record.by_module.get(id(m), ())]

    def inside(m: nn.Module) -> Iterator[int]:
        for i in indices(m):
            yield from range(i, end[i])

    group_of: dict[int, int] = {}
    group_d: dict[int, int] = {}
    called = {c.module for c in calls}

    def conv_dilations(m: nn.Module) -> list[int]:
        """Dilations of the spatial convs under ``m`` that ran."""
        ds = (_dilation(sub) for sub in m.modules() if is_conv(sub) and sub in called)
        return [d for d in ds if d is not None]

    def find_groups(m: nn.Module) -> None:
        own = indices(m)
        kids = list(m.children())
        if own and kids:
            seen = {logs[j] for j in inside(m)} - {None}
            if len(seen) == 1:
                per_kid = [(min(indices(c), default=len(calls)), ds) for c in kids if (ds := conv_dilations(c))]
                holders = [ds for _, ds in sorted(per_kid, key=lambda t: t[0])]
                pool = holders[1:] if len(holders) > 1 else holders
                ds = [d for kid in pool for d in kid]
                d = min(ds) if ds else 1
                d = d if d > 1 and d & (d - 1) == 0 else 1
                for i in own:
                    group_d[i] = d
                    for j in range(i + 1, end[i]):
                        group_of[j] = i
                return
        for c in kids:
            find_groups(c)

    find_groups(root)
    factor: dict[int, int] = {}
    produced: dict[int, int] = {}  # id(tensor) -> factor of the call that returned it
    parent: list[Optional[int]] = [None] * len(calls)
    stack: list[int] = []
    for i in range(len(calls)):
        while stack and end[stack[-1]] <= i:
            stack.pop()
        parent[i] = stack[-1] if stack else None
        stack.append(i)
    pending: list[tuple[int, int]] = []  # (end, call index): outputs are known at a call's end
    for i, c in enumerate(calls):
        while pending and pending[0][0] < c.start:
            _, k = heapq.heappop(pending)
            for t in _tensors(calls[k].output):
                produced.setdefault(id(t), factor[k])
        if i in group_of:
            f = factor[group_of[i]]
        else:
            first = next((t for t in _tensors((c.args, c.kwargs)) if t.dim() in (4, 5)), None)
            p = parent[i]
            f = produced.get(id(first), factor[p] if p is not None else 1) if first is not None else \
                (factor[p] if p is not None else 1)
            in_log = steps.log(tuple(first.shape)) if first is not None else None
            if logs[i] is not None and in_log is not None and logs[i] < in_log:
                f = 1  # upsampled: a decoder's maps mean their real resolution
            f = max(f, group_d.get(i, 1))
        factor[i] = f
        heapq.heappush(pending, (c.end, i))
    return factor


def _block_rule(root: nn.Module, record: ShapeRecord, nominal: dict[int, int], end: list[int]) -> dict[int, int]:
    """Rule part 3: every call inside an outermost block takes the block's output stage."""
    position = record.position
    by_call = dict(nominal)

    def visit(m: nn.Module, path: str) -> None:
        calls = record.by_module.get(id(m), ())
        if path and calls and not is_container(m) and any(True for _ in m.children()):
            outs = {nominal.get(position[id(c)]) for c in calls}
            if len(outs) == 1 and None not in outs and all(_out_shape(c) is not None for c in calls):
                s = outs.pop()
                assert s is not None
                inner = {nominal[j] for c in calls for j in range(position[id(c)], end[position[id(c)]])
                         if j in nominal}
                if max(inner) <= s and min(inner) >= s - 1:
                    for c in calls:
                        i = position[id(c)]
                        for j in range(i, end[i]):
                            if j in by_call:
                                by_call[j] = s
                    return
        for p, c in _children(m, path):
            visit(c, p)

    visit(root, "")
    return by_call


def map_stages(root: nn.Module, record: ShapeRecord) -> StageMap:
    """Stages of ``root`` from its shape pass (the module docstring's rule).

    Examples:
        >>> import torchvision
        >>> from dropblock_fx.graph.shapes import record_calls
        >>> m = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True])
        >>> sm = map_stages(m, record_calls(m, (3, 224, 224)))
        >>> [(s.name, s.stride, s.resolution, s.dilation) for s in sm.stages[3:]]
        [('layer3', 16, (28, 28), 2), ('layer4', 32, (28, 28), 4)]
    """
    end = record.ends
    steps = Steps(record)
    collapsed = _collapsed(record, steps)
    binned = _binned(record)
    logs = {i: None if id(c.output) in binned else _feature_log(record, c, steps, collapsed)
            for i, c in enumerate(record.calls)}
    factor = _dilation_factors(root, record, end, logs, steps)
    nominal: dict[int, int] = {}
    for i, log in logs.items():
        if log is not None:
            st = _stage(log + int(math.log2(factor.get(i, 1))))
            if st is not None:
                nominal[i] = st
    by_call = _block_rule(root, record, nominal, end)
    stages = find_stages(root, record, nominal, by_call, factor, steps)
    return StageMap(record, stages, by_call, nominal, factor, steps)


def find_stages(root: nn.Module, record: ShapeRecord, stages_by_call: dict[int, int],
                site_stages: Optional[dict[int, int]] = None,
                factor: Optional[dict[int, int]] = None, steps: Optional[Steps] = None) -> list[Stage]:
    """The model's stages in order, with names, strides, resolutions and modules."""
    site_stages = stages_by_call if site_stages is None else site_stages
    factor = factor or {}
    steps = steps or Steps(record)
    res: dict[int, tuple[int, ...]] = {}
    conv_res: dict[int, tuple[int, ...]] = {}
    dil: dict[int, int] = {}
    exact: set[int] = set()  # stages whose resolution is at their own stride (stage 0: 2, not 1)
    for i, st in sorted(stages_by_call.items()):
        shape = _out_shape(record.calls[i])[2:]  # type: ignore[index]
        on_stride = _feature_log(record, record.calls[i], steps) == st + 1 - int(math.log2(factor.get(i, 1)))
        if st in exact and not on_stride:
            continue
        res[st] = shape
        if is_conv(record.calls[i].module):
            conv_res[st] = shape
            dil[st] = factor.get(i, 1)
            if on_stride:
                exact.add(st)
    # A stride with no conv output (VGG's and AlexNet's last max-pool) is not a stage: the
    # "two deepest stages" of VGG are its two deepest groups of convs. Resolutions come from
    # conv outputs, which are always N, C, H, W (a channels-last N, H, W, C output can pass
    # for a feature map when C is close to W).
    if conv_res:
        res = conv_res
    # Nor is a stride past the network's deepest, entered by pooling, where only pointwise
    # layers run (1x1 convs, norms, activations): a pyramid-pooling branch (PSPNet's and
    # UPerNet's pooled bins, AHNet's pooled projections: pool, 1x1 conv, upsample back) is
    # part of the stage it comes back to.
    pooled = _pooled_branches(record, stages_by_call)
    if any(st not in pooled for st in res):
        res = {st: r for st, r in res.items() if st not in pooled}
    modules = _stage_modules(root, record, site_stages)
    names = _feature_info_names(root, record, stages_by_call)
    stages = []
    for st in sorted(res):
        mods = tuple(modules.get(st, ()))
        plain = " + ".join(a if a == b else f"{a}..{b}" for a, b in _runs(mods))
        real = tuple(round(i / o, 1) for i, o in zip(record.input_shape[-2:], res[st][-2:]))
        stages.append(Stage(st, names.get(st) or plain or f"stage{st}", 2 ** (st + 1), res[st],
                            dil.get(st, 1), mods, real))
    return stages


def _binned(record: ShapeRecord) -> frozenset[int]:
    """Ids of maps pooled to a fixed number of bins (an adaptive pool that changed the map's
    size: PSPNet's and UPerNet's pyramid of 1, 2, 3 and 6 bins) and of what pointwise layers
    compute from them at that size: their size follows the bins, not the input, so they are
    not feature maps of any stride."""
    ids: set[int] = set()
    for c in sorted(record.calls, key=lambda c: c.end):  # a producer ends before its users
        s = _out_shape(c)
        first = next((t for t in _tensors((c.args, c.kwargs)) if t.dim() in (4, 5)), None)
        if s is None or first is None:
            continue
        if isinstance(c.module, _GLOBAL_POOLS):
            if tuple(first.shape[2:]) != s[2:]:
                ids.add(id(c.output))
        elif id(first) in ids and tuple(first.shape[2:]) == s[2:] and _pointwise(c.module) is not None:
            ids.add(id(c.output))
    return frozenset(ids)


def _pointwise(m: nn.Module) -> Optional[str]:
    """``"pool"``, ``"pointwise"`` (a 1x1 conv, a norm, an activation, an identity, dropout, or a
    plain container of those), or None for any other module."""
    if isinstance(m, _POOLS):
        return "pool"
    if is_conv(m):
        return "pointwise" if all(k == 1 for k in m.kernel_size) else None
    if is_norm(m) or is_act_module(m) or is_identity(m) or isinstance(m, nn.modules.dropout._DropoutNd):
        return "pointwise"
    if _runs_children(m):
        return "pointwise" if all(_pointwise(c) is not None for c in m.children()) else None
    return None


def _runs_children(m: nn.Module) -> bool:
    """A plain container, or a subclass of ``nn.Sequential`` that keeps its ``forward``
    (segmentation-models-pytorch's ``Conv2dReLU``): its calls are its children's."""
    return is_container(m) or type(m).forward is nn.Sequential.forward


_POOLS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
          nn.modules.pooling._AdaptiveMaxPoolNd)


def _pooled_branches(record: ShapeRecord, stages_by_call: dict[int, int]) -> set[int]:
    """Strides deeper than any other whose maps come only from pooling layers and pointwise
    layers (1x1 convs, norms, activations, identities, dropout): at least one pool, and no other
    module (a spatial conv, an attention block or any module of unknown kind) makes a map there."""
    kinds: dict[int, set[str]] = {}
    for i, st in stages_by_call.items():
        m = record.calls[i].module
        if _runs_children(m):
            continue  # its layers are counted themselves
        kinds.setdefault(st, set()).add(_pointwise(m) or "other")
    pooled = {st for st, k in kinds.items() if "pool" in k and k <= {"pool", "pointwise"}}
    # Only past the deepest stride where anything else runs: a branch that pools deeper than
    # the network goes. (ShuffleNetV2's max-pool at stride 4, before the next block's 1x1 conv,
    # is on the way down and keeps its stage.)
    deepest = max((st for st in kinds if st not in pooled), default=None)
    return {st for st in pooled if deepest is not None and st > deepest}


def _stage_modules(root: nn.Module, record: ShapeRecord, by_call: dict[int, int]) -> dict[int, list[str]]:
    """Per stage, the outermost modules whose every call is in it, in call order; a ``|``
    marks where another stage's modules come in between."""
    position, end = record.position, record.ends
    found: list[tuple[int, str, int]] = []  # (first call, path, stage)

    def visit(m: nn.Module, path: str) -> None:
        for p, c in _children(m, path):
            calls = record.by_module.get(id(c), ())
            sts = {by_call[j] for call in calls for j in range(position[id(call)], end[position[id(call)]])
                   if j in by_call}
            if not sts and calls:
                continue
            if len(sts) == 1 and calls:
                found.append((position[id(calls[0])], p, sts.pop()))
            else:
                visit(c, p)

    visit(root, "")
    found.sort()
    out: dict[int, list[str]] = {}
    last: Optional[int] = None
    for _, p, st in found:
        mods = out.setdefault(st, [])
        if mods and last != st:
            mods.append("|")
        mods.append(p)
        last = st
    return out


def _feature_info_names(root: nn.Module, record: ShapeRecord, nominal: dict[int, int]) -> dict[int, str]:
    info: Any = getattr(root, "feature_info", None)
    if info is None:
        return {}
    position = record.position
    try:
        entries = list(info.info) if hasattr(info, "info") else list(info)
        found: dict[int, list[str]] = {}
        for e in entries:
            module, red = e["module"], int(e["reduction"])
            st = max(0, round(math.log2(red)) - 1) if red >= 1 else 0
            try:  # the module's own output says its nominal stage (dilated nets report real strides)
                calls = record.by_module.get(id(root.get_submodule(module)), ())
                st = nominal.get(position[id(calls[-1])], st) if calls else st
            except AttributeError:
                pass
            found.setdefault(st, []).append(module)
        # two entries of one stage: "a+b"; an isotropic run of blocks (ConvMixer): "first..last"
        return {st: "+".join(ms) if len(ms) <= 2 else f"{ms[0]}..{ms[-1]}" for st, ms in found.items()}
    except Exception:  # noqa: BLE001 - not timm's format: fall back to module names
        return {}
