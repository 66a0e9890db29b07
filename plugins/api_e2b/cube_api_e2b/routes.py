"""The E2B control plane: both endpoint generations, plus Cube's documented extensions.

Every route authenticates first (``X-API-Key``), then validates its input (a bad field is a 400
naming it, never FastAPI's 422), then calls one ``SandboxService`` method. Errors of any kind are
answered with the E2B error body through errors.py. Another team's sandbox is "not found" (404):
the service scopes every lookup by team.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import structlog
from cube_core import CubeError, Sandbox, SandboxSpec, SandboxState
from fastapi import APIRouter, Body, Depends, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from starlette.exceptions import HTTPException

from cube_api_e2b.auth import authenticate
from cube_api_e2b.context import E2bContext
from cube_api_e2b.errors import InvalidRequestError, error_body, error_headers, http_error
from cube_api_e2b.pagination import DEFAULT_LIMIT, MAX_LIMIT, paginate
from cube_api_e2b.policy import network_policy, updated_policy
from cube_api_e2b.sandbox_metrics import in_window, sample
from cube_api_e2b.schemas import (
    ConnectSandbox,
    ConnectSandboxV2,
    ErrorBody,
    ForkItemOut,
    ForkSandbox,
    ListedSandboxOut,
    NetworkAuditOut,
    NewSandbox,
    NewSandboxV2,
    NewSnapshot,
    ResumedSandbox,
    RollbackSandbox,
    SandboxDetailOut,
    SandboxesWithMetricsOut,
    SandboxLogsOut,
    SandboxLogsV2Out,
    SandboxMetricOut,
    SandboxNetworkUpdateConfig,
    SandboxOut,
    SandboxPauseRequest,
    SandboxRefreshRequest,
    SandboxTimeoutRequest,
    SnapshotInfoOut,
    TemplateAliasOut,
    TemplateOut,
)
from cube_api_e2b.views import TemplateLookup, detail_out, listed_out, sandbox_out, snapshot_out, template_out

log = structlog.get_logger(__name__)

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error answers of a route, each with the E2B body: always 400 (a malformed parameter,
    header or body; FastAPI's own 422 is never sent) and 401, plus ``codes``."""
    return {code: {"model": ErrorBody, "description": "E2B error body"} for code in sorted({400, 401, *codes})}


def _field(loc: tuple[Any, ...]) -> str:
    parts = list(loc[1:]) if loc and loc[0] in ("body", "query", "path", "header") else list(loc)
    if not parts:
        return str(loc[0]) if loc else "request"
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_message(exc: RequestValidationError) -> str:
    """``"timeout: Input should be a valid integer; metadata.a: ..."``: every bad field, by wire name."""
    problems = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        if err.get("type") == "json_invalid":
            problems.append(f"body: invalid JSON ({err.get('ctx', {}).get('error', 'decode error')})")
        else:
            problems.append(f"{_field(loc)}: {err.get('msg', 'invalid')}")
    return "; ".join(problems) or "invalid request"


def error_response(ctx: E2bContext, exc: CubeError) -> JSONResponse:
    answer = http_error(exc)
    ctx.metrics.errors.labels(str(answer.status), type(exc).__name__).inc()
    if answer.status >= 500:
        log.warning("request failed", status=answer.status, error=type(exc).__name__, message=exc.message)
    return JSONResponse(error_body(answer.status, exc.message, answer.error_code), status_code=answer.status,
                        headers=error_headers(answer, ctx.config.retry_after_s))


