"""Public name of `dropblock_fx.integrations.torchvision` (the same module object)."""

import sys

from .integrations import torchvision as _impl

sys.modules[__name__] = _impl
