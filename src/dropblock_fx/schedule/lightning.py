"""Old name of `dropblock_fx.integrations.lightning` (a plain re-export; import that one)."""

from ..integrations.lightning import DropBlockScheduleCallback

__all__ = ["DropBlockScheduleCallback"]
