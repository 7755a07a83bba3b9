"""``training_mode``: set a model's train / eval mode for a while, then put every flag back.

``model.train()`` / ``model.eval()`` set the flag of every submodule, so "switch to eval and
back" is not ``model.train(old)``: submodules may have had their own modes (a frozen batch
norm in eval inside a training model). This saves each module's own flag and restores it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from torch import nn

__all__ = ["training_mode"]


@contextlib.contextmanager
def training_mode(module: nn.Module, mode: Optional[bool] = None) -> Iterator[nn.Module]:
    """Run the body with ``module.train(mode)`` (unless ``mode`` is None: the body sets modes
    itself), then give every submodule its own training flag back, also on errors.

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> _ = net[1].eval()   # a frozen norm inside a training model
        >>> with training_mode(net, False):
        ...     net[0].training
        False
        >>> net.training, net[1].training
        (True, False)
    """
    flags = [(m, m.training) for m in module.modules()]
    try:
        if mode is not None:
            module.train(mode)
        yield module
    finally:
        for m, flag in flags:
            m.training = flag
