"""The E2B control plane: both endpoint generations, plus Cube's documented extensions.

One module-level router per resource; each route asks for its :data:`~cube_api_e2b.routing.Context`,
:data:`~cube_api_e2b.routing.Service` and :data:`~cube_api_e2b.routing.CurrentTeam` as typed
dependencies and calls the control plane's public methods. Another team's sandbox is "not found"
(404): the service scopes every lookup by team.
"""

from __future__ import annotations

from fastapi import APIRouter

from cube_api_e2b.routes import (
    accesstokens,
    apikeys,
    builds,
    commands,
    events,
    lifecycle,
    logs,
    metrics,
    network,
    registrybuilds,
    sandboxes,
    secrets,
    snapshots,
    teams,
    templates,
    volumes,
    webhooks,
)

ROUTERS: tuple[APIRouter, ...] = (
    metrics.router,  # first: GET /sandboxes/metrics before GET /sandboxes/{sandbox_id}
    sandboxes.router, lifecycle.router, network.router, commands.router,
    builds.tags_router,  # before snapshots: DELETE /templates/tags vs DELETE /templates/{snapshotID}
    snapshots.router, templates.router,
    builds.router,
    registrybuilds.router,  # after builds.tags_router: POST /templates/tags vs POST /templates/{templateID}
    secrets.router, webhooks.router, apikeys.router, accesstokens.router, logs.router, teams.router,
    events.router,
    volumes.router,
)
"""Every router that authenticates with an API key, in mounting order."""
SIGNED: tuple[APIRouter, ...] = (builds.uploads, volumes.content)
"""Routers that authenticate otherwise: a signature in the URL (the template file upload link), the
volume's own Bearer token (the volume content API)."""

__all__ = ["ROUTERS", "SIGNED"]
