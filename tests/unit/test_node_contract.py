"""One NodeClientContract, both ways to a node agent: in this process (LocalNodeClient) and over
HTTP (HttpNodeClient to node_app served by a real uvicorn on 127.0.0.1), on the fake drivers.
Then what only HTTP has: the cluster token, the edge hand-off, the error transport, unreachable
and silent nodes."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import structlog
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from cube_core import errors
from cube_core._host import PluginHost
from cube_core.builds import engine_of
from cube_core.buildspec import BuildJob, BuildPlan, TemplateBuild
from cube_core.config import LoadedConfig
from cube_core.errors import (
    CubeError,
    NodeError,
    NodeUnavailableError,
    SandboxNotFoundError,
    UnsupportedOperation,
)
from cube_core.models import Node, Template
from cube_core.node import NodeAgent
from cube_core.nodeapi import edge_resolver, node_app
from cube_core.nodeclient import LocalNodeClient, NodeClient
from cube_core.nodehttp import ErrorBody, HttpNodeClient, error_body, error_from_body, error_status
from cube_core.store import SqliteStore, StateStore
from cube_core.testing.fakes import FAKE_CONFIG
from cube_core.testing.node_contract import NodeClientContract

TOKEN = "cluster-secret-0123456789abcdef"


@contextlib.asynccontextmanager
async def served(app: ASGIApp) -> AsyncIterator[str]:
    """``app`` served by uvicorn on 127.0.0.1 (a free port) in this event loop; its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("uvicorn stopped before it started")
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def agent(plugin_host: Callable[..., PluginHost], tmp_path: Path) -> AsyncIterator[NodeAgent]:
    store = SqliteStore(tmp_path / "cube.db")
    node = NodeAgent(plugin_host(), store, token=TOKEN)
    await node.start()
    await node.ensure_templates(("base",))
    try:
        yield node
    finally:
        await node.stop()
        store.close()


@pytest.fixture
def node_store(agent: NodeAgent) -> StateStore:
    return agent.store


@pytest.fixture
def node_template(agent: NodeAgent) -> Template:
    template = agent.store.get_template("base")
    assert template is not None
    return template


@pytest.fixture
async def origin_agent(agent: NodeAgent, plugin_host: Callable[..., PluginHost],
                       cube_config_factory: Callable[..., LoadedConfig], tmp_path: Path) -> AsyncIterator[NodeAgent]:
    """A second node on the same store with its own state dir and its own template build, served
    over HTTP (snapshot files are always fetched from the origin's /node/v1)."""
    text = FAKE_CONFIG.format(state_dir=tmp_path / "node-a").replace("[core]\n", '[core]\nnode_id = "node-a"\n', 1)
    node = NodeAgent(plugin_host(cube_config_factory(text)), agent.store, token=TOKEN)
    await node.start()
    node.template_ready(await node.templates.ensure("base", rebuild=True))
    try:
        async with served(node_app(node, token=TOKEN)) as url:
            node.url = url
            node.beat()
            yield node
    finally:
        await node.stop()


@pytest.fixture
def origin_client(origin_agent: NodeAgent) -> NodeClient:
    return LocalNodeClient(origin_agent)


@pytest.fixture
def origin_node(origin_agent: NodeAgent) -> Node:
    return origin_agent.report()


class TestLocalNodeClient(NodeClientContract):
    @pytest.fixture
    def node_client(self, agent: NodeAgent) -> NodeClient:
        return LocalNodeClient(agent)


