"""The event bus: what happened to sandboxes, nodes and template builds, as it happens.

The control plane publishes an :class:`Event` where a lifecycle change happens (the service, the
node directory, the build engine), never by polling the store. Consumers subscribe: the dashboard
and ``GET /events`` (server-sent events, ``cube events``), webhooks.

- :meth:`EventBus.publish` never blocks its caller: each subscriber has a bounded buffer; a slow
  one loses its oldest events, and its stream then yields a ``stream.lost`` event saying how many.
- :meth:`EventBus.subscribe` (``team_id=None``: every team, for operators) returns a
  :class:`Subscription`, registered at once (nothing published after the call is missed).
- Fan-out between processes: with the SQLite store everything runs in one process, so delivery is
  in-process. With the PostgreSQL store (several masters, nodes elsewhere) the store's
  :class:`EventChannel` carries each event to every other process by ``NOTIFY``/``LISTEN``; a
  process delivers its own events locally at once and skips them when they come back.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import os
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any, Final

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cube_core.models import utcnow

log = structlog.get_logger(__name__)

EVENT_TYPES: Final = (
    "sandbox.created", "sandbox.paused", "sandbox.resumed", "sandbox.killed", "sandbox.expired",
    "sandbox.snapshot", "sandbox.policy_changed", "sandbox.timeout_changed",
    "node.up", "node.down", "node.draining", "template.build_finished", "template.deleted",
)
"""Every type the core publishes."""
LOST: Final = "stream.lost"
"""Not published: a subscription yields it after its buffer overflowed (``data.lost``: how many)."""
BUFFER: Final = 1000
"""Events a subscriber may fall behind by before it loses the oldest."""

WIRE_MAX: Final = 7000
"""Longest event (JSON bytes) sent to other processes; a longer one goes without its ``data``."""

_counter = itertools.count()


def event_id() -> str:
    """Sortable by time (nanoseconds, hex, fixed width), unique across processes (random tail)."""
    return f"{time.time_ns():016x}{next(_counter) % 0x10000:04x}{secrets.token_hex(4)}"


class Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(default_factory=event_id)
    type: str
    at: datetime = Field(default_factory=utcnow)
    team_id: str | None = None
    sandbox_id: str | None = None
    node_id: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class EventChannel(abc.ABC):
    """Carries events between processes (the store provides it; None: one process only).
    Both methods are called on the bus's own threads and may block."""

    @abc.abstractmethod
    def send(self, payload: str) -> None:
        """Deliver ``payload`` to every listener (this process's included)."""

    @abc.abstractmethod
    def listen(self, deliver: Callable[[str], None], stop: threading.Event) -> None:
        """Call ``deliver`` with each payload sent by anyone until ``stop`` is set; return then.
        Raising ends this attempt; the bus retries after a pause. Call ``deliver("")`` once
        listening (the bus's start waits for it)."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release what :meth:`send` holds (called on the sender's thread as the bus stops)."""


