"""matplotlib without a display (the ``demo`` extra installs it)."""

from __future__ import annotations

from typing import Any

__all__ = ["pyplot"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, works over ssh and in CI)."""
    try:
        import matplotlib
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "plots need matplotlib: install the demo extra (in a clone of dropblock-fx: "
            'pip install -e ".[demo]")', name=e.name
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt
