"""The ``filesystem.Filesystem`` Connect service (E2B_PROTOCOL.md §5.7, §5.8)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import logging
import os
import shutil
import stat
import uuid
from typing import Any

from .auth import basic_auth_user
from .connect import Call, ConnectError, Message, Router, ServerStream, as_int, keepalive_interval
from .inotify import DirWatch, Inotify, InotifyError
from .state import AgentState
from .users import (
    UnknownUserError,
    UserInfo,
    chown_quiet,
    expand_path,
    group_name,
    makedirs_as,
    user_name,
)

log = logging.getLogger(__name__)

XATTR_PREFIX = "user.e2b."
MAX_WATCHER_EVENTS = 10000
MAX_WATCHERS = 1024
ENTRY_EVENTS = frozenset({"EVENT_TYPE_CREATE", "EVENT_TYPE_WRITE", "EVENT_TYPE_CHMOD"})


def rfc3339_ns(ns: int) -> str:
    secs, frac = divmod(ns, 1_000_000_000)
    base = dt.datetime.fromtimestamp(secs, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        return f"{base}.{frac:09d}".rstrip("0") + "Z"
    return base + "Z"


def read_metadata(path: str) -> dict[str, str]:
    try:
        names = os.listxattr(path)
    except OSError:
        return {}
    out: dict[str, str] = {}
    for name in names:
        if name.startswith(XATTR_PREFIX):
            try:
                out[name[len(XATTR_PREFIX) :]] = os.getxattr(path, name).decode(
                    "utf-8", "replace"
                )
            except OSError:
                continue
    return out


def write_metadata(path: str, metadata: dict[str, str]) -> None:
    """Replace the file's whole ``user.e2b.*`` set with ``metadata``."""
    with contextlib.suppress(OSError):
        for name in os.listxattr(path):
            if name.startswith(XATTR_PREFIX):
                os.removexattr(path, name)
    for key, value in metadata.items():
        os.setxattr(path, XATTR_PREFIX + key, value.encode())


def entry_info(path: str) -> Message:
    """EntryInfo JSON for ``path`` (absolute). Raises FileNotFoundError."""
    lst = os.lstat(path)
    st = lst
    entry: Message = {"name": os.path.basename(path) or "/", "path": path}
    if stat.S_ISLNK(lst.st_mode):
        entry["symlinkTarget"] = os.path.realpath(path)
        with contextlib.suppress(OSError):
            st = os.stat(path)
    entry["type"] = "FILE_TYPE_DIRECTORY" if stat.S_ISDIR(st.st_mode) else "FILE_TYPE_FILE"
    if st.st_size:
        entry["size"] = str(st.st_size)
    perm = stat.S_IMODE(st.st_mode) & 0o777
    if perm:
        entry["mode"] = perm
    entry["permissions"] = stat.filemode(st.st_mode)
    entry["owner"] = user_name(st.st_uid)
    entry["group"] = group_name(st.st_gid)
    entry["modifiedTime"] = rfc3339_ns(st.st_mtime_ns)
    meta = read_metadata(path)
    if meta:
        entry["metadata"] = meta
    return entry


def _not_found(path: str) -> ConnectError:
    return ConnectError("not_found", f"path '{path}' does not exist")


def _os_error(exc: OSError, path: str) -> ConnectError:
    if exc.errno == errno.ENOENT:
        return _not_found(path)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ConnectError("permission_denied", f"{exc.strerror}: '{path}'")
    if exc.errno == errno.ENOSPC:
        return ConnectError("resource_exhausted", f"not enough disk space: '{path}'")
    if exc.errno in (errno.ENOTDIR, errno.EISDIR, errno.EINVAL, errno.ENOTEMPTY):
        return ConnectError("invalid_argument", f"{exc.strerror}: '{path}'")
    return ConnectError("internal", f"{exc.strerror or exc}: '{path}'")


