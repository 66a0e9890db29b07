"""Copying a snapshot's files from one node to another: the manifest, content keys, the stream.

The origin node describes a snapshot (:class:`SnapshotExport`: its record as the origin holds it
and every file a restore reads, from :meth:`VmmDriver.state_files` and
:meth:`StorageDriver.layer_files`), then streams the files the receiver lacks. The stream keeps
holes: a 2 GiB template image with 400 MiB of data travels as 400 MiB (``tarfile`` cannot write
sparse members, so the format is this module's own)::

    repeat: 4-byte big-endian header length, JSON header {"name", "size", "mtime_ns", "mode",
            "extents": [[offset, length], ...]}, then the extents' bytes in that order
    end:    a header {"end": true, "files": n, "bytes": total}

Every read and write is blocking: call these from a worker thread.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import struct
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal, Protocol

from pydantic import Field

from cube_core.errors import NodeError
from cube_core.models import Frozen, SnapshotRef, StateFile

CHUNK = 1 << 20
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")
_HEADER = struct.Struct(">I")
_MAX_HEADER = 1 << 20


class ExportedFile(Frozen):
    """One file of an export: ``name`` is unique within it (what the stream calls it)."""

    name: str
    role: Literal["vm", "disk"]
    file: StateFile
    size: int


class SnapshotExport(Frozen):
    """What a node answers for ``GET /node/v1/snapshots/{id}/manifest``."""

    snapshot: SnapshotRef
    files: tuple[ExportedFile, ...] = ()


class Received(Frozen):
    """What one import copied."""

    snapshot_id: str
    fetched: tuple[str, ...] = ()
    """Snapshots copied, bases first (empty: this node had everything)."""
    files: int = 0
    bytes: int = 0
    """Data bytes received (holes not counted)."""
    skipped: tuple[str, ...] = Field(default_factory=tuple)
    """Content keys the receiver already held (not sent)."""
    seconds: float = 0.0


# -- content keys ------------------------------------------------------------------------------

_digests: dict[tuple[int, int, int, int], str] = {}
_digests_lock = threading.Lock()


def _extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The data ranges of a file (all of it where the filesystem cannot tell holes)."""
    out: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            if exc.errno == errno.EINVAL:
                return [(0, size)] if size else []
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out.append((start, end - start))
        offset = end
    return out


def content_key(path: Path) -> str:
    """``sha256:<hex>`` of a file's content (size, then data ranges with their offsets: two files
    with the same key hold the same bytes). Cached per inode, size and mtime."""
    st = os.stat(path)
    ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _digests_lock:
        known = _digests.get(ident)
    if known is not None:
        return known
    h = hashlib.sha256(str(st.st_size).encode())
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for start, length in _extents(fd, st.st_size):
            pos, end = start, start + length
            while pos < end:
                chunk = os.pread(fd, min(CHUNK, end - pos), pos)
                if not chunk:
                    break
                if chunk.count(0) != len(chunk):  # all-zero data hashes like a hole
                    h.update(struct.pack(">QI", pos, len(chunk)))
                    h.update(chunk)
                pos += len(chunk)
    finally:
        os.close(fd)
    key = "sha256:" + h.hexdigest()
    with _digests_lock:
        _digests[ident] = key
    return key


def key_name(key: str) -> str:
    """A file name for a content key."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", key)


# -- the stream ----------------------------------------------------------------------------------


def _frame(header: dict[str, object]) -> bytes:
    raw = json.dumps(header).encode()
    return _HEADER.pack(len(raw)) + raw


def stream(files: Iterable[tuple[str, Path]]) -> Iterator[bytes]:
    """The bytes of the stream of ``files`` (name, path): holes stay holes."""
    count = total = 0
    for name, path in files:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            extents = _extents(fd, st.st_size)
            yield _frame({"name": name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "mode": st.st_mode & 0o777,
                          "extents": [list(e) for e in extents]})
            for start, length in extents:
                pos, end = start, start + length
                while pos < end:
                    chunk = os.pread(fd, min(CHUNK, end - pos), pos)
                    if not chunk:
                        raise NodeError(f"{path} shrank while it was sent")
                    yield chunk
                    pos += len(chunk)
                total += length
        finally:
            os.close(fd)
        count += 1
    yield _frame({"end": True, "files": count, "bytes": total})


class Readable(Protocol):
    def read(self, n: int, /) -> bytes: ...


def _read_exact(src: Readable, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = src.read(n - len(data))
        if not chunk:
            raise NodeError(f"the snapshot stream ended early ({len(data)} of {n} bytes)")
        data += chunk
    return bytes(data)


def unpack(src: Readable, target: Path, expected: Iterable[str]) -> dict[str, int]:
    """Write the files of a stream into ``target`` (names must be in ``expected``); return the
    data bytes of each. A file's mode and modification time are the origin's (a base RAM file is
    checked by its size and mtime; a jailed VMM reads what the origin's could)."""
    allowed = set(expected)
    target.mkdir(parents=True, exist_ok=True)
    got: dict[str, int] = {}
    while True:
        (length,) = _HEADER.unpack(_read_exact(src, _HEADER.size))
        if length > _MAX_HEADER:
            raise NodeError(f"snapshot stream: a header of {length} bytes")
        header = json.loads(_read_exact(src, length))
        if header.get("end"):
            if header.get("files") != len(got) or set(got) != allowed:
                raise NodeError(f"snapshot stream: got {sorted(got)}, expected {sorted(allowed)}")
            return got
        name, size = str(header["name"]), int(header["size"])
        if not NAME_RE.fullmatch(name) or name not in allowed or name in got:
            raise NodeError(f"snapshot stream: unexpected file {name!r}")
        path = target / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        written = 0
        try:
            os.ftruncate(fd, size)
            for start, span in header["extents"]:
                if start < 0 or span < 0 or start + span > size:
                    raise NodeError(f"snapshot stream: extent {start}+{span} outside {name} ({size} bytes)")
                pos, end = int(start), int(start) + int(span)
                while pos < end:
                    chunk = _read_exact(src, min(CHUNK, end - pos))
                    os.pwrite(fd, chunk, pos)
                    pos += len(chunk)
                written += int(span)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(path, int(header.get("mode", 0o600)) & 0o755)  # the origin's mode (never setuid or writable by others)
        os.utime(path, ns=(int(header["mtime_ns"]), int(header["mtime_ns"])))
        got[name] = written
