"""A Connect stream open through the edge when its sandbox is killed ends as E2B ends it.

The upstream plays envd's process stream (``application/connect+json`` envelopes that never end);
the edge runs behind uvicorn (HTTP/1.1) as in single-URL mode. What the SDK then decides is proven
end to end in tests/e2e/test_e2e_conformance.py (HTTP/1.1 and HTTP/2).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx
from e2b_helpers import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route
from test_e2b_proxy import edge, new_sandbox, to

from cube_api_e2b.connect_stream import EnvelopeTracker, end_of_stream_error


def envelope(obj: object, flags: int = 0) -> bytes:
    body = json.dumps(obj).encode()
    return bytes([flags]) + len(body).to_bytes(4, "big") + body


def envelopes_of(raw: bytes) -> list[tuple[int, object]]:
    out, i = [], 0
    while i < len(raw):
        size = int.from_bytes(raw[i + 1:i + 5], "big")
        out.append((raw[i], json.loads(raw[i + 5:i + 5 + size])))
        i += 5 + size
    assert i == len(raw), "the stream ends inside an envelope"
    return out


async def endless_process_stream(request: Request) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        yield envelope({"event": {"start": {"pid": 7}}})
        while True:
            await asyncio.sleep(0.2)
            yield envelope({"event": {"data": {"stdout": "dGljawo="}}})

    return StreamingResponse(body(), media_type="application/connect+json")


def test_tracker_follows_envelopes_across_chunks() -> None:
    raw = envelope({"a": 1}) + envelope({"b": "x" * 300}) + end_of_stream_error("unavailable", "gone")
    for size in (1, 3, 5, 7, 64, len(raw)):
        tracker = EnvelopeTracker()
        boundaries = []
        for i in range(0, len(raw), size):
            tracker.feed(raw[i:i + size])
            boundaries.append(tracker.at_boundary)
        assert tracker.at_boundary and tracker.ended and boundaries[-1]
    tracker = EnvelopeTracker()
    tracker.feed(envelope({"a": 1})[:7])
    assert not tracker.at_boundary and not tracker.ended


async def test_kill_ends_an_open_connect_stream_with_unavailable(cube) -> None:
    app = Starlette(routes=[Route("/process.Process/Start", endless_process_stream, methods=["POST"])])
    key = cube.key()
    sid = (await new_sandbox(cube, key))["sandboxID"]
    async with serve(app, lifespan="off") as up_port, edge(cube) as (client, _):
        raw = b""
        async with client.stream("POST", "/process.Process/Start", content=envelope({}),
                                 headers=to(sid, up_port, **{"Content-Type": "application/connect+json"})) as r:
            assert r.status_code == 200
            chunks = r.aiter_raw()
            while b"dGljawo=" not in raw:
                raw += await chunks.__anext__()
            started = time.monotonic()
            assert (await cube.client.delete(f"/sandboxes/{sid}", headers=cube.headers(key))).status_code == 204
            async for chunk in chunks:  # ends cleanly: no protocol error
                raw += chunk
            assert time.monotonic() - started < 3
        events = envelopes_of(raw)
        flags, last = events[-1]
        assert flags == 0x02
        assert last == {"error": {"code": "unavailable", "message":
                                  f"the connection to sandbox {sid} ended before the stream completed"}}
        assert all(f == 0 for f, _ in events[:-1])
        # and the probe the SDK sends next is answered as E2B answers for a dead sandbox
        health = await client.get("/health", headers=to(sid, 49983))
        assert health.status_code == 502 and "was not found" in health.json()["message"]


async def test_a_plain_stream_is_still_aborted(cube, upstream) -> None:
    _, up_port = upstream
    key = cube.key()
    sid = (await new_sandbox(cube, key))["sandboxID"]
    async with edge(cube) as (client, _):
        async with client.stream("GET", "/forever", headers=to(sid, up_port)) as r:
            lines = r.aiter_lines()
            assert await lines.__anext__() == "first"
            await cube.client.delete(f"/sandboxes/{sid}", headers=cube.headers(key))
            try:
                async for _ in lines:
                    pass
            except httpx.RemoteProtocolError:
                pass
            else:
                raise AssertionError("a non-Connect body must not look complete")