def route_class(ctx: E2bContext) -> type[APIRoute]:
    """An ``APIRoute`` whose handler authenticates first and answers every error the E2B way."""

    class E2bRoute(APIRoute):
        def get_route_handler(self) -> Handler:
            inner = super().get_route_handler()
            path = self.path

            async def handler(request: Request) -> Response:
                try:
                    request.state.cube_team = authenticate(ctx.service, request.headers)
                    response = await inner(request)
                except RequestValidationError as exc:
                    response = error_response(ctx, InvalidRequestError(validation_message(exc)))
                except CubeError as exc:
                    response = error_response(ctx, exc)
                except HTTPException as exc:
                    response = JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                                            headers={"Should-Retry": "false"})
                    ctx.metrics.errors.labels(str(exc.status_code), "HTTPException").inc()
                except Exception:
                    log.exception("unexpected error in the E2B API", route=path)
                    ctx.metrics.errors.labels("500", "unexpected").inc()
                    response = JSONResponse(error_body(500, "internal server error", "internal_server_error"),
                                            status_code=500, headers={"Should-Retry": "false"})
                ctx.metrics.requests.labels(request.method, path, str(response.status_code)).inc()
                return response

            return handler

    return E2bRoute


def current_team(request: Request) -> Any:
    return request.state.cube_team


Team = Annotated[Any, Depends(current_team)]
# Documents the key in /openapi.json; the check itself runs first, in the route class.
API_KEY_SCHEME = APIKeyHeader(name="X-API-Key", auto_error=False, description="e2b_... API key")


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


