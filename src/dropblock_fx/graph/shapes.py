"""One forward pass on meta tensors that records every module call (inputs, output, order)
and which tensors lie on the main path.

The model's parameters are swapped for meta tensors with ``torch.func.functional_call``
only for the duration of the call, so a ResNet-152 plan costs no real compute and no
memory. Models that create real tensors inside ``forward`` get a second try under
``FakeTensorMode``, and models with data-dependent control flow one real forward on zeros
(eval mode, no grad; the plan notes it). Every module's ``training`` flag is restored.

The pass also follows the data, op by op (a ``TorchFunctionMode``), to tell the **main path**
from side branches: a tensor is on the main path when the output depends on it other than
only as a gate, through the input of a sigmoid / softmax or as the broadcast operand of a
product (see ``graph.feature_maps``). Squeeze-excitation vectors, pooled gates and attention
logits are side branches; a U-Net's deep path, which comes back through a concatenation or
a sum, is main.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ..modes import training_mode
from .feature_maps import gate_inputs
from .meta import memo_meta

__all__ = ["Call", "ShapeRecord", "record_calls"]


@dataclass
class Call:
    """One call of one module: meta inputs and output, and its span in the call order."""

    module: nn.Module
    path: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    start: int
    end: int = -1
    output: Any = None


@dataclass
class ShapeRecord:
    """All calls of one forward pass, in order, and the input used."""

    input_shape: tuple[int, ...]
    calls: list[Call] = field(default_factory=list)
    by_module: dict[int, list[Call]] = field(default_factory=dict)
    mode: str = "meta"
    runner: str = ""  # the ancestor run to reach the target ('' : the target itself)
    runner_module: Optional[nn.Module] = None  # the module that was run
    main: Optional[frozenset[int]] = None  # ids of the tensors on the main path (None: not followed)

    @functools.cached_property
    def position(self) -> dict[int, int]:
        """``id(call)`` -> its index in :attr:`calls` (start order). Read after the pass."""
        return {id(c): i for i, c in enumerate(self.calls)}

    @functools.cached_property
    def ends(self) -> list[int]:
        """``ends[i]``: one past the index of the last call made inside call ``i``, so the calls
        inside call ``i`` are ``range(i + 1, ends[i])``. Read after the pass."""
        end = [len(self.calls)] * len(self.calls)
        stack: list[int] = []
        for i, c in enumerate(self.calls):
            while stack and self.calls[stack[-1]].end < c.start:
                end[stack.pop()] = i
            stack.append(i)
        return end

    def on_main_path(self, value: Any) -> bool:
        """Does the target's output depend on ``value`` (a recorded tensor) other than as a
        gate? True when the data was not followed."""
        return self.main is None or id(value) in self.main

    def first(self, m: nn.Module) -> Optional[Call]:
        calls = self.by_module.get(id(m))
        return calls[0] if calls else None

    def outputs_within(self, m: nn.Module, start: int, end: int) -> list[Any]:
        """Outputs of ``m``'s calls that happened inside the span ``[start, end]``."""
        return [c.output for c in self.by_module.get(id(m), ()) if start < c.start and c.end < end]


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, device="meta")


class _Reached(Exception):
    """Raised once the target's call is recorded: the rest of the runner is not needed."""


def _check_channels(name: str, x: torch.Tensor, *params: Optional[torch.Tensor]) -> None:
    for p in params:
        if p is not None and p.numel() != x.shape[1]:
            raise RuntimeError(f"{name}: a {tuple(x.shape)} input, parameters of {p.numel()} channels")


