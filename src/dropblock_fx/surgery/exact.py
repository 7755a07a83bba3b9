"""``verify="exact"``: one real forward in eval mode before and after apply, compared bit for bit."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..graph.preserve import preserved
from ..graph.shapes import fresh
from ..modes import training_mode
from .target import SurgeryError, Target

__all__ = ["VERIFY_MODES", "check_verify", "exact_check"]

VERIFY_MODES = ("graph", "exact")


def check_verify(verify: Any) -> str:
    if verify not in VERIFY_MODES:
        raise SurgeryError(f"verify={verify!r}: must be one of {', '.join(map(repr, VERIFY_MODES))} "
                           "('graph': every rewritten unit checked on meta tensors; 'exact': that, and "
                           "one real forward compared bit for bit)")
    return verify


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def _forward(model: nn.Module, runner: nn.Module, x: Any) -> list[torch.Tensor]:
    """Eval outputs of ``runner`` on ``x`` (a tensor, or ``(args, kwargs)``)."""
    args, kwargs = fresh(x) if isinstance(x, tuple) else ((x,), {})
    with training_mode(model, False), preserved(model, values=True), torch.no_grad():
        return [t.clone() for t in _tensors(runner(*args, **kwargs))]


def exact_check(target: Target, runner: nn.Module, input_shape: tuple[int, ...], apply: Callable[[], None],
                undo: Callable[[], None]) -> None:
    """Run ``apply()`` between two real eval forwards of ``runner`` (the target, or the
    ancestor the shape pass ran) on one random input (a private generator: the global RNG is
    untouched); on any difference, ``undo()`` and raise. The model's state is put back after
    each forward."""
    device = next((p.device for p in target.model.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    dtype = next((p.dtype for p in target.model.parameters() if p.is_floating_point()), torch.float32)
    x: Any = torch.randn(input_shape, generator=gen).to(device=device, dtype=dtype)
    if target.inputs is not None:  # the user's own example: real values, run as given
        x = target.inputs
    try:
        before = _forward(target.model, runner, x)
    except Exception as e:  # noqa: BLE001
        raise SurgeryError(f"verify='exact': could not run {type(runner).__name__} on an input of shape "
                           f"{tuple(input_shape)} ({type(e).__name__}: {e}); use verify='graph'") from None
    apply()
    try:
        after = _forward(target.model, runner, x)
        same = len(before) == len(after) and all(
            a.shape == b.shape and a.dtype == b.dtype and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
            for a, b in zip(before, after))
        if not same:
            raise SurgeryError("verify='exact': the rewritten model's eval output differs from the original's "
                               "on the same input; nothing was changed")
    except SurgeryError:
        undo()
        raise
    except Exception as e:  # noqa: BLE001
        undo()
        raise SurgeryError(f"verify='exact': the rewritten model failed on an input the original ran "
                           f"({type(e).__name__}: {e}); nothing was changed") from None

