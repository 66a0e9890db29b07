"""A hostile guest behind the E2B API: envd's metrics answers and websocket messages through the
edge proxy are size-capped, time-boxed and validated; whatever the guest sends, the API answers
without a 500 and keeps serving. A real uvicorn server plays the guest (the fake network routes
every sandbox to 127.0.0.1)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from e2b_helpers import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from cube_api_e2b.proxy import WS_MAX_MESSAGE_BYTES
from cube_api_e2b.sandbox_metrics import MAX_SAMPLE_BYTES, SAMPLE_TIMEOUT_S

GOOD = {"ts": int(time.time()), "cpu_count": 2, "cpu_used_pct": 12.5, "mem_total": 512 << 20,
        "mem_used": 100 << 20, "mem_cache": 0, "disk_used": 1 << 30, "disk_total": 4 << 30}


DRIP_S = 0.2  # a whole dripped answer takes ~26 s: far above the time-boxed bound below


class HostileEnvd:
    def __init__(self) -> None:
        self.mode = "good"
        self.app = Starlette(routes=[Route("/metrics", self.metrics), WebSocketRoute("/ws", self.websocket)])

    async def metrics(self, request: Request) -> Response:
        body: Any
        if self.mode == "good":
            return JSONResponse(GOOD)
        if self.mode == "drip":
            async def drip() -> AsyncIterator[bytes]:
                for byte in b'{"mem_used": 1, "mem_total": 2}' + b" " * 100:
                    yield bytes([byte])
                    await asyncio.sleep(DRIP_S)  # every read is fast; the whole is not
            return StreamingResponse(drip(), media_type="application/json")
        if self.mode == "huge":
            async def huge() -> AsyncIterator[bytes]:
                yield b'{"mem_used": 1, "mem_total": 2, "x": "'
                while True:
                    yield b"x" * 65536
                    await asyncio.sleep(0)
            return StreamingResponse(huge(), media_type="application/json")
        body = {
            "list": [GOOD],
            "string": "metrics",
            "wrong types": {**GOOD, "mem_used": {"a": 1}, "cpu_count": "two"},
            "negative": {**GOOD, "mem_used": -1},
            "overflow": {**GOOD, "ts": 10**30},
            "nan": {**GOOD, "cpu_used_pct": "NaN"},
            "missing": {"ts": 1},
            "deep": None,
        }[self.mode]
        if self.mode == "deep":
            return Response(b"[" * 100_000, media_type="application/json")
        return JSONResponse(body)

    async def websocket(self, ws: WebSocket) -> None:
        await ws.accept()
        message = await ws.receive_text()
        if message == "flood me":
            await ws.send_bytes(b"x" * (WS_MAX_MESSAGE_BYTES + 1))
        else:
            await ws.send_text("echo:" + message)
        with contextlib.suppress(Exception):
            await ws.receive_text()


@pytest.fixture
async def envd() -> AsyncIterator[tuple[HostileEnvd, int]]:
    guest = HostileEnvd()
    async with serve(guest.app, lifespan="off") as port:
        yield guest, port


BAD_METRICS = ["list", "string", "wrong types", "negative", "overflow", "nan", "missing", "deep", "huge", "drip"]


async def test_hostile_metrics_answers_are_no_sample(cube_factory: Any, envd: tuple[HostileEnvd, int]) -> None:
    guest, port = envd
    async with cube_factory({"envd_port": port}) as cube:
        key = cube.key()
        h = cube.headers(key)
        r = await cube.client.post("/v2/sandboxes", json={"templateID": "base"}, headers=h)
        sid = r.json()["sandboxID"]
        assert len((await cube.client.get(f"/sandboxes/{sid}/metrics", headers=h)).json()) == 1
        for mode in BAD_METRICS:
            guest.mode = mode
            started = time.monotonic()
            r = await cube.client.get(f"/sandboxes/{sid}/metrics", headers=h)
            assert r.status_code == 200 and r.json() == [], (mode, r.text)
            r = await cube.client.get("/sandboxes/metrics", params={"sandbox_ids": sid}, headers=h)
            assert r.status_code == 200 and r.json() == {"sandboxes": {}}, (mode, r.text)
            # two samples, each time-boxed; the slack is for a loaded box, and stays far below one
            # untimed drip (~26 s), so the bound still fails if the time box goes
            assert time.monotonic() - started < 2 * SAMPLE_TIMEOUT_S + 6, mode
        guest.mode = "good"
        assert len((await cube.client.get(f"/sandboxes/{sid}/metrics", headers=h)).json()) == 1
    assert MAX_SAMPLE_BYTES <= 1 << 20


async def test_an_oversized_websocket_message_from_the_guest_closes_only_that_socket(
        cube_factory: Any, envd: tuple[HostileEnvd, int]) -> None:
    _, port = envd
    async with cube_factory() as cube:
        r = await cube.client.post("/v2/sandboxes", json={"templateID": "base"}, headers=cube.headers(cube.key()))
        sid = r.json()["sandboxID"]
        async with serve(cube.app, lifespan="off") as edge_port:
            headers = {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": str(port)}
            url = f"ws://127.0.0.1:{edge_port}/ws"
            async with ws_connect(url, additional_headers=headers, max_size=None) as good, \
                    ws_connect(url, additional_headers=headers, max_size=None) as bad:
                await bad.send("flood me")
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(bad.recv(), 30)
                assert bad.close_code == 1009  # message too big
                await good.send("hi")
                assert await good.recv() == "echo:hi"
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{edge_port}") as client:
                assert (await client.get("/health")).status_code == 200
