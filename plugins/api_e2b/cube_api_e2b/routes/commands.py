"""Cube extension: run a command in a sandbox over its control channel (``cube sandbox exec``)."""

from __future__ import annotations

from cube_core import InvalidStateError, SandboxState
from fastapi import APIRouter, Security

from cube_api_e2b.routing import API_KEY_SCHEME, CurrentTeam, E2bRoute, Service, errors
from cube_api_e2b.schemas import ExecCommand, ExecOut

router = APIRouter(route_class=E2bRoute, tags=["sandboxes"], dependencies=[Security(API_KEY_SCHEME)])


@router.post("/sandboxes/{sandbox_id}/exec", response_model=ExecOut, responses=errors(404, 409, 500),
             summary="Cube extension: run a command in a sandbox as root (the guest agent, not envd)")
async def exec_command(sandbox_id: str, body: ExecCommand, team: CurrentTeam, service: Service) -> ExecOut:
    sb = service.get(team.team_id, sandbox_id)  # another team's sandbox is not found
    if sb.state != SandboxState.RUNNING:
        raise InvalidStateError(sandbox_id=sandbox_id, state=sb.state.value, required=SandboxState.RUNNING.value)
    reply = await service.exec(sandbox_id, list(body.cmd), timeout=body.timeout)
    return ExecOut(sandbox_id=sandbox_id, exit_code=reply.get("exit_code"), stdout=reply.get("stdout", ""),
                   stderr=reply.get("stderr", ""), truncated=bool(reply.get("truncated")))
