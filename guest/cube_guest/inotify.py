"""A small inotify binding (ctypes, no dependencies) with recursive directory watches.

One inotify instance serves the whole agent (the per-user instance limit is low);
each :class:`DirWatch` subscribes to the watch descriptors of its directories.
Events are mapped the way fsnotify (used by upstream envd) maps them.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
import struct
from collections.abc import Callable

log = logging.getLogger(__name__)

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000

WATCH_MASK = (
    IN_CREATE | IN_MODIFY | IN_ATTRIB | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO
    | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
)
_HEADER = struct.Struct("iIII")

# (inotify bit, E2B event type), checked in this order.
EVENT_TYPES = (
    (IN_CREATE, "EVENT_TYPE_CREATE"),
    (IN_MOVED_TO, "EVENT_TYPE_CREATE"),
    (IN_MODIFY, "EVENT_TYPE_WRITE"),
    (IN_DELETE, "EVENT_TYPE_REMOVE"),
    (IN_MOVED_FROM, "EVENT_TYPE_RENAME"),
    (IN_ATTRIB, "EVENT_TYPE_CHMOD"),
)

Sink = Callable[[str, str, str], None]  # (relative name, event type, absolute path)


class InotifyError(OSError):
    pass


class Inotify:
    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._rm = libc.inotify_rm_watch
        self._rm.argtypes = [ctypes.c_int, ctypes.c_int]
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise InotifyError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int = fd
        self._subs: dict[int, dict[DirWatch, str]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is None:
            self._loop = loop
            loop.add_reader(self.fd, self.drain)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.fd)
        os.close(self.fd)

    def add_watch(self, path: str, watch: DirWatch, rel: str) -> int:
        wd = int(self._add(self.fd, os.fsencode(path), WATCH_MASK))
        if wd < 0:
            err = ctypes.get_errno()
            raise InotifyError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
        self._subs.setdefault(wd, {})[watch] = rel
        return wd

    def release(self, wd: int, watch: DirWatch) -> None:
        subs = self._subs.get(wd)
        if subs is None:
            return
        subs.pop(watch, None)
        if not subs:
            del self._subs[wd]
            self._rm(self.fd, wd)

    def drain(self) -> None:
        """Read and dispatch every queued event (also called before polling watchers)."""
        while True:
            try:
                buf = os.read(self.fd, 64 << 10)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                log.warning("inotify read failed: %s", exc)
                return
            pos = 0
            while pos + _HEADER.size <= len(buf):
                wd, mask, _cookie, size = _HEADER.unpack_from(buf, pos)
                pos += _HEADER.size
                name = os.fsdecode(buf[pos : pos + size].rstrip(b"\0"))
                pos += size
                try:
                    self._dispatch(wd, mask, name)
                except Exception:
                    log.exception("inotify dispatch failed")

    def _dispatch(self, wd: int, mask: int, name: str) -> None:
        if mask & IN_Q_OVERFLOW:
            log.warning("inotify queue overflow: events were lost")
            return
        subs = self._subs.get(wd)
        if not subs:
            return
        if mask & IN_IGNORED:
            for watch in list(subs):
                watch.forget(wd)
            self._subs.pop(wd, None)
            return
        if not name:  # *_SELF events: the parent's watch reports these
            return
        for watch, rel in list(subs.items()):
            watch.on_event(rel, name, mask)


class DirWatch:
    """Watches one directory (optionally its whole tree) and reports to ``sink``."""

    def __init__(self, hub: Inotify, root: str, recursive: bool, sink: Sink) -> None:
        self.hub = hub
        self.root = root
        self.recursive = recursive
        self.sink = sink
        self._wds: dict[int, str] = {}
        self.closed = False

    def start(self) -> None:
        self._add_dir(self.root, "")
        if self.recursive:
            self._add_subdirs(self.root, "")

    def _add_dir(self, path: str, rel: str) -> None:
        wd = self.hub.add_watch(path, self, rel)
        self._wds[wd] = rel

    def _add_subdirs(self, path: str, rel: str) -> None:
        for top, dirs, _files in os.walk(path):
            dirs.sort()
            for d in dirs:
                full = os.path.join(top, d)
                sub_rel = os.path.relpath(full, self.root)
                try:
                    self._add_dir(full, sub_rel)
                except OSError as exc:  # vanished or unreadable: skip it
                    log.debug("not watching %s: %s", full, exc)

    def forget(self, wd: int) -> None:
        self._wds.pop(wd, None)

    def on_event(self, rel: str, name: str, mask: int) -> None:
        if self.closed:
            return
        rel_name = os.path.join(rel, name) if rel else name
        full = os.path.join(self.root, rel_name)
        for bit, kind in EVENT_TYPES:
            if mask & bit:
                self.sink(rel_name, kind, full)
                break
        if self.recursive and mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
            try:
                self._add_dir(full, rel_name)
                self._add_subdirs(full, rel_name)
            except OSError as exc:
                log.debug("not watching new dir %s: %s", full, exc)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for wd in list(self._wds):
            self.hub.release(wd, self)
        self._wds.clear()
