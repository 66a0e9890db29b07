from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class BinpackConfig(BaseModel):
    """Options of ``[scheduler] plugin = "binpack"``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cpu_overcommit: float = Field(default=4.0, gt=0, description="vCPUs per host core")
    memory_overcommit: float = Field(default=1.0, gt=0, description="guest MiB per host MiB")
    reserved_memory_mb: int = Field(default=1024, ge=0, description="host memory kept free")
    locality_bonus: float = Field(default=0.25, ge=0, le=1,
                                  description="score bonus for a node that caches the template")
