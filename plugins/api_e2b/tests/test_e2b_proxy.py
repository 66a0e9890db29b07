"""The edge proxy through a real uvicorn server, to a real upstream server standing in for a sandbox.

The fake network gives every sandbox the guest address 127.0.0.1, so "port P of the sandbox" is
127.0.0.1:P, where the test upstream listens.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import time
from datetime import UTC, datetime

import httpx
import pytest
from e2b_helpers import free_port, serve
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus


@contextlib.asynccontextmanager
async def edge(cube):
    async with serve(cube.app, lifespan="off") as port:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield client, port


async def new_sandbox(cube, key, **body):
    r = await cube.client.post("/v2/sandboxes", json={"templateID": "base", **body}, headers=cube.headers(key))
    assert r.status_code == 201, r.text
    return r.json()


def to(sandbox_id, port, **extra):
    return {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(port), **extra}


async def test_streams_response_as_it_arrives(cube, upstream) -> None:
    _, up_port = upstream
    sid = (await new_sandbox(cube, cube.key()))["sandboxID"]
    async with edge(cube) as (client, _):
        started = time.monotonic()
        arrivals = []
        async with client.stream("GET", "/stream", params={"n": 4, "delay": 0.3}, headers=to(sid, up_port)) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            async for line in r.aiter_lines():
                if line:
                    arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 4
    # the first chunk is there long before the upstream finished (4 x 0.3 s): nothing is buffered
    assert arrivals[0] < 0.6, arrivals
    assert arrivals[-1] - arrivals[0] > 0.6, arrivals


async def test_streams_request_body_as_it_is_sent(cube, upstream) -> None:
    up, up_port = upstream
    sid = (await new_sandbox(cube, cube.key()))["sandboxID"]
    sent_last = []

    async def body():
        for _ in range(3):
            yield b"x" * 1000
            await asyncio.sleep(0.4)
        sent_last.append(time.monotonic())
        yield b"end"

    async with edge(cube) as (client, _):
        r = await client.post("/upload", content=body(), headers=to(sid, up_port))
    assert r.status_code == 200 and r.json()["bytes"] == 3003
    arrivals = up.upload_arrivals
    assert len(arrivals) >= 3
    # the upstream saw the first chunk ~1.2 s before the client finished sending
    assert sent_last[0] - arrivals[0] > 0.8, (arrivals, sent_last)


async def test_large_body_round_trip(cube, upstream) -> None:
    _, up_port = upstream
    sid = (await new_sandbox(cube, cube.key()))["sandboxID"]
    payload = os.urandom(16 << 20)
    async with edge(cube) as (client, _):
        r = await client.post("/upload", content=payload, headers=to(sid, up_port))
        assert r.status_code == 200 and r.json()["sha256"] == hashlib.sha256(payload).hexdigest()
        size = (16 << 20) + 12345
        digest, total = hashlib.sha256(), 0
        async with client.stream("GET", "/download", params={"size": size}, headers=to(sid, up_port)) as r:
            async for chunk in r.aiter_bytes():
                digest.update(chunk)
                total += len(chunk)
    expected = hashlib.sha256()
    left, block = size, 0
    while left > 0:
        chunk = (hashlib.sha256(str(block).encode()).digest() * 2048)[:left]
        expected.update(chunk)
        left -= len(chunk)
        block += 1
    assert total == size and digest.hexdigest() == expected.hexdigest()


async def test_headers_and_status_pass_through(cube, upstream) -> None:
    _, up_port = upstream
    sid = (await new_sandbox(cube, cube.key()))["sandboxID"]
    async with edge(cube) as (client, port):
        r = await client.get("/headers", params={"q": "a b"}, headers=to(
            sid, up_port, **{"X-Access-Token": "tok", "Keep-Alive": "timeout=5", "Connection": "keep-alive, X-Drop",
                             "X-Drop": "1", "X-Custom": "v", "Cookie": "c=1"}))
        seen = r.json()
        assert r.status_code == 200 and r.headers["x-upstream"] == "yes" and r.headers["set-cookie"] == "a=1"
        assert seen["host"] == f"127.0.0.1:{port}"  # the client's Host is kept
        assert seen["x-custom"] == "v" and seen["e2b-sandbox-id"] == sid
        assert "cookie" not in seen  # a Cube credential (see test_client_credentials_never_reach_the_guest)
        assert seen["x-forwarded-for"] == "127.0.0.1" and seen["x-forwarded-proto"] == "http"
        assert "keep-alive" not in seen and "x-drop" not in seen
        r = await client.get("/status/418", headers=to(sid, up_port))
        assert r.status_code == 418 and r.text == "status 418"
        r = await client.get("/does-not-exist", headers=to(sid, up_port))
        assert r.status_code == 404  # the upstream's own 404, not the API's


async def test_client_credentials_never_reach_the_guest(cube_factory, upstream) -> None:
    """The attacker runs the sandbox's server: it must not learn the caller's API key or cookies."""
    up, up_port = upstream
    user_port = free_port()
    selector = "Basic " + base64.b64encode(b"root:").decode()  # the SDK's envd user: no secret in it
    async with cube_factory({"envd_port": up_port}) as cube, serve(up.app, lifespan="off", port=user_port):
        key = cube.key()
        sb = await new_sandbox(cube, key)
        sid, token = sb["sandboxID"], sb["envdAccessToken"]
        creds = {"X-API-Key": key, "Cookie": f"session={key}", "X-Custom": "kept"}
        async with edge(cube) as (client, _):
            for auth in (f"Bearer {key}", selector):  # user port: no Authorization of any kind
                r = await client.get("/headers", headers=to(sid, user_port, Authorization=auth, **creds))
                seen = r.json()
                assert r.status_code == 200 and seen["x-custom"] == "kept"
                assert not {"x-api-key", "cookie", "authorization"} & set(seen), seen
                assert key not in str(seen)
            envd = to(sid, up_port, **{"X-Access-Token": token}, **creds)
            seen = (await client.get("/headers", headers={**envd, "Authorization": selector})).json()
            assert seen["authorization"] == selector and seen["x-access-token"] == token
            assert not {"x-api-key", "cookie"} & set(seen), seen
            for auth in (f"Bearer {key}", "Basic " + base64.b64encode(f"root:{key}".encode()).decode(),
                         f"Basic {key}"):
                seen = (await client.get("/headers", headers={**envd, "Authorization": auth})).json()
                assert "authorization" not in seen and key not in str(seen), (auth, seen)


async def test_malformed_ports_are_400_without_a_key(cube, upstream) -> None:
    _, up_port = upstream
    sid = (await new_sandbox(cube, cube.key()))["sandboxID"]
    async with edge(cube) as (client, port):
        # the single byte 0xB2 ('²' in latin-1): str.isdigit() says yes, int() says no
        for raw in (b"\xb2", b"1\xb2", "\u0663".encode(), b"-1", b"+80", b"0x50", b"1e3", b"65536",
                    b"0", b"9" * 5000, b"80 80", b"\xff\xfe"):
            r = await client.get("/health", headers=[(b"E2b-Sandbox-Id", sid.encode()), (b"E2b-Sandbox-Port", raw)])
            assert r.status_code == 400, (raw, r.text)
            assert r.json()["code"] == 400 and "port" in r.json()["message"]
        r = await client.get("/health", headers=to(sid, up_port))
        assert r.status_code == 204  # a good port still goes through


async def test_bare_files_url_is_a_clear_400(cube, upstream) -> None:
    """A signed /files URL made in single-URL mode names no sandbox: 400 saying how to route it."""
    async with edge(cube) as (client, _):
        for method in ("GET", "POST"):
            r = await client.request(method, "/files", params={"path": "/tmp/x", "signature": "v1_abc"})
            assert r.status_code == 400, (method, r.text)
            assert "E2b-Sandbox-Id" in r.json()["message"] and "E2B_DOMAIN" in r.json()["message"]


async def test_malformed_host_ports_in_domain_mode(cube_factory, upstream) -> None:
    _, up_port = upstream
    async with cube_factory({"domain": "cube.test"}) as cube:
        sid = (await new_sandbox(cube, cube.key()))["sandboxID"]
        async with edge(cube) as (client, _):
            r = await client.get("/health", headers={"Host": f"{up_port}-{sid}.cube.test"})
            assert r.status_code == 204
            for host in (f"\xb2-{sid}.cube.test", f"99999-{sid}.cube.test", f"0-{sid}.cube.test",
                         f"{'9' * 5000}-{sid}.cube.test"):
                r = await client.get("/health", headers=[(b"Host", host.encode("latin-1"))])
                assert r.status_code in (400, 200), (host, r.text)  # refused, or not a sandbox host: the app
                assert r.status_code != 200 or r.json()["status"] == "ok"
            for host in ("cube.test:\xb2", "api.cube.test:\xb2", f"{up_port}-{sid}.cube.test:\xb2", "x:" + "9" * 5000):
                r = await client.get("/health", headers=[(b"Host", host.encode("latin-1"))])
                assert r.status_code < 500, (host, r.text)


async def test_websocket_relay(cube, upstream) -> None:
    _, up_port = upstream
    sid = (await new_sandbox(cube, cube.key()))["sandboxID"]
    async with edge(cube) as (_, port):
        async with ws_connect(f"ws://127.0.0.1:{port}/ws", additional_headers=to(sid, up_port),
                              subprotocols=["echo.v1"]) as ws:
            assert ws.subprotocol == "echo.v1"
            await ws.send("hello")
            assert await ws.recv() == "echo:hello"
            await ws.send(b"\x00\x01bin")
            assert await ws.recv() == b"echo:\x00\x01bin"
            big = "y" * 300_000
            await ws.send(big)
            assert await ws.recv() == "echo:" + big
            await ws.send("close-me")
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 4001 and ws.close_reason == "asked to"
        closed_port = free_port()
        with pytest.raises(InvalidStatus) as info:
            async with ws_connect(f"ws://127.0.0.1:{port}/ws", additional_headers=to(sid, closed_port)):
                pass
        assert info.value.response.status_code == 502
        assert b"port is not open" in info.value.response.body


async def test_port_not_open_and_unknown_or_killed_sandbox(cube, openapi) -> None:
    key = cube.key()
    sid = (await new_sandbox(cube, key))["sandboxID"]
    closed = free_port()
    async with edge(cube) as (client, _):
        r = await client.get("/health", headers=to(sid, closed))
        assert r.status_code == 502 and r.headers["content-type"] == "application/json"
        assert r.json() == {"sandboxId": sid, "code": 502, "message": "The sandbox is running but port is not open"}
        r = await client.get("/health", headers=to("doesnotexist", closed))
        assert r.status_code == 502 and "was not found" in r.json()["message"]
        await cube.client.post(f"/sandboxes/{sid}/pause", headers=cube.headers(key))
        r = await client.get("/health", headers=to(sid, closed))
        assert r.status_code == 502 and "was not found" in r.json()["message"]  # paused: not reachable
        await cube.client.delete(f"/sandboxes/{sid}", headers=cube.headers(key))
        r = await client.get("/health", headers=to(sid, closed))
        assert r.status_code == 502 and r.json()["message"] == "The sandbox was not found"
        r = await client.get("/health", headers={"E2b-Sandbox-Id": sid})
        assert r.status_code == 400 and "E2b-Sandbox-Port" in r.json()["message"]
        r = await client.get("/health", headers=to(sid, "99999"))
        assert r.status_code == 400 and "port" in r.json()["message"]
        r = await client.get("/health")
        assert r.status_code == 200  # no sandbox headers: the core app


async def test_traffic_token_on_user_ports(cube, upstream) -> None:
    _, up_port = upstream
    key = cube.key()
    private = await new_sandbox(cube, key, network={"allowPublicTraffic": False})
    public = await new_sandbox(cube, key)
    token = private["trafficAccessToken"]
    async with edge(cube) as (client, _):
        r = await client.get("/headers", headers=to(private["sandboxID"], up_port))
        assert r.status_code == 403 and "traffic" in r.json()["message"]
        r = await client.get("/headers", headers=to(private["sandboxID"], up_port,
                                                  **{"E2B-Traffic-Access-Token": "wrong"}))
        assert r.status_code == 403
        r = await client.get("/headers", headers=to(private["sandboxID"], up_port,
                                                  **{"e2b-traffic-access-token": token}))
        assert r.status_code == 200
        # another sandbox's token does not open this one
        other = await new_sandbox(cube, key, network={"allowPublicTraffic": False})
        r = await client.get("/headers", headers=to(other["sandboxID"], up_port,
                                                  **{"E2B-Traffic-Access-Token": token}))
        assert r.status_code == 403
        r = await client.get("/headers", headers=to(public["sandboxID"], up_port))
        assert r.status_code == 200


async def test_envd_port_access_token_and_control_routes(cube_factory, upstream) -> None:
    up, up_port = upstream
    async with cube_factory({"envd_port": up_port}) as cube:
        sb = await new_sandbox(cube, cube.key())
        sid, token = sb["sandboxID"], sb["envdAccessToken"]
        async with edge(cube) as (client, _):
            assert (await client.get("/health", headers=to(sid, up_port))).status_code == 204  # open
            r = await client.post("/echo", content=b"x", headers=to(sid, up_port))
            assert r.status_code == 401 and "access token" in r.json()["message"]
            r = await client.post("/echo", content=b"x", headers=to(sid, up_port, **{"X-Access-Token": "bad"}))
            assert r.status_code == 401
            r = await client.post("/echo", content=b"abc", headers=to(sid, up_port, **{"X-Access-Token": token}))
            assert r.status_code == 200 and r.content == b"abc"
            r = await client.post("/init", json={}, headers=to(sid, up_port, **{"X-Access-Token": token}))
            assert r.status_code == 403 and "control plane" in r.json()["message"]
            r = await client.get("/files", params={"path": "x", "signature": "v1_x"}, headers=to(sid, up_port))
            assert r.status_code == 404  # reached envd (here: the upstream), which checks signatures itself


async def test_domain_mode_host_routing(cube_factory, upstream) -> None:
    _, up_port = upstream
    async with cube_factory({"domain": "cube.test:8443"}) as cube:
        key = cube.key()
        sid = (await new_sandbox(cube, key))["sandboxID"]
        async with edge(cube) as (client, _):
            r = await client.get("/headers", headers={"Host": f"{up_port}-{sid}.cube.test:8443"})
            assert r.status_code == 200 and r.json()["host"] == f"{up_port}-{sid}.cube.test:8443"
            r = await client.get("/v2/sandboxes", headers={"Host": "api.cube.test:8443", **cube.headers(key)})
            assert r.status_code == 200 and r.json()[0]["sandboxID"] == sid
            r = await client.get("/health", headers={"Host": f"{free_port()}-{sid}.cube.test"})
            assert r.status_code == 502 and "port is not open" in r.text
            r = await client.get("/health", headers={"Host": f"{up_port}-nosuchsandbox.cube.test"})
            assert r.status_code == 502 and "was not found" in r.text
            r = await client.get("/health", headers={"Host": f"{up_port}-{sid}.other.test"})
            assert r.status_code == 200 and r.json()["status"] == "ok"  # not our domain: the app


async def test_kill_cuts_open_streams(cube, upstream) -> None:
    up, up_port = upstream
    key = cube.key()
    sid = (await new_sandbox(cube, key))["sandboxID"]
    async with edge(cube) as (client, _):
        async with client.stream("GET", "/forever", headers=to(sid, up_port)) as r:
            lines = r.aiter_lines()
            assert await lines.__anext__() == "first"
            started = time.monotonic()
            assert (await cube.client.delete(f"/sandboxes/{sid}", headers=cube.headers(key))).status_code == 204
            with pytest.raises(httpx.RemoteProtocolError):
                async for _ in lines:
                    pass
            assert time.monotonic() - started < 3
        await asyncio.wait_for(up.disconnected.wait(), timeout=5)


async def test_client_disconnect_closes_upstream(cube, upstream) -> None:
    up, up_port = upstream
    sid = (await new_sandbox(cube, cube.key()))["sandboxID"]
    async with edge(cube) as (client, _):
        async with client.stream("GET", "/forever", headers=to(sid, up_port)) as r:
            assert await r.aiter_lines().__anext__() == "first"
        await asyncio.wait_for(up.disconnected.wait(), timeout=5)


async def test_edge_metrics(cube, upstream) -> None:
    _, up_port = upstream
    sid = (await new_sandbox(cube, cube.key()))["sandboxID"]
    async with edge(cube) as (client, _):
        await client.get("/headers", headers=to(sid, up_port))
        await client.get("/headers", headers=to(sid, free_port()))
    text = cube.plugin.metrics.render().decode()
    assert 'cube_edge_requests_total{kind="http",outcome="forwarded"} 1.0' in text
    assert 'cube_edge_requests_total{kind="http",outcome="port_not_open"} 1.0' in text


async def test_upstream_dying_mid_body_is_not_a_complete_response(cube) -> None:
    async def half(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nContent-Type: text/plain\r\n\r\n" + b"x" * 10)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(half, "127.0.0.1", 0)
    up_port = server.sockets[0].getsockname()[1]
    sid = (await new_sandbox(cube, cube.key()))["sandboxID"]
    try:
        async with edge(cube) as (client, _):
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get("/", headers=to(sid, up_port))
    finally:
        server.close()
        await server.wait_closed()


async def test_traffic_resumes_a_paused_sandbox_with_auto_resume(cube, upstream) -> None:
    """The first requests wait for one resume, then go; without auto-resume a paused sandbox is
    "not found" at the edge (E2B's answer); a request the edge refuses never wakes a sandbox."""
    _, up_port = upstream
    key = cube.key()
    waking = await new_sandbox(cube, key, autoPause=True, autoResume={"enabled": True}, timeout=120)
    private = await new_sandbox(cube, key, autoPause=True, autoResume={"enabled": True},
                                network={"allowPublicTraffic": False})
    plain = await new_sandbox(cube, key, autoPause=True)
    for body in (waking, private, plain):
        r = await cube.client.post(f"/sandboxes/{body['sandboxID']}/pause", headers=cube.headers(key))
        assert r.status_code == 204
    r = await cube.client.get(f"/sandboxes/{waking['sandboxID']}", headers=cube.headers(key))
    assert r.json()["lifecycle"] == {"autoResume": True, "onTimeout": "pause"} and r.json()["state"] == "paused"
    r = await cube.client.get(f"/sandboxes/{plain['sandboxID']}", headers=cube.headers(key))
    assert r.json()["lifecycle"] == {"autoResume": False, "onTimeout": "pause"}
    syncs_before = cube.agent.vmm.calls.count(("sync_clock", waking["sandboxID"]))
    async with edge(cube) as (client, _):
        r = await client.get("/headers", headers=to(plain["sandboxID"], up_port))
        assert r.status_code == 502 and "was not found" in r.json()["message"]
        r = await client.get("/headers", headers=to(private["sandboxID"], up_port))
        assert r.status_code == 403  # no traffic token: refused before anything wakes
        answers = await asyncio.gather(*(client.get("/status/200", headers=to(waking["sandboxID"], up_port))
                                         for _ in range(5)))
        assert [a.status_code for a in answers] == [200] * 5
    assert cube.agent.vmm.calls.count(("sync_clock", waking["sandboxID"])) == syncs_before + 1  # resumed once
    states = {b["sandboxID"]: cube.service.find(b["sandboxID"]).state.value for b in (waking, private, plain)}
    assert states == {waking["sandboxID"]: "running", private["sandboxID"]: "paused", plain["sandboxID"]: "paused"}
    resumed = cube.service.find(waking["sandboxID"])
    left = (resumed.end_at - datetime.now(UTC)).total_seconds()
    assert 100 < left <= 120  # a sandbox resumed by traffic gets the timeout it was created with
