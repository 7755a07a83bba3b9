"""Planning leaves no trace: put back whatever running or tracing a model changed on it.

The shape pass runs the model's own ``forward`` (on meta tensors), and tracing runs it on
proxies. A forward may cache things on its modules (a detection head keeps its anchor grid
keyed by input size, ``self._cache = f(x)``); those would be meta tensors or proxies
afterwards. `preserved` snapshots every module's own Python state (its ``__dict__``,
one level into lists, dicts and sets held there, so parameters, buffers and children too)
and the RNG state, and restores them on exit.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["preserved"]

_CONTAINERS = (list, dict, set)


def _copy(v: Any) -> Any:
    if isinstance(v, list):
        return list(v)
    if isinstance(v, dict):
        return dict(v)
    return set(v)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(a[k] is b[k] for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(x is y for x, y in zip(a, b))
    return a == b


def _restore_contents(current: Any, saved: Any) -> None:
    if isinstance(current, list):
        current[:] = saved
    else:
        current.clear()
        current.update(saved)


@contextlib.contextmanager
def preserved(root: nn.Module, values: bool = False) -> Iterator[list[str]]:
    """Run the body, then put every module under ``root`` back as it was.

    Yields a list that, after the body, names what the body had changed
    (``"path.attribute"``), so a caller can tell that a forward has side effects.

    Args:
        root: the model.
        values: also restore the values of buffers (for a real forward pass that may
            update them in place).

    Examples:
        >>> m = nn.Sequential(nn.Conv2d(3, 4, 3))
        >>> with preserved(m):
        ...     m[0].cache = "set during a forward"
        >>> hasattr(m[0], "cache")
        False
    """
    saved = []
    changed: list[str] = []
    names = {id(m): n for n, m in root.named_modules()}
    for m in root.modules():
        d = dict(m.__dict__)
        # a module holds a dozen containers, mostly empty hook tables: an empty one is kept as
        # None (restored by clearing it), which halves what a snapshot costs
        inner = {k: (_copy(v) if v else None) for k, v in d.items()
                 if type(v) in _CONTAINERS or type(v).__module__ == "collections" and isinstance(v, _CONTAINERS)}
        buffers = {k: b.detach().clone() for k, b in m._buffers.items() if b is not None} if values else {}
        saved.append((m, d, inner, buffers))
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield changed
    finally:
        for m, d, inner, buffers in saved:
            current = m.__dict__
            where = names.get(id(m), "")
            for k in [k for k in current if k not in d]:
                changed.append(f"{where}.{k}".lstrip("."))
                del current[k]
            for k, v in d.items():
                if current.get(k, d) is not v:
                    changed.append(f"{where}.{k}".lstrip("."))
                    current[k] = v
            for k, contents in inner.items():
                if contents is None:
                    if d[k]:
                        changed.append(f"{where}.{k}".lstrip("."))
                        d[k].clear()
                elif not _same(contents, d[k]):
                    changed.append(f"{where}.{k}".lstrip("."))
                    _restore_contents(d[k], contents)
            for k, b in buffers.items():
                live = m._buffers.get(k)
                if live is not None and not torch.equal(live, b):
                    with torch.no_grad():
                        live.copy_(b)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