class Echo:
    """An edge that answers what it was given (the headers it saw, the body)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        message = await receive()
        body = json.dumps({"path": scope["path"], "body": message.get("body", b"").decode(),
                           "headers": {k.decode(): v.decode() for k, v in scope["headers"]}}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def node_url(agent: NodeAgent) -> AsyncIterator[str]:
    async with served(node_app(agent, token=TOKEN, edge=Echo())) as url:
        yield url


@pytest.fixture
async def http_client(agent: NodeAgent, node_url: str) -> AsyncIterator[HttpNodeClient]:
    async with HttpNodeClient(agent.node_id, node_url, TOKEN) as client:
        yield client


class TestHttpNodeClient(NodeClientContract):
    @pytest.fixture
    def node_client(self, http_client: HttpNodeClient) -> NodeClient:
        return http_client


async def test_a_build_over_http_sends_the_uploaded_files_to_the_node(
        http_client: HttpNodeClient, agent: NodeAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control plane's uploads are on its own host: the node gets a copy in its state dir
    (once), and the job it runs names that copy."""
    started: list[BuildJob] = []
    monkeypatch.setattr(engine_of(agent), "start", started.append)
    upload = tmp_path / "elsewhere" / "files.tar"
    upload.parent.mkdir()
    upload.write_bytes(b"the SDK's tar archive" * 100_000)
    build = TemplateBuild(build_id="b1", template_id="t1", team_id="team-a", name="t1")
    job = BuildJob(build=build, plan=BuildPlan(from_template="base"), files={"d" * 64: upload})
    await http_client.build_template(job)
    copy = agent.settings.state_dir / "build-files" / "team-a" / f"{'d' * 64}.tar"
    assert started[0].files == {"d" * 64: copy}
    assert copy.read_bytes() == upload.read_bytes()
    # present on the node: not sent again
    mtime = copy.stat().st_mtime_ns
    await http_client.build_template(job)
    assert started[1].files == {"d" * 64: copy} and copy.stat().st_mtime_ns == mtime
    with pytest.raises(errors.CubeError, match="Not Found|invalid team id"):  # never a path outside
        await http_client.build_template(job.model_copy(update={"build": build.model_copy(
            update={"team_id": "..%2Fx"})}))


@contextlib.asynccontextmanager
async def pooled_agent(plugin_host: Callable[..., PluginHost], cube_config_factory: Callable[..., LoadedConfig],
                       tmp_path: Path, *, identity_at_join: bool = True) -> AsyncIterator[NodeAgent]:
    """A node agent with a warm pool of 2 (members personalized at join, unless told not to),
    once the pool is full."""
    text = FAKE_CONFIG.format(state_dir=tmp_path / "state").replace(
        "pool = { size = 0 }", f"pool = {{ size = 2, identity_at_join = {str(identity_at_join).lower()} }}")
    store = SqliteStore(tmp_path / "cube.db")
    node = NodeAgent(plugin_host(cube_config_factory(text)), store, token=TOKEN)
    await node.start()
    await node.ensure_templates(("base",))
    try:
        for _ in range(500):
            if node.pool.sizes().get("base", 0) >= 2:
                break
            await asyncio.sleep(0.01)
        yield node
    finally:
        await node.stop()
        store.close()


class TestLocalNodeClientFromThePool(NodeClientContract):
    """The contract again, launches taken from a warm pool whose members joined as their sandbox."""

    @pytest.fixture
    async def agent(self, plugin_host: Callable[..., PluginHost], cube_config_factory: Callable[..., LoadedConfig],
                    tmp_path: Path) -> AsyncIterator[NodeAgent]:
        async with pooled_agent(plugin_host, cube_config_factory, tmp_path) as node:
            yield node

    @pytest.fixture
    def node_client(self, agent: NodeAgent) -> NodeClient:
        return LocalNodeClient(agent)


class TestHttpNodeClientFromThePool(NodeClientContract):
    @pytest.fixture
    async def agent(self, plugin_host: Callable[..., PluginHost], cube_config_factory: Callable[..., LoadedConfig],
                    tmp_path: Path) -> AsyncIterator[NodeAgent]:
        async with pooled_agent(plugin_host, cube_config_factory, tmp_path) as node:
            yield node

    @pytest.fixture
    def node_client(self, http_client: HttpNodeClient) -> NodeClient:
        return http_client


# -- what only HTTP has -------------------------------------------------------------------------------


def test_http_client_has_every_method_of_the_local_one() -> None:
    members = [m for m in vars(NodeClient) if not m.startswith("_")]
    assert members
    for name in members:
        local, remote = getattr(LocalNodeClient, name), getattr(HttpNodeClient, name)
        if isinstance(local, property):
            assert isinstance(remote, property), name
            continue
        assert inspect.signature(local) == inspect.signature(remote), name


