"""Integrations with the libraries and training loops people already use.

Each module imports its library on import, so none is imported here:
``dropblock_fx.integrations.timm`` (also ``dropblock_fx.timm``),
``dropblock_fx.integrations.torchvision`` (also ``dropblock_fx.torchvision``) and
``dropblock_fx.integrations.lightning`` (the Lightning callback).
"""