def _norm_on_meta(func: Any, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """A norm's output on a meta input, without torch's meta kernels (a batch norm costs about
    a millisecond there, most of a ResNet's pass): the input's shape, after the checks the
    real op makes on shapes. None: not one of these ops, or not on meta tensors."""
    sig = _NORMS.get(func)
    if sig is None or not args or not isinstance(args[0], torch.Tensor) or not args[0].is_meta:
        return None
    try:
        a = sig.bind(*args, **kwargs).arguments
    except TypeError:
        return None
    x = a["input"]
    if func is F.layer_norm:
        shape = tuple(a["normalized_shape"])
        if tuple(x.shape[x.dim() - len(shape):]) != shape:
            return None  # the op raises its own error
        return torch.empty_like(x)
    if x.dim() < 2:
        return None
    if func is F.group_norm:
        if x.shape[1] % a["num_groups"]:
            return None
        _check_channels("group_norm", x, a.get("weight"), a.get("bias"))
        return torch.empty_like(x)
    _check_channels(func.__name__, x, *(a.get(k) for k in ("running_mean", "running_var", "weight", "bias")))
    if func is F.batch_norm and a.get("training") and math.prod(x.shape) // x.shape[1] == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
    return torch.empty_like(x)


_NORMS = {f: inspect.signature(f) for f in (F.batch_norm, F.instance_norm, F.group_norm, F.layer_norm)}


class _Flow(TorchFunctionMode):
    """Runs the ops of a pass (norms on meta tensors by shape: ``_norm_on_meta``) and, with
    ``follow``, follows its data: for every torch op, the tensors it read (each flagged when
    read only as a gate) and the tensors it returned. Keeps every tensor it saw alive, so
    ids stay unique for the pass."""

    def __init__(self, follow: bool = True) -> None:
        super().__init__()
        self.follow = follow
        self.ops: list[tuple[tuple[tuple[int, bool], ...], tuple[int, ...]]] = []
        self.produced: set[int] = set()
        self._keep: list[Any] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = _norm_on_meta(func, args, kwargs)
        if out is None:
            out = func(*args, **kwargs)
        if not self.follow:
            return out
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if outs:
            ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            gates = gate_inputs(func, ins, outs[0])
            self.ops.append((tuple((id(t), id(t) in gates) for t in ins), tuple(id(t) for t in outs)))
            self.produced.update(id(t) for t in outs)
            self._keep.append((ins, outs))
        return out

    def add_module_call(self, call: "Call") -> None:
        """A module whose output no op produced (a scripted or C++ module): its output
        depends on all its inputs."""
        outs = [t for t in tree_leaves(call.output) if isinstance(t, torch.Tensor)]
        if outs and not any(id(t) in self.produced for t in outs):
            ins = [t for t in tree_leaves((call.args, call.kwargs)) if isinstance(t, torch.Tensor)]
            self.ops.append((tuple((id(t), False) for t in ins), tuple(id(t) for t in outs)))
            self.produced.update(id(t) for t in outs)

    def main_path(self, output: Any, inputs: Any) -> Optional[frozenset[int]]:
        """Ids of the tensors ``output`` depends on other than only as a gate; None when the
        data could not be followed back to ``inputs`` (an op no torch function reports, such
        as a TorchScript function called inside a forward, broke the chain)."""
        main = {id(t) for t in tree_leaves(output) if isinstance(t, torch.Tensor)}
        for ins, outs in reversed(self.ops):
            if any(o in main for o in outs):
                main.update(i for i, gate in ins if not gate)
        if not any(id(t) in main for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)):
            return None
        return frozenset(main)


Inputs = tuple[tuple[Any, ...], dict[str, Any]]  # a forward's positional and keyword arguments


def input_shape_of(inputs: Inputs, batch: int) -> Optional[tuple[int, ...]]:
    """The shape, at ``batch``, of the image among ``inputs``: the first 4-D or 5-D tensor (the
    one strides are measured against); None when there is none."""
    t = next((v for v in tree_leaves(inputs) if isinstance(v, torch.Tensor) and v.dim() in (4, 5)), None)
    return None if t is None else (batch, *t.shape[1:])


def fresh(value: Any) -> Any:
    """``value`` with its lists, tuples and dicts copied (tensors shared): a forward that
    writes into the list it was given (pytorchvideo's SlowFast) cannot change the caller's.

    Examples:
        >>> clips = [torch.zeros(1), torch.ones(1)]
        >>> copy = fresh((clips,))
        >>> copy[0] is clips, copy[0][0] is clips[0]
        (False, True)
    """
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(fresh(v) for v in value)
    if isinstance(value, dict):
        return {k: fresh(v) for k, v in value.items()}
    return value


def _made_like(value: Any, batch: int, make: Any) -> Any:
    """``value`` with every tensor replaced by ``make(shape, dtype)`` at ``batch``."""
    if isinstance(value, torch.Tensor):
        return make((batch, *value.shape[1:]) if value.dim() else (), value.dtype)
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(_made_like(v, batch, make) for v in value)
    if isinstance(value, dict):
        return {k: _made_like(v, batch, make) for k, v in value.items()}
    return value