async def test_every_request_needs_the_cluster_token(node_url: str) -> None:
    with structlog.testing.capture_logs() as logs:
        async with httpx.AsyncClient(base_url=node_url) as raw:
            for headers in ({}, {"x-cube-cluster-token": "wrong"}, {"x-cube-cluster-token": TOKEN[:-1]},
                            {"x-cube-cluster-token": ""}):
                for path in ("/node/v1/health", "/node/v1/status", "/node/v1/nope", "/anything"):
                    resp = await raw.get(path, headers=headers)
                    assert resp.status_code == 401, (path, headers)
                    assert resp.json()["error"] == "NodeError"
                edge = await raw.get("/", headers={**headers, "x-cube-sandbox-id": "sbx", "x-cube-sandbox-port": "80"})
                assert edge.status_code == 401
                launch = await raw.post("/node/v1/sandboxes", headers=headers, json={})
                assert launch.status_code == 401
            ok = await raw.get("/node/v1/health", headers={"x-cube-cluster-token": TOKEN})
            assert ok.status_code == 200 and ok.json()["status"] == "ok"
    assert logs and all(e["event"] == "request without the cluster token refused" for e in logs)
    assert "wrong" not in repr(logs) and TOKEN[:-1] not in repr(logs)


async def test_a_client_with_a_wrong_token_gets_a_node_error(agent: NodeAgent, node_url: str) -> None:
    async with HttpNodeClient(agent.node_id, node_url, "not-the-token") as client:
        with pytest.raises(NodeError, match="cluster token") as caught:
            await client.status()
    assert type(caught.value) is NodeError
    assert "not-the-token" not in repr(client)


async def test_sandbox_traffic_goes_to_the_edge_without_the_token(agent: NodeAgent, node_url: str) -> None:
    async with HttpNodeClient(agent.node_id, node_url, TOKEN) as client:
        endpoint = await client.endpoint("sbxedge", 8080)
    assert endpoint.via == node_url and endpoint.port == int(node_url.rsplit(":", 1)[1])
    async with httpx.AsyncClient(base_url=node_url) as raw:
        resp = await raw.post("/some/path", headers=dict(endpoint.headers), content=b"payload")
    assert resp.status_code == 200
    seen = resp.json()
    assert seen["path"] == "/some/path" and seen["body"] == "payload"
    assert seen["headers"]["x-cube-sandbox-id"] == "sbxedge" and seen["headers"]["x-cube-sandbox-port"] == "8080"
    assert "x-cube-cluster-token" not in seen["headers"]  # the guest never sees the cluster token


async def test_without_an_edge_sandbox_traffic_is_501(agent: NodeAgent) -> None:
    async with served(node_app(agent, token=TOKEN, edge=None)) as url:
        async with httpx.AsyncClient(base_url=url) as raw:
            resp = await raw.get("/", headers={"x-cube-cluster-token": TOKEN, "x-cube-sandbox-id": "sbx"})
            api = await raw.get("/node/v1/health", headers={"x-cube-cluster-token": TOKEN})
    assert resp.status_code == 501
    assert isinstance(error_from_body(ErrorBody.model_validate(resp.json())), UnsupportedOperation)
    assert api.status_code == 200


async def test_the_edge_resolver_names_the_guest(agent: NodeAgent) -> None:
    with pytest.raises(SandboxNotFoundError):
        await edge_resolver(agent)("sbxnotthere", 80)


def test_an_empty_token_is_refused(agent: NodeAgent) -> None:
    with pytest.raises(errors.ConfigError):
        node_app(agent, token="", edge=None)
    with pytest.raises(NodeError):
        HttpNodeClient("n", "http://127.0.0.1:1", "")


