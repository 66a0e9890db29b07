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
from cube_core import GuestTimeoutError, VmmError

log = structlog.get_logger(__name__)

LINE_LIMIT = 64 << 20
HANDSHAKE_FIRST_S = 0.05
HANDSHAKE_MAX_S = 0.5


class GuestCallError(VmmError):
    """The guest agent answered ``ok: false``."""

    msg_fmt = "guest of {vm_id}: {op} failed: {error}"


class ChannelLostError(VmmError):
    """The control connection broke while a call was pending."""


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

    @property
    def connected(self) -> bool:
        return self._live and self._writer is not None and not self._writer.is_closing()

    async def connect(self, *, timeout: float) -> dict[str, Any]:
        """Connect (retrying while QEMU starts) and handshake; return the handshake's answer."""
        async with self._connect_lock:
            if self.connected and self.hello is not None:
                return self.hello
            deadline = time.monotonic() + timeout
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
                    elif isinstance(ping.exception(), ChannelLostError):
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
                line = await reader.readline()
                if not line:
                    break
                if not line.strip():
                    continue
                try:
                    msg = json.loads(line)
                except ValueError:
                    log.warning("guest sent a line that is not JSON", vm_id=self.vm_id, line=line[:200])
                    continue
                if isinstance(msg, dict):
                    self._dispatch(msg)
        except (OSError, ValueError, asyncio.LimitOverrunError) as exc:
            error = exc
        finally:
            if self._writer is writer:
                self._drop_connection(error)
            else:
                writer.close()

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if "event" in msg and "id" not in msg:
            if msg.get("event") == "ready":
                self.ready_event = msg
                self._ready.set()
            log.debug("guest event", vm_id=self.vm_id, guest_event=msg.get("event"))
            return
        request_id = msg.get("id")
        future = self._pending.pop(request_id, None) if isinstance(request_id, int) else None
        if future is None:
            log.debug("dropping reply with unknown id", vm_id=self.vm_id, id=request_id)
            return
        if not future.done():
            future.set_result(msg)

    def _drop_connection(self, error: BaseException) -> None:
        writer, self._writer = self._writer, None
        self._live = False
        self.hello = None
        if writer is not None:
            writer.close()
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(ChannelLostError(f"guest of {self.vm_id}: control channel lost: {error}"))

    async def _send(self, op: str, params: dict[str, Any] | None) -> asyncio.Future[dict[str, Any]]:
        """Write one request; return the future of its reply (removed from ``_pending`` when done)."""
        writer = self._writer
        if writer is None or writer.is_closing():
            raise ChannelLostError(f"guest of {self.vm_id}: control channel lost before {op}")
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        future.add_done_callback(lambda _f: self._pending.pop(request_id, None))
        payload = json.dumps({**(params or {}), "id": request_id, "op": op}, separators=(",", ":"))
        try:
            async with self._write_lock:
                writer.write(payload.encode() + b"\n")
                await writer.drain()
        except OSError as exc:
            self._drop_connection(exc)
            raise ChannelLostError(f"guest of {self.vm_id}: {op}: control channel write failed: {exc}") from exc
        return future

    async def call(self, op: str, params: dict[str, Any] | None = None, *,
                   timeout: float = 10.0) -> dict[str, Any]:
        """Send one request and return the reply's fields (without ``id``/``ok``)."""
        deadline = time.monotonic() + timeout
        await self.connect(timeout=timeout)
        future = await self._send(op, params)
        try:
            reply = await asyncio.wait_for(future, max(0.0, deadline - time.monotonic()))
        except TimeoutError as exc:
            raise GuestTimeoutError(vm_id=self.vm_id, timeout=timeout) from exc
        if not reply.get("ok", False):
            raise GuestCallError(vm_id=self.vm_id, op=op, error=reply.get("error", "unknown error"))
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
            except GuestTimeoutError:
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


def _fields(reply: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in reply.items() if k not in ("id", "ok")}
