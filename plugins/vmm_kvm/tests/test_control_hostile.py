"""The host side of the control channel against a hostile guest: a test double speaking the
protocol over a unix socket (where QEMU's ``ctl.sock`` would be) answers with wrong types, huge
lines, endless streams and slow bytes. Every call ends by its deadline with a clear error, a guest
that broke the protocol is not listened to again, and the event loop (every other VM) stays live."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from cube_core import GuestProtocolError, GuestTimeoutError

from cube_vmm_kvm.control import JUNK_LINES_MAX, LINE_LIMIT, ControlChannel, GuestCallError

Answer = Callable[[asyncio.StreamWriter, dict[str, Any]], Awaitable[None]]


class HostileGuest:
    """Answers ``ping`` honestly (so the handshake completes) and every other op with ``answer``."""

    def __init__(self, path: Path, answer: Answer, *, read: bool = True) -> None:
        self.path = path
        self.answer = answer
        self.read = read
        self.connections = 0
        self.tasks: list[asyncio.Task[Any]] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.append(task)
        try:
            if not self.read:
                await asyncio.sleep(3600)
            while line := await reader.readline():
                request = json.loads(line)
                if request["op"] == "ping":
                    writer.write(json.dumps({"id": request["id"], "ok": True, "boot_id": "b1"}).encode() + b"\n")
                else:
                    self.tasks.append(asyncio.ensure_future(self._guarded(writer, request)))
        except (ConnectionError, OSError, ValueError):
            pass  # the host hung up on us (or the test is over)
        finally:
            writer.close()

    async def _guarded(self, writer: asyncio.StreamWriter, request: dict[str, Any]) -> None:
        try:
            await self.answer(writer, request)
        except (ConnectionError, OSError):
            pass

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def guest_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[tuple[HostileGuest, ControlChannel]]]]:
    made: list[tuple[HostileGuest, ControlChannel]] = []

    async def make(answer: Answer, *, read: bool = True, name: str = "ctl") -> tuple[HostileGuest, ControlChannel]:
        guest = HostileGuest(tmp_path / f"{name}.sock", answer, read=read)
        await guest.start()
        channel = ControlChannel(name, guest.path)
        made.append((guest, channel))
        return guest, channel

    yield make
    for guest, channel in made:
        await channel.close()
        await guest.stop()


def line(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def replying(make: Callable[[int], object]) -> Answer:
    async def answer(writer: asyncio.StreamWriter, request: dict[str, Any]) -> None:
        writer.write(line(make(request["id"])))
        await writer.drain()
    return answer


async def honest(writer: asyncio.StreamWriter, request: dict[str, Any]) -> None:
    writer.write(line({"id": request["id"], "ok": True, "value": request.get("value")}))
    await writer.drain()


class Ticker:
    """Measures the longest time the event loop did not get to run a 10 ms ticker."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.worst = max(self.worst, now - last)
            last = now

    def __enter__(self) -> Ticker:
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


MALFORMED = {
    "ok is a string": lambda i: {"id": i, "ok": "yes", "boot_id": "b"},
    "ok is a number": lambda i: {"id": i, "ok": 1},
    "ok is missing": lambda i: {"id": i, "boot_id": "b"},
    "error is an object": lambda i: {"id": i, "ok": False, "error": {"rm": "-rf"}},
    "error is huge": lambda i: {"id": i, "ok": False, "error": "e" * 100_000},
}


@pytest.mark.parametrize("shape", MALFORMED)
async def test_malformed_reply_breaks_the_channel(guest_factory: Any, shape: str) -> None:
    guest, channel = await guest_factory(replying(MALFORMED[shape]))
    with pytest.raises(GuestProtocolError, match="broke the control protocol: a malformed reply"):
        await channel.call("personalize", timeout=5)
    assert channel.broken is not None and not channel.connected
    started = time.monotonic()
    with pytest.raises(GuestProtocolError):  # later calls fail at once, without reconnecting
        await channel.call("ping", timeout=5)
    with pytest.raises(GuestProtocolError):
        await channel.wait_ready(timeout=5)
    assert time.monotonic() - started < 0.1
    assert guest.connections == 1


UNANSWERED = {
    "id is a string": lambda i: {"id": str(i), "ok": True},
    "id is a bool": lambda i: {"id": True, "ok": True},
    "id was never sent": lambda i: {"id": i + 1000, "ok": True},
    "a list": lambda i: [i, True],
    "a number": lambda i: 1e308,
}


@pytest.mark.parametrize("shape", UNANSWERED)
async def test_a_reply_to_nothing_is_junk_and_the_call_ends_at_its_deadline(guest_factory: Any, shape: str) -> None:
    _, channel = await guest_factory(replying(UNANSWERED[shape]))
    started = time.monotonic()
    with pytest.raises(GuestTimeoutError):
        await channel.call("personalize", timeout=0.5)
    assert time.monotonic() - started < 1.0
    assert channel.broken is None  # a little junk is tolerated (a reply from an earlier connection)


