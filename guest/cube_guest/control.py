"""Host ↔ agent control channel: JSON lines over a virtio-serial port.

Requests ``{"id": int, "op": str, ...}`` get ``{"id": int, "ok": true, ...}`` or
``{"id": int, "ok": false, "error": str}``. The agent writes ``{"event": "ready", ...}``
when it is ready and again every time it (re)opens the port.

The port is used with blocking I/O in a thread: on virtio-serial a read returns EOF
at once while the host side is closed, and a write blocks until the host connects.
So on EOF/EIO the thread closes and reopens the port and writes the ready line,
which waits for the host to come back (e.g. across a snapshot/restore). A path that
names a Unix socket (or ``unix:<path>``) is connected to instead, which is how the
tests stand in for the virtio port; there the agent reconnects after EOF.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import socket
import stat
import threading
import time
import tty
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20
Reply = dict[str, Any]
OpHandler = Callable[[dict[str, Any]], Awaitable[Reply]]


class OpError(Exception):
    """A control request failed; the message goes back to the host."""


def decode_entropy(req: dict[str, Any]) -> bytes:
    raw = req.get("entropy")
    if not isinstance(raw, str):
        raise OpError("'entropy' (base64 string) is required")
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise OpError(f"invalid base64 entropy: {exc}") from exc
    if len(data) < 32:
        raise OpError("entropy must be at least 32 bytes")
    return data


class ControlChannel:
    def __init__(
        self,
        path: str,
        loop: asyncio.AbstractEventLoop,
        handlers: dict[str, OpHandler],
        ready_event: Callable[[], Reply],
    ) -> None:
        self.path = path[5:] if path.startswith("unix:") else path
        self.loop = loop
        self.handlers = handlers
        self.ready_event = ready_event
        self._fd: int | None = None
        self._sock: socket.socket | None = None
        self._wlock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.opens = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cube-ctl", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._close()

    # -- port handling --------------------------------------------------------------

    def _is_socket(self) -> bool:
        try:
            return stat.S_ISSOCK(os.stat(self.path).st_mode)
        except OSError:
            return False

    def _open(self) -> int:
        if self._is_socket():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
            except OSError:
                sock.close()
                raise
            self._sock = sock
            return sock.fileno()
        fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        if os.isatty(fd):
            tty.setraw(fd)
        return fd

    def _close(self) -> None:
        with self._wlock:
            fd, sock = self._fd, self._sock
            self._fd, self._sock = None, None
        if sock is not None:
            sock.close()
        elif fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                fd = self._open()
            except OSError as exc:
                log.debug("control port %s not available: %s", self.path, exc)
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            with self._wlock:
                self._fd = fd
            self.opens += 1
            opened = time.monotonic()
            try:
                self.write(self.ready_event())  # on virtio this waits for the host
                self._serve(fd)
            except OSError as exc:
                log.info("control port closed: %s", exc)
            finally:
                self._close()
            if time.monotonic() - opened < 1.0:
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            else:
                backoff = 0.05

    def _serve(self, fd: int) -> None:
        buf = b""
        while not self._stop.is_set():
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    self._dispatch(line)
            if len(buf) > MAX_LINE:
                log.warning("control: dropping an over-long line")
                buf = b""

    def _dispatch(self, line: bytes) -> None:
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("request must be a JSON object")
        except ValueError as exc:
            self.write({"id": None, "ok": False, "error": f"bad request: {exc}"})
            return
        asyncio.run_coroutine_threadsafe(self._handle(req), self.loop)

    async def _handle(self, req: dict[str, Any]) -> None:
        req_id = req.get("id")
        op = req.get("op")
        handler = self.handlers.get(op) if isinstance(op, str) else None
        reply: Reply
        if handler is None:
            reply = {"id": req_id, "ok": False, "error": f"unknown op {op!r}"}
        else:
            try:
                result = await handler(req)
                reply = {"id": req_id, "ok": True, **result}
            except OpError as exc:
                reply = {"id": req_id, "ok": False, "error": str(exc)}
            except Exception as exc:
                log.exception("control op %s failed", op)
                reply = {"id": req_id, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        await self.loop.run_in_executor(None, self.write, reply)

    def write(self, obj: Reply) -> None:
        data = (json.dumps(obj, separators=(",", ":"), default=str) + "\n").encode()
        with self._wlock:
            fd = self._fd
            if fd is None:
                return
            view = memoryview(data)
            try:
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
            except OSError as exc:
                log.info("control write failed: %s", exc)
