"""``dropblock_fx.timm``: the timm integration (``create_model``, the ``<arch>_dropblock`` names).

A plain re-export of `dropblock_fx.integrations.timm`; importing either registers the
``<arch>_dropblock`` models with timm.
"""

from .integrations.timm import (
    CNN_MODULES,
    SUFFIX,
    convert_timm_dropblock,
    create_model,
    find_timm_dropblocks,
    register,
    registered,
    timm_dropblock_recipe,
)

__all__ = [
    "create_model", "register", "registered", "SUFFIX", "CNN_MODULES", "find_timm_dropblocks",
    "timm_dropblock_recipe", "convert_timm_dropblock",
]
