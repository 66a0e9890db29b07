"""The edge across a cluster: a master's edge proxy -> a node's edge (``cube_node_edge``) -> the guest.

Every hop is a real uvicorn server on loopback: the guest is the ``Upstream`` test app, the node is
:class:`~cube_api_e2b.nodeedge.NodeEdge` (behind a small gate that records what the node received and
checks the cluster token, as ``cube node``'s server does), the master is the plugin's
:class:`~cube_api_e2b.proxy.EdgeProxyMiddleware` over a control-plane double whose ``endpoint``
answers ``Endpoint(via=<node URL>, headers=...)`` exactly as ``HttpNodeClient.endpoint`` does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cube_core import CoreSettings, CubeError, NodeUnavailableError, Sandbox, SandboxNotFoundError, SandboxState
from cube_core.nodeclient import Endpoint
from e2b_helpers import Upstream, free_port, serve
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from cube_api_e2b.auth import TrafficTokens
from cube_api_e2b.config import E2bConfig
from cube_api_e2b.context import E2bContext
from cube_api_e2b.errors import NODE_UNREACHABLE
from cube_api_e2b.metrics import ApiMetrics
from cube_api_e2b.plugin import E2bApiPlugin
from cube_api_e2b.proxy import EdgeProxy, EdgeProxyMiddleware
from cube_api_e2b.sandbox_metrics import sample

TOKEN = "cluster-secret-" + "x" * 24
SID = "sbx1"
SELECTOR = "Basic " + base64.b64encode(b"root:").decode()  # the SDK's envd user: no secret in it
CLUSTER = ("x-cube-cluster-token", "x-cube-sandbox-id", "x-cube-sandbox-port")
WAIT = 10.0  # a guard against hangs, not a timing assertion


def node_headers(sandbox_id: str, port: int | str, **extra: str) -> dict[str, str]:
    return {"x-cube-cluster-token": TOKEN, "x-cube-sandbox-id": sandbox_id, "x-cube-sandbox-port": str(port),
            **extra}


class Gate:
    """Stands in for ``cube node``'s server in front of the edge app: refuses a wrong cluster token
    and records the headers the node received (it passes them on unchanged, token included, so the
    tests show that the edge app itself never forwards it)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[list[tuple[str, str]]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
            self.seen.append(headers)
            if [v for k, v in headers if k == "x-cube-cluster-token"] != [TOKEN]:
                if scope["type"] == "http":
                    await send({"type": "http.response.start", "status": 401, "headers": []})
                    await send({"type": "http.response.body", "body": b"wrong cluster token"})
                else:
                    await send({"type": "websocket.close", "code": 1008})
                return
        await self.app(scope, receive, send)


@contextlib.asynccontextmanager
async def node(config: E2bConfig,
               resolve: Callable[[str, int], Awaitable[tuple[str, int]]]) -> AsyncIterator[tuple[Gate, int]]:
    """The plugin's node edge (through the hook implementation) behind a gate, served on loopback."""
    plugin = E2bApiPlugin(config)
    gate = Gate(plugin.cube_node_edge(resolve))
    async with serve(gate, lifespan="off") as port:
        try:
            yield gate, port
        finally:
            assert plugin.node_edge is not None
            await plugin.node_edge.forwarder.aclose()


def guest_resolver(guest_port: int,
                   known: tuple[str, ...] = (SID,)) -> Callable[[str, int], Awaitable[tuple[str, int]]]:
    """What ``cube node`` passes: the guest's address; port P of the guest is 127.0.0.1:P here."""

    async def resolve(sandbox_id: str, port: int) -> tuple[str, int]:
        if sandbox_id not in known:
            raise SandboxNotFoundError(sandbox_id=sandbox_id)
        return "127.0.0.1", port

    return resolve


@pytest.fixture
async def guest() -> AsyncIterator[tuple[Upstream, int]]:
    up = Upstream()
    async with serve(up.app, lifespan="off") as port:
        yield up, port


# -- the node's edge on its own ---------------------------------------------------------------------


async def test_node_edge_streams_http_and_strips_the_cluster_headers(guest: tuple[Upstream, int]) -> None:
    up, guest_port = guest
    async with node(E2bConfig(envd_port=guest_port), guest_resolver(guest_port)) as (gate, port), \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=WAIT) as client:
        # a response the guest never finishes: its first line arrives, so nothing is buffered
        async with client.stream("GET", "/forever", headers=node_headers(SID, guest_port)) as r:
            assert r.status_code == 200
            lines = r.aiter_lines()
            assert await asyncio.wait_for(anext(lines), WAIT) == "first"
        await asyncio.wait_for(up.disconnected.wait(), WAIT)  # the client left: so did the node's request

        async def body() -> AsyncIterator[bytes]:
            for i in range(5):
                yield bytes([i]) * 100_000

        r = await client.post("/upload", content=body(), headers=node_headers(SID, guest_port))
        assert r.status_code == 200 and r.json()["bytes"] == 500_000

        # what the master sends: its X-Forwarded-* (the real client) and the envd user selector
        r = await client.get("/headers", params={"q": "a b"}, headers=node_headers(
            SID, guest_port, **{"Authorization": SELECTOR, "X-Forwarded-For": "203.0.113.7",
                                "X-Forwarded-Proto": "https", "X-Forwarded-Host": "49983-sbx1.cube.test",
                                "Host": "49983-sbx1.cube.test", "X-Custom": "v"}))
    seen = r.json()
    assert r.status_code == 200 and r.headers["x-upstream"] == "yes"
    assert any(k == "x-cube-cluster-token" for k, _ in gate.seen[-1])  # the node did receive it ...
    assert not set(CLUSTER) & set(seen) and TOKEN not in json.dumps(seen)  # ... the guest did not
    assert seen["authorization"] == SELECTOR and seen["x-custom"] == "v"
    assert seen["x-forwarded-for"] == "203.0.113.7" and seen["x-forwarded-proto"] == "https"
    assert seen["x-forwarded-host"] == "49983-sbx1.cube.test" and seen["host"] == "49983-sbx1.cube.test"


