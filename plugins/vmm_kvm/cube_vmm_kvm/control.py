"""Host side of the guest control channel: JSON lines over the virtio-serial port ``cube.ctl``.

QEMU exposes the port as a unix socket (``<workdir>/ctl.sock``, QEMU is the server) and the guest
agent ``cube_guest`` serves it. Requests are ``{"id": int, "op": str, ...params}``; replies are
``{"id": int, "ok": true, ...}`` or ``{"id": int, "ok": false, "error": str}``; the guest also sends
unsolicited events such as ``{"event": "ready", "boot_id": ...}``.

Every new connection starts with a handshake: the guest agent reopens its port whenever the host
side goes away (a restored clone, a restarted node agent), and Linux discards what was queued on a
port that is being closed. So after connecting we ping, at short and then growing intervals, until
a ping is answered or the agent's ``ready`` line arrives; only then do requests go out.

Calls are multiplexed by id, so many can be in flight. A reply whose id is unknown (for example a
late answer to a handshake ping, or one addressed to an earlier connection) is dropped. When the
connection breaks, pending calls fail and the next call connects again.

The guest is hostile (root inside its VM, it may replace the agent), so what it sends is bounded:

* a line is at most :data:`LINE_LIMIT` bytes (the agent's own limit; its largest reply, ``exec``
  with 2 x 64 KiB of output, fits);
* every call has one total deadline (``timeout``) covering connect, handshake, write and reply,
  however slowly the bytes come;
* each reply's envelope is validated (:class:`Envelope`; strict ``id``/``ok``, ``error`` a short
  string); the fields of a reply are validated by the caller (``cube_core.guest``);
* lines that answer nothing (not JSON, not an object, an id never sent, unsolicited events) are
  junk: a connection may carry :data:`JUNK_LINES_MAX` of them and :data:`JUNK_BYTES_MAX` bytes.

A guest that breaks one of these rules (an over-long line, a malformed envelope, too much junk,
JSON nested too deep) breaks the channel for good: the connection is closed, nothing more is read
and every call, pending or later, raises :class:`cube_core.GuestProtocolError` with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from pathlib import Path
from typing import Any

import structlog
from cube_core import GuestProtocolError, GuestTimeoutError, VmmError
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

log = structlog.get_logger(__name__)

LINE_LIMIT = 1 << 20
"""Longest line accepted from the guest (bytes, newline included)."""
JUNK_LINES_MAX = 64
"""Lines per connection that answer no request (late pings and ready events are a handful)."""
JUNK_BYTES_MAX = 4 << 20
"""Bytes per connection of such lines."""
ERROR_TEXT_MAX = 2000
"""Longest ``error`` text accepted in a failed reply."""
ISSUED_IDS_KEPT = 4096
HANDSHAKE_FIRST_S = 0.05
HANDSHAKE_MAX_S = 0.5


class GuestCallError(VmmError):
    """The guest agent answered ``ok: false``."""

    msg_fmt = "guest of {vm_id}: {op} failed: {error}"


class ChannelLostError(VmmError):
    """The control connection broke while a call was pending."""


class Envelope(BaseModel):
    """What every reply must be; its other fields are the op's result (validated by the caller)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: StrictInt
    ok: StrictBool
    error: str | None = Field(default=None, max_length=ERROR_TEXT_MAX)


