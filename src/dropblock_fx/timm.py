"""Public name of `dropblock_fx.integrations.timm` (the same module object)."""

import sys

from .integrations import timm as _impl

sys.modules[__name__] = _impl
