"""Sandboxes: create, list, look at, time out, keep alive, kill (their logs: logs.py)."""

from __future__ import annotations

import time
import urllib.parse
from datetime import UTC, datetime, timedelta
from typing import Annotated

import structlog
from cube_core import CubeError, Sandbox, SandboxSpec, SandboxState, VolumeMount
from cube_core.requestctx import request_ms
from fastapi import APIRouter, Body, Query, Response, Security

from cube_api_e2b.context import E2bContext
from cube_api_e2b.errors import InvalidRequestError
from cube_api_e2b.pagination import DEFAULT_LIMIT, MAX_LIMIT, paginate
from cube_api_e2b.policy import network_policy
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
    ListedSandboxOut,
    NewSandbox,
    NewSandboxV2,
    SandboxDetailOut,
    SandboxOut,
    SandboxRefreshRequest,
    SandboxTimeoutRequest,
)
from cube_api_e2b.service import ControlPlane
from cube_api_e2b.views import TemplateLookup, detail_out, listed_out, sandbox_out

log = structlog.get_logger(__name__)

router = APIRouter(route_class=E2bRoute, tags=["sandboxes"], dependencies=[Security(API_KEY_SCHEME)])


def parse_states(value: str | None) -> tuple[SandboxState, ...]:
    if not value:
        return (SandboxState.RUNNING, SandboxState.PAUSED)
    states: list[SandboxState] = []
    for part in value.split(","):
        name = part.strip().lower()
        if name not in ("running", "paused"):
            raise InvalidRequestError(field="state", reason=f"{part!r} is not one of running, paused")
        if SandboxState(name) not in states:
            states.append(SandboxState(name))
    return tuple(states)


def parse_metadata(value: str | None) -> dict[str, str] | None:
    """``metadata=k%3Dv%26k2%3Dv2``: a query string whose keys and values are URL-escaped once more."""
    if not value:
        return None
    try:
        pairs = urllib.parse.parse_qsl(value, keep_blank_values=True, strict_parsing=True)
    except ValueError as exc:
        raise InvalidRequestError(field="metadata", reason="expected key=value pairs joined by &") from exc
    return {urllib.parse.unquote(k): urllib.parse.unquote(v) for k, v in pairs}


def spec_for(ctx: E2bContext, body: NewSandboxV2, team_id: str, *, secure: bool) -> SandboxSpec:
    """The core's spec of a create request; what Cube cannot do is a 400 naming the field."""
    check_timeout(ctx, "timeout", body.timeout)
    auto_resume = body.auto_resume is not None and body.auto_resume.enabled
    if auto_resume and not body.auto_pause:
        raise InvalidRequestError(field="autoResume.enabled", reason="auto-resume needs autoPause (on timeout: pause)")
    if auto_resume and body.auto_pause_memory is False:
        raise InvalidRequestError(field="autoResume.enabled",
                                  reason="auto-resume is not supported with autoPauseMemory false: a sandbox paused "
                                         "without memory boots again only by an explicit connect")
    for i, mount in enumerate(body.volume_mounts or ()):
        if not mount.path.startswith("/"):
            raise InvalidRequestError(field=f"volumeMounts[{i}].path", reason="must be an absolute path")
    if body.mcp:
        raise InvalidRequestError(field="mcp", reason="the MCP gateway is not supported")
    if body.iam and body.iam.get("tokens"):
        raise InvalidRequestError(field="iam.tokens", reason="workload identity tokens are not supported")
    return SandboxSpec(
        template_id=body.template_id, team_id=team_id,
        timeout_s=ctx.default_timeout_s if body.timeout is None else body.timeout,
        metadata=dict(body.metadata or {}), env_vars=dict(body.env_vars or {}),
        auto_pause=bool(body.auto_pause), auto_pause_memory=body.auto_pause_memory is not False,
        auto_resume=auto_resume, secure=secure,
        network=network_policy(body.allow_internet_access, body.network),
        volume_mounts=tuple(VolumeMount(name=m.name, path=m.path, read_only=bool(m.read_only))
                            for m in body.volume_mounts or ()))


async def create(ctx: E2bContext, service: ControlPlane, body: NewSandboxV2, team_id: str, *,
                 secure: bool) -> SandboxOut:
    spec = spec_for(ctx, body, team_id, secure=secure)
    started = time.perf_counter()
    sb = await service.create(spec)
    took = time.perf_counter() - started
    ctx.metrics.create_seconds.observe(took)
    # request_ms: since the request entered the app (create_ms of it in the service); the bench
    # (cube_bench.create.phases) splits a create's latency with it
    log.info("sandbox created", sandbox_id=sb.sandbox_id, template=sb.template_id, team=team_id,
             request_ms=request_ms(), create_ms=round(took * 1000, 1))
    return sandbox_out(ctx, sb)


# -- create ----------------------------------------------------------------------------------------


@router.post("/v2/sandboxes", status_code=201, **SANDBOX_RESPONSE,
             responses=errors(400, 403, 404, 409, 429, 500, 503, 504),
             summary="Create sandbox (v2, SDK >= 2.51)")
