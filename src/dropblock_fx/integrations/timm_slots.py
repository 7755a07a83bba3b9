"""Site kind ``timm``: the slots where timm's own ``drop_block_rate`` puts DropBlock.

A site finder for surgery (loaded when a recipe asks for ``sites: [timm]``). A timm model is
rebuilt on the meta device with ``drop_block_rate`` (exact for every architecture that
supports it, when the rebuilt model has the same parameters); else the ``drop_block``
``Identity`` slots of timm-style residual blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from ..graph.leaves import foreign_dropblock
from ..graph.units import Unit
from ..surgery.candidates import Candidate, SiteContext, register_site_finder

__all__ = ["timm_slots"]


def timm_slots(root: nn.Module, units: list[Unit]) -> tuple[list[str], str]:
    """Paths (under ``root``) of the slots, and how they were found."""
    arch = (getattr(root, "pretrained_cfg", None) or {}).get("architecture")
    if arch:
        try:
            import timm

            with torch.device("meta"):
                twin = timm.create_model(arch, pretrained=False, drop_block_rate=0.1)
            if list(twin.state_dict()) == list(root.state_dict()):
                return [n for n, m in twin.named_modules() if foreign_dropblock(m)], f"timm {arch}"
        except Exception:  # noqa: BLE001 - the architecture has no drop_block_rate: heuristic below
            pass
    return [f"{u.path}.drop_block" for u in units
            if u.kind == "block" and isinstance(getattr(u.module, "drop_block", None), nn.Identity)], "drop_block"


@register_site_finder("timm")
def timm_slot_sites(ctx: SiteContext) -> list[Candidate]:
    """One candidate per timm slot in a selected stage (a block's slot: the block's stage)."""
    if "timm" not in ctx.kinds:
        return []
    root = ctx.target.root
    slots, how = timm_slots(root, ctx.units)
    out = []
    for path in slots:
        slot = root.get_submodule(path)
        call = ctx.record.first(slot)
        if not isinstance(slot, nn.Identity) or call is None or not hasattr(call.output, "shape"):
            continue
        owner = ctx.unit_of(path)
        shape = tuple(call.output.shape)
        st = ctx.unit_stage(owner) if owner is not None else None
        st = ctx.stages.of_call(call) if st is None else st
        if ctx.wants(st, "timm"):
            out.append(Candidate(st, owner.path if owner is not None else path,  # type: ignore[arg-type]
                                 ctx.target.prefix + path, "timm", shape, f"timm's DropBlock slot ({how})", "slot",
                                 path))
    if not out:
        ctx.notes.append("site kind 'timm': this model has no timm drop_block slots in the selected stages")
    return out