class Subscription:
    """An async iterator of the events one subscriber may see; :meth:`close` (or leaving
    ``async with``) unregisters it."""

    def __init__(self, bus: EventBus, team_id: str | None, buffer: int) -> None:
        self.bus = bus
        self.team_id = team_id
        self._queue: deque[Event] = deque()
        self._buffer = buffer
        self._lost = 0
        self._wake = asyncio.Event()
        self.closed = False

    def _offer(self, event: Event) -> None:
        if self.team_id is not None and event.team_id != self.team_id:
            return
        if len(self._queue) >= self._buffer:
            self._queue.popleft()
            self._lost += 1
        self._queue.append(event)
        self._wake.set()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        while True:
            if self.closed:
                raise StopAsyncIteration
            if self._lost:
                lost, self._lost = self._lost, 0
                return Event(type=LOST, team_id=self.team_id, data={"lost": lost})
            if self._queue:
                return self._queue.popleft()
            self._wake.clear()
            await self._wake.wait()

    def close(self) -> None:
        self.closed = True
        self._wake.set()
        self.bus._subscribers.discard(self)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    """See the module docstring. Publish from the event loop's thread (or any thread once
    :meth:`start` ran); subscribe from the loop."""

    def __init__(self, channel: EventChannel | None = None, *, buffer: int = BUFFER) -> None:
        self.channel = channel
        self.buffer = buffer
        self.origin = f"{os.getpid()}-{secrets.token_hex(6)}"
        self._subscribers: set[Subscription] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.published = 0
        self.received = 0

    # -- life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Remember the loop (deliveries from other threads go through it); with a channel, start
        its sender and listener threads."""
        self._loop = asyncio.get_running_loop()
        if self.channel is None or self._threads:
            return
        self._stop.clear()
        ready = threading.Event()
        self._threads = [threading.Thread(target=self._send_forever, name="cube-events-send", daemon=True),
                         threading.Thread(target=self._listen_forever, args=(ready,), name="cube-events-listen",
                                          daemon=True)]
        for thread in self._threads:
            thread.start()
        await asyncio.to_thread(ready.wait, 5.0)  # listening before the first publish, when it can

    async def stop(self) -> None:
        """Send what is queued, stop the threads, end every subscription."""
        await asyncio.to_thread(self.flush)
        for sub in list(self._subscribers):
            sub.close()

    def flush(self) -> None:
        """Blocking: send every queued event, then stop the channel's threads (also without a loop,
        e.g. a CLI command that published)."""
        if self.channel is not None and not self._threads:
            while True:  # never started (a CLI command): send here
                try:
                    payload = self._outbox.get_nowait()
                except queue.Empty:
                    break
                if payload is not None:
                    self._send(payload)
            self.channel.close()
            return
        self._stop.set()
        self._outbox.put(None)
        for thread in self._threads:
            thread.join(timeout=10.0)
        self._threads = []

    # -- publish and subscribe -------------------------------------------------------------------

    def publish(self, event: Event) -> None:
        """Deliver ``event`` to this process's subscribers and hand it to the channel; never blocks."""
        self.published += 1
        self._deliver_here(event)
        if self.channel is not None:
            payload = _Wire(origin=self.origin, event=event).model_dump_json()
            if len(payload.encode()) > WIRE_MAX:  # PostgreSQL's NOTIFY takes < 8000 bytes
                cut = event.model_copy(update={"data": {"truncated": True}})
                payload = _Wire(origin=self.origin, event=cut).model_dump_json()
            self._outbox.put(payload)

    def emit(self, type_: str, *, team_id: str | None = None, sandbox_id: str | None = None,
             node_id: str | None = None, **data: Any) -> Event:
        """Build an :class:`Event` and :meth:`publish` it; the event."""
        event = Event(type=type_, team_id=team_id, sandbox_id=sandbox_id, node_id=node_id, data=data)
        self.publish(event)
        return event

    def subscribe(self, team_id: str | None = None) -> Subscription:
        """The events of ``team_id`` (None: of every team, and those of no team: nodes)."""
        sub = Subscription(self, team_id, self.buffer)
        self._subscribers.add(sub)
        return sub

    async def stream(self, team_id: str | None = None) -> AsyncIterator[Event]:
        """:meth:`subscribe` as an async generator (closed when the generator is)."""
        async with self.subscribe(team_id) as sub:
            async for event in sub:
                yield event

    def _deliver_here(self, event: Event) -> None:
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is not None and running is not loop:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
                loop.call_soon_threadsafe(self._offer_all, event)
            return
        self._offer_all(event)

    def _offer_all(self, event: Event) -> None:
        for sub in list(self._subscribers):
            sub._offer(event)

    # -- the channel's threads -------------------------------------------------------------------

    def _send(self, payload: str) -> None:
        assert self.channel is not None
        try:
            self.channel.send(payload)
        except Exception as exc:  # noqa: BLE001 - other processes miss it; this one has it
            log.warning("event not sent to other processes", error=repr(exc))

    def _send_forever(self) -> None:
        while True:
            payload = self._outbox.get()
            if payload is None:
                assert self.channel is not None
                self.channel.close()
                return
            self._send(payload)

    def _listen_forever(self, ready: threading.Event) -> None:
        assert self.channel is not None

        def deliver(payload: str) -> None:
            ready.set()
            if not payload:  # the channel says: listening
                return
            try:
                wire = _Wire.model_validate_json(payload)
            except ValidationError as exc:
                log.warning("malformed event from another process", error=str(exc)[:200])
                return
            if wire.origin == self.origin:
                return
            self.received += 1
            self._deliver_here(wire.event)

        while not self._stop.is_set():
            try:
                self.channel.listen(deliver, self._stop)
            except Exception as exc:  # noqa: BLE001 - the database went away: listen again
                log.warning("event listener failed; retrying", error=repr(exc))
                ready.set()
                self._stop.wait(1.0)


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    origin: str
    event: Event
