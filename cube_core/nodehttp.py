"""A node agent over HTTP: :class:`HttpNodeClient`, and the wire format it shares with
:func:`cube_core.nodeapi.node_app` (request/answer models, the error transport).

Every request carries the cluster token (header ``x-cube-cluster-token``); paths are under
``/node/v1``. Bodies are the pydantic models of :mod:`cube_core.nodeclient` and
:mod:`cube_core.models`, plus the small envelopes below for methods with several arguments.

Errors travel as JSON ``{"error": <class name>, "message": ..., "fields": {...}}`` and the
client raises the same :class:`~cube_core.errors.CubeError` subclass with the same fields (a name
it does not know becomes a :class:`~cube_core.errors.NodeError`). A node that cannot be reached
(refused, reset, timed out) is a :class:`~cube_core.errors.NodeUnavailableError`. A launch or a
rollback whose answer timed out may still complete on the node: the caller destroys it.
"""

from __future__ import annotations

import asyncio
import enum
import math
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import structlog
from pydantic import BaseModel, Field

from cube_core import telemetry
from cube_core.buildspec import BuildJob
from cube_core.errors import (
    CubeError,
    InvalidStateError,
    NoCapacityError,
    NodeError,
    NodeUnavailableError,
    SnapshotInUseError,
    UnsupportedOperation,
    VmmError,
)
from cube_core.log import REQUEST_ID_HEADER, current_ids
from cube_core.models import (
    EgressRule,
    ExecReply,
    Frozen,
    NetworkPolicy,
    Node,
    Sandbox,
    SandboxRuntime,
    SnapshotRef,
    Template,
)
from cube_core.nodeclient import Endpoint, Launched, LaunchRequest, SavedSnapshot
from cube_core.snapshotfiles import Received, SnapshotExport, unpack
from cube_core.volumes import VolumeAnswer, VolumeCall

log = structlog.get_logger(__name__)

PREFIX = "/node/v1"
TOKEN_HEADER = "x-cube-cluster-token"
SANDBOX_HEADER = "x-cube-sandbox-id"
PORT_HEADER = "x-cube-sandbox-port"

M = TypeVar("M", bound=BaseModel)


# -- wire envelopes --------------------------------------------------------------------------------


class DestroyReply(Frozen):
    errors: list[str]


class BuildFileReply(Frozen):
    present: bool
    path: Path
    """Where the node keeps it."""


class RemovedReply(Frozen):
    deleted: list[str]


class SnapshotRequest(Frozen):
    snapshot_id: str
    memory: bool = True


class FreeBuildRequest(Frozen):
    snapshot: SnapshotRef | None = None


class RollbackRequest(Frozen):
    sandbox: Sandbox
    snapshot: SnapshotRef
    paused: bool


class ImportRequest(Frozen):
    snapshot: SnapshotRef
    origin: Node


class PolicyRequest(Frozen):
    policy: NetworkPolicy
    rules: tuple[EgressRule, ...] = ()


class ExecRequest(Frozen):
    cmd: tuple[str, ...]
    timeout: float


class AddressReply(Frozen):
    host: str


class HealthReply(Frozen):
    node_id: str
    status: str = "ok"


class ErrorBody(Frozen):
    error: str
    message: str
    fields: dict[str, Any] = Field(default_factory=dict)


# -- the error transport ---------------------------------------------------------------------------


def error_status(exc: CubeError) -> int:
    """The HTTP status of an agent's error (for people and proxies; the client goes by the name)."""
    if any(cls.__name__.endswith("NotFoundError") for cls in type(exc).__mro__):
        return 404
    if isinstance(exc, (InvalidStateError, SnapshotInUseError)):
        return 409
    if isinstance(exc, (NoCapacityError, NodeUnavailableError)):
        return 503
    if isinstance(exc, VmmError):
        return 502
    if isinstance(exc, UnsupportedOperation):
        return 501
    return 400


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, enum.Enum):
        return _json_safe(value.value)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_json_safe(v) for v in value]
    return str(value)


def error_body(exc: CubeError) -> ErrorBody:
    return ErrorBody(error=type(exc).__name__, message=exc.message, fields=_json_safe(exc.fields))


