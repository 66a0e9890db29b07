"""Pause, resume and connect (resume if paused; the timeout only grows)."""

from __future__ import annotations

from typing import Annotated

from cube_core import SandboxState, Team
from fastapi import APIRouter, Body, Response, Security

from cube_api_e2b.context import E2bContext
from cube_api_e2b.routing import (
    API_KEY_SCHEME,
    SANDBOX_RESPONSE,
    Context,
    CurrentTeam,
    E2bRoute,
    Service,
    check_timeout,
    errors,
)
from cube_api_e2b.schemas import (
    ConnectSandbox,
    ConnectSandboxV2,
    ResumedSandbox,
    SandboxOut,
    SandboxPauseRequest,
)
from cube_api_e2b.service import ControlPlane
from cube_api_e2b.views import sandbox_out

router = APIRouter(route_class=E2bRoute, tags=["sandboxes"], dependencies=[Security(API_KEY_SCHEME)])

CONNECT_RESPONSES = {201: {"model": SandboxOut, "description": "The sandbox was resumed"},
                     **errors(400, 404, 409, 429, 500)}


async def connect(ctx: E2bContext, service: ControlPlane, team: Team, sandbox_id: str, timeout: int | None,
                  memory: bool | None, response: Response) -> SandboxOut:
    """201 when a paused sandbox was resumed, else 200."""
    check_timeout(ctx, "timeout", timeout)
    before = service.get(team.team_id, sandbox_id)
    sb = await service.connect(team.team_id, sandbox_id, ctx.default_timeout_s if timeout is None else timeout,
                               memory=memory is not False)
    response.status_code = 201 if before.state == SandboxState.PAUSED else 200
    return sandbox_out(ctx, sb)


@router.post("/sandboxes/{sandbox_id}/pause", status_code=204, response_class=Response,
             responses=errors(400, 404, 409, 500), summary="Pause a sandbox (409 if already paused)")
async def pause(sandbox_id: str, team: CurrentTeam, service: Service,
                body: Annotated[SandboxPauseRequest | None, Body()] = None) -> None:
    await service.pause(team.team_id, sandbox_id, memory=body is None or body.memory is not False)


@router.post("/sandboxes/{sandbox_id}/resume", status_code=201, **SANDBOX_RESPONSE,
             responses=errors(400, 404, 409, 429, 500),
             summary="Resume a paused sandbox (deprecated; use connect)")
async def resume(sandbox_id: str, team: CurrentTeam, ctx: Context, service: Service,
                 body: Annotated[ResumedSandbox | None, Body()] = None) -> SandboxOut:
    timeout = body.timeout if body is not None else None
    check_timeout(ctx, "timeout", timeout)
    sb = await service.resume(team.team_id, sandbox_id, ctx.default_timeout_s if timeout is None else timeout)
    return sandbox_out(ctx, sb)


@router.post("/v2/sandboxes/{sandbox_id}/connect", **SANDBOX_RESPONSE, responses=CONNECT_RESPONSES,
             summary="Connect (resume if paused; the timeout only grows), SDK >= 2.51")
async def connect_v2(sandbox_id: str, team: CurrentTeam, ctx: Context, service: Service, response: Response,
                     body: Annotated[ConnectSandboxV2 | None, Body()] = None) -> SandboxOut:
    body = body or ConnectSandboxV2()
    return await connect(ctx, service, team, sandbox_id, body.timeout, body.memory, response)


@router.post("/sandboxes/{sandbox_id}/connect", **SANDBOX_RESPONSE, responses=CONNECT_RESPONSES,
             summary="Connect (resume if paused; the timeout only grows), SDK 2.10-2.50")
async def connect_v1(sandbox_id: str, body: ConnectSandbox, team: CurrentTeam, ctx: Context, service: Service,
                     response: Response) -> SandboxOut:
    return await connect(ctx, service, team, sandbox_id, body.timeout, None, response)
