"""timm integration: ``create_model`` with a recipe, and ``<arch>_dropblock`` model names.

Importing this module registers, for every convolutional architecture of timm's
CNN families (ResNet, EfficientNet, MobileNet, RegNet, ConvNeXt, DenseNet, ...), a model
named ``<arch>_dropblock``: ``timm.create_model("resnet50_dropblock")`` is ``resnet50`` with
the default recipe applied, ``timm.list_models("*_dropblock")`` lists them, and pretrained
tags resolve to the base architecture's weights (``resnet50_dropblock.a1_in1k``). So timm's
own ``train.py`` trains a DropBlock model by name (``--model resnet50_dropblock``).

A model built with timm's own ``drop_block_rate`` is recognised: [`create_model`][dropblock_fx.integrations.timm.create_model]
replaces timm's modules by this library's, at the same positions with the same settings
(the ``timm-resnet`` recipe on ResNets), so the model traces, compiles and takes schedules.

Examples:
    >>> import timm, dropblock_fx.timm
    >>> m = dropblock_fx.timm.create_model("resnet18", recipe="paper-resnet50", num_classes=10)  # doctest: +SKIP
    >>> m2 = timm.create_model("resnet18_dropblock", num_classes=10)                             # doctest: +SKIP
"""

from __future__ import annotations

import copy
import fnmatch
import sys
from dataclasses import replace
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import timm
from timm.models import _registry as timm_registry
from torch import nn

from ..modules import DropBlock2d, DropBlockNd
from ..recipe import Recipe, RecipeLike, load_recipe
from . import timm_train as _timm_train

__all__ = [
    "create_model",
    "register",
    "registered",
    "SUFFIX",
    "CNN_MODULES",
    "find_timm_dropblocks",
    "timm_dropblock_recipe",
    "convert_timm_dropblock",
]

SUFFIX = "_dropblock"

# timm model modules whose architectures are CNNs with norm -> activation chains: the ones
# that get an ``<arch>_dropblock`` name on import. Others: call register() yourself.
CNN_MODULES: tuple[str, ...] = (
    "resnet", "resnetv2", "efficientnet", "mobilenetv3", "mobilenetv5", "regnet", "convnext",
    "densenet", "dla", "cspnet", "byobnet", "byoanet", "vgg", "rexnet", "ghostnet", "hrnet",
    "inception_v3", "inception_v4", "inception_resnet_v2", "xception", "xception_aligned",
    "dpn", "res2net", "resnest", "sknet", "senet", "nfnet", "selecsls", "tresnet", "hgnet",
    "repghost", "repvit", "fastvit", "mobileone", "ghostnetv3", "efficientvit_mit",
    "edgenext", "inception_next", "rdnet", "starnet", "mambaout", "csatv2", "shvit",
)

# variant name -> (base architecture, recipe); the timm registry holds the entrypoints.
_REGISTERED: dict[str, tuple[str, RecipeLike]] = {}


def _apply(
    model: nn.Module, recipe: RecipeLike, overrides: Optional[Mapping[str, Any]], in_chans: Optional[int] = None
) -> nn.Module:
    from ..surgery import apply_dropblock

    extra = dict(overrides or {})
    if in_chans and "input_size" not in extra:
        size = list(load_recipe(recipe).input_size)
        if size[0] != in_chans:  # timm's in_chans: plan with the model's own input channels
            extra["input_size"] = [int(in_chans), *size[1:]]
    # Watched: timm's train.py attaches the recipe's schedule when it builds its LR scheduler.
    return _timm_train.watch(apply_dropblock(model, recipe, **extra))


