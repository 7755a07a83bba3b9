"""``python -m dropblock_fx``: the same as the ``dropblock-fx`` command."""

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
