"""A sandbox's egress rules and (a Cube extension) its recent egress decisions."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, Security

from cube_api_e2b.policy import updated_policy
from cube_api_e2b.routing import API_KEY_SCHEME, CurrentTeam, E2bRoute, Service, errors
from cube_api_e2b.schemas import NetworkAuditOut, SandboxNetworkUpdateConfig

router = APIRouter(route_class=E2bRoute, tags=["sandboxes"], dependencies=[Security(API_KEY_SCHEME)])


@router.put("/sandboxes/{sandbox_id}/network", status_code=204, response_class=Response,
            responses=errors(400, 404, 409, 429, 500), summary="Replace the egress rules of a sandbox")
async def update_network(sandbox_id: str, body: SandboxNetworkUpdateConfig, team: CurrentTeam,
                         service: Service) -> None:
    sb = service.get(team.team_id, sandbox_id)
    await service.update_network(team.team_id, sandbox_id, updated_policy(sb.network, body))


@router.get("/sandboxes/{sandbox_id}/network/audit", response_model=NetworkAuditOut,
            responses=errors(400, 404, 500), summary="Cube extension: recent egress decisions of a sandbox")
async def network_audit(sandbox_id: str, team: CurrentTeam, service: Service,
                        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000) -> NetworkAuditOut:
    events = await service.network_audit(team.team_id, sandbox_id, limit=limit)
    return NetworkAuditOut(sandbox_id=sandbox_id, events=events)
