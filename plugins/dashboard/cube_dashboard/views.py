"""The dashboard's routes (``/dashboard/...``): server-rendered pages, form actions, the live feed.

Every page needs a signed-in :class:`~cube_dashboard.sessions.Viewer` (else it redirects to the
sign-in page); every ``POST`` needs the session's CSRF token. A team sees and acts on its own
sandboxes only (another team's is "not found", as in the API); the operator on every team's (an
action then runs as the sandbox's team). Pages refresh themselves from ``/dashboard/events`` (the
event bus as server-sent events): the browser fetches the page again and swaps its live part.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import structlog
from cube_core import CubeError, SandboxService, SandboxSpec, SandboxState, SnapshotNotFoundError
from cube_core.models import Sandbox, SnapshotRef, utcnow
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.templating import Jinja2Templates

from cube_dashboard import assets, processes, sizes
from cube_dashboard.config import DashboardConfig
from cube_dashboard.sessions import COOKIE, LOGIN_COOKIE, PATH, Sessions, Viewer, csrf_ok

log = structlog.get_logger(__name__)

HERE = Path(str(resources.files("cube_dashboard")))
STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
STATES = {"running": (SandboxState.RUNNING,), "paused": (SandboxState.PAUSED,),
          "all": (SandboxState.RUNNING, SandboxState.PAUSED)}
KEEPALIVE_S = 15.0


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def dashboard_router(service: SandboxService, config: DashboardConfig) -> APIRouter:
    router = APIRouter(prefix=PATH, include_in_schema=False)
    sessions = Sessions(service, config.session_ttl_s)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["duration"] = _duration

    # -- helpers ---------------------------------------------------------------------------------

    def viewer_of(request: Request) -> Viewer | None:
        return sessions.viewer(request.cookies.get(COOKIE))

    def page(request: Request, name: str, viewer: Viewer | None, **context: Any) -> HTMLResponse:
        response = templates.TemplateResponse(request, name, {
            "viewer": viewer, "notice": request.query_params.get("notice"), "path": request.url.path, **context})
        response.headers["Cache-Control"] = "no-store"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "frame-ancestors 'none'; form-action 'self'")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        return response

    def to_login() -> RedirectResponse:
        return RedirectResponse(f"{PATH}/login", status_code=303)

    def set_cookie(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
        response.set_cookie(name, value, max_age=max_age, path=PATH, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")

    async def form_of(request: Request) -> dict[str, str]:
        body = (await request.body()).decode("utf-8", "replace")
        return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}

    def same_origin(request: Request) -> bool:
        origin = request.headers.get("origin")
        return origin is None or origin == f"{request.url.scheme}://{request.url.netloc}"

    def back(target: str, notice: str | None = None) -> RedirectResponse:
        if not target.startswith(PATH) or target.startswith("//"):
            target = f"{PATH}/sandboxes"
        if notice:
            target += ("&" if "?" in target else "?") + urlencode({"notice": notice})
        return RedirectResponse(target, status_code=303)

    def team_of(viewer: Viewer, sandbox_id: str) -> str:
        """The team an action on ``sandbox_id`` runs as: the viewer's, or (operator) the sandbox's."""
        return viewer.team_id if viewer.team_id is not None else service.owner_of(sandbox_id)

    def visible(viewer: Viewer, states: tuple[SandboxState, ...]) -> list[Sandbox]:
        if viewer.team_id is None:
            return service.list_all(states=states)
        return service.list(viewer.team_id, states=states)

    def series(sb: Sandbox) -> dict[str, list[Any]]:
        start = utcnow() - timedelta(seconds=config.metrics_window_s)
        try:
            samples = service.sandbox_metrics(sb.team_id, sb.sandbox_id, start=start)
        except CubeError:
            samples = []
        return {"t": [int(s.at.timestamp()) for s in samples],
                "cpu": [round(s.cpu_used_pct, 1) for s in samples],
                "mem": [round(s.mem_used / 2**20, 1) for s in samples],
                "mem_total": [round(s.mem_total / 2**20, 1) for s in samples]}

    def row(sb: Sandbox, now: datetime) -> dict[str, Any]:
        return {"sb": sb, "age": (now - sb.started_at).total_seconds(),
                "left": (sb.end_at - now).total_seconds() if sb.state == SandboxState.RUNNING else None,
                "series": json.dumps(series(sb))}

    async def process_list(sb: Sandbox) -> tuple[list[processes.Process], str | None]:
        """The guest's processes, or why there are none: a paused sandbox is not woken for it."""
        if sb.state != SandboxState.RUNNING:
            return [], f"{sb.state.value}: no processes listed"
        try:
            reply = await service.exec(sb.sandbox_id, processes.COMMAND, timeout=processes.TIMEOUT_S)
        except CubeError as exc:
            return [], f"unavailable: {exc.message}"
        except (OSError, TimeoutError) as exc:
            return [], f"unavailable: {exc or type(exc).__name__}"
        if reply.get("exit_code") != 0:
            return [], f"unavailable: the listing exited with {reply.get('exit_code')}"
        return processes.parse(reply.get("stdout", "")), None

    def snapshot_tree(team: str, sb: Sandbox, snaps: list[SnapshotRef]) -> list[dict[str, Any]]:
        """The sandbox's snapshots as trees (parent -> children by ``parent_id``), each rooted at
        the snapshot they grew from that is not the sandbox's own: its template's, or the
        snapshot it was forked from."""
        own = {s.snapshot_id for s in snaps}
        children: dict[str, list[SnapshotRef]] = {}
        outer: dict[str | None, list[SnapshotRef]] = {}  # grew from a snapshot not the sandbox's
        for s in sorted(snaps, key=lambda s: s.created_at):
            if s.parent_id in own:
                children.setdefault(s.parent_id, []).append(s)
            else:
                outer.setdefault(s.parent_id, []).append(s)

        def node(s: SnapshotRef) -> dict[str, Any]:
            return {"s": s, "current": s.snapshot_id == sb.runtime.parent_snapshot,
                    "children": [node(c) for c in children.get(s.snapshot_id, [])]}

        roots = []
        for parent, grown in outer.items():
            label = "template snapshot"
            if parent is not None:
                try:
                    ref = service.get_snapshot(team, parent)
                    label = f"snapshot of sandbox {ref.sandbox_id}" if ref.sandbox_id else "snapshot"
                except CubeError:
                    pass  # a template's snapshot is not a team's
            roots.append({"id": parent, "label": label, "current": parent == sb.runtime.parent_snapshot,
                          "children": [node(c) for c in grown]})
        return roots

    # -- sign-in ---------------------------------------------------------------------------------

    @router.get("")
    @router.get("/")
    async def home(request: Request) -> Response:
        return RedirectResponse(f"{PATH}/sandboxes" if viewer_of(request) else f"{PATH}/login", status_code=303)

    @router.get("/login")
    async def login_form(request: Request) -> Response:
        token = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(24)
        response = page(request, "login.html", None, login_csrf=token,
                        operator_enabled=service.settings.operator_token is not None)
        set_cookie(response, request, LOGIN_COOKIE, token, 3600)
        return response

    @router.post("/login")
    async def login(request: Request) -> Response:
        form = await form_of(request)
        if not same_origin(request) or not csrf_ok(request.cookies.get(LOGIN_COOKIE, ""), form.get("csrf")):
            return back(f"{PATH}/login", "The sign-in form expired: try again.")
        try:
            session = sessions.sign_in(form.get("secret", ""))
        except CubeError:
            return back(f"{PATH}/login", "That is neither an API key of this server nor its operator token.")
        response = back(f"{PATH}/sandboxes")
        set_cookie(response, request, COOKIE, session.session_id, config.session_ttl_s)
        response.delete_cookie(LOGIN_COOKIE, path=PATH)
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        viewer = viewer_of(request)
        form = await form_of(request)
        if viewer is not None and not csrf_ok(viewer.csrf, form.get("csrf")):
            return Response("CSRF check failed: reload the page", status_code=403)
        if viewer is not None:
            sessions.sign_out(viewer.session_id)
        response = to_login()
        response.delete_cookie(COOKIE, path=PATH)
        return response

    # -- pages -----------------------------------------------------------------------------------

    @router.get("/sandboxes")
    async def sandboxes(request: Request, state: str = "all", template: str = "", meta: str = "") -> Response:
        viewer = viewer_of(request)
        if viewer is None:
            return to_login()
        listed = visible(viewer, STATES.get(state, STATES["all"]))
        if template:
            listed = [s for s in listed if template in (s.template_id, s.alias)]
        key, sep, value = meta.partition("=")
        if meta:
            listed = [s for s in listed if key in s.metadata and (not sep or s.metadata[key] == value)]
        now = utcnow()
        listed.sort(key=lambda s: s.started_at, reverse=True)
        return page(request, "sandboxes.html", viewer, rows=[row(s, now) for s in listed],
                    filters={"state": state, "template": template, "meta": meta}, live=True)

    @router.get("/sandboxes/{sandbox_id}")
    async def sandbox(request: Request, sandbox_id: str) -> Response:
        viewer = viewer_of(request)
        if viewer is None:
            return to_login()
        try:
            team = team_of(viewer, sandbox_id)
            sb = service.get(team, sandbox_id)
        except CubeError as exc:
            return page(request, "missing.html", viewer, what=f"sandbox {sandbox_id}", why=exc.message)
        audit: list[dict[str, Any]] = []
        audit_error = None
        listing = asyncio.ensure_future(process_list(sb))
        try:
            audit = await service.network_audit(team, sandbox_id, limit=200)
        except CubeError as exc:
            audit_error = exc.message
        procs, procs_note = await listing
        counts = {"allow": sum(1 for a in audit if a.get("verdict") == "allow"),
                  "deny": sum(1 for a in audit if a.get("verdict") == "deny")}
        now = utcnow()
        snaps = service.list_snapshots(team, sandbox_id)
        return page(request, "sandbox.html", viewer, r=row(sb, now), audit=audit[-50:][::-1], counts=counts,
                    audit_error=audit_error, snapshots=snaps, tree=snapshot_tree(team, sb, snaps),
                    processes=procs, processes_note=procs_note, template_id=sb.template_id, live=True)

    @router.get("/templates")
    async def templates_page(request: Request) -> Response:
        viewer = viewer_of(request)
        if viewer is None:
            return to_login()
        pool = service.pool_sizes()
        nodes = service.list_nodes()
        listed = []
        for tpl in service.list_templates(viewer.team_id):
            try:
                builds = service.list_builds(tpl.template_id, viewer.team_id)[:5]
            except CubeError:
                builds = []
            size = sizes.template_size(tpl, nodes)
            listed.append({"t": tpl, "pool": pool.get(tpl.template_id, 0), "builds": builds,
                           "image": sizes.human(size.image), "snapshot": sizes.human(size.snapshot)})
        return page(request, "templates.html", viewer, templates=listed, live=True)

    @router.get("/nodes")
    async def nodes(request: Request) -> Response:
        viewer = viewer_of(request)
        if viewer is None:
            return to_login()
        return page(request, "nodes.html", viewer, nodes=service.list_nodes(), live=True)

    @router.get("/start")
    async def start(request: Request) -> Response:
        viewer = viewer_of(request)
        if viewer is None:
            return to_login()
        base = f"{request.url.scheme}://{request.url.netloc}"
        return page(request, "start.html", viewer, api_url=base, domain=service.settings.domain)

    # -- actions ---------------------------------------------------------------------------------

    def action(name: str, run: Callable[[SandboxService, str, str, dict[str, str]], Awaitable[str]]) -> None:
        async def handler(request: Request, sandbox_id: str) -> Response:
            viewer = viewer_of(request)
            if viewer is None:
                return Response("sign in first", status_code=401)
            form = await form_of(request)
            presented = form.get("csrf") or request.headers.get("x-csrf-token")
            if not same_origin(request) or not csrf_ok(viewer.csrf, presented):
                return Response("CSRF check failed: reload the page", status_code=403)
            target = form.get("next") or f"{PATH}/sandboxes"
            try:
                team = team_of(viewer, sandbox_id)
                done = await run(service, team, sandbox_id, form)
            except CubeError as exc:
                log.info("dashboard action refused", action=name, sandbox_id=sandbox_id, error=exc.message)
                return back(target, f"{name} {sandbox_id}: {exc.message}")
            log.info("dashboard action", action=name, sandbox_id=sandbox_id, operator=viewer.operator)
            if name == "kill" and target.startswith(f"{PATH}/sandboxes/"):
                target = f"{PATH}/sandboxes"
            return back(target, done)

        router.add_api_route(f"/sandboxes/{{sandbox_id}}/{name}", handler, methods=["POST"])

    async def pause(s: SandboxService, team: str, sid: str, form: dict[str, str]) -> str:
        await s.pause(team, sid)
        return f"Paused {sid}."

    async def resume(s: SandboxService, team: str, sid: str, form: dict[str, str]) -> str:
        await s.resume(team, sid)
        return f"Resumed {sid}."

    async def kill(s: SandboxService, team: str, sid: str, form: dict[str, str]) -> str:
        await s.kill(team, sid)
        return f"Killed {sid}."

    async def extend(s: SandboxService, team: str, sid: str, form: dict[str, str]) -> str:
        try:
            seconds = int(form.get("seconds", "300"))
        except ValueError:
            seconds = 0
        if not 1 <= seconds <= 86400:
            raise CubeError("the timeout is 1 to 86400 seconds")
        await s.set_timeout(team, sid, seconds)
        return f"{sid} now ends in {_duration(seconds)}."

    async def snapshot(s: SandboxService, team: str, sid: str, form: dict[str, str]) -> str:
        ref = await s.snapshot(team, sid, name=form.get("name") or None)
        return f"Snapshot {ref.snapshot_id} of {sid} taken."

    async def rollback(s: SandboxService, team: str, sid: str, form: dict[str, str]) -> str:
        await s.rollback(team, sid, form.get("snapshot_id", ""))
        return f"{sid} rolled back to {form.get('snapshot_id')}."

    async def fork(s: SandboxService, team: str, sid: str, form: dict[str, str]) -> str:
        snapshot_id = form.get("snapshot_id")
        if not snapshot_id:  # the sandbox as it is now
            made = await s.fork(team, sid, 1)
            return f"Forked {sid}: {', '.join(m.sandbox_id for m in made)}."
        ref = s.get_snapshot(team, snapshot_id)  # another team's is not found
        if ref.sandbox_id != sid:
            raise SnapshotNotFoundError(snapshot_id=snapshot_id)
        sb = s.get(team, sid)
        made_one = await s.create(SandboxSpec(
            template_id=snapshot_id, team_id=team, metadata=sb.metadata, env_vars=sb.env_vars,
            auto_pause=sb.auto_pause, auto_resume=sb.auto_resume, secure=sb.secure, network=sb.network,
            timeout_s=max(1, int((sb.end_at - utcnow()).total_seconds()))))
        return f"Forked {snapshot_id} of {sid}: {made_one.sandbox_id}."

    for name, run in (("pause", pause), ("resume", resume), ("kill", kill), ("timeout", extend),
                      ("snapshot", snapshot), ("rollback", rollback), ("fork", fork)):
        action(name, run)

    # -- live feed and static files --------------------------------------------------------------

    @router.get("/events")
    async def events(request: Request) -> Response:
        viewer = viewer_of(request)
        if viewer is None:
            return Response("sign in first", status_code=401)
        sub = service.events.subscribe(viewer.team_id)

        async def body() -> AsyncIterator[bytes]:
            try:
                yield b"retry: 2000\n\n"
                while True:
                    try:
                        event = await asyncio.wait_for(anext(sub), KEEPALIVE_S)
                    except TimeoutError:
                        yield b": keepalive\n\n"
                        continue
                    except StopAsyncIteration:
                        return
                    yield f"id: {event.id}\ndata: {event.model_dump_json()}\n\n".encode()
            finally:
                sub.close()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @router.get("/static/{name}")
    async def static(name: str) -> Response:
        headers = {"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"}
        if name in STATIC:
            return FileResponse(HERE / "static" / name, media_type=STATIC[name], headers=headers)
        if name in assets.FILES:
            try:
                directory = await asyncio.to_thread(assets.ensure, config.cache)
            except (assets.AssetError, OSError, TimeoutError) as exc:
                log.warning("chart library unavailable", error=str(exc))
                return Response(f"/* charts unavailable: {quote(str(exc))} */", status_code=503,
                                media_type="text/plain")
            media = "text/javascript" if name.endswith(".js") else "text/css"
            return FileResponse(directory / name, media_type=media,
                                headers={**headers, "Cache-Control": "public, max-age=31536000, immutable"})
        return Response("not found", status_code=404)

    return router