def _subclasses(cls: type[CubeError]) -> Iterator[type[CubeError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def error_class(name: str) -> type[CubeError]:
    """The :class:`CubeError` subclass called ``name`` (plugins' too, once imported); else NodeError."""
    if name == CubeError.__name__:
        return CubeError
    return next((cls for cls in _subclasses(CubeError) if cls.__name__ == name), NodeError)


def error_from_body(body: ErrorBody) -> CubeError:
    """The error an agent raised, rebuilt: same class, message and fields."""
    cls = error_class(body.error)
    try:
        return cls(body.message, **body.fields)
    except Exception:  # a subclass with its own constructor, or a field called "message"
        return NodeError(f"{body.error}: {body.message}")


# -- the client ------------------------------------------------------------------------------------


class NodeTimeouts(Frozen):
    """Seconds to wait for a node's answer, per kind of call (a launch or a rollback boots or
    restores a VM: tens of seconds under TCG; a snapshot writes the guest's memory)."""

    default: float = 30.0
    launch: float = 120.0
    snapshot: float = 300.0
    transfer: float = 1800.0
    """Copying a snapshot's files from another node (a template image and RAM the first time)."""
    exec_margin: float = 10.0
    """Added to an exec's own timeout (the command's), for the trip and the guest's answer."""


DEFAULT_TIMEOUTS = NodeTimeouts()


def _path(*parts: str) -> str:
    return PREFIX + "".join("/" + quote(p, safe="") for p in parts)


class HttpNodeClient:
    """A :class:`~cube_core.nodeclient.NodeClient` for the node agent at ``url`` (``cube node``).

    Close it with :meth:`aclose` (or use it as an async context manager)."""

    def __init__(self, node_id: str, url: str, token: str, *, timeout: NodeTimeouts | float = DEFAULT_TIMEOUTS,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        if not token:
            raise NodeError("the cluster token is empty", node_id=node_id)
        self._node_id = node_id
        self.url = url.rstrip("/")
        self._token = token
        self.timeouts = timeout if isinstance(timeout, NodeTimeouts) else NodeTimeouts(default=timeout)
        parsed = httpx.URL(self.url)
        self._host = parsed.host
        self._port = parsed.port or (443 if parsed.scheme == "https" else 80)
        # trust_env=False: cluster traffic (and its token) never goes through an HTTP(S)_PROXY
        self._client = httpx.AsyncClient(base_url=self.url, headers={TOKEN_HEADER: token},
                                         timeout=self.timeouts.default, transport=transport,
                                         trust_env=False, follow_redirects=False)

    def __repr__(self) -> str:
        return f"HttpNodeClient(node_id={self._node_id!r}, url={self.url!r})"

    @property
    def node_id(self) -> str:
        return self._node_id

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> HttpNodeClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- transport -----------------------------------------------------------------------------

    async def _call(self, method: str, path: str, *, body: BaseModel | None = None,
                    params: dict[str, str | int] | None = None, timeout: float | None = None,
                    content: AsyncIterator[bytes] | None = None) -> httpx.Response:
        headers = {REQUEST_ID_HEADER: rid} if (rid := current_ids().get("request_id")) else {}
        telemetry.inject(headers)  # the node's spans continue this trace
        try:
            resp = await self._client.request(
                method, path, json=body.model_dump(mode="json") if body is not None else None, params=params,
                content=content, headers=headers, timeout=timeout if timeout is not None else self.timeouts.default)
        except httpx.TransportError as exc:
            detail = f"{method} {path}: {type(exc).__name__}" + (f": {exc}" if str(exc) else "")
            log.warning("node unreachable", node_id=self._node_id, url=self.url, detail=detail)
            raise NodeUnavailableError(node_id=self._node_id, detail=detail) from exc
        if resp.is_success:
            return resp
        try:
            body_in = ErrorBody.model_validate(resp.json())
        except ValueError:
            raise NodeError(f"node {self._node_id} answered {method} {path} with HTTP {resp.status_code}: "
                            f"{resp.text[:300]}", node_id=self._node_id, status=resp.status_code) from None
        raise error_from_body(body_in)

    def _parse(self, model: type[M], resp: httpx.Response) -> M:
        try:
            return model.model_validate(resp.json())
        except ValueError as exc:
            raise NodeError(f"node {self._node_id} answered {resp.request.method} {resp.request.url.path} "
                            f"with a malformed {model.__name__}: {str(exc)[:300]}", node_id=self._node_id) from None

    # -- NodeClient ----------------------------------------------------------------------------

    async def health(self) -> HealthReply:
        """The agent answers and accepts the token (no side effect)."""
        return self._parse(HealthReply, await self._call("GET", _path("health")))

    async def status(self) -> Node:
        return self._parse(Node, await self._call("GET", _path("status")))

    async def launch(self, request: LaunchRequest) -> Launched:
        resp = await self._call("POST", _path("sandboxes"), body=request, timeout=self.timeouts.launch)
        return self._parse(Launched, resp)

    async def destroy(self, sandbox: Sandbox) -> list[str]:
        resp = await self._call("POST", _path("sandboxes", sandbox.sandbox_id, "destroy"), body=sandbox,
                                timeout=self.timeouts.launch)
        return self._parse(DestroyReply, resp).errors

    async def pause(self, sandbox_id: str) -> None:
        await self._call("POST", _path("sandboxes", sandbox_id, "pause"))

    async def pause_to_disk(self, sandbox_id: str) -> SandboxRuntime:
        resp = await self._call("POST", _path("sandboxes", sandbox_id, "pause-to-disk"),
                                timeout=self.timeouts.snapshot)
        return self._parse(SandboxRuntime, resp)

    async def drop_memory(self, sandbox_id: str) -> SandboxRuntime:
        resp = await self._call("POST", _path("sandboxes", sandbox_id, "drop-memory"),
                                timeout=self.timeouts.snapshot)
        return self._parse(SandboxRuntime, resp)

    async def resume(self, sandbox_id: str) -> SandboxRuntime:
        resp = await self._call("POST", _path("sandboxes", sandbox_id, "resume"), timeout=self.timeouts.launch)
        return self._parse(SandboxRuntime, resp)

    async def snapshot(self, sandbox_id: str, snapshot_id: str, *, memory: bool = True) -> SavedSnapshot:
        resp = await self._call("POST", _path("sandboxes", sandbox_id, "snapshots"),
                                body=SnapshotRequest(snapshot_id=snapshot_id, memory=memory),
                                timeout=self.timeouts.snapshot)
        return self._parse(SavedSnapshot, resp)

    async def delete_snapshot(self, snapshot_id: str) -> None:
        await self._call("DELETE", _path("snapshots", snapshot_id))

    async def build_template(self, job: BuildJob) -> None:
        """The uploaded files of the build's COPY steps are on this (the control plane's) host:
        the node gets each one it lacks first, and the job names its copies."""
        files = {h: await self._send_build_file(job.build.team_id, h, path) for h, path in job.files.items()}
        await self._call("POST", _path("builds"), body=job.model_copy(update={"files": files}))

    async def _send_build_file(self, team_id: str, files_hash: str, path: Path) -> Path:
        where = _path("build-files", team_id, files_hash)
        there = self._parse(BuildFileReply, await self._call("GET", where))
        if there.present:
            return there.path

        async def chunks() -> AsyncIterator[bytes]:
            with path.open("rb") as fh:
                while chunk := await asyncio.to_thread(fh.read, 1 << 20):
                    yield chunk

        resp = await self._call("PUT", where, content=chunks(), timeout=self.timeouts.transfer)
        return self._parse(BuildFileReply, resp).path

    async def remove_template(self, template: Template) -> list[str]:
        resp = await self._call("POST", _path("templates", template.template_id, "remove"), body=template)
        return self._parse(RemovedReply, resp).deleted

    async def free_build(self, build_id: str, snapshot: SnapshotRef | None) -> list[str]:
        resp = await self._call("POST", _path("builds", build_id, "free"), body=FreeBuildRequest(snapshot=snapshot))
        return self._parse(RemovedReply, resp).deleted

    async def volume(self, call: VolumeCall) -> VolumeAnswer:
        resp = await self._call("POST", _path("volumes", call.volume_id), body=call, timeout=self.timeouts.transfer)
        return self._parse(VolumeAnswer, resp)

    async def import_snapshot(self, snapshot: SnapshotRef, origin: Node) -> Received:
        resp = await self._call("POST", _path("snapshots", snapshot.snapshot_id, "import"),
                                body=ImportRequest(snapshot=snapshot, origin=origin), timeout=self.timeouts.transfer)
        return self._parse(Received, resp)

    async def snapshot_manifest(self, snapshot_id: str) -> SnapshotExport:
        """The snapshot's record and files as this node holds them (node to node)."""
        resp = await self._call("GET", _path("snapshots", snapshot_id, "manifest"), timeout=self.timeouts.snapshot)
        return self._parse(SnapshotExport, resp)

    async def snapshot_files(self, snapshot_id: str, have: Sequence[str], target: Path,
                             names: Sequence[str]) -> dict[str, int]:
        """Fetch the snapshot's files but those of the content keys in ``have`` into ``target``
        (they must be exactly ``names``); the data bytes of each (node to node)."""

        def fetch() -> dict[str, int]:
            path = _path("snapshots", snapshot_id, "files")
            with httpx.Client(base_url=self.url, headers={TOKEN_HEADER: self._token}, trust_env=False,
                              timeout=httpx.Timeout(self.timeouts.snapshot), follow_redirects=False) as client:
                try:
                    with client.stream("GET", path, params={"have": list(have)}) as resp:
                        if not resp.is_success:
                            resp.read()
                            try:
                                body = ErrorBody.model_validate(resp.json())
                            except ValueError:
                                raise NodeError(f"node {self._node_id} answered GET {path} with HTTP "
                                                f"{resp.status_code}", node_id=self._node_id) from None
                            raise error_from_body(body)
                        return unpack(_Reader(resp.iter_raw()), target, names)
                except httpx.TransportError as exc:
                    raise NodeUnavailableError(node_id=self._node_id, detail=f"GET {path}: {type(exc).__name__}: "
                                               f"{exc}") from exc

        return await asyncio.to_thread(fetch)

    async def rollback(self, sandbox: Sandbox, snapshot: SnapshotRef, *, paused: bool) -> Launched:
        resp = await self._call("POST", _path("sandboxes", sandbox.sandbox_id, "rollback"),
                                body=RollbackRequest(sandbox=sandbox, snapshot=snapshot, paused=paused),
                                timeout=self.timeouts.launch)
        return self._parse(Launched, resp)

    async def update_policy(self, sandbox_id: str, policy: NetworkPolicy, rules: Sequence[EgressRule]) -> None:
        await self._call("PUT", _path("sandboxes", sandbox_id, "policy"),
                         body=PolicyRequest(policy=policy, rules=tuple(rules)))

    async def audit(self, sandbox_id: str, limit: int) -> list[dict[str, object]]:
        resp = await self._call("GET", _path("sandboxes", sandbox_id, "audit"), params={"limit": limit})
        try:
            entries = resp.json()
        except ValueError:
            entries = None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise NodeError(f"node {self._node_id} answered a malformed audit log", node_id=self._node_id)
        return entries

    async def exec(self, sandbox_id: str, cmd: Sequence[str], timeout: float) -> ExecReply:
        resp = await self._call("POST", _path("sandboxes", sandbox_id, "exec"),
                                body=ExecRequest(cmd=tuple(cmd), timeout=timeout),
                                timeout=max(self.timeouts.default, timeout + self.timeouts.exec_margin))
        return self._parse(ExecReply, resp)

    async def guest_address(self, sandbox_id: str) -> str:
        """The guest's address as the node reaches it (not reachable from here in general)."""
        return self._parse(AddressReply, await self._call("GET", _path("sandboxes", sandbox_id, "address"))).host

    async def endpoint(self, sandbox_id: str, port: int) -> Endpoint:
        """Through the node's edge: the node checks the token and forwards to the guest (once
        the guest applied its create message)."""
        return Endpoint(host=self._host, port=self._port, via=self.url,
                        headers=((TOKEN_HEADER, self._token), (SANDBOX_HEADER, sandbox_id),
                                 (PORT_HEADER, str(port))))


class _Reader:
    """A blocking ``read(n)`` over an iterator of byte chunks."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def read(self, n: int) -> bytes:
        while not self._buf:
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._buf = chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out