def _all_errors(cls: type[CubeError] = CubeError) -> list[type[CubeError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out += _all_errors(sub)
    return out


@pytest.mark.parametrize("cls", [c for c in _all_errors() if c.__module__ == "cube_core.errors"],
                         ids=lambda c: c.__name__)
def test_every_core_error_crosses_the_wire_as_itself(cls: type[CubeError]) -> None:
    sent = cls("it broke", sandbox_id="sbx1", node_id="node-a", count=3, ratio=0.5, flags=[True, None],
               where=Path("/var/lib/cube"), nested={"a": (1, 2)})
    wire = json.loads(json.dumps(error_body(sent).model_dump(mode="json")))
    got = error_from_body(ErrorBody.model_validate(wire))
    assert type(got) is cls
    assert got.message == "it broke"
    assert got.fields == {"sandbox_id": "sbx1", "node_id": "node-a", "count": 3, "ratio": 0.5, "flags": [True, None],
                          "where": "/var/lib/cube", "nested": {"a": [1, 2]}}
    assert got.sandbox_id == "sbx1"


def test_an_unknown_error_name_becomes_a_node_error() -> None:
    got = error_from_body(ErrorBody(error="SomePluginError", message="m", fields={"x": 1}))
    assert type(got) is NodeError and got.message == "m" and got.fields == {"x": 1}
    clash = error_from_body(ErrorBody(error="SandboxNotFoundError", message="m", fields={"message": "x"}))
    assert type(clash) is NodeError and clash.message == "SandboxNotFoundError: m"


def test_error_status_codes() -> None:
    assert error_status(errors.SandboxNotFoundError(sandbox_id="x")) == 404
    assert error_status(errors.SandboxFailedError(sandbox_id="x", reason="r")) == 404
    assert error_status(errors.TemplateNotFoundError(template="t")) == 404
    assert error_status(errors.SnapshotNotFoundError(snapshot_id="s")) == 404
    assert error_status(errors.InvalidStateError(sandbox_id="x", state="a", required="b")) == 409
    assert error_status(errors.NoCapacityError(cpu=1, memory_mb=1)) == 503
    assert error_status(errors.NodeUnavailableError(node_id="n", detail="d")) == 503
    assert error_status(errors.GuestTimeoutError(vm_id="v", timeout=1)) == 502
    assert error_status(errors.GuestProtocolError(vm_id="v", reason="r")) == 502
    assert error_status(errors.VmmError("v")) == 502
    assert error_status(errors.UnsupportedOperation(driver="d", operation="o")) == 501
    assert error_status(errors.ConfigError("c")) == 400
    assert error_status(errors.StorageError("s")) == 400


async def test_an_unreachable_node_is_unavailable() -> None:
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()  # the port is free again: connections are refused
    async with HttpNodeClient("node-gone", f"http://127.0.0.1:{port}", TOKEN) as client:
        with pytest.raises(NodeUnavailableError) as caught:
            await client.pause("sbx1")
    assert caught.value.fields["node_id"] == "node-gone"
    assert "ConnectError" in caught.value.fields["detail"]
    assert TOKEN not in caught.value.message


async def test_a_silent_node_times_out_as_unavailable() -> None:
    held: list[asyncio.StreamWriter] = []

    async def accept_and_say_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    listener = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with HttpNodeClient("node-mute", f"http://127.0.0.1:{port}", TOKEN, timeout=0.3) as client:
            with pytest.raises(NodeUnavailableError) as caught:
                await client.status()
        assert "Timeout" in caught.value.fields["detail"]
    finally:
        for writer in held:
            writer.close()
        listener.close()
        await listener.wait_closed()


async def test_an_answer_that_is_not_an_error_body_is_a_node_error(http_client: HttpNodeClient) -> None:
    with pytest.raises(NodeError, match="HTTP 404") as caught:
        await http_client._call("GET", "/node/v1/no-such-route")
    assert caught.value.fields["status"] == 404


async def test_a_malformed_request_is_a_node_error(http_client: HttpNodeClient) -> None:
    with pytest.raises(NodeError, match="malformed request"):
        await http_client._call("POST", "/node/v1/sandboxes/sbx1/exec", params={"x": 1})


async def test_health_and_guest_address(agent: NodeAgent, http_client: HttpNodeClient) -> None:
    assert (await http_client.health()).node_id == agent.node_id
    with pytest.raises(SandboxNotFoundError):
        await http_client.guest_address("sbxnotthere")


async def test_a_websocket_without_the_token_is_closed_before_the_edge(agent: NodeAgent) -> None:
    reached: list[Scope] = []

    async def edge(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append(scope)

    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    app = node_app(agent, token=TOKEN, edge=edge)
    scope = {"type": "websocket", "path": "/ws", "headers": [(b"x-cube-sandbox-id", b"sbx")], "client": ("1.2.3.4", 5)}
    await app(scope, receive, send)
    assert reached == [] and sent[0]["type"] == "websocket.close" and sent[0]["code"] == 1008
    await app({**scope, "headers": [*scope["headers"], (b"x-cube-cluster-token", TOKEN.encode())]}, receive, send)
    assert len(reached) == 1 and (b"x-cube-cluster-token", TOKEN.encode()) not in reached[0]["headers"]
