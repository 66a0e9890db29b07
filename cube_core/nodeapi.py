"""The node agent's HTTP app (``cube node``): what :class:`~cube_core.nodehttp.HttpNodeClient` calls.

:func:`node_app` wraps a :class:`~cube_core.node.NodeAgent` in one route per agent method under
``/node/v1`` (the wire format is in :mod:`cube_core.nodehttp`). Every request, API or sandbox
traffic, must carry the cluster token in ``x-cube-cluster-token`` (else 401, the token is never
logged). A request that carries ``x-cube-sandbox-id`` is sandbox traffic a master's edge proxy
sends: it goes to ``edge`` (the app of the ``cube_node_edge`` hook) without the token header,
and answers 501 when no plugin provides an edge. Everything else goes to the API routes.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog
from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from cube_core.builds import engine_of
from cube_core.buildspec import BuildJob
from cube_core.errors import ConfigError, CubeError, NodeError, UnsupportedOperation
from cube_core.models import ExecReply, Node, Sandbox, SandboxRuntime, Template
from cube_core.nodeclient import Launched, LaunchRequest, SavedSnapshot
from cube_core.nodehttp import (
    PREFIX,
    SANDBOX_HEADER,
    TOKEN_HEADER,
    AddressReply,
    BuildFileReply,
    DestroyReply,
    ErrorBody,
    ExecRequest,
    FreeBuildRequest,
    HealthReply,
    ImportRequest,
    PolicyRequest,
    RemovedReply,
    RollbackRequest,
    SnapshotRequest,
    error_body,
    error_status,
)
from cube_core.requestctx import RequestContext
from cube_core.snapshotfiles import Received, SnapshotExport
from cube_core.templatebuilds import build_file_path, save_upload
from cube_core.volumes import VolumeAnswer, VolumeCall

if TYPE_CHECKING:
    from cube_core.node import NodeAgent

log = structlog.get_logger(__name__)

_TOKEN = TOKEN_HEADER.encode()
_SANDBOX = SANDBOX_HEADER.encode()


def edge_resolver(agent: NodeAgent) -> Callable[[str, int], Awaitable[tuple[str, int]]]:
    """The ``resolve`` argument of ``cube_node_edge``: a sandbox's port on this node, once its
    guest applied its create message."""

    async def resolve(sandbox_id: str, port: int) -> tuple[str, int]:
        return await agent.guest_address(sandbox_id), port

    return resolve


def node_app(agent: NodeAgent, *, token: str, edge: ASGIApp | None = None) -> ASGIApp:
    """The HTTP app of ``agent``; see the module docstring. ``token`` must not be empty."""
    if not token:
        raise ConfigError("[cluster] token is empty: a node agent never serves without one")
    if agent.token is None:
        agent.token = token  # the same token fetches snapshot files from the other nodes
    return RequestContext(_ClusterGate(_api(agent), edge, token), name="node")


def _check_path(path_id: str, body_id: str) -> None:
    if path_id != body_id:
        raise NodeError(f"the path names sandbox {path_id}, the body {body_id}")


def _api(agent: NodeAgent) -> FastAPI:
    api = FastAPI(title="Cube node agent", docs_url=None, redoc_url=None, openapi_url=None)

    @api.exception_handler(CubeError)
    async def cube_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, CubeError)
        return JSONResponse(error_body(exc).model_dump(mode="json"), status_code=error_status(exc))

    @api.exception_handler(RequestValidationError)
    async def malformed(request: Request, exc: Exception) -> JSONResponse:
        body = ErrorBody(error=NodeError.__name__, message=f"malformed request to {request.url.path}: {exc}"[:2000])
        return JSONResponse(body.model_dump(mode="json"), status_code=422)

    @api.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        # the server logs the traceback after this answer
        body = ErrorBody(error=NodeError.__name__, message=f"node agent failed: {type(exc).__name__}: {exc}"[:2000])
        return JSONResponse(body.model_dump(mode="json"), status_code=500)

    @api.get(PREFIX + "/health")
    async def health() -> HealthReply:
        return HealthReply(node_id=agent.node_id)

    @api.get(PREFIX + "/status")
    async def status() -> Node:
        return agent.report()

    @api.post(PREFIX + "/sandboxes")
    async def launch(request: LaunchRequest) -> Launched:
        return await agent.launch(request)

    @api.post(PREFIX + "/sandboxes/{sandbox_id}/destroy")
    async def destroy(sandbox_id: str, sandbox: Sandbox) -> DestroyReply:
        _check_path(sandbox_id, sandbox.sandbox_id)
        return DestroyReply(errors=await agent.destroy(sandbox))

    @api.post(PREFIX + "/sandboxes/{sandbox_id}/pause", status_code=204, response_class=Response)
    async def pause(sandbox_id: str) -> None:
        await agent.pause(sandbox_id)

    @api.post(PREFIX + "/sandboxes/{sandbox_id}/pause-to-disk")
    async def pause_to_disk(sandbox_id: str) -> SandboxRuntime:
        return await agent.pause_to_disk(sandbox_id)

    @api.post(PREFIX + "/sandboxes/{sandbox_id}/drop-memory")
    async def drop_memory(sandbox_id: str) -> SandboxRuntime:
        return await agent.drop_memory(sandbox_id)

    @api.post(PREFIX + "/sandboxes/{sandbox_id}/resume")
    async def resume(sandbox_id: str) -> SandboxRuntime:
        return await agent.resume(sandbox_id)

    @api.post(PREFIX + "/sandboxes/{sandbox_id}/snapshots")
    async def snapshot(sandbox_id: str, request: SnapshotRequest) -> SavedSnapshot:
        return await agent.snapshot(sandbox_id, request.snapshot_id, memory=request.memory)

    @api.post(PREFIX + "/builds", status_code=204, response_class=Response)
    async def build_template(job: BuildJob) -> None:
        engine_of(agent).start(job)

    @api.get(PREFIX + "/build-files/{team_id}/{files_hash}")
    async def build_file(team_id: str, files_hash: str) -> BuildFileReply:
        path = build_file_path(agent.settings.state_dir, team_id, files_hash)
        return BuildFileReply(present=path.is_file(), path=path)

    @api.put(PREFIX + "/build-files/{team_id}/{files_hash}")
    async def put_build_file(team_id: str, files_hash: str, request: Request) -> BuildFileReply:
        path = build_file_path(agent.settings.state_dir, team_id, files_hash)
        await save_upload(path, request.stream())
        return BuildFileReply(present=True, path=path)

    @api.post(PREFIX + "/templates/{template_id}/remove")
    async def remove_template(template_id: str, template: Template) -> RemovedReply:
        _check_path(template_id, template.template_id)
        return RemovedReply(deleted=await agent.remove_template(template))

    @api.post(PREFIX + "/builds/{build_id}/free")
    async def free_build(build_id: str, body: FreeBuildRequest) -> RemovedReply:
        return RemovedReply(deleted=await agent.free_build(build_id, body.snapshot))

    @api.post(PREFIX + "/volumes/{volume_id}")
    async def volume(volume_id: str, call: VolumeCall) -> VolumeAnswer:
        _check_path(volume_id, call.volume_id)
        return await agent.volume(call)

    @api.delete(PREFIX + "/snapshots/{snapshot_id}", status_code=204, response_class=Response)
    async def delete_snapshot(snapshot_id: str) -> None:
        await agent.delete_snapshot(snapshot_id)

    @api.get(PREFIX + "/snapshots/{snapshot_id}/manifest")
    async def snapshot_manifest(snapshot_id: str) -> SnapshotExport:
        return await agent.export_snapshot(snapshot_id)

    @api.get(PREFIX + "/snapshots/{snapshot_id}/files")
    async def snapshot_files(snapshot_id: str, have: list[str] = Query(default=[])) -> StreamingResponse:  # noqa: B008
        files = await asyncio.to_thread(agent.export_files, snapshot_id, have)  # errors before the answer starts
        return StreamingResponse(files, media_type="application/x-cube-snapshot-files")

    @api.post(PREFIX + "/snapshots/{snapshot_id}/import")
    async def import_snapshot(snapshot_id: str, request: ImportRequest) -> Received:
        if snapshot_id != request.snapshot.snapshot_id:
            raise NodeError(f"the path names snapshot {snapshot_id}, the body {request.snapshot.snapshot_id}")
        return await agent.import_snapshot(request.snapshot, request.origin)

    @api.post(PREFIX + "/sandboxes/{sandbox_id}/rollback")
    async def rollback(sandbox_id: str, request: RollbackRequest) -> Launched:
        _check_path(sandbox_id, request.sandbox.sandbox_id)
        return await agent.rollback(request.sandbox, request.snapshot, paused=request.paused)

    @api.put(PREFIX + "/sandboxes/{sandbox_id}/policy", status_code=204, response_class=Response)
    async def update_policy(sandbox_id: str, request: PolicyRequest) -> None:
        await agent.update_policy(sandbox_id, request.policy, request.rules)

    @api.get(PREFIX + "/sandboxes/{sandbox_id}/audit")
    async def audit(sandbox_id: str, limit: int = 1000) -> list[dict[str, Any]]:
        return await agent.audit(sandbox_id, limit)

    @api.post(PREFIX + "/sandboxes/{sandbox_id}/exec")
    async def exec_(sandbox_id: str, request: ExecRequest) -> ExecReply:
        return await agent.exec(sandbox_id, request.cmd, request.timeout)

    @api.get(PREFIX + "/sandboxes/{sandbox_id}/address")
    async def address(sandbox_id: str) -> AddressReply:
        return AddressReply(host=await agent.guest_address(sandbox_id))

    return api


class _ClusterGate:
    """Checks the cluster token of every request, then hands it to the edge or the API."""

    def __init__(self, api: FastAPI, edge: ASGIApp | None, token: str) -> None:
        self.api = api
        self.edge = edge
        self._token = token.encode()

    def __repr__(self) -> str:
        return f"_ClusterGate(edge={self.edge!r})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            await self.api(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = list(scope["headers"])
        given = [v for k, v in headers if k == _TOKEN]
        if len(given) != 1 or not hmac.compare_digest(given[0], self._token):
            client = scope.get("client")
            log.warning("request without the cluster token refused", path=scope.get("path"),
                        client=client[0] if client else None, token_given=bool(given))
            await _refuse(scope, send, 401, ErrorBody(
                error=NodeError.__name__, message=f"missing or wrong cluster token ({TOKEN_HEADER})"))
            return
        if any(k == _SANDBOX for k, _ in headers):
            if self.edge is None:
                err = UnsupportedOperation(driver="this node agent", operation="sandbox traffic (no cube_node_edge)")
                await _refuse(scope, send, 501, error_body(err))
                return
            # the guest never sees the cluster token
            await self.edge({**scope, "headers": [(k, v) for k, v in headers if k != _TOKEN]}, receive, send)
            return
        await self.api(scope, receive, send)


async def _refuse(scope: Scope, send: Send, status: int, body: ErrorBody) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": body.message[:120]})
        return
    await JSONResponse(body.model_dump(mode="json"), status_code=status)(scope, _no_body, send)


async def _no_body() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}
