"""Options of ``[[api]] plugin = "dashboard"``."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class DashboardConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    cache: Path = Field(default=Path("/var/cache/cube"),
                        description="where the chart library fetched from npm is kept (`npm/<hash>/`)")
    session_ttl_s: int = Field(default=8 * 3600, ge=60, le=30 * 86400,
                               description="how long a sign-in lasts (sessions live in the server's memory)")
    metrics_window_s: int = Field(default=900, ge=60, le=86400,
                                  description="how much metric history the sparklines and charts show")
