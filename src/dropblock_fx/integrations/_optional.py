"""``require``: import a third-party library an integration needs, or say how to install it."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Sequence, Union

__all__ = ["require"]


def require(modules: Union[str, Sequence[str]], *, extra: str, needed_by: str, library: str = "") -> ModuleType:
    """The first of ``modules`` (dotted names) that imports; if none does, an ``ImportError``
    that names what needs it, the library (``library``, default the module names) and the
    extra that installs it.

    Examples:
        >>> require("json", extra="none", needed_by="this example").__name__
        'json'
        >>> require("no_such_library_here", extra="demo", needed_by="this example")
        Traceback (most recent call last):
        ...
        ImportError: this example needs no_such_library_here (the demo extra; in a clone of dropblock-fx: pip install -e '.[demo]')
    """
    names = [modules] if isinstance(modules, str) else list(modules)
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError as e:
            error = e
    what = library or " or ".join(names)
    raise ImportError(
        f"{needed_by} needs {what} (the {extra} extra; in a clone of dropblock-fx: pip install -e '.[{extra}]')"
    ) from error
