"""What a feature map is: the one rule for where a DropBlock may go.

DropBlock drops square blocks of a convolutional feature map. A tensor is a **feature map**
when all of these hold:

1. **Layout.** It is ``N, C, H, W`` (or ``N, C, D, H, W``), or the channels-last
   ``N, H, W, C`` view of one (see ``graph.sites``), not a 1x1 map.
2. **Batch.** Its first dim is the input's batch: a window partition (``B * windows``) or a
   per-head tensor (``B * heads``) is not a feature map.
3. **Stage map.** Its spatial size is one of the network's stage maps (the maps of the main
   path, see ``graph.stages``): unfolded patches ``(B, C, patch_area, n_patches)`` are not.
4. **Main path.** The network's output depends on it other than only as a **gate**, i.e.
   other than through the input of a sigmoid / hard-sigmoid / softmax, or as the broadcast
   operand of a product (``x * se``). A gate's own branch (squeeze-excitation, a pooled
   gate, attention logits and everything that only feeds them) is a **side branch**: it
   makes no stage and holds no site.

Rules 1-3 are checked on shapes; rule 4 on the data flow, both in the shape pass (whole
model, op by op: ``graph.shapes``) and in a unit's FX graph (`side_nodes`). The plan is
then checked by running it (``surgery.promise``): every DropBlock module must be called, on
a feature map of its stage.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["FeatureMaps", "gate_inputs", "side_nodes", "is_gate_module"]

# Ops whose input is read as a gate: the network's data does not flow through them.
_GATE_FUNCTIONS = {torch.sigmoid, torch.Tensor.sigmoid, torch.Tensor.sigmoid_, F.sigmoid, F.hardsigmoid,
                   torch.softmax, torch.Tensor.softmax, F.softmax, F.log_softmax, torch.log_softmax,
                   torch.Tensor.log_softmax, F.softmin, torch.special.expit}
_GATE_METHODS = {"sigmoid", "sigmoid_", "softmax", "log_softmax"}
_GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softmax, nn.Softmax2d, nn.LogSoftmax, nn.Softmin)
_MUL = {torch.mul, torch.Tensor.mul, torch.Tensor.mul_, torch.Tensor.__mul__, torch.Tensor.__rmul__,
        torch.Tensor.__imul__, operator.mul, operator.imul}
_MUL_METHODS = {"mul", "mul_"}


def is_gate_module(m: Any) -> bool:
    """A module that turns its input into a gate (sigmoid, hard-sigmoid, softmax), including
    other libraries' own classes by name (timm's ``HardSigmoid``)."""
    if isinstance(m, _GATE_MODULES):
        return True
    name = type(m).__name__.lower()
    return isinstance(m, nn.Module) and not any(True for _ in m.children()) and (
        "sigmoid" in name or "softmax" in name)


def gate_inputs(func: Any, inputs: list[torch.Tensor], output: torch.Tensor) -> set[int]:
    """Ids of the tensors among ``inputs`` that the op ``func`` reads only as a gate."""
    if func in _GATE_FUNCTIONS:
        return {id(t) for t in inputs}
    if func in _MUL and len(inputs) == 2:
        return {id(t) for t in inputs if t.shape != output.shape}
    return set()


def _is_gate_node(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_function":
        return node.target in _GATE_FUNCTIONS
    if node.op == "call_method":
        return node.target in _GATE_METHODS
    if node.op == "call_module":
        try:
            return is_gate_module(root.get_submodule(str(node.target)))
        except AttributeError:
            return False
    return False


def _broadcast_operands(node: fx.Node, values: dict[fx.Node, Any]) -> set[fx.Node]:
    mul = (node.op == "call_function" and node.target in _MUL) or (
        node.op == "call_method" and node.target in _MUL_METHODS)
    out = values.get(node)
    if not mul or not isinstance(out, torch.Tensor):
        return set()
    return {a for a in node.args[:2] if isinstance(a, fx.Node) and isinstance(values.get(a), torch.Tensor)
            and values[a].shape != out.shape}


def side_nodes(graph: fx.Graph, root: nn.Module, values: dict[fx.Node, Any]) -> set[fx.Node]:
    """The nodes of a unit's ``graph`` on a side branch (rule 4): the unit's output depends on
    them only as a gate. ``values``: each node's meta value, for the broadcast rule.

    Examples:
        >>> class SE(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Conv2d(8, 8, 1)
        ...     def forward(self, x):
        ...         return x * self.fc(x.mean((2, 3), keepdim=True)).sigmoid()
        >>> g = fx.symbolic_trace(SE()).graph
        >>> sorted(n.name for n in side_nodes(g, SE(), {}))
        ['fc', 'mean']
    """
    main: set[fx.Node] = set()
    for node in reversed(list(graph.nodes)):
        if node.op == "output":
            main.update(node.all_input_nodes)
            continue
        if node not in main or _is_gate_node(node, root):
            continue
        gates = _broadcast_operands(node, values)
        main.update(a for a in node.all_input_nodes if a not in gates)
    return {n for n in graph.nodes if n not in main and n.op not in ("output", "get_attr")}


@dataclass(frozen=True)
class FeatureMaps:
    """The network's stage maps and its batch: what rules 1-3 compare a tensor with.

    Examples:
        >>> fm = FeatureMaps(2, {3: frozenset({(14, 14), (28, 28)}), 4: frozenset({(7, 7), (14, 14)})})
        >>> fm.why_not((2, 256, 14, 14)), fm.why_not((8, 256, 7, 7))
        (None, 'its batch dim is 8, not the batch of 2 (a window partition or a per-head tensor)')
        >>> fm.why_not((2, 64, 4, 49)), fm.why_not((2, 256, 28, 28), stage=4)
        ('its spatial size 4x49 is no stage map', 'its spatial size 28x28 is not a map of stage 4')
    """

    batch: int
    by_stage: dict[int, frozenset[tuple[int, ...]]] = field(default_factory=dict)

    @property
    def spatial(self) -> frozenset[tuple[int, ...]]:
        """Every stage map's spatial size."""
        return frozenset().union(*self.by_stage.values()) if self.by_stage else frozenset()

    def why_not(self, shape: Iterable[int], stage: Optional[int] = None) -> Optional[str]:
        """Why a channels-first tensor of ``shape`` is not a feature map (of ``stage``, when
        given); None when it is."""
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (4, 5):
            return f"it is {len(shape)}-D, not N, C, (D,) H, W"
        spatial = shape[2:]
        size = "x".join(map(str, spatial))
        if all(d == 1 for d in spatial):
            return "it is a 1x1 map"
        if shape[0] != self.batch:
            return (f"its batch dim is {shape[0]}, not the batch of {self.batch} "
                    "(a window partition or a per-head tensor)")
        key = spatial[-2:]
        if key not in self.spatial:
            return f"its spatial size {size} is no stage map"
        if stage is not None and key not in self.by_stage.get(stage, frozenset()):
            return f"its spatial size {size} is not a map of stage {stage}"
        return None

    def with_batch(self, batch: int) -> "FeatureMaps":
        return FeatureMaps(batch, self.by_stage)