async def test_a_huge_line_breaks_the_channel_without_buffering_it(guest_factory: Any) -> None:
    async def huge(writer: asyncio.StreamWriter, request: dict[str, Any]) -> None:
        chunk = b"x" * (1 << 20)
        for _ in range(64):  # 64 MiB, no newline: the host must give up after LINE_LIMIT
            writer.write(chunk)
            await writer.drain()

    _, channel = await guest_factory(huge)
    started = time.monotonic()
    with pytest.raises(GuestProtocolError, match=f"a line longer than {LINE_LIMIT} bytes"):
        await channel.call("personalize", timeout=30)
    assert time.monotonic() - started < 5


async def test_an_oversized_but_complete_reply_breaks_the_channel(guest_factory: Any) -> None:
    _, channel = await guest_factory(replying(lambda i: {"id": i, "ok": True, "boot_id": "b" * (2 << 20)}))
    with pytest.raises(GuestProtocolError, match="longer than"):
        await channel.call("personalize", timeout=30)


async def test_json_nested_too_deep_breaks_the_channel(guest_factory: Any) -> None:
    async def deep(writer: asyncio.StreamWriter, request: dict[str, Any]) -> None:
        writer.write(b"[" * 200_000 + b"\n")
        await writer.drain()

    _, channel = await guest_factory(deep)
    with pytest.raises(GuestProtocolError, match="nested too deep"):
        await channel.call("personalize", timeout=5)


@pytest.mark.parametrize("junk", [b"garbage that is not json\n", b'{"event": "ready", "boot_id": "b"}\n',
                                  b'{"event": {"nested": 1}}\n', b'"a string"\n', b'{"id": 99999, "ok": true}\n'])
async def test_an_endless_stream_breaks_the_channel_and_the_loop_stays_live(guest_factory: Any, junk: bytes) -> None:
    async def endless(writer: asyncio.StreamWriter, request: dict[str, Any]) -> None:
        while True:
            writer.write(junk * 100)
            await writer.drain()

    _, channel = await guest_factory(endless, name="evil")
    _, good = await guest_factory(honest, name="good")
    with Ticker() as ticker:
        started = time.monotonic()
        with pytest.raises(GuestProtocolError, match=f"more than {JUNK_LINES_MAX} lines"):
            await channel.call("personalize", timeout=30)
        assert time.monotonic() - started < 2
        assert (await good.call("echo", {"value": 7}, timeout=5))["value"] == 7  # another VM's channel
    assert ticker.worst < 0.5


async def test_slow_bytes_meet_one_total_deadline(guest_factory: Any) -> None:
    async def drip(writer: asyncio.StreamWriter, request: dict[str, Any]) -> None:
        for byte in line({"id": request["id"], "ok": True, "boot_id": "b" * 1000}):
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.02)  # every read gets a byte in time; the whole never arrives

    _, channel = await guest_factory(drip)
    started = time.monotonic()
    with pytest.raises(GuestTimeoutError):
        await channel.call("personalize", timeout=1.0)
    assert 0.9 < time.monotonic() - started < 1.5


async def test_a_guest_that_never_reads_cannot_hold_a_write_past_the_deadline(guest_factory: Any) -> None:
    _, channel = await guest_factory(honest, read=False)
    channel.hello = {"event": "ready"}  # skip the handshake: this guest answers nothing at all
    await channel._open(time.monotonic() + 5, 5)  # noqa: PLC2701 - connect without the handshake
    channel._live = True  # noqa: PLC2701
    started = time.monotonic()
    with pytest.raises(GuestTimeoutError):
        await channel.call("exec", {"blob": "x" * (16 << 20)}, timeout=1.0)  # fills every socket buffer
    assert time.monotonic() - started < 1.5
    assert not channel.connected  # the half-written request is not followed by another one


async def test_a_little_junk_is_tolerated(guest_factory: Any) -> None:
    async def noisy(writer: asyncio.StreamWriter, request: dict[str, Any]) -> None:
        writer.write(b"partial line from before a restore\n" + b'{"id": 123456, "ok": true}\n' * 5)
        writer.write(line({"id": request["id"], "ok": True, "value": request.get("value")}))
        await writer.drain()

    _, channel = await guest_factory(noisy)
    for i in range(5):
        assert (await channel.call("echo", {"value": i}, timeout=5))["value"] == i
    assert channel.broken is None


async def test_a_failed_call_carries_a_bounded_error(guest_factory: Any) -> None:
    _, channel = await guest_factory(replying(lambda i: {"id": i, "ok": False, "error": "no " * 600}))
    with pytest.raises(GuestCallError) as info:
        await channel.call("personalize", timeout=5)
    assert len(str(info.value)) < 700
    assert channel.broken is None