def create_model(
    model_name: str,
    recipe: RecipeLike = None,
    *,
    recipe_overrides: Optional[Mapping[str, Any]] = None,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model`` followed by ``apply_dropblock``.

    Every argument of ``timm.create_model`` passes through unchanged (``pretrained``,
    ``pretrained_cfg``, ``pretrained_cfg_overlay``, ``checkpoint_path``, ``num_classes``,
    ``features_only``, ``in_chans``, ...), so weights are loaded first and the recipe is
    applied to the loaded model; ``pretrained_cfg`` and ``feature_info`` are timm's.

    Args:
        model_name: a timm name, with an optional pretrained tag (``"resnet50.a1_in1k"``).
        recipe: a built-in recipe name, a YAML path, a dict or a ``Recipe``; default
            ``"last-two-stages"``.
        recipe_overrides: recipe fields set on top (``{"drop_prob": 0.2}``).
        **kwargs: everything ``timm.create_model`` takes. With ``drop_block_rate`` (timm's
            own DropBlock) and no recipe, timm's modules are replaced by this library's at
            the same positions and settings (see [`convert_timm_dropblock`][dropblock_fx.integrations.timm.convert_timm_dropblock]).

    Raises:
        ValueError: both ``drop_block_rate`` and a recipe were given.
        SurgeryError / RecipeError: from ``apply_dropblock`` (the model is not returned).

    Examples:
        >>> m = create_model("resnet18", "paper-resnet50", num_classes=10)     # doctest: +SKIP
        >>> print(dropblock_fx.describe(m))                                     # doctest: +SKIP
    """
    timm_rate = kwargs.get("drop_block_rate")
    if timm_rate and (recipe is not None or recipe_overrides):
        raise ValueError(
            "create_model: drop_block_rate (timm's DropBlock) and a recipe both place DropBlock; "
            "pass one of them (recipe='timm-resnet' reproduces drop_block_rate on ResNets)"
        )
    model = timm.create_model(model_name, **kwargs)
    if timm_rate:
        return convert_timm_dropblock(model, in_chans=kwargs.get("in_chans"))
    return _apply(model, recipe, recipe_overrides, kwargs.get("in_chans"))


# ----------------------------------------------------------------------- registered variants


def _timm_entrypoint_name(arch: str, suffix: str) -> str:
    return f"{arch}{suffix}"


def _variant_default_cfg(arch: str, variant: str) -> Optional[Any]:
    base = getattr(timm_registry, "_model_default_cfgs", {}).get(arch)
    if base is None:
        return None
    cfg = copy.deepcopy(base)
    # The weights are the base architecture's: timm completes a bare "timm/" hub id with the
    # registered name, which for a variant would be a repository that does not exist.
    cfg.cfgs = {
        tag: replace(c, hf_hub_id=f"timm/{arch}.{tag}" if tag else f"timm/{arch}") if c.hf_hub_id == "timm/" else c
        for tag, c in cfg.cfgs.items()
    }
    return cfg


def _make_entrypoint(arch: str, variant: str, recipe: RecipeLike) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        chosen = kwargs.pop("recipe", None)
        overrides = kwargs.pop("recipe_overrides", None)
        cfg = kwargs.pop("pretrained_cfg", None)
        if cfg is not None and not isinstance(cfg, (str, dict)):
            cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else cfg
        if isinstance(cfg, dict) and cfg.get("architecture") == variant:
            cfg = dict(cfg, architecture=arch)
        model = timm.create_model(arch, pretrained=pretrained, pretrained_cfg=cfg, **kwargs)
        base_cfg = getattr(model, "pretrained_cfg", None)
        if isinstance(base_cfg, dict):
            model.pretrained_cfg = dict(base_cfg, architecture=variant)
        return _apply(model, chosen if chosen is not None else recipe, overrides, kwargs.get("in_chans"))

    entrypoint.__name__ = variant
    entrypoint.__qualname__ = variant
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = (
        f"timm's ``{arch}`` with DropBlock (recipe {recipe if isinstance(recipe, str) else 'custom'!r}"
        f"{'' if recipe is not None else ', the default'}); ``recipe=...`` picks another one."
    )
    return entrypoint


def register(
    archs: Union[str, Iterable[str], None] = None,
    recipe: RecipeLike = None,
    *,
    suffix: str = SUFFIX,
    overwrite: bool = False,
) -> list[str]:
    """Register ``<arch><suffix>`` timm models that build ``arch`` and apply ``recipe``.

    Args:
        archs: architecture names or ``fnmatch`` patterns (``"resnet*"``); default: every
            architecture of `CNN_MODULES`.
        recipe: the recipe the new names apply (default ``"last-two-stages"``); a custom one
            with another ``suffix`` gives several variants side by side
            (``register("resnet50", "paper-resnet50", suffix="_paperdb")``).
        suffix: appended to the architecture name.
        overwrite: re-register names that exist (else they are skipped).

    Returns:
        The names registered by this call.

    Examples:
        >>> register("resnet18", "timm-resnet", suffix="_timmdb", overwrite=True)
        ['resnet18_timmdb']
    """
    if not isinstance(suffix, str) or not suffix or "." in suffix:
        raise ValueError(f"suffix must be a non-empty string without '.', got {suffix!r}")
    if recipe is not None and not isinstance(recipe, (str, Recipe)):
        recipe = load_recipe(recipe)  # validate dicts now, not at the first create_model
    elif isinstance(recipe, str):
        load_recipe(recipe)
    if archs is None:
        names = timm.list_models(module=list(CNN_MODULES))
    else:
        patterns = [archs] if isinstance(archs, str) else list(archs)
        every = timm.list_models()
        names = []
        for pat in patterns:
            hits = fnmatch.filter(every, pat) if any(c in pat for c in "*?[") else [pat]
            for h in hits:
                if not timm.is_model(h):
                    raise ValueError(f"register: timm has no model {h!r}")
                if h not in names:
                    names.append(h)
    this = sys.modules[__name__]
    if not hasattr(this, "default_cfgs"):
        this.default_cfgs = {}  # type: ignore[attr-defined]
    done: list[str] = []
    for arch in names:
        if arch.endswith(suffix) or arch in _REGISTERED:
            continue  # never a variant of a variant
        variant = _timm_entrypoint_name(arch, suffix)
        if timm.is_model(variant) and not overwrite:
            continue
        cfg = _variant_default_cfg(arch, variant)
        if cfg is not None:
            this.default_cfgs[variant] = cfg  # type: ignore[attr-defined]
        fn = _make_entrypoint(arch, variant, recipe)
        setattr(this, variant, fn)
        if overwrite and timm.is_model(variant):
            clear = getattr(timm_registry, "_clear_model_entries", None)  # timm >= 1.0.2x
            if clear is not None:
                clear(variant)
            timm_registry._model_entrypoints.pop(variant, None)
        timm.models.register_model(fn)
        _REGISTERED[variant] = (arch, recipe)
        done.append(variant)
    return done


def registered() -> dict[str, str]:
    """``{variant name: base architecture}`` of the names registered by this module."""
    return {v: a for v, (a, _) in _REGISTERED.items()}


# ----------------------------------------------------------------------- timm's own DropBlock


def find_timm_dropblocks(model: nn.Module) -> dict[str, nn.Module]:
    """``{module path: timm DropBlock2d}`` of the DropBlock modules timm put in (``drop_block_rate``)."""
    from timm.layers import DropBlock2d as TimmDropBlock2d

    return {name: m for name, m in model.named_modules() if isinstance(m, TimmDropBlock2d)}


def _settings(m: nn.Module) -> dict[str, Any]:
    """Our module options equivalent to a timm ``DropBlock2d``."""
    return dict(
        drop_prob=float(m.drop_prob),
        block_size=int(m.block_size),
        gamma_scale=float(m.gamma_scale),
        mask="shared" if getattr(m, "couple_channels", True) else "channel",
        seed_region="full",
        scale="count" if getattr(m, "scale_by_keep", True) else "none",
        noise=bool(getattr(m, "with_noise", False)),
    )


def timm_dropblock_recipe(model: nn.Module) -> Optional[Recipe]:
    """The recipe that reproduces the timm DropBlock modules of ``model``, or ``None``.

    On timm ResNets built with ``drop_block_rate=p`` this is the built-in ``timm-resnet``
    recipe with ``drop_prob=p``: one module in the ``drop_block`` slot of every block of
    ``layer3`` (block 5, gamma_scale 0.25) and ``layer4`` (block 3), mask shared by
    channels, seeds anywhere. ``None`` when the model has no timm DropBlock, or when its
    placement is not that one (other architectures: use [`convert_timm_dropblock`][dropblock_fx.integrations.timm.convert_timm_dropblock]).
    """
    found = find_timm_dropblocks(model)
    if not found:
        return None
    base = load_recipe("timm-resnet")
    expected = {3: (5, 0.25), 4: (3, 1.0)}
    rates = set()
    for path, m in found.items():
        parts = path.split(".")
        if len(parts) != 3 or parts[0] not in ("layer3", "layer4") or parts[2] != "drop_block":
            return None
        s = _settings(m)
        bs, gs = expected[int(parts[0][-1])]
        if (s["block_size"], s["gamma_scale"]) != (bs, gs):
            return None
        if (s["mask"], s["scale"], s["noise"]) != (base.mask, base.scale, base.noise):
            return None
        rates.add(s["drop_prob"])
    stages = {p.split(".")[0] for p in found}
    layer_blocks = {
        name: sum(1 for _ in getattr(model, name).children()) for name in ("layer3", "layer4") if hasattr(model, name)
    }
    for name in stages:
        if sum(1 for p in found if p.startswith(name + ".")) != layer_blocks.get(name):
            return None  # not one module per block
    if len(rates) != 1 or stages != {"layer3", "layer4"}:
        return None
    return base.model_copy(update={"drop_prob": rates.pop()})


def convert_timm_dropblock(model: nn.Module, *, in_chans: Optional[int] = None) -> nn.Module:
    """Replace timm's DropBlock modules (``drop_block_rate``) by this library's, in place.

    Same positions and settings, so training behaves as timm's; but the model now traces
    with FX, compiles without recompiling when the rate changes, and takes
    [`dropblock_fx.attach_schedule`][dropblock_fx.attach_schedule]. On timm ResNets this is ``apply_dropblock`` with
    the ``timm-resnet`` recipe (``describe`` / ``remove_dropblock`` work); elsewhere each
    module is swapped one for one. A model without timm DropBlock is returned unchanged.
    """
    found = find_timm_dropblocks(model)
    if not found:
        return model
    recipe = timm_dropblock_recipe(model)
    parents = {path: model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model for path in found}
    leaf = {path: path.rsplit(".", 1)[-1] for path in found}
    if recipe is not None:
        for path, parent in parents.items():  # timm's slot without drop_block_rate is an Identity
            parent._modules[leaf[path]] = nn.Identity()
        try:
            _apply(model, recipe, None, in_chans)
            placed = {n for n, m in model.named_modules() if isinstance(m, DropBlockNd)}
            if placed == set(found):
                return model
            from ..surgery import remove_dropblock

            remove_dropblock(model)
        except Exception:
            pass
        for path, parent in parents.items():
            parent._modules[leaf[path]] = found[path]
    for path, parent in parents.items():
        old = found[path]
        new = DropBlock2d(**_settings(old), inplace=bool(getattr(old, "inplace", False)))
        new.train(old.training)
        parent._modules[leaf[path]] = new
    return model


register()
_timm_train.install()