async def test_node_edge_relays_a_websocket(guest: tuple[Upstream, int]) -> None:
    _, guest_port = guest
    async with node(E2bConfig(), guest_resolver(guest_port)) as (gate, port):
        async with ws_connect(f"ws://127.0.0.1:{port}/ws", additional_headers=node_headers(SID, guest_port),
                              subprotocols=["echo.v1"], open_timeout=WAIT) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "echo.v1"
            await ws.send("hi")
            assert await asyncio.wait_for(ws.recv(), WAIT) == "echo:hi"
            await ws.send(b"\x00\x01")
            assert await asyncio.wait_for(ws.recv(), WAIT) == b"echo:\x00\x01"
            await ws.send("close-me")
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), WAIT)
            assert ws.close_code == 4001 and ws.close_reason == "asked to"


@pytest.mark.parametrize(("headers", "what"), [
    ({"x-cube-cluster-token": TOKEN}, "both x-cube-sandbox-id and x-cube-sandbox-port are required"),
    ({"x-cube-cluster-token": TOKEN, "x-cube-sandbox-id": SID}, "are required"),
    (node_headers(SID, "0"), "invalid sandbox port"),
    (node_headers(SID, "65536"), "invalid sandbox port"),
    (node_headers(SID, "8o"), "invalid sandbox port"),
    (node_headers("a b", 80), "invalid x-cube-sandbox-id"),
])
async def test_node_edge_refuses_requests_without_a_target(guest: tuple[Upstream, int], headers: dict[str, str],
                                                           what: str) -> None:
    _, guest_port = guest
    async with node(E2bConfig(), guest_resolver(guest_port)) as (_, port), \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=WAIT) as client:
        r = await client.get("/health", headers=headers)
        assert r.status_code == 400 and what in r.json()["message"], r.text
        with pytest.raises(InvalidStatus) as refused:
            await ws_connect(f"ws://127.0.0.1:{port}/ws", additional_headers=headers, open_timeout=WAIT)
        assert refused.value.response.status_code == 400


async def test_node_edge_answers_like_the_edge_for_a_sandbox_it_does_not_run(guest: tuple[Upstream, int]) -> None:
    up, guest_port = guest
    async with node(E2bConfig(), guest_resolver(guest_port)) as (_, port), \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=WAIT) as client:
        r = await client.get("/headers", headers=node_headers("gone", guest_port))
        assert r.status_code == 502
        assert r.json() == {"sandboxId": "gone", "code": 502, "message": "The sandbox was not found"}
        with pytest.raises(InvalidStatus) as refused:
            await ws_connect(f"ws://127.0.0.1:{port}/ws", additional_headers=node_headers("gone", guest_port),
                             open_timeout=WAIT)
        assert refused.value.response.status_code == 502 and b"was not found" in refused.value.response.body
        closed = free_port()
        r = await client.get("/headers", headers=node_headers(SID, closed))
        assert r.status_code == 502 and r.json()["message"] == "The sandbox is running but port is not open"
    assert up.seen_headers == []


# -- master edge -> node edge -> guest ------------------------------------------------------------


