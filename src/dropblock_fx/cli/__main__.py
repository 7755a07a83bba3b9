"""``python -m dropblock_fx.cli``: the ``dropblock-fx`` command."""

import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())
