"""Plugin object for ``[[api]] plugin = "dashboard"`` (thin: config, hooks and delegation)."""

from __future__ import annotations

from collections.abc import Sequence

from cube_core import SandboxService, hookimpl
from fastapi import APIRouter

from cube_dashboard.config import DashboardConfig
from cube_dashboard.views import dashboard_router


class DashboardPlugin:
    """The web dashboard at ``/dashboard`` (docs/dashboard.md)."""

    Config = DashboardConfig

    def __init__(self, config: DashboardConfig) -> None:
        self.config = config

    @hookimpl
    def cube_api_routers(self, service: SandboxService) -> Sequence[APIRouter]:
        return [dashboard_router(service, self.config)]
