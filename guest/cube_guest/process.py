"""The ``process.Process`` Connect service (E2B_PROTOCOL.md §5.6, §5.8).

Each started command is a :class:`ManagedProcess`. Its output is read from
non-blocking pipes (or a PTY master) and fanned out to every attached stream.
An attached stream applies backpressure: the reader waits until the slowest
subscriber has room, and the subscriber's writer waits for the socket to drain,
so a command printing 100 MB never piles up in memory. With nobody attached the
output is dropped, as upstream envd does. A stream going away never kills the
command; the ``Connect-Timeout-Ms`` of ``Start`` does (SIGKILL to the process
group), again as upstream.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import logging
import os
import signal
import struct
import subprocess
import termios
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from .auth import basic_auth_user
from .connect import (
    Call,
    ConnectError,
    Message,
    Router,
    ServerStream,
    as_bytes,
    as_int,
    b64,
    field_value,
    keepalive_interval,
)
from .eventlog import Level
from .state import AgentState
from .users import UnknownUserError, UserInfo, expand_path

log = logging.getLogger(__name__)

STD_CHUNK = 32 << 10
PTY_CHUNK = 16 << 10
SUBSCRIBER_QUEUE = 16
FINISHED_KEEP = 1024  # finished processes kept for Connect replay (each is a few hundred bytes)
FINISHED_TTL_S = 600.0
# After the main process exits, keep reading output that is still in flight
# (grandchildren, the tty flush work) for this long without new data.
PIPE_GRACE_S = 0.05
PTY_GRACE_S = 0.2
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

SIGNALS = {
    "SIGNAL_SIGTERM": signal.SIGTERM,
    "SIGNAL_SIGKILL": signal.SIGKILL,
    15: signal.SIGTERM,
    9: signal.SIGKILL,
}


class Subscriber:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=SUBSCRIBER_QUEUE)
        self.closed = False


def _exit_event(returncode: int) -> Message:
    """EndEvent JSON in the shape upstream (Go's ProcessState) reports."""
    end: Message
    if returncode >= 0:
        status = f"exit status {returncode}"
        end = {"exited": True, "status": status}
        if returncode != 0:
            end["exitCode"] = returncode
            end["error"] = status
    else:
        signum = -returncode
        try:
            name = (signal.strsignal(signum) or f"signal {signum}").lower()
        except ValueError:
            name = f"signal {signum}"
        status = f"signal: {name}"
        end = {"exitCode": -1, "status": status, "error": status}
    return end


async def _wait_fd(fd: int, *, write: bool, timeout: float | None, waiters: set[Any]) -> bool:
    """Wait until ``fd`` is readable/writable; False on timeout or external wake-up."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[bool] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(True)

    if write:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    waiters.add(fut)
    try:
        if timeout is None:
            return await fut
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return False
    finally:
        waiters.discard(fut)
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


class ManagedProcess:
    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        config: Message,
        tag: str | None,
        *,
        pty_master: int | None,
        stdin_fd: int | None,
        out_fds: list[tuple[int, str]],
    ) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.config = config
        self.tag = tag
        self.pty_master = pty_master
        self.stdin_fd = stdin_fd
        self._out_fds = out_fds
        self.subscribers: list[Subscriber] = []
        self.end: Message | None = None
        self.done = asyncio.Event()
        self.finished_at = 0.0
        self._exited = False
        self._waiters: set[asyncio.Future[bool]] = set()
        self._input_lock = asyncio.Lock()
        self._timeout_handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._master_closed = False

    # -- lifecycle ---------------------------------------------------------------

    def run(self, on_done: Callable[[ManagedProcess], None]) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(on_done))

    def kill_after(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self._timeout_handle = loop.call_later(seconds, self.signal, signal.SIGKILL)

    async def _run(self, on_done: Callable[[ManagedProcess], None]) -> None:
        try:
            pumps = [
                asyncio.create_task(self._pump(fd, kind)) for fd, kind in self._out_fds
            ]
            returncode = await self._wait_exit()
            self._exited = True
            for fut in list(self._waiters):
                if not fut.done():
                    fut.set_result(False)
            await asyncio.gather(*pumps, return_exceptions=True)
            self.end = _exit_event(returncode)
            await self._broadcast({"end": self.end})
        except Exception:
            log.exception("process %d supervision failed", self.pid)
            if self.end is None:
                self.end = {"status": "unknown", "error": "agent lost track of the process"}
        finally:
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
            self._close_inputs()
            self.finished_at = time.monotonic()
            self.done.set()
            on_done(self)

    async def _wait_exit(self) -> int:
        try:
            pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, self.popen.wait)
        try:
            await _wait_fd(pidfd, write=False, timeout=None, waiters=set())
        finally:
            os.close(pidfd)
        return self.popen.wait()

    async def _pump(self, fd: int, kind: str) -> None:
        chunk = PTY_CHUNK if kind == "pty" else STD_CHUNK
        grace = PTY_GRACE_S if kind == "pty" else PIPE_GRACE_S
        try:
            while True:
                try:
                    data = os.read(fd, chunk)
                except BlockingIOError:
                    if self._exited:
                        if not await _wait_fd(fd, write=False, timeout=grace, waiters=set()):
                            return
                    else:
                        await _wait_fd(fd, write=False, timeout=None, waiters=self._waiters)
                    continue
                except OSError as exc:  # EIO: every holder of the PTY slave is gone
                    if exc.errno not in (errno.EIO, errno.EBADF):
                        log.warning("reading %s of %d: %s", kind, self.pid, exc)
                    return
                if not data:
                    return
                await self._broadcast({"data": {kind: b64(data)}})
        finally:
            if kind == "pty":
                self._master_closed = True
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- fan-out ------------------------------------------------------------------

    async def _broadcast(self, event: Message) -> None:
        for sub in list(self.subscribers):
            if not sub.closed:
                await sub.queue.put(event)

    def subscribe(self) -> Subscriber:
        sub = Subscriber()
        if self.end is not None:
            sub.queue.put_nowait({"end": self.end})
        else:
            self.subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        sub.closed = True
        with contextlib.suppress(ValueError):
            self.subscribers.remove(sub)
        while not sub.queue.empty():  # unblocks a reader waiting on this queue
            sub.queue.get_nowait()

    # -- control --------------------------------------------------------------------

    def signal(self, signum: int) -> None:
        if self.done.is_set():
            return
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    async def write_input(self, data: bytes, *, pty: bool) -> None:
        if pty:
            if self.pty_master is None or self._master_closed:
                raise ConnectError(
                    "failed_precondition", "tty not assigned to process — use stdin input"
                )
            fd = self.pty_master
        else:
            if self.pty_master is not None:
                raise ConnectError(
                    "failed_precondition",
                    "tty assigned to process — input should be written to the pty",
                )
            if self.stdin_fd is None:
                raise ConnectError("failed_precondition", "stdin not enabled or closed")
            fd = self.stdin_fd
        async with self._input_lock:
            view = memoryview(data)
            while view:
                try:
                    n = os.write(fd, view)
                except BlockingIOError:
                    await _wait_fd(fd, write=True, timeout=None, waiters=set())
                    continue
                except OSError as exc:
                    raise ConnectError(
                        "failed_precondition",
                        f"error writing to stdin of process '{self.pid}': {exc.strerror}",
                    ) from exc
                view = view[n:]

    async def close_stdin(self) -> None:
        if self.pty_master is not None:
            raise ConnectError(
                "failed_precondition",
                "cannot close stdin for PTY process — send Ctrl+D (0x04) instead",
            )
        async with self._input_lock:
            if self.stdin_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self.stdin_fd)
                self.stdin_fd = None

    def _close_inputs(self) -> None:
        if self.stdin_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.stdin_fd)
            self.stdin_fd = None

    def resize(self, cols: int, rows: int) -> None:
        if self.pty_master is None or self._master_closed:
            raise ConnectError("failed_precondition", "tty not assigned to process")
        fcntl.ioctl(self.pty_master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def info(self) -> Message:
        out: Message = {"config": self.config, "pid": self.pid}
        if self.tag is not None:
            out["tag"] = self.tag
        return out


def _set_ctty() -> None:  # runs in the child between fork and exec
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _spawn(
    argv: list[str],
    *,
    cwd: str,
    env: dict[str, str],
    user: UserInfo,
    pty_size: tuple[int, int] | None,
    stdin: bool,
) -> tuple[subprocess.Popen[bytes], int | None, int | None, list[tuple[int, str]]]:
    """Fork/exec the command (blocking; run in a worker thread)."""
    creds: dict[str, Any] = {}
    if os.geteuid() == 0 and (user.uid != 0 or user.gid != 0):
        creds = {"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)}
    to_close: list[int] = []
    try:
        if pty_size is not None:
            master, slave = os.openpty()
            to_close.append(slave)
            cols, rows = pty_size
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            try:
                popen = subprocess.Popen(
                    argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env,
                    start_new_session=True, preexec_fn=_set_ctty, close_fds=True, **creds,
                )
            except BaseException:
                os.close(master)
                raise
            os.set_blocking(master, False)
            return popen, master, None, [(master, "pty")]
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        to_close += [out_w, err_w]
        if stdin:
            in_r, in_w = os.pipe()
            to_close.append(in_r)
        else:
            in_r = os.open(os.devnull, os.O_RDONLY)
            in_w = -1
            to_close.append(in_r)
        try:
            popen = subprocess.Popen(
                argv, stdin=in_r, stdout=out_w, stderr=err_w, cwd=cwd, env=env,
                start_new_session=True, close_fds=True, **creds,
            )
        except BaseException:
            for fd in (out_r, err_r, in_w):
                if fd >= 0:
                    os.close(fd)
            raise
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
        stdin_fd: int | None = None
        if in_w >= 0:
            os.set_blocking(in_w, False)
            stdin_fd = in_w
        return popen, None, stdin_fd, [(out_r, "stdout"), (err_r, "stderr")]
    finally:
        for fd in to_close:
            with contextlib.suppress(OSError):
                os.close(fd)


def _selector(msg: Message) -> tuple[int | None, str | None]:
    sel = field_value(msg, "process") or {}
    if "pid" in sel:
        return as_int(sel["pid"]), None
    if "tag" in sel:
        return None, str(sel["tag"])
    raise ConnectError("invalid_argument", "process selector (pid or tag) is required")


class ProcessService:
    def __init__(self, state: AgentState) -> None:
        self.state = state
        self.running: dict[int, ManagedProcess] = {}
        self.finished: collections.OrderedDict[int, ManagedProcess] = collections.OrderedDict()

    def register(self, router: Router) -> None:
        router.server_stream("/process.Process/Start", self.start)
        router.server_stream("/process.Process/Connect", self.connect)
        router.unary("/process.Process/List", self.list)
        router.unary("/process.Process/SendInput", self.send_input)
        router.client_stream("/process.Process/StreamInput", self.stream_input)
        router.unary("/process.Process/CloseStdin", self.close_stdin)
        router.unary("/process.Process/SendSignal", self.send_signal)
        router.unary("/process.Process/Update", self.update)

    # -- lookup -------------------------------------------------------------------

    def _find(self, msg: Message, *, include_finished: bool = False) -> ManagedProcess:
        pid, tag = _selector(msg)
        pools = [self.running] + ([self.finished] if include_finished else [])
        for pool in pools:
            if pid is not None and pid in pool:
                return pool[pid]
            if tag is not None:
                for proc in reversed(list(pool.values())):
                    if proc.tag == tag:
                        return proc
        what = f"pid {pid}" if pid is not None else f"tag '{tag}'"
        raise ConnectError("not_found", f"process with {what} not found")

    def _on_done(self, proc: ManagedProcess) -> None:
        end = proc.end or {}
        code = 0 if end.get("exited") and "exitCode" not in end else end.get("exitCode", -1)
        level: Level = "info" if code == 0 else "warn" if end.get("exited") else "error"
        self.state.events.add(level, "process exited", pid=proc.pid, exit_code=code,
                              status=end.get("status"), error=end.get("error"), tag=proc.tag)
        if self.running.get(proc.pid) is proc:
            del self.running[proc.pid]
        self.finished[proc.pid] = proc
        self.finished.move_to_end(proc.pid)
        now = time.monotonic()
        while self.finished and (
            len(self.finished) > FINISHED_KEEP
            or now - next(iter(self.finished.values())).finished_at > FINISHED_TTL_S
        ):
            self.finished.popitem(last=False)

    # -- RPCs -------------------------------------------------------------------------

    def _user(self, call: Call) -> UserInfo:
        try:
            return self.state.user(basic_auth_user(call.headers))
        except UnknownUserError as exc:
            raise ConnectError("unauthenticated", str(exc)) from exc

    async def start(self, call: Call, msg: Message, stream: ServerStream) -> None:
        user = self._user(call)
        config = field_value(msg, "process") or {}
        cmd = config.get("cmd")
        if not cmd:
            raise ConnectError("invalid_argument", "process.cmd is required")
        args = [str(a) for a in config.get("args") or []]
        envs = {str(k): str(v) for k, v in (config.get("envs") or {}).items()}
        cwd_in = config.get("cwd")
        cwd = expand_path(cwd_in, user) if cwd_in else self.state.workdir(user)
        if not os.path.isdir(cwd):
            self.state.events.add(
                "error", f"process failed to start: cwd '{cwd}' does not exist", cmd=cmd)
            raise ConnectError("invalid_argument", f"cwd '{cwd}' does not exist")
        env = {
            "PATH": os.environ.get("PATH", DEFAULT_PATH),
            "HOME": user.home,
            "USER": user.name,
            "LOGNAME": user.name,
        }
        env.update(self.state.env_vars)
        env.update(envs)
        pty_msg = field_value(msg, "pty")
        pty_size: tuple[int, int] | None = None
        if pty_msg is not None:
            size = pty_msg.get("size") or {}
            pty_size = (as_int(size.get("cols"), 80) or 80, as_int(size.get("rows"), 24) or 24)
        stdin_flag = msg.get("stdin")
        stdin = True if stdin_flag is None else bool(stdin_flag)
        tag = msg.get("tag")
        loop = asyncio.get_running_loop()
        try:
            popen, master, stdin_fd, outs = await loop.run_in_executor(
                None,
                lambda: _spawn(
                    [cmd, *args], cwd=cwd, env=env, user=user, pty_size=pty_size, stdin=stdin
                ),
            )
        except OSError as exc:
            self.state.events.add("error", f"process failed to start: {exc}", cmd=cmd, tag=tag)
            raise ConnectError(
                "invalid_argument",
                f"error starting process '{' '.join([cmd, *args])}': {exc}",
            ) from exc
        stored: Message = {"cmd": cmd, "args": args, "envs": envs}
        if cwd_in:
            stored["cwd"] = cwd_in
        proc = ManagedProcess(
            popen, stored, tag, pty_master=master, stdin_fd=stdin_fd, out_fds=outs
        )
        self.running[proc.pid] = proc
        sub = proc.subscribe()
        if call.timeout is not None:
            proc.kill_after(call.timeout)
        proc.run(self._on_done)
        log.info("started pid %d: %s (user %s)", proc.pid, cmd, user.name)
        self.state.events.add("info", "process started", pid=proc.pid, cmd=" ".join([cmd, *args]),
                              tag=tag, user=user.name)
        await self._follow(call, proc, sub, stream)

    async def connect(self, call: Call, msg: Message, stream: ServerStream) -> None:
        proc = self._find(msg, include_finished=True)
        sub: Subscriber | None = None
        if not proc.done.is_set():
            sub = proc.subscribe()
        await self._follow(call, proc, sub, stream)

    async def _follow(
        self, call: Call, proc: ManagedProcess, sub: Subscriber | None, stream: ServerStream
    ) -> None:
        """Stream start, data and end events of ``proc`` until it ends or the call does."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + call.timeout if call.timeout is not None else None
        interval = keepalive_interval(call.headers)
        try:
            await stream.send({"event": {"start": {"pid": proc.pid}}})
            if sub is None:  # already finished: replay the end
                await stream.send({"event": {"end": proc.end or {}}})
                return
            while True:
                wait = interval
                if deadline is not None:
                    wait = min(wait, deadline - loop.time())
                    if wait <= 0:
                        raise ConnectError("deadline_exceeded", "context deadline exceeded")
                try:
                    event = await asyncio.wait_for(sub.queue.get(), wait)
                except TimeoutError:
                    if deadline is not None and loop.time() >= deadline:
                        raise ConnectError(
                            "deadline_exceeded", "context deadline exceeded"
                        ) from None
                    await stream.send({"event": {"keepalive": {}}})
                    continue
                await stream.send({"event": event})
                if "end" in event:
                    return
        finally:
            if sub is not None:
                proc.unsubscribe(sub)

    async def list(self, call: Call, msg: Message) -> Message:
        return {"processes": [p.info() for p in self.running.values()]}

    async def send_input(self, call: Call, msg: Message) -> Message:
        proc = self._find(msg)
        inp = field_value(msg, "input") or {}
        if "pty" in inp:
            await proc.write_input(as_bytes(inp["pty"]), pty=True)
        elif "stdin" in inp:
            await proc.write_input(as_bytes(inp["stdin"]), pty=False)
        return {}

    async def stream_input(self, call: Call, messages: AsyncIterator[Message]) -> Message:
        proc: ManagedProcess | None = None
        async for msg in messages:
            if "start" in msg:
                proc = self._find(msg["start"])
            elif "data" in msg:
                if proc is None:
                    raise ConnectError("failed_precondition", "start event must come first")
                inp = (msg["data"] or {}).get("input") or {}
                if "pty" in inp:
                    await proc.write_input(as_bytes(inp["pty"]), pty=True)
                elif "stdin" in inp:
                    await proc.write_input(as_bytes(inp["stdin"]), pty=False)
        return {}

    async def close_stdin(self, call: Call, msg: Message) -> Message:
        proc = self._find(msg)
        await proc.close_stdin()
        return {}

    async def send_signal(self, call: Call, msg: Message) -> Message:
        proc = self._find(msg)
        raw = msg.get("signal")
        signum = SIGNALS.get(raw) if isinstance(raw, (str, int)) else None
        if signum is None:
            raise ConnectError("invalid_argument", f"invalid signal: {raw!r}")
        proc.signal(signum)
        return {}

    async def update(self, call: Call, msg: Message) -> Message:
        proc = self._find(msg)
        pty_msg = field_value(msg, "pty")
        if pty_msg is not None:
            size = pty_msg.get("size") or {}
            proc.resize(as_int(size.get("cols")), as_int(size.get("rows")))
        return {}

    def forget_finished(self) -> None:
        """Drop the records of finished processes (kept for Connect replay)."""
        self.finished.clear()

    async def shutdown(self) -> None:
        for proc in list(self.running.values()):
            proc.signal(signal.SIGKILL)
