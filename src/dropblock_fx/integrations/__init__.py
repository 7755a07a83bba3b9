"""Integrations with the libraries and training loops people already use.

Each module imports its library on import, so none is imported here:
``dropblock_fx.integrations.timm`` (also ``dropblock_fx.timm``),
``dropblock_fx.integrations.timm_train`` (timm's ``train.py``; also ``python -m
dropblock_fx.timm_train``), ``dropblock_fx.integrations.torchvision`` (also
``dropblock_fx.torchvision``), ``dropblock_fx.integrations.lightning`` (the Lightning
callback, also ``dropblock_fx.schedule.lightning``) and ``dropblock_fx.integrations.hf``
(the Hugging Face ``Trainer`` callback).
"""