class Plane:
    """The control plane as the edge sees it: one sandbox, on a node reached at ``via``."""

    def __init__(self, tmp: Path, via: str) -> None:
        self.settings = CoreSettings(state_dir=tmp)
        self.via = via
        self.failure: CubeError | None = None
        now = datetime.now(UTC)
        self.sandbox = Sandbox.model_validate({
            "sandbox_id": SID, "template_id": "base", "team_id": "team-a", "state": SandboxState.RUNNING,
            "started_at": now, "end_at": now + timedelta(minutes=5), "envd_access_token": "envd-tok"})

    def find(self, sandbox_id: str) -> Sandbox:
        if self.failure is not None:
            raise self.failure
        if sandbox_id not in (SID, "gone"):
            raise SandboxNotFoundError(sandbox_id=sandbox_id)
        return self.sandbox.model_copy(update={"sandbox_id": sandbox_id})

    async def wake(self, sandbox_id: str) -> Sandbox:
        return self.find(sandbox_id)

    async def endpoint(self, sandbox_id: str, port: int) -> tuple[Sandbox, Endpoint]:
        self.find(sandbox_id)
        # as HttpNodeClient.endpoint answers (cube_core/nodehttp.py)
        return self.sandbox.model_copy(update={"sandbox_id": sandbox_id}), Endpoint(
            host="10.0.0.5", port=7070, via=self.via,
            headers=(("x-cube-cluster-token", TOKEN), ("x-cube-sandbox-id", sandbox_id),
                     ("x-cube-sandbox-port", str(port))))


async def control_plane_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 418, "headers": []})
    await send({"type": "http.response.body", "body": b"control plane"})


@contextlib.asynccontextmanager
async def master(plane: Plane, config: E2bConfig) -> AsyncIterator[tuple[E2bContext, int]]:
    ctx = E2bContext(service=plane, config=config, settings=plane.settings,
                     metrics=ApiMetrics(), tokens=TrafficTokens(b"s" * 32))
    edge = EdgeProxy(ctx)
    async with serve(EdgeProxyMiddleware(control_plane_app, edge), lifespan="off") as port:
        try:
            yield ctx, port
        finally:
            await edge.aclose()


def to(sandbox_id: str, port: int, **extra: str) -> dict[str, str]:
    return {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(port), "X-Access-Token": "envd-tok", **extra}


async def test_master_sends_sandbox_traffic_through_the_node(guest: tuple[Upstream, int], tmp_path: Path) -> None:
    up, guest_port = guest
    config = E2bConfig(envd_port=guest_port)
    async with node(config, guest_resolver(guest_port)) as (gate, node_port):
        plane = Plane(tmp_path, f"http://127.0.0.1:{node_port}")
        async with master(plane, config) as (_, port), \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=WAIT) as client:
            # a client cannot inject the hop's headers: the master drops them and adds its own
            forged = {"x-cube-cluster-token": "forged", "x-cube-sandbox-id": "other", "x-cube-sandbox-port": "1"}
            r = await client.get("/headers", params={"q": "a b"}, headers=to(
                SID, guest_port, Authorization=SELECTOR, Cookie="session=k", **{"X-API-Key": "k"}, **forged))
            seen = r.json()
            assert r.status_code == 200 and r.headers["x-upstream"] == "yes", r.text
            hop = gate.seen[-1]
            assert [v for k, v in hop if k == "x-cube-cluster-token"] == [TOKEN]
            assert [v for k, v in hop if k == "x-cube-sandbox-id"] == [SID]
            assert [v for k, v in hop if k == "x-cube-sandbox-port"] == [str(guest_port)]
            assert not set(CLUSTER) & set(seen) and TOKEN not in json.dumps(seen) and "forged" not in json.dumps(seen)
            assert not {"x-api-key", "cookie"} & set(seen) and seen["authorization"] == SELECTOR
            assert seen["host"] == f"127.0.0.1:{port}"  # the client's Host, through both hops
            assert seen["x-forwarded-for"] == "127.0.0.1" and seen["x-forwarded-proto"] == "http"
            assert seen["e2b-sandbox-id"] == SID and seen["x-access-token"] == "envd-tok"

            # streamed through both hops: the first line of an endless answer arrives
            async with client.stream("GET", "/forever", headers=to(SID, guest_port)) as r:
                assert r.status_code == 200
                assert await asyncio.wait_for(anext(r.aiter_lines()), WAIT) == "first"
            await asyncio.wait_for(up.disconnected.wait(), WAIT)
            payload = bytes(range(256)) * 20_000
            r = await client.post("/echo", content=payload, headers=to(SID, guest_port))
            assert r.status_code == 200 and r.content == payload

            # the node's own answers pass through unchanged
            r = await client.get("/headers", headers=to("gone", guest_port))
            assert r.status_code == 502 and r.json()["message"] == "The sandbox was not found"
            r = await client.get("/status/418", headers=to(SID, guest_port))
            assert r.status_code == 418 and r.text == "status 418"

            # the master's checks still come first (nothing reaches the node)
            before = len(gate.seen)
            r = await client.get("/headers", headers={**to(SID, guest_port), "X-Access-Token": "wrong"})
            assert r.status_code == 401 and len(gate.seen) == before

            # the envd metrics sample goes through the node too
            ctx = E2bContext(service=plane, config=config, settings=plane.settings,
                             metrics=ApiMetrics(), tokens=TrafficTokens(b"s" * 32))
            metric = await sample(ctx, plane.sandbox)
            assert metric is not None and metric.cpu_used_pct == 12.5
            assert up.seen_headers[-1]["x-access-token"] == "envd-tok"
            assert not set(CLUSTER) & set(up.seen_headers[-1])


