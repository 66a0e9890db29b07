"""Snapshots of a sandbox (memory, processes, disk): take, list, delete; fork and roll back."""

from __future__ import annotations

from typing import Annotated

from cube_core import SnapshotNotFoundError
from fastapi import APIRouter, Body, Query, Response, Security

from cube_api_e2b.errors import InvalidRequestError
from cube_api_e2b.routing import API_KEY_SCHEME, Context, CurrentTeam, E2bRoute, Service, errors
from cube_api_e2b.schemas import ForkItemOut, ForkSandbox, NewSnapshot, RollbackSandbox, SandboxOut, SnapshotInfoOut
from cube_api_e2b.views import sandbox_out, snapshot_out

router = APIRouter(route_class=E2bRoute, dependencies=[Security(API_KEY_SCHEME)])


@router.post("/sandboxes/{sandbox_id}/fork", status_code=201, response_model=list[ForkItemOut],
             response_model_exclude_none=True, responses=errors(400, 404, 409, 429, 500), tags=["sandboxes"],
             summary="Fork: independent copies of a sandbox as it is now, each with a fresh identity")
async def fork(sandbox_id: str, team: CurrentTeam, ctx: Context, service: Service,
               body: Annotated[ForkSandbox | None, Body()] = None) -> list[ForkItemOut]:
    body = body or ForkSandbox()
    forks = await service.fork(team.team_id, sandbox_id, count=body.count, timeout_s=body.timeout)
    return [ForkItemOut(sandbox=sandbox_out(ctx, sb)) for sb in forks]


@router.post("/sandboxes/{sandbox_id}/snapshots", status_code=201, response_model=SnapshotInfoOut,
             responses=errors(400, 404, 409, 429, 500), tags=["sandboxes"],
             summary="Snapshot a sandbox (memory, processes, disk)")
async def snapshot(sandbox_id: str, team: CurrentTeam, service: Service,
                   body: Annotated[NewSnapshot | None, Body()] = None) -> SnapshotInfoOut:
    body = body or NewSnapshot()
    ref = await service.snapshot(team.team_id, sandbox_id, name=body.name, memory=body.memory is not False)
    return snapshot_out(ref)


@router.post("/sandboxes/{sandbox_id}/rollback", response_model=SandboxOut, responses=errors(400, 404, 500),
             tags=["sandboxes"], summary="Cube extension: put a sandbox back to one of its snapshots (same id)")
async def rollback(sandbox_id: str, body: RollbackSandbox, team: CurrentTeam, ctx: Context,
                   service: Service) -> SandboxOut:
    return sandbox_out(ctx, await service.rollback(team.team_id, sandbox_id, body.snapshot_id))


@router.get("/snapshots", response_model=list[SnapshotInfoOut], responses=errors(400, 500), tags=["templates"],
            summary="List the team's snapshots")
async def list_snapshots(team: CurrentTeam, service: Service, response: Response,
                         sandbox_id: Annotated[str | None, Query(alias="sandboxID")] = None,
                         name: str | None = None,
                         limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                         next_token: Annotated[str | None, Query(alias="nextToken")] = None,
                         ) -> list[SnapshotInfoOut]:
    refs = [r for r in service.list_snapshots(team.team_id, sandbox_id)
            if name is None or name in r.names or name == r.snapshot_id]
    if next_token and not (next_token.isascii() and next_token.isdigit() and len(next_token) <= 9):
        raise InvalidRequestError(field="nextToken", reason="invalid pagination token")
    start = int(next_token) if next_token else 0
    page = refs[start:start + limit]
    if start + limit < len(refs):
        response.headers["X-Next-Token"] = str(start + limit)
    return [snapshot_out(r) for r in page]


@router.delete("/templates/{template_id}", status_code=204, response_class=Response,
               responses=errors(403, 404, 409, 500), tags=["templates"],
               summary="Delete a snapshot, or a template the team built (not while sandboxes or snapshots use it)")
async def delete_template(template_id: str, team: CurrentTeam, service: Service) -> None:
    try:
        await service.delete_snapshot(team.team_id, template_id)
    except SnapshotNotFoundError:
        await service.template_builds.delete(template_id, team_id=team.team_id)
