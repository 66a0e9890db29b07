from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class BinpackConfig(BaseModel):
    """Options of ``[scheduler] plugin = "binpack"``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Sandboxes are mostly idle microVMs whose RAM is a copy-on-write clone of their template
    # (an idle 512 MiB sandbox dirties ~34-64 MiB, docs/bench.md), so reservations are
    # overcommitted; paused sandboxes reserve memory but no CPU. `[core] max_sandboxes` and the
    # warm pool's free-memory guard stay the hard limits.
    cpu_overcommit: float = Field(default=32.0, gt=0, description="vCPUs of running sandboxes per host core")
    memory_overcommit: float = Field(default=4.0, gt=0, description="guest MiB reserved per host MiB")
    reserved_memory_mb: int = Field(default=1024, ge=0, description="host memory kept free")
    locality_bonus: float = Field(default=0.25, ge=0, le=1,
                                  description="score bonus for a node that caches the template")
