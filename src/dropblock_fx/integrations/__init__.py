"""Integrations with the libraries and training loops people already use.

Each module imports its library on import, so none is imported here:
``dropblock_fx.integrations.timm`` (also ``dropblock_fx.timm``: the ``<arch>_dropblock``
names and ``create_model``), ``dropblock_fx.integrations.timm_train`` (the recipe's schedule in
timm's ``train.py``; the launcher is ``dropblock-fx timm-train``),
``dropblock_fx.integrations.torchvision`` (also ``dropblock_fx.torchvision``),
``dropblock_fx.integrations.lightning`` (the Lightning callback and ``hook="lightning"``) and
``dropblock_fx.integrations.hf`` (the Hugging Face ``Trainer`` callback).
"""