def list_dir(path: str, depth: int) -> list[Message]:
    """Entries under ``path`` down to ``depth`` levels, in lexical walk order."""
    out: list[Message] = []

    def walk(directory: str, level: int) -> None:
        try:
            names = sorted(os.listdir(directory))
        except OSError as exc:
            if directory == path:
                raise
            log.debug("list_dir: skipping %s: %s", directory, exc)
            return
        for name in names:
            full = os.path.join(directory, name)
            try:
                entry = entry_info(full)
            except OSError:
                continue
            out.append(entry)
            if level < depth and os.path.isdir(full) and not os.path.islink(full):
                walk(full, level + 1)

    walk(path, 1)
    return out


def remove_path(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


class Watcher:
    """A polled watcher (CreateWatcher / GetWatcherEvents)."""

    def __init__(self, include_entry: bool) -> None:
        self.include_entry = include_entry
        self.events: list[Message] = []
        self.watch: DirWatch | None = None

    def sink(self, name: str, kind: str, full: str) -> None:
        if len(self.events) < MAX_WATCHER_EVENTS:
            self.events.append(fs_event(name, kind, full, self.include_entry))


def fs_event(name: str, kind: str, full: str, include_entry: bool) -> Message:
    event: Message = {"name": name, "type": kind}
    if include_entry and kind in ENTRY_EVENTS:
        with contextlib.suppress(OSError):
            event["entry"] = entry_info(full)
    return event


class FilesystemService:
    def __init__(self, state: AgentState) -> None:
        self.state = state
        self._hub: Inotify | None = None
        self.watchers: dict[str, Watcher] = {}

    def register(self, router: Router) -> None:
        router.unary("/filesystem.Filesystem/Stat", self.stat)
        router.unary("/filesystem.Filesystem/MakeDir", self.make_dir)
        router.unary("/filesystem.Filesystem/Move", self.move)
        router.unary("/filesystem.Filesystem/ListDir", self.list_dir)
        router.unary("/filesystem.Filesystem/Remove", self.remove)
        router.server_stream("/filesystem.Filesystem/WatchDir", self.watch_dir)
        router.unary("/filesystem.Filesystem/CreateWatcher", self.create_watcher)
        router.unary("/filesystem.Filesystem/GetWatcherEvents", self.get_watcher_events)
        router.unary("/filesystem.Filesystem/RemoveWatcher", self.remove_watcher)

    @property
    def hub(self) -> Inotify:
        if self._hub is None:
            self._hub = Inotify()
            self._hub.attach(asyncio.get_running_loop())
        return self._hub

    def _user(self, call: Call) -> UserInfo:
        try:
            return self.state.user(basic_auth_user(call.headers))
        except UnknownUserError as exc:
            raise ConnectError("unauthenticated", str(exc)) from exc

    def _path(self, call: Call, msg: Message, key: str = "path") -> tuple[str, UserInfo]:
        user = self._user(call)
        raw = msg.get(key)
        if raw is None or not isinstance(raw, str):
            raw = ""
        return expand_path(raw, user), user

    async def stat(self, call: Call, msg: Message) -> Message:
        path, _ = self._path(call, msg)
        try:
            return {"entry": entry_info(path)}
        except OSError as exc:
            raise _os_error(exc, path) from exc

    async def make_dir(self, call: Call, msg: Message) -> Message:
        path, user = self._path(call, msg)
        if os.path.lexists(path):
            if os.path.isdir(path):
                raise ConnectError("already_exists", f"directory '{path}' already exists")
            raise ConnectError(
                "invalid_argument", f"path '{path}' already exists and is not a directory"
            )
        try:
            await asyncio.to_thread(makedirs_as, path, user)
            return {"entry": entry_info(path)}
        except OSError as exc:
            raise _os_error(exc, path) from exc

    async def move(self, call: Call, msg: Message) -> Message:
        src, user = self._path(call, msg, "source")
        dst, _ = self._path(call, msg, "destination")
        if not os.path.lexists(src):
            raise _not_found(src)

        def do_move() -> Message:
            makedirs_as(os.path.dirname(dst), user)
            os.rename(src, dst)
            return entry_info(dst)

        try:
            return {"entry": await asyncio.to_thread(do_move)}
        except OSError as exc:
            raise _os_error(exc, dst) from exc

    async def list_dir(self, call: Call, msg: Message) -> Message:
        path, _ = self._path(call, msg)
        depth = max(as_int(msg.get("depth"), 1), 1)
        if not os.path.exists(path):
            raise _not_found(path)
        if not os.path.isdir(path):
            raise ConnectError("invalid_argument", f"path '{path}' is not a directory")
        try:
            entries = await asyncio.to_thread(list_dir, path, depth)
        except OSError as exc:
            raise _os_error(exc, path) from exc
        return {"entries": entries}

    async def remove(self, call: Call, msg: Message) -> Message:
        path, _ = self._path(call, msg)
        try:
            await asyncio.to_thread(remove_path, path)
        except OSError as exc:
            raise _os_error(exc, path) from exc
        return {}

    def _check_watch_root(self, path: str) -> None:
        if not os.path.exists(path):
            raise _not_found(path)
        if not os.path.isdir(path):
            raise ConnectError("invalid_argument", f"path '{path}' is not a directory")

    def _start_watch(self, path: str, recursive: bool, sink: Any) -> DirWatch:
        watch = DirWatch(self.hub, path, recursive, sink)
        try:
            watch.start()
        except InotifyError as exc:
            watch.close()
            raise ConnectError("internal", f"error watching '{path}': {exc}") from exc
        return watch

    async def watch_dir(self, call: Call, msg: Message, stream: ServerStream) -> None:
        path, _ = self._path(call, msg)
        self._check_watch_root(path)
        include_entry = bool(msg.get("includeEntry", msg.get("include_entry", False)))
        queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=MAX_WATCHER_EVENTS)

        def sink(name: str, kind: str, full: str) -> None:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(fs_event(name, kind, full, include_entry))

        watch = self._start_watch(path, bool(msg.get("recursive")), sink)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + call.timeout if call.timeout is not None else None
        interval = keepalive_interval(call.headers)
        try:
            await stream.send({"start": {}})
            while True:
                wait = interval
                if deadline is not None:
                    wait = min(wait, deadline - loop.time())
                    if wait <= 0:
                        raise ConnectError("deadline_exceeded", "context deadline exceeded")
                try:
                    event = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    if deadline is None or loop.time() < deadline:
                        await stream.send({"keepalive": {}})
                    continue
                await stream.send({"filesystem": event})
        finally:
            watch.close()

    async def create_watcher(self, call: Call, msg: Message) -> Message:
        path, _ = self._path(call, msg)
        self._check_watch_root(path)
        if len(self.watchers) >= MAX_WATCHERS:
            raise ConnectError("resource_exhausted", "too many watchers")
        watcher = Watcher(bool(msg.get("includeEntry", msg.get("include_entry", False))))
        watcher.watch = self._start_watch(path, bool(msg.get("recursive")), watcher.sink)
        watcher_id = str(uuid.uuid4())
        self.watchers[watcher_id] = watcher
        return {"watcherId": watcher_id}

    def _watcher(self, msg: Message) -> tuple[str, Watcher]:
        watcher_id = str(msg.get("watcherId", msg.get("watcher_id", "")))
        watcher = self.watchers.get(watcher_id)
        if watcher is None:
            raise ConnectError("not_found", f"watcher with id {watcher_id} not found")
        return watcher_id, watcher

    async def get_watcher_events(self, call: Call, msg: Message) -> Message:
        _, watcher = self._watcher(msg)
        self.hub.drain()
        events, watcher.events = watcher.events, []
        return {"events": events}

    async def remove_watcher(self, call: Call, msg: Message) -> Message:
        watcher_id, watcher = self._watcher(msg)
        if watcher.watch is not None:
            watcher.watch.close()
        del self.watchers[watcher_id]
        return {}

    def close(self) -> None:
        for watcher in self.watchers.values():
            if watcher.watch is not None:
                watcher.watch.close()
        self.watchers.clear()
        if self._hub is not None:
            self._hub.close()
            self._hub = None


__all__ = ["FilesystemService", "chown_quiet", "entry_info", "read_metadata", "write_metadata"]