def record_calls(root: nn.Module, input_size: tuple[int, ...], runners: tuple[nn.Module, ...] = (), *,
                 batch: int = 1, training: bool = False, follow: bool = True,
                 inputs: Optional[Inputs] = None) -> ShapeRecord:
    """Run ``root`` once on a meta (else fake, else real) batch of ``input_size`` inputs,
    recording the calls of ``root`` and its submodules.

    Args:
        root: the module whose calls are recorded.
        input_size: the input without the batch dim, e.g. ``(3, 224, 224)``.
        runners: ancestors of ``root`` (nearest first) to run instead when ``root`` does not
            take an image tensor (an FPN takes a dict of feature maps): the first one that
            reaches ``root`` is used, and stopped there.
        batch: the batch size.
        training: run in train mode (meta and fake passes only: a real pass is always in eval
            mode, so that it updates no running statistics).
        follow: follow the data to find the main path (``ShapeRecord.main``).
        inputs: example arguments ``(args, kwargs)`` to run with instead of one image of
            ``input_size`` (several inputs, a list of clips); their tensors are recreated at
            ``batch`` (meta, fake or zeros), and strides are measured against the first 4-D or
            5-D one.

    Raises:
        RuntimeError: when no pass can run the model.

    Examples:
        >>> m = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU())
        >>> r = record_calls(m, (3, 32, 32))
        >>> [(c.path, tuple(c.output.shape)) for c in r.calls][1:], r.on_main_path(r.calls[1].output)
        ([('0', (1, 8, 15, 15)), ('1', (1, 8, 15, 15))], True)
    """
    shape = (input_shape_of(inputs, batch) if inputs is not None else None) or (batch, *input_size)
    errors: dict[str, list[str]] = {}  # one message, the passes that raised it
    for runner in (root, *runners):
        for mode in ("meta", "fake", "real"):
            try:
                return _run(root, shape, mode, runner, training and mode != "real", follow, inputs)
            except Exception as e:  # noqa: BLE001 - try the next mode, report all
                who = "" if runner is root else f"{type(runner).__name__} "
                text = " ".join(str(e).split())
                text = text if len(text) <= 160 else text[:157] + "..."
                errors.setdefault(f"{type(e).__name__}: {text}", []).append(who + mode)
    why = "; ".join(f"{', '.join(passes)} pass: {msg}" for msg, passes in errors.items())
    raise RuntimeError(f"could not run {type(root).__name__} on an input of shape {shape} to find its stages ({why})")


def _run(root: nn.Module, shape: tuple[int, ...], mode: str, runner: nn.Module, training: bool = False,
         follow: bool = True, inputs: Optional[Inputs] = None) -> ShapeRecord:
    record = ShapeRecord(input_shape=shape, mode=mode, runner="" if runner is root else type(runner).__name__,
                         runner_module=runner)
    flow = _Flow(follow)
    counter = itertools.count()
    stack: list[Call] = []
    handles = []
    named = list(root.named_modules(remove_duplicate=False))
    seen: set[int] = set()

    def pre(path: str):
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            call = Call(mod, path, args, dict(kwargs), next(counter))
            stack.append(call)
            record.calls.append(call)
            record.by_module.setdefault(id(mod), []).append(call)
        return hook

    def post(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        call = stack.pop()
        call.end = next(counter)
        call.output = out
        if follow:
            flow.add_module_call(call)
        if mod is root:
            if follow:
                record.main = flow.main_path(out, (args, kwargs))
            if runner is not root:
                raise _Reached()

    for path, m in named:
        if id(m) in seen:
            continue
        seen.add(id(m))
        handles.append(m.register_forward_pre_hook(pre(path), with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    # a fake-tensor pass in train mode updates the real running statistics in place
    saved = [(b, b.clone()) for b in runner.buffers()] if training and mode != "meta" else []
    try:
        if mode == "meta":  # made before the pass: the parameters are no data the pass follows
            # one name per tensor: functional_call ties the other names of a shared one
            tensors = dict(itertools.chain(runner.named_parameters(), runner.named_buffers()))
            meta = {k: _meta_like(v) for k, v in tensors.items()}
        with training_mode(runner, training), torch.no_grad(), flow:
            try:
                args, kwargs = inputs if inputs is not None else ((torch.empty(shape, device="meta"),), {})
                batch = shape[0]
                if mode == "meta":
                    args, kwargs = _made_like((args, kwargs), batch, lambda s, d: torch.empty(s, dtype=d, device="meta"))
                    with memo_meta():
                        torch.func.functional_call(runner, meta, tuple(args), kwargs, strict=False, tie_weights=True)
                elif mode == "real":  # data-dependent control flow: one real forward on zeros
                    args, kwargs = _made_like((args, kwargs), batch, lambda s, d: torch.zeros(s, dtype=d))
                    runner(*args, **kwargs)
                else:
                    from torch._subclasses.fake_tensor import FakeTensorMode

                    log = logging.getLogger("torch._subclasses.fake_tensor")
                    level = log.level
                    log.setLevel(logging.CRITICAL)  # a failure is reported by us, with the others
                    try:
                        with FakeTensorMode(allow_non_fake_inputs=True):
                            args, kwargs = _made_like((args, kwargs), batch, lambda s, d: torch.empty(s, dtype=d))
                            runner(*args, **kwargs)
                    finally:
                        log.setLevel(level)
            except _Reached:
                pass
        if record.first(root) is None:
            raise RuntimeError(f"{type(runner).__name__} did not call the target")
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)
    return record
