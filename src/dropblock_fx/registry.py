"""``Registry``: the one registry type (schedules, hooks, site finders).

A registry maps names to values that other code looks up by name: ``register`` by decorator or
call, ``get`` with an error that lists the known names and suggests the closest one. A lower
layer that needs something a higher layer provides (the Lightning hook, timm's slot finder)
names the module that registers it with `Registry.lazy`: the module is imported the
first time the name is asked for, so nothing is imported upward at start-up.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, Optional, TypeVar

from .errors import closest

__all__ = ["Registry"]

T = TypeVar("T")


def _same_name(name: str) -> str:
    return name


class Registry(Generic[T]):
    """Named values of one kind.

    Args:
        kind: what the values are, for messages (``"schedule"``, ``"hook"``).
        normalize: maps a name to its key (schedules: case and ``_`` / ``-`` do not matter).
        error: the exception type ``get`` raises for an unknown name.

    Examples:
        >>> colours = Registry("colour", normalize=str.lower)
        >>> colours.register("Red", 0xFF0000)
        16711680
        >>> colours.get("RED"), "red" in colours, colours.names()
        (16711680, True, ['red'])
        >>> colours.get("rad")
        Traceback (most recent call last):
        ...
        ValueError: unknown colour 'rad'; did you mean 'red'?; known: red
    """

    def __init__(self, kind: str, *, normalize: Callable[[str], str] = _same_name,
                 error: type[Exception] = ValueError) -> None:
        self.kind = kind
        self.normalize = normalize
        self.error = error
        self._values: dict[str, T] = {}
        self._lazy: dict[str, str] = {}

    def register(self, name: str, value: T, *, overwrite: bool = False) -> T:
        """Register ``value`` under ``name`` and return it; a name taken by another value is
        an error unless ``overwrite``."""
        key = self.normalize(name)
        if key in self._values and not overwrite and self._values[key] is not value:
            raise ValueError(f"{self.kind} {key!r} is already registered (pass overwrite=True to replace it)")
        self._values[key] = value
        return value

    def lazy(self, name: str, module: str) -> None:
        """``name`` is registered by importing ``module`` (a dotted path): done on first use."""
        self._lazy[self.normalize(name)] = module

    def get(self, name: str) -> T:
        """The value registered under ``name`` (importing its plug-in module if it is lazy)."""
        key = self.normalize(name)
        if key not in self._values and key in self._lazy:
            importlib.import_module(self._lazy[key])  # registers the name, or raises ImportError
        try:
            return self._values[key]
        except KeyError:
            known = self.names()
            raise self.error(f"unknown {self.kind} {name!r}{closest(key, known)}; known: {', '.join(known)}") from None

    def find(self, name: str) -> Optional[T]:
        """The value registered under ``name`` if it is loaded, else ``None`` (imports nothing)."""
        return self._values.get(self.normalize(name))

    def pop(self, name: str) -> Optional[T]:
        """Unregister ``name``; returns its value (``None`` if it had none)."""
        return self._values.pop(self.normalize(name), None)

    def names(self) -> list[str]:
        """Every registered name, the lazy ones included (sorted)."""
        return sorted({*self._values, *self._lazy})

    def items(self) -> Iterator[tuple[str, T]]:
        """``(name, value)`` of the loaded values, in registration order."""
        return iter(list(self._values.items()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.normalize(name) in {*self._values, *self._lazy}

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"
