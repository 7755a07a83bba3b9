"""``python -m dropblock_fx.timm_train path/to/train.py ...``: run timm's ``train.py`` with the
DropBlock models registered and the recipe's schedule following the run.

Imported, this is `dropblock_fx.integrations.timm_train` (the same module object).
"""

import sys

from .integrations import timm_train as _impl

if __name__ == "__main__":
    _impl.main()
else:
    sys.modules[__name__] = _impl
