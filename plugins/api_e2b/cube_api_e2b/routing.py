"""What every control-plane route shares: the route class, the typed dependencies, the error docs.

* :class:`E2bRoute` authenticates first (``X-API-Key``; a missing or bad key is a 401 before the
  body or any parameter is looked at), then runs the route, and answers every error the E2B way
  (errors.py): a bad field is a 400 naming it, never FastAPI's 422.
* :class:`BindContext` (ASGI middleware, added by the plugin) tells the routes of one app which
  :class:`E2bContext` they serve; the routers themselves are module-level and hold no state.
* The dependencies (:data:`Context`, :data:`Service`, :data:`CurrentTeam`) are what a route may
  ask for; a per-route test mounts one router in a bare app and overrides them.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import structlog
from cube_core import AuthError, CubeError, Team
from cube_core.log import bound_ids
from fastapi import Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from cube_api_e2b.auth import api_key_from, authenticate
from cube_api_e2b.context import E2bContext
from cube_api_e2b.errors import InvalidRequestError, error_body, error_headers, http_error
from cube_api_e2b.schemas import ErrorBody, SandboxOut
from cube_api_e2b.service import ControlPlane

log = structlog.get_logger(__name__)

Handler = Callable[[Request], Coroutine[Any, Any, Response]]
CONTEXT_KEY = "cube_api_e2b.context"
"""The ASGI scope key under which :class:`BindContext` puts the app's :class:`E2bContext`."""

# Documents the key in /openapi.json; the check itself runs first, in the route class.
API_KEY_SCHEME = APIKeyHeader(name="X-API-Key", auto_error=False, description="e2b_... API key")
SANDBOX_RESPONSE: dict[str, Any] = {"response_model": SandboxOut, "response_model_exclude_none": True}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error answers of a route, each with the E2B body: always 400 (a malformed parameter,
    header or body; FastAPI's own 422 is never sent) and 401, plus ``codes``."""
    return {code: {"model": ErrorBody, "description": "E2B error body"} for code in sorted({400, 401, *codes})}


# -- binding an app's context ----------------------------------------------------------------------


class BindContext:
    """ASGI middleware: every HTTP request of this app is served with ``ctx``."""

    def __init__(self, app: ASGIApp, ctx: E2bContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope[CONTEXT_KEY] = self.ctx
        await self.app(scope, receive, send)


def context_of(request: Request) -> E2bContext:
    ctx = request.scope.get(CONTEXT_KEY)
    if not isinstance(ctx, E2bContext):
        raise RuntimeError("the E2B routes are served without their context: add the BindContext middleware")
    return ctx


# -- dependencies ----------------------------------------------------------------------------------


# The dependencies are coroutines although they do not wait for anything: FastAPI runs a plain
# ``def`` dependency in its thread pool, and three thread round trips per request cost a create
# at c=50 more than the route itself (docs/bench.md, "Session 22: the c=50 wave").


async def get_context(request: Request) -> E2bContext:
    return context_of(request)


async def get_service(ctx: Annotated[E2bContext, Depends(get_context)]) -> ControlPlane:
    return ctx.service


def team_of(request: Request) -> Team:
    """The team :class:`E2bRoute` authenticated (never a default: no team, no answer)."""
    team = getattr(request.state, "cube_team", None)
    if not isinstance(team, Team):
        raise AuthError("invalid API key")
    return team


async def current_team(request: Request) -> Team:
    return team_of(request)


Context = Annotated[E2bContext, Depends(get_context)]
Service = Annotated[ControlPlane, Depends(get_service)]
CurrentTeam = Annotated[Team, Depends(current_team)]


# -- the route class -------------------------------------------------------------------------------


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


class E2bRoute(APIRoute):
    """An ``APIRoute`` whose handler authenticates first and answers every error the E2B way."""

    def get_route_handler(self) -> Handler:
        inner = super().get_route_handler()
        path = self.path

        async def handler(request: Request) -> Response:
            ctx = context_of(request)
            try:
                request.state.cube_team = team = self.authenticate(ctx, request)
                with bound_ids(team_id=team.team_id if team is not None else None,
                               sandbox_id=request.path_params.get("sandbox_id")):
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

    def authenticate(self, ctx: E2bContext, request: Request) -> Team | None:
        """The caller's team; :class:`AuthError` (401) when the key is missing or bad."""
        return authenticate(ctx.service, request.headers)


class TeamOrOperatorRoute(E2bRoute):
    """Also lets the operator in (``[core] operator_token`` as the key or bearer token): the route
    then sees the team ``None`` (every team) through :data:`Caller`."""

    def authenticate(self, ctx: E2bContext, request: Request) -> Team | None:
        presented = api_key_from(request.headers)
        token = ctx.settings.operator_secret()
        if token is not None and presented is not None and hmac.compare_digest(presented.encode(), token.encode()):
            request.state.cube_operator = True
            return None
        return authenticate(ctx.service, request.headers)


async def current_caller(request: Request) -> Team | None:
    """The team :class:`TeamOrOperatorRoute` authenticated, or None for the operator."""
    if getattr(request.state, "cube_operator", False) is True:
        return None
    return team_of(request)


Caller = Annotated[Team | None, Depends(current_caller)]


# -- input checks shared by several routes ----------------------------------------------------------


def check_timeout(ctx: E2bContext, field: str, value: int | None) -> None:
    if value is not None and value > ctx.config.max_timeout_s:
        raise InvalidRequestError(field=field, reason=f"must be at most {ctx.config.max_timeout_s} seconds")