async def create_v2(body: NewSandboxV2, team: CurrentTeam, ctx: Context, service: Service) -> SandboxOut:
    """Create a sandbox from a template; always secured (the answer carries ``envdAccessToken``)."""
    return await create(ctx, service, body, team.team_id, secure=True)


@router.post("/sandboxes", status_code=201, **SANDBOX_RESPONSE,
             responses=errors(400, 404, 429, 500, 503, 504), summary="Create sandbox (SDK <= 2.50)")
async def create_v1(body: NewSandbox, team: CurrentTeam, ctx: Context, service: Service) -> SandboxOut:
    return await create(ctx, service, body, team.team_id, secure=bool(body.secure))


# -- list ------------------------------------------------------------------------------------------


@router.get("/v2/sandboxes", response_model=list[ListedSandboxOut], response_model_exclude_none=True,
            responses=errors(400, 500), summary="List sandboxes (v2)")
async def list_v2(
    team: CurrentTeam, ctx: Context, service: Service, response: Response,
    metadata: Annotated[str | None, Query(description="URL-encoded k=v pairs joined by &")] = None,
    state: Annotated[str | None, Query(description="comma-separated: running,paused")] = None,
    order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
    started_after: Annotated[datetime | None, Query(alias="startedAfter")] = None,
    template: str | None = None,
    next_token: Annotated[str | None, Query(alias="nextToken")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
) -> list[ListedSandboxOut]:
    states = parse_states(state)
    items: list[Sandbox] = list(service.list(team.team_id, states=states, metadata=parse_metadata(metadata)))
    if started_after is not None:
        after = started_after if started_after.tzinfo else started_after.replace(tzinfo=UTC)
        items = [s for s in items if s.started_at >= after]
    if template:
        wanted = {template}
        try:
            wanted.add(service.get_template(template).template_id)
        except CubeError:
            pass
        items = [s for s in items if s.template_id in wanted or s.alias in wanted]
    page, token = paginate(items, order="asc" if order == "asc" else "desc", limit=limit, next_token=next_token)
    if token:
        response.headers["X-Next-Token"] = token
    if SandboxState.RUNNING in states:
        response.headers["X-Total-Running"] = str(sum(1 for s in items if s.state != SandboxState.PAUSED))
    lookup = TemplateLookup(ctx)
    return [listed_out(ctx, s, lookup) for s in page]


@router.get("/sandboxes", response_model=list[ListedSandboxOut], response_model_exclude_none=True,
            responses=errors(400, 500), summary="List running sandboxes (deprecated)")
async def list_v1(team: CurrentTeam, ctx: Context, service: Service,
                  metadata: str | None = None) -> list[ListedSandboxOut]:
    items = service.list(team.team_id, states=(SandboxState.RUNNING,), metadata=parse_metadata(metadata))
    lookup = TemplateLookup(ctx)
    return [listed_out(ctx, s, lookup) for s in sorted(items, key=lambda s: s.started_at, reverse=True)]


# -- one sandbox -----------------------------------------------------------------------------------


@router.get("/sandboxes/{sandbox_id}", response_model=SandboxDetailOut, response_model_exclude_none=True,
            responses=errors(404, 500), summary="Get a sandbox")
async def get_sandbox(sandbox_id: str, team: CurrentTeam, ctx: Context, service: Service) -> SandboxDetailOut:
    return detail_out(ctx, service.get(team.team_id, sandbox_id))


@router.delete("/sandboxes/{sandbox_id}", status_code=204, response_class=Response,
               responses=errors(404, 500), summary="Kill a sandbox")
async def kill(sandbox_id: str, team: CurrentTeam, service: Service) -> None:
    await service.kill(team.team_id, sandbox_id)
    log.info("sandbox killed", sandbox_id=sandbox_id, team=team.team_id)


@router.post("/sandboxes/{sandbox_id}/timeout", status_code=204, response_class=Response,
             responses=errors(400, 404, 500), summary="Set the timeout (seconds from now; may shorten)")
async def set_timeout(sandbox_id: str, body: SandboxTimeoutRequest, team: CurrentTeam, ctx: Context,
                      service: Service) -> None:
    check_timeout(ctx, "timeout", body.timeout)
    await service.set_timeout(team.team_id, sandbox_id, body.timeout)


@router.post("/sandboxes/{sandbox_id}/refreshes", status_code=204, response_class=Response,
             responses=errors(400, 404), summary="Keep a sandbox alive (never shortens the timeout)")
async def refresh(sandbox_id: str, team: CurrentTeam, ctx: Context, service: Service,
                  body: Annotated[SandboxRefreshRequest | None, Body()] = None) -> None:
    duration = body.duration if body is not None and body.duration is not None else ctx.default_timeout_s
    sb = service.get(team.team_id, sandbox_id)
    if datetime.now(UTC) + timedelta(seconds=duration) > sb.end_at:
        await service.set_timeout(team.team_id, sandbox_id, duration)
