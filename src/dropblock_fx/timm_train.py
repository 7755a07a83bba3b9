"""``python -m dropblock_fx.timm_train path/to/train.py ...``: the older spelling of
``dropblock-fx timm-train path/to/train.py ...`` (see `dropblock_fx.cli.timm_train`)."""

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main(["timm-train", *sys.argv[1:]]))
