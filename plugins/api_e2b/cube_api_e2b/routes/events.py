"""``GET /events``: the event bus (``cube_core.events``) as server-sent events, for ``cube events``
and any client that follows what happens. A team's API key sees its team's events; the operator
token (``[core] operator_token``) sees every team's and the nodes'.

Each event is one SSE message: ``id`` (sortable), ``event`` (its type), ``data`` (the event as
JSON). A comment line every :data:`KEEPALIVE_S` keeps proxies from closing a quiet stream. A client
that reads too slowly loses the oldest events and gets an ``event: stream.lost`` saying how many.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

from cube_core.events import Event, Subscription
from fastapi import APIRouter, Query, Security
from fastapi.responses import StreamingResponse

from cube_api_e2b.routing import API_KEY_SCHEME, Caller, Service, TeamOrOperatorRoute, errors

router = APIRouter(route_class=TeamOrOperatorRoute, tags=["events"], dependencies=[Security(API_KEY_SCHEME)])

KEEPALIVE_S = 15.0
Types = Annotated[list[str] | None, Query(alias="type", description="only these types (repeatable)")]


def sse(event: Event) -> bytes:
    """One server-sent event (the JSON has no newline, so it is one ``data:`` line)."""
    return f"id: {event.id}\nevent: {event.type}\ndata: {event.model_dump_json()}\n\n".encode()


async def stream(sub: Subscription, types: frozenset[str], keepalive_s: float = KEEPALIVE_S) -> AsyncIterator[bytes]:
    try:
        yield b": subscribed\n\n"  # headers and a first byte at once: the client knows it is listening
        while True:
            try:
                event = await asyncio.wait_for(anext(sub), keepalive_s)
            except TimeoutError:
                yield b": keepalive\n\n"
                continue
            except StopAsyncIteration:
                return
            if not types or event.type in types or event.type == "stream.lost":
                yield sse(event)
    finally:
        sub.close()


# Not in /openapi.json: an endless stream cannot be described or fuzzed there (schemathesis reads
# it to the end); docs/api.md and docs/events.md document it.
@router.get("/events", response_class=StreamingResponse, include_in_schema=False, responses={
    200: {"content": {"text/event-stream": {}}, "description": "server-sent events, until the client leaves"},
    **errors()}, summary="Follow the caller's events (the operator token: every team's), as server-sent events")
async def follow(caller: Caller, service: Service, types: Types = None) -> StreamingResponse:
    sub = service.events.subscribe(None if caller is None else caller.team_id)
    return StreamingResponse(stream(sub, frozenset(types or ())), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
