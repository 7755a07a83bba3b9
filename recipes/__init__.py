"""Built-in DropBlock recipes (YAML). Installed as ``dropblock_fx.recipes``; load them by
name with ``dropblock_fx.load_recipe("paper-resnet50")``."""