def build_routers(ctx: E2bContext) -> list[APIRouter]:
    service = ctx.service
    router = APIRouter(route_class=route_class(ctx), tags=["sandboxes"],
                       dependencies=[Security(API_KEY_SCHEME)])
    templates = APIRouter(route_class=route_class(ctx), tags=["templates"],
                          dependencies=[Security(API_KEY_SCHEME)])

    def check_timeout(field: str, value: int | None) -> None:
        if value is not None and value > ctx.config.max_timeout_s:
            raise InvalidRequestError(field=field, reason=f"must be at most {ctx.config.max_timeout_s} seconds")

    def spec_for(body: NewSandboxV2, team_id: str, *, secure: bool) -> SandboxSpec:
        check_timeout("timeout", body.timeout)
        if body.auto_pause_memory is False:
            raise InvalidRequestError(field="autoPauseMemory",
                                      reason="filesystem-only auto-pause is not supported; omit it or send true")
        if body.auto_resume is not None and body.auto_resume.enabled:
            raise InvalidRequestError(field="autoResume.enabled", reason="auto-resume is not supported")
        if body.volume_mounts:
            raise InvalidRequestError(field="volumeMounts", reason="volumes are not supported")
        if body.mcp:
            raise InvalidRequestError(field="mcp", reason="the MCP gateway is not supported")
        if body.iam and body.iam.get("tokens"):
            raise InvalidRequestError(field="iam.tokens", reason="workload identity tokens are not supported")
        return SandboxSpec(
            template_id=body.template_id, team_id=team_id,
            timeout_s=ctx.default_timeout_s if body.timeout is None else body.timeout,
            metadata=dict(body.metadata or {}), env_vars=dict(body.env_vars or {}),
            auto_pause=bool(body.auto_pause), secure=secure,
            network=network_policy(body.allow_internet_access, body.network))

    async def create(body: NewSandboxV2, team: Any, *, secure: bool) -> SandboxOut:
        spec = spec_for(body, team.team_id, secure=secure)
        started = time.perf_counter()
        sb = await service.create(spec)
        ctx.metrics.create_seconds.observe(time.perf_counter() - started)
        log.info("sandbox created", sandbox_id=sb.sandbox_id, template=sb.template_id, team=team.team_id)
        return sandbox_out(ctx, sb)

    async def connect(team: Any, sandbox_id: str, timeout: int | None, memory: bool | None,
                      response: Response) -> SandboxOut:
        check_timeout("timeout", timeout)
        before = service.get(team.team_id, sandbox_id)
        if memory is False and before.state == SandboxState.PAUSED:
            raise InvalidRequestError(field="memory", reason="resuming without memory (cold boot) is not supported")
        sb = await service.connect(team.team_id, sandbox_id,
                                   ctx.default_timeout_s if timeout is None else timeout)
        response.status_code = 201 if before.state == SandboxState.PAUSED else 200
        return sandbox_out(ctx, sb)

    sandbox_response: dict[str, Any] = {"response_model": SandboxOut, "response_model_exclude_none": True}

    # -- create ------------------------------------------------------------------------------

    @router.post("/v2/sandboxes", status_code=201, **sandbox_response,
                 responses=_errors(400, 403, 404, 409, 429, 500, 503, 504),
                 summary="Create sandbox (v2, SDK >= 2.51)")
    async def create_v2(body: NewSandboxV2, team: Team) -> SandboxOut:
        """Create a sandbox from a template; always secured (the answer carries ``envdAccessToken``)."""
        return await create(body, team, secure=True)

    @router.post("/sandboxes", status_code=201, **sandbox_response,
                 responses=_errors(400, 404, 429, 500, 503, 504), summary="Create sandbox (SDK <= 2.50)")
    async def create_v1(body: NewSandbox, team: Team) -> SandboxOut:
        return await create(body, team, secure=bool(body.secure))

    # -- list ------------------------------------------------------------------------------------

    @router.get("/v2/sandboxes", response_model=list[ListedSandboxOut], response_model_exclude_none=True,
                responses=_errors(400, 500), summary="List sandboxes (v2)")
    async def list_v2(
        team: Team, response: Response,
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
                responses=_errors(400, 500), summary="List running sandboxes (deprecated)")
    async def list_v1(team: Team, metadata: str | None = None) -> list[ListedSandboxOut]:
        items = service.list(team.team_id, states=(SandboxState.RUNNING,), metadata=parse_metadata(metadata))
        lookup = TemplateLookup(ctx)
        return [listed_out(ctx, s, lookup) for s in sorted(items, key=lambda s: s.started_at, reverse=True)]

    @router.get("/sandboxes/metrics", response_model=SandboxesWithMetricsOut, responses=_errors(400, 500),
                summary="Current metrics of several sandboxes")
    async def metrics_many(team: Team, sandbox_ids: str) -> SandboxesWithMetricsOut:
        ids = list(dict.fromkeys(i.strip() for i in sandbox_ids.split(",") if i.strip()))
        if not ids or len(ids) > 100:
            raise InvalidRequestError(field="sandbox_ids", reason="give 1 to 100 sandbox ids, comma-separated")
        out: dict[str, SandboxMetricOut] = {}
        for sandbox_id in ids:
            try:
                sb = service.get(team.team_id, sandbox_id)
            except CubeError:
                continue
            metric = await sample(ctx, sb)
            if metric is not None:
                out[sandbox_id] = metric
        return SandboxesWithMetricsOut(sandboxes=out)

    # -- one sandbox -----------------------------------------------------------------------------

    @router.get("/sandboxes/{sandbox_id}", response_model=SandboxDetailOut, response_model_exclude_none=True,
                responses=_errors(404, 500), summary="Get a sandbox")
    async def get_sandbox(sandbox_id: str, team: Team) -> SandboxDetailOut:
        return detail_out(ctx, service.get(team.team_id, sandbox_id))

    @router.delete("/sandboxes/{sandbox_id}", status_code=204, response_class=Response,
                   responses=_errors(404, 500), summary="Kill a sandbox")
    async def kill(sandbox_id: str, team: Team) -> None:
        await service.kill(team.team_id, sandbox_id)
        log.info("sandbox killed", sandbox_id=sandbox_id, team=team.team_id)

    @router.post("/sandboxes/{sandbox_id}/timeout", status_code=204, response_class=Response,
                 responses=_errors(400, 404, 500), summary="Set the timeout (seconds from now; may shorten)")
    async def set_timeout(sandbox_id: str, body: SandboxTimeoutRequest, team: Team) -> None:
        check_timeout("timeout", body.timeout)
        await service.set_timeout(team.team_id, sandbox_id, body.timeout)

    @router.post("/sandboxes/{sandbox_id}/refreshes", status_code=204, response_class=Response,
                 responses=_errors(400, 404), summary="Keep a sandbox alive (never shortens the timeout)")
    async def refresh(sandbox_id: str, team: Team,
                      body: Annotated[SandboxRefreshRequest | None, Body()] = None) -> None:
        duration = body.duration if body is not None and body.duration is not None else ctx.default_timeout_s
        sb = service.get(team.team_id, sandbox_id)
        if datetime.now(UTC) + timedelta(seconds=duration) > sb.end_at:
            await service.set_timeout(team.team_id, sandbox_id, duration)

    @router.post("/sandboxes/{sandbox_id}/pause", status_code=204, response_class=Response,
                 responses=_errors(400, 404, 409, 500), summary="Pause a sandbox (409 if already paused)")
    async def pause(sandbox_id: str, team: Team,
                    body: Annotated[SandboxPauseRequest | None, Body()] = None) -> None:
        if body is not None and body.memory is False:
            raise InvalidRequestError(field="memory", reason="filesystem-only pause is not supported")
        await service.pause(team.team_id, sandbox_id)

    @router.post("/sandboxes/{sandbox_id}/resume", status_code=201, **sandbox_response,
                 responses=_errors(400, 404, 409, 429, 500),
                 summary="Resume a paused sandbox (deprecated; use connect)")
    async def resume(sandbox_id: str, team: Team,
                     body: Annotated[ResumedSandbox | None, Body()] = None) -> SandboxOut:
        timeout = body.timeout if body is not None else None
        check_timeout("timeout", timeout)
        sb = await service.resume(team.team_id, sandbox_id, ctx.default_timeout_s if timeout is None else timeout)
        return sandbox_out(ctx, sb)

    @router.post("/v2/sandboxes/{sandbox_id}/connect", **sandbox_response,
                 responses={201: {"model": SandboxOut, "description": "The sandbox was resumed"},
                            **_errors(400, 404, 409, 429, 500)},
                 summary="Connect (resume if paused; the timeout only grows), SDK >= 2.51")
    async def connect_v2(sandbox_id: str, team: Team, response: Response,
                         body: Annotated[ConnectSandboxV2 | None, Body()] = None) -> SandboxOut:
        body = body or ConnectSandboxV2()
        return await connect(team, sandbox_id, body.timeout, body.memory, response)

    @router.post("/sandboxes/{sandbox_id}/connect", **sandbox_response,
                 responses={201: {"model": SandboxOut, "description": "The sandbox was resumed"},
                            **_errors(400, 404, 409, 429, 500)},
                 summary="Connect (resume if paused; the timeout only grows), SDK 2.10-2.50")
    async def connect_v1(sandbox_id: str, body: ConnectSandbox, team: Team, response: Response) -> SandboxOut:
        return await connect(team, sandbox_id, body.timeout, None, response)

    @router.put("/sandboxes/{sandbox_id}/network", status_code=204, response_class=Response,
                responses=_errors(400, 404, 409, 429, 500), summary="Replace the egress rules of a sandbox")
    async def update_network(sandbox_id: str, body: SandboxNetworkUpdateConfig, team: Team) -> None:
        sb = service.get(team.team_id, sandbox_id)
        await service.update_network(team.team_id, sandbox_id, updated_policy(sb.network, body))

    @router.get("/sandboxes/{sandbox_id}/network/audit", response_model=NetworkAuditOut,
                responses=_errors(400, 404, 500), summary="Cube extension: recent egress decisions of a sandbox")
    async def network_audit(sandbox_id: str, team: Team,
                            limit: Annotated[int, Query(ge=1, le=10_000)] = 1000) -> NetworkAuditOut:
        events = await service.network_audit(team.team_id, sandbox_id, limit=limit)
        return NetworkAuditOut(sandbox_id=sandbox_id, events=events)

    @router.get("/sandboxes/{sandbox_id}/metrics", response_model=list[SandboxMetricOut],
                responses=_errors(400, 404, 500), summary="Sandbox metrics (the current sample)")
    async def metrics_one(sandbox_id: str, team: Team,
                          start: Annotated[int | None, Query(ge=0)] = None,
                          end: Annotated[int | None, Query(ge=0)] = None) -> list[SandboxMetricOut]:
        metric = await sample(ctx, service.get(team.team_id, sandbox_id))
        return [metric] if metric is not None and in_window(metric, start, end) else []

    @router.get("/sandboxes/{sandbox_id}/logs", response_model=SandboxLogsOut, responses=_errors(404, 500),
                summary="Sandbox logs (Cube keeps none yet: always empty)")
    async def logs_v1(sandbox_id: str, team: Team, start: Annotated[int | None, Query(ge=0)] = None,
                      limit: Annotated[int, Query(ge=0)] = 1000) -> SandboxLogsOut:
        service.get(team.team_id, sandbox_id)
        return SandboxLogsOut(logs=[], log_entries=[])

    @router.get("/v2/sandboxes/{sandbox_id}/logs", response_model=SandboxLogsV2Out, responses=_errors(404, 500),
                summary="Sandbox logs v2 (Cube keeps none yet: always empty)")
    async def logs_v2(sandbox_id: str, team: Team, cursor: Annotated[int | None, Query(ge=0)] = None,
                      limit: Annotated[int, Query(ge=0, le=1000)] = 1000) -> SandboxLogsV2Out:
        service.get(team.team_id, sandbox_id)
        return SandboxLogsV2Out(logs=[])

    @router.post("/sandboxes/{sandbox_id}/fork", status_code=201, response_model=list[ForkItemOut],
                 response_model_exclude_none=True, responses=_errors(400, 404, 409, 429, 500),
                 summary="Fork: independent copies of a sandbox as it is now, each with a fresh identity")
    async def fork(sandbox_id: str, team: Team,
                   body: Annotated[ForkSandbox | None, Body()] = None) -> list[ForkItemOut]:
        body = body or ForkSandbox()
        forks = await service.fork(team.team_id, sandbox_id, count=body.count, timeout_s=body.timeout)
        return [ForkItemOut(sandbox=sandbox_out(ctx, sb)) for sb in forks]

    @router.post("/sandboxes/{sandbox_id}/snapshots", status_code=201, response_model=SnapshotInfoOut,
                 responses=_errors(400, 404, 409, 429, 500), summary="Snapshot a sandbox (memory, processes, disk)")
    async def snapshot(sandbox_id: str, team: Team,
                       body: Annotated[NewSnapshot | None, Body()] = None) -> SnapshotInfoOut:
        body = body or NewSnapshot()
        if body.memory is False:
            raise InvalidRequestError(field="memory", reason="filesystem-only snapshots are not supported")
        ref = await service.snapshot(team.team_id, sandbox_id, name=body.name)
        return snapshot_out(ref)

    @router.post("/sandboxes/{sandbox_id}/rollback", response_model=SandboxOut, responses=_errors(400, 404, 500),
                 summary="Cube extension: put a sandbox back to one of its snapshots (same id)")
    async def rollback(sandbox_id: str, body: RollbackSandbox, team: Team) -> SandboxOut:
        return sandbox_out(ctx, await service.rollback(team.team_id, sandbox_id, body.snapshot_id))

    @templates.get("/snapshots", response_model=list[SnapshotInfoOut], responses=_errors(400, 500),
                   summary="List the team's snapshots")
    async def list_snapshots(team: Team, response: Response, sandbox_id: Annotated[str | None, Query(
            alias="sandboxID")] = None, name: str | None = None,
                             limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                             next_token: Annotated[str | None, Query(alias="nextToken")] = None
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

    @templates.delete("/templates/{template_id}", status_code=204, response_class=Response,
                      responses=_errors(404, 409, 500), summary="Delete a snapshot (templates are managed by cube)")
    async def delete_template(template_id: str, team: Team) -> None:
        await service.delete_snapshot(team.team_id, template_id)

    # -- templates -------------------------------------------------------------------------------

    @templates.get("/templates", response_model=list[TemplateOut], responses=_errors(500), summary="List templates")
    async def list_templates(team: Team) -> list[TemplateOut]:
        return [template_out(ctx, t) for t in service.list_templates()]

    @templates.get("/templates/aliases/{alias}", response_model=TemplateAliasOut, responses=_errors(400, 404, 500),
                   summary="Does a template with this alias exist?")
    async def template_alias(alias: str, team: Team) -> TemplateAliasOut:
        template = service.get_template(alias)
        return TemplateAliasOut(template_id=template.template_id, public=True)

    return [router, templates]