class ReadyEvent(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    event: str = Field(max_length=64)


class ControlChannel:
    """A reconnecting, multiplexing client of one VM's ``ctl.sock``."""

    def __init__(self, vm_id: str, path: Path) -> None:
        self.vm_id = vm_id
        self.path = path
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task[None] | None = None
        self._connect_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        self._live = False
        self._ready = asyncio.Event()
        self.ready_event: dict[str, Any] | None = None
        """The last ``ready`` event the guest sent on the current connection."""
        self.hello: dict[str, Any] | None = None
        """What completed the last handshake: the ready event or the answered ping."""
        self.broken: str | None = None
        """Why the guest is no longer listened to (it broke the protocol); None while it behaves."""
        self._issued: dict[int, None] = {}
        """Ids sent and not yet answered (oldest first, bounded): a late answer to one is not junk."""
        self._junk_lines = 0
        self._junk_bytes = 0

    @property
    def connected(self) -> bool:
        return self._live and self._writer is not None and not self._writer.is_closing()

    def _check_broken(self) -> None:
        if self.broken is not None:
            raise GuestProtocolError(vm_id=self.vm_id, reason=self.broken)

    async def connect(self, *, timeout: float) -> dict[str, Any]:
        """Connect (retrying while QEMU starts) and handshake; return the handshake's answer."""
        deadline = time.monotonic() + timeout
        try:
            async with asyncio.timeout_at(asyncio.get_running_loop().time() + timeout):
                return await self._connect(deadline, timeout)
        except TimeoutError as exc:
            raise GuestTimeoutError(vm_id=self.vm_id, timeout=timeout) from exc

    async def _connect(self, deadline: float, timeout: float) -> dict[str, Any]:
        async with self._connect_lock:
            self._check_broken()
            if self.connected and self.hello is not None:
                return self.hello
            if self._writer is None or self._writer.is_closing():
                await self._open(deadline, timeout)
            self.hello = await self._handshake(deadline, timeout)
            self._live = True
            log.debug("control channel live", vm_id=self.vm_id, via=self.hello.get("event", "ping"))
            return self.hello

    async def _open(self, deadline: float, timeout: float) -> None:
        delay = 0.002
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.path), limit=LINE_LIMIT)
                break
            except OSError as exc:
                if time.monotonic() + delay > deadline:
                    raise GuestTimeoutError(vm_id=self.vm_id, timeout=timeout) from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        self._ready.clear()
        self.ready_event = None
        self._junk_lines = self._junk_bytes = 0
        self._writer = writer
        self._read_task = asyncio.create_task(self._read_loop(reader, writer), name=f"ctl-{self.vm_id}")

    async def _handshake(self, deadline: float, timeout: float) -> dict[str, Any]:
        interval = HANDSHAKE_FIRST_S
        pings: list[asyncio.Future[dict[str, Any]]] = []
        ready: asyncio.Future[Any] = asyncio.ensure_future(self._ready.wait())
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestTimeoutError(vm_id=self.vm_id, timeout=timeout)
                pings.append(await self._send("ping", None))
                waiting: set[asyncio.Future[Any]] = {ready, *pings}
                done, _ = await asyncio.wait(waiting, timeout=min(interval, left),
                                             return_when=asyncio.FIRST_COMPLETED)
                if ready in done and self.ready_event is not None:
                    return dict(self.ready_event)
                for ping in done:
                    if ping is ready:
                        continue
                    if ping.exception() is None:
                        reply = ping.result()
                        if reply.get("ok"):
                            return {"event": "ready", **_fields(reply)}
                    elif isinstance(ping.exception(), GuestProtocolError):
                        raise ping.exception()  # type: ignore[misc]
                    elif isinstance(ping.exception(), ChannelLostError):
                        self._check_broken()
                        raise VmmError(f"guest of {self.vm_id}: control channel closed during handshake")
                interval = min(interval * 2, HANDSHAKE_MAX_S)
        finally:
            ready.cancel()
            for ping in pings:
                ping.cancel()

    async def _read_loop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        error: BaseException = EOFError("control channel closed")
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError as exc:  # the limit: no newline within LINE_LIMIT bytes
                    raise _Violation(f"a line longer than {LINE_LIMIT} bytes") from exc
                if not line:
                    break
                if not line.strip():
                    continue
                self._dispatch(line)
        except _Violation as exc:
            error = self._break(str(exc))
        except (OSError, ValueError) as exc:
            error = exc
        finally:
            if self._writer is writer:
                self._drop_connection(error)
            else:
                writer.close()

    def _break(self, reason: str) -> GuestProtocolError:
        """The guest broke the protocol: stop listening to it for good."""
        if self.broken is None:
            self.broken = reason
            log.warning("guest broke the control protocol; channel closed", vm_id=self.vm_id, reason=reason)
        return GuestProtocolError(vm_id=self.vm_id, reason=self.broken)

    def _junk(self, line: bytes, what: str) -> None:
        self._junk_lines += 1
        self._junk_bytes += len(line)
        log.debug("dropping a guest line", vm_id=self.vm_id, what=what, bytes=len(line))
        if self._junk_lines > JUNK_LINES_MAX or self._junk_bytes > JUNK_BYTES_MAX:
            raise _Violation(f"more than {JUNK_LINES_MAX} lines or {JUNK_BYTES_MAX} bytes that answer nothing")

    def _dispatch(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except RecursionError as exc:
            raise _Violation("JSON nested too deep") from exc
        except ValueError:
            self._junk(line, "not JSON")
            return
        if not isinstance(msg, dict):
            self._junk(line, "not a JSON object")
            return
        if "id" not in msg:
            try:
                event = ReadyEvent.model_validate(msg)
            except ValidationError:
                self._junk(line, "not a reply or an event")
                return
            self._junk(line, "event")  # events are rare: they count, so that a flood of them ends
            if event.event == "ready":
                self.ready_event = msg
                self._ready.set()
            return
        request_id = msg.get("id")
        if not isinstance(request_id, int) or isinstance(request_id, bool) or request_id not in self._issued:
            self._junk(line, "a reply to no request")
            return
        del self._issued[request_id]
        try:
            Envelope.model_validate(msg)
        except ValidationError as exc:
            fields = ", ".join(".".join(str(p) for p in e["loc"])[:40] for e in exc.errors()[:3])
            raise _Violation(f"a malformed reply ({fields})") from None
        future = self._pending.pop(request_id, None)
        if future is not None and not future.done():
            future.set_result(msg)  # else a late answer (a handshake ping, a call that timed out)

    def _drop_connection(self, error: BaseException) -> None:
        writer, self._writer = self._writer, None
        self._live = False
        self.hello = None
        if writer is not None:
            writer.close()
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error if isinstance(error, GuestProtocolError) else
                                     ChannelLostError(f"guest of {self.vm_id}: control channel lost: {error}"))

    async def _send(self, op: str, params: dict[str, Any] | None) -> asyncio.Future[dict[str, Any]]:
        """Write one request; return the future of its reply (removed from ``_pending`` when done)."""
        self._check_broken()
        writer = self._writer
        if writer is None or writer.is_closing():
            raise ChannelLostError(f"guest of {self.vm_id}: control channel lost before {op}")
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        self._issued[request_id] = None
        while len(self._issued) > ISSUED_IDS_KEPT:
            del self._issued[next(iter(self._issued))]
        future.add_done_callback(lambda _f: self._pending.pop(request_id, None))
        payload = json.dumps({**(params or {}), "id": request_id, "op": op}, separators=(",", ":"))
        try:
            async with self._write_lock:
                writer.write(payload.encode() + b"\n")
                await writer.drain()
        except OSError as exc:
            self._drop_connection(exc)
            raise ChannelLostError(f"guest of {self.vm_id}: {op}: control channel write failed: {exc}") from exc
        except asyncio.CancelledError:
            # the deadline hit while a guest that does not read held the write: a half-written
            # request would corrupt the next one, so this connection is done
            self._drop_connection(EOFError(f"{op}: write abandoned at the deadline"))
            raise
        return future

    async def call(self, op: str, params: dict[str, Any] | None = None, *,
                   timeout: float = 10.0) -> dict[str, Any]:
        """Send one request and return the reply's fields (without ``id``/``ok``).

        ``timeout`` is the call's total deadline: connect, handshake, write and reply."""
        self._check_broken()
        deadline = time.monotonic() + timeout
        try:
            async with asyncio.timeout(timeout):
                await self._connect(deadline, timeout)
                reply = await (await self._send(op, params))
        except TimeoutError as exc:
            raise GuestTimeoutError(vm_id=self.vm_id, timeout=timeout) from exc
        if not reply["ok"]:
            error = reply.get("error") or "unknown error"
            raise GuestCallError(vm_id=self.vm_id, op=op, error=error[:500])
        return _fields(reply)

    async def wait_ready(self, *, timeout: float) -> dict[str, Any]:
        """Wait until the guest agent answers; return its ready event (or the answered ping).

        Does not rely on the ``ready`` event alone: it may have been sent before we connected.
        A connection that breaks meanwhile (QEMU resetting the chardev) is opened again.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await self.connect(timeout=max(0.0, deadline - time.monotonic()))
            except (GuestTimeoutError, GuestProtocolError):
                raise
            except VmmError:
                if time.monotonic() > deadline:
                    raise GuestTimeoutError(vm_id=self.vm_id, timeout=timeout) from None
                await asyncio.sleep(0.01)

    async def close(self) -> None:
        writer = self._writer
        task = self._read_task
        self._drop_connection(EOFError("closed by the host"))
        if writer is not None:
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._read_task = None


class _Violation(Exception):
    """Raised inside the read loop when the guest breaks the protocol."""


def _fields(reply: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in reply.items() if k not in ("id", "ok")}