async def test_master_relays_a_websocket_through_the_node(guest: tuple[Upstream, int], tmp_path: Path) -> None:
    _, guest_port = guest
    config = E2bConfig(envd_port=guest_port)
    async with node(config, guest_resolver(guest_port)) as (gate, node_port):
        async with master(Plane(tmp_path, f"http://127.0.0.1:{node_port}"), config) as (_, port):
            async with ws_connect(f"ws://127.0.0.1:{port}/ws", additional_headers=to(SID, guest_port),
                                  subprotocols=["echo.v1"], open_timeout=WAIT) as ws:  # type: ignore[list-item]
                assert ws.subprotocol == "echo.v1"
                await ws.send("through two hops")
                assert await asyncio.wait_for(ws.recv(), WAIT) == "echo:through two hops"
                await ws.send("close-me")
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), WAIT)
                assert ws.close_code == 4001
            assert [v for k, v in gate.seen[-1] if k == "x-cube-cluster-token"] == [TOKEN]
            # the node's refusal reaches the client with its message
            with pytest.raises(InvalidStatus) as refused:
                await ws_connect(f"ws://127.0.0.1:{port}/ws", additional_headers=to("gone", guest_port),
                                 open_timeout=WAIT)
            assert refused.value.response.status_code == 502
            assert json.loads(refused.value.response.body)["message"] == "The sandbox was not found"


async def test_node_down_is_unreachable_not_not_found(tmp_path: Path) -> None:
    """Nothing listens at the node's URL, or the control plane knows the node is down: 502 "could
    not be reached" (the SDK's SandboxUnreachableException), never "was not found" (killed)."""
    plane = Plane(tmp_path, f"http://127.0.0.1:{free_port()}")
    async with master(plane, E2bConfig()) as (_, port), \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=WAIT) as client:
        r = await client.get("/health", headers=to(SID, 49983))
        assert r.status_code == 502 and r.json()["message"] == NODE_UNREACHABLE
        with pytest.raises(InvalidStatus) as refused:
            await ws_connect(f"ws://127.0.0.1:{port}/ws", additional_headers=to(SID, 8000), open_timeout=WAIT)
        assert refused.value.response.status_code == 502
        assert json.loads(refused.value.response.body)["message"] == NODE_UNREACHABLE

        plane.failure = NodeUnavailableError(node_id="node-b", detail="missed heartbeats")
        r = await client.get("/health", headers=to(SID, 49983))
        assert r.status_code == 502
        assert r.json()["message"] == ("The sandbox could not be reached: node node-b is unavailable: "
                                       "missed heartbeats")
        assert "not found" not in r.text


async def test_direct_endpoint_still_goes_to_the_guest(guest: tuple[Upstream, int], tmp_path: Path) -> None:
    """``via`` None (``cube serve``): straight to host:port, no cluster header at all."""
    up, guest_port = guest
    plane = Plane(tmp_path, "")

    async def direct(sandbox_id: str, port: int) -> tuple[Sandbox, Endpoint]:
        return plane.sandbox, Endpoint(host="127.0.0.1", port=port)

    plane.endpoint = direct  # type: ignore[method-assign]
    async with master(plane, E2bConfig()) as (_, port), \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=WAIT) as client:
        r = await client.get("/headers", headers=to(SID, guest_port, **{"x-cube-cluster-token": "forged"}))
        assert r.status_code == 200 and not set(CLUSTER) & set(r.json())
        r = await client.get("/health", headers=to(SID, free_port()))
        assert r.status_code == 502 and r.json()["message"] == "The sandbox is running but port is not open"
    assert up.seen_headers
