from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SpreadConfig(BaseModel):
    """Options of ``[scheduler] plugin = "spread"``.

    Capacity options mean the same as binpack's, with the same defaults, so swapping the plugin
    changes only which node is chosen, never whether a sandbox fits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cpu_overcommit: float = Field(default=32.0, gt=0, description="vCPUs of running sandboxes per host core")
    memory_overcommit: float = Field(default=4.0, gt=0, description="guest MiB reserved per host MiB")
    reserved_memory_mb: int = Field(default=1024, ge=0, description="host memory kept free")
    locality_bonus: float = Field(default=0.1, ge=0, le=1,
                                  description="utilisation subtracted for a node that caches the template")
