"""``dropblock-fx timm-train path/to/train.py [train.py arguments...]``: run a copy of timm's
``train.py`` with the ``<arch>_dropblock`` models registered and the recipe's schedule
following the run (``--resume`` included); see `dropblock_fx.integrations.timm_train`.
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Sequence

__all__ = ["run_script"]


def run_script(script: str, args: Sequence[str] = ()) -> None:
    """Run ``script`` as ``__main__`` with ``args`` as its command line, after registering the
    timm models and wrapping timm's scheduler factory (what ``import dropblock_fx.timm`` does,
    done before the script imports anything).

    Examples:
        >>> run_script("no/such/train.py")
        Traceback (most recent call last):
        ...
        FileNotFoundError: no such script: no/such/train.py
    """
    if not os.path.isfile(script):
        raise FileNotFoundError(f"no such script: {script}")
    from ..integrations import timm as _registration  # noqa: F401  (registers the models)
    from ..integrations.timm_train import install

    install()
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
