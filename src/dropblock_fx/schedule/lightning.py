"""Public name of `dropblock_fx.integrations.lightning` (the same module object)."""

import sys

from ..integrations import lightning as _impl

sys.modules[__name__] = _impl
