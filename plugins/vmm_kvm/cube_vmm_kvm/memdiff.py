"""Incremental ("diff") RAM snapshots of a clone: only the pages that differ from its base RAM file.

A clone maps its template's RAM file ``share=off`` (``MAP_PRIVATE``). A page it never wrote is still
the file's page-cache page; a page the guest (or QEMU, on its behalf) wrote is a private anonymous
copy. With the VM stopped, ``/proc/<pid>/pagemap`` tells them apart: a present page whose "file
page or shared anon" bit (61) is clear, or a page on swap (bit 62 without bit 61), is private, i.e.
changed since the template. Those pages, read with ``process_vm_readv``, are the diff. The file
keeps an explicit index of page runs: a page the guest zeroed is changed too, so holes in a sparse
file could not stand for "same as the base".

Restoring writes the pages into a new QEMU that maps the same base file ``share=off`` with
``process_vm_writev`` (before its device state is loaded: virtio reads its rings from guest RAM
while loading). Each write breaks copy-on-write exactly as a guest write would, so the new clone
privately owns the same pages as the source did, and a diff of it is again relative to the base.

Guest RAM outside the base file (the microvm BIOS block ``pc.bios``, which the firmware writes
to, 64 KiB) is saved whole as "extra" blocks; QEMU's ``gpa2hva`` gives their host addresses.

File layout (little-endian): header ``_HEADER``; the run index (pairs of u64: first page in the
base file, page count); a JSON blob describing the extra blocks; padding to a page boundary; then
the data: every run's pages in index order, followed by the extra blocks in order.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import ctypes.util
import json
import mmap
import os
import re
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cube_core import VmmError

PAGE = mmap.PAGESIZE
MAGIC = b"CUBEDIFF"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQQQ")
"""magic, version, page size, base file bytes, run count, extras JSON bytes, data offset."""
_PAGEMAP_CHUNK = 1 << 17
"""pagemap entries read at a time (1 MiB of pagemap per 512 MiB of guest RAM)."""
_IOV_MAX = 1024
_CHUNK = 4 << 20
"""Bytes copied per ``process_vm_readv`` + ``pwrite`` round when saving."""


def _private_page(top: int) -> bool:
    """From the top byte of a pagemap entry (bits 56-63): a private (copy-on-write broken) page."""
    present, swapped, file_or_shared = top & 0x80, top & 0x40, top & 0x20
    return bool((present or swapped) and not file_or_shared)


_PRIVATE = bytes(int(_private_page(top)) for top in range(256))
_RUNS = re.compile(b"\x01+")

Run = tuple[int, int]
"""A run of changed pages: (first page in the base file, page count)."""


@dataclass(frozen=True)
class Vma:
    """One mapping of the base file in QEMU: ``[start, end)`` maps the file from ``offset``."""

    start: int
    end: int
    offset: int


@dataclass(frozen=True)
class ExtraBlock:
    """Guest RAM that is not in the base file, saved whole (found by guest-physical address)."""

    name: str
    gpa: int
    size: int


@dataclass(frozen=True)
class DiffIndex:
    """What a diff file holds (everything but the page data)."""

    base_bytes: int
    runs: list[Run]
    extras: list[ExtraBlock]
    data_offset: int

    @property
    def pages(self) -> int:
        return sum(count for _, count in self.runs)

    @property
    def data_bytes(self) -> int:
        return self.pages * PAGE + sum(extra.size for extra in self.extras)


@dataclass(frozen=True)
class DiffStats:
    pages: int
    runs: int
    data_bytes: int
    scan_ms: float
    copy_ms: float


# -- finding the changed pages -----------------------------------------------------------------


def base_mappings(pid: int, base: Path) -> list[Vma]:
    """The private mappings of ``base`` in ``pid`` (matched by device and inode, so a file that was
    replaced or deleted since QEMU mapped it is not found), in file order."""
    try:
        st = os.stat(base)
    except OSError:
        return []
    vmas = []
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                fields = line.split(None, 5)
                if len(fields) < 6 or fields[4] != str(st.st_ino) or fields[1][3] != "p":
                    continue
                major, minor = (int(part, 16) for part in fields[3].split(":"))
                if (major, minor) != (os.major(st.st_dev), os.minor(st.st_dev)):
                    continue
                start, end = (int(part, 16) for part in fields[0].split("-"))
                vmas.append(Vma(start, end, int(fields[2], 16)))
    except OSError as exc:
        raise VmmError(f"cannot read the mappings of pid {pid}: {exc.strerror}") from exc
    return sorted(vmas, key=lambda vma: vma.offset)


def runs_from_pagemap(entries: bytes, first_page: int) -> list[Run]:
    """The runs of private pages among pagemap ``entries`` (8 bytes each) of consecutive pages,
    the first of which is page ``first_page`` of the base file."""
    flags = entries[7::8].translate(_PRIVATE)  # the top byte of each little-endian u64
    return [(first_page + m.start(), m.end() - m.start()) for m in _RUNS.finditer(flags)]


def private_runs(pid: int, vmas: Sequence[Vma]) -> list[Run]:
    """The pages of the base file that ``pid`` holds privately (changed since it was mapped)."""
    runs: list[Run] = []
    try:
        with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap:
            for vma in vmas:
                pages = (vma.end - vma.start) // PAGE
                for done in range(0, pages, _PAGEMAP_CHUNK):
                    count = min(_PAGEMAP_CHUNK, pages - done)
                    entries = os.pread(pagemap.fileno(), count * 8, (vma.start // PAGE + done) * 8)
                    if len(entries) != count * 8:
                        raise VmmError(f"short read of /proc/{pid}/pagemap")
                    for start, length in runs_from_pagemap(entries, vma.offset // PAGE + done):
                        if runs and runs[-1][0] + runs[-1][1] == start:
                            runs[-1] = (runs[-1][0], runs[-1][1] + length)
                        else:
                            runs.append((start, length))
    except OSError as exc:
        raise VmmError(f"cannot read /proc/{pid}/pagemap: {exc.strerror}") from exc
    return runs


def _remote_ranges(vmas: Sequence[Vma], runs: Sequence[Run]) -> list[tuple[int, int]]:
    """Host address ranges ``(address, bytes)`` of ``runs`` in a process that maps the base
    file as ``vmas`` (a run is split where the mappings are)."""
    ranges = []
    for first, count in runs:
        offset, end = first * PAGE, (first + count) * PAGE
        while offset < end:
            vma = next((v for v in vmas if v.offset <= offset < v.offset + (v.end - v.start)), None)
            if vma is None:
                raise VmmError(f"page {offset // PAGE} of the base RAM file is not mapped")
            upto = min(end, vma.offset + (vma.end - vma.start))
            ranges.append((vma.start + offset - vma.offset, upto - offset))
            offset = upto
    return ranges


# -- copying between processes -----------------------------------------------------------------


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
for _name in ("process_vm_readv", "process_vm_writev"):
    _func = getattr(_libc, _name)
    _func.restype = ctypes.c_ssize_t
    _func.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.POINTER(_Iovec),
                      ctypes.c_ulong, ctypes.c_ulong]


def _transfer(pid: int, local: int, remote: Sequence[tuple[int, int]], *, write: bool) -> None:
    """Copy between our contiguous buffer at address ``local`` and the ranges ``remote`` of
    ``pid``, in order (``write``: ours → theirs). Writes break copy-on-write like a guest write."""
    func = _libc.process_vm_writev if write else _libc.process_vm_readv
    pending = list(remote)
    position = 0
    index = 0
    while index < len(pending):
        batch = pending[index:index + _IOV_MAX]
        total = sum(length for _, length in batch)
        ours = _Iovec(local + position, total)
        theirs = (_Iovec * len(batch))(*(_Iovec(address, length) for address, length in batch))
        done = func(pid, ctypes.byref(ours), 1, theirs, len(batch), 0)
        if done <= 0:
            err = ctypes.get_errno() if done < 0 else 0
            raise VmmError(f"{func.__name__} of pid {pid} failed: {os.strerror(err) if err else 'no progress'}")
        position += done
        while done:  # a partial transfer stops inside some range: continue from there
            address, length = pending[index]
            if done >= length:
                done -= length
                index += 1
            else:
                pending[index] = (address + done, length - done)
                done = 0


@contextlib.contextmanager
def _address(buffer: mmap.mmap) -> Iterator[int]:
    """The address of ``buffer``'s memory (the ctypes view is dropped before the map can close)."""
    anchor = ctypes.c_char.from_buffer(buffer)
    try:
        yield ctypes.addressof(anchor)
    finally:
        del anchor


# -- the diff file -----------------------------------------------------------------------------


def _index_bytes(runs: Sequence[Run]) -> bytes:
    flat = array.array("Q", [value for run in runs for value in run])
    if sys.byteorder != "little":
        flat.byteswap()
    return flat.tobytes()


def _batches(ranges: Sequence[tuple[int, int]], limit: int) -> Iterator[tuple[list[tuple[int, int]], int]]:
    """``ranges`` cut into consecutive batches of at most ``limit`` bytes: (ranges, bytes)."""
    batch: list[tuple[int, int]] = []
    size = 0
    for address, length in ranges:
        while length:
            take = min(length, limit - size)
            batch.append((address, take))
            size, address, length = size + take, address + take, length - take
            if size == limit:
                yield batch, size
                batch, size = [], 0
    if batch:
        yield batch, size


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def save(pid: int, base: Path, path: Path, extras: Sequence[tuple[ExtraBlock, int]]) -> DiffStats:
    """Write the pages of ``base`` that ``pid`` (stopped) changed, and ``extras`` (block, host
    address), to ``path``. The caller fsyncs.

    Pages go through a bounded buffer (``process_vm_readv`` then ``pwrite``): measured faster
    than reading straight into a mapping of the file, whose page faults cost more than the copy.
    """
    started = time.monotonic()
    vmas = base_mappings(pid, base)
    if not vmas:
        raise VmmError(f"pid {pid} does not map {base}")
    runs = private_runs(pid, vmas)
    scanned = time.monotonic()
    meta = json.dumps({"extras": [{"name": e.name, "gpa": e.gpa, "size": e.size} for e, _ in extras]}).encode()
    head = _HEADER.size + 16 * len(runs) + len(meta)
    data_offset = -(-head // PAGE) * PAGE
    index = DiffIndex(os.stat(base).st_size, runs, [e for e, _ in extras], data_offset)
    remote = _remote_ranges(vmas, runs) + [(address, e.size) for e, address in extras]
    header = _HEADER.pack(MAGIC, VERSION, PAGE, index.base_bytes, len(runs), len(meta), data_offset)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, memoryview((header + _index_bytes(runs) + meta).ljust(data_offset, b"\0")), 0)
        if index.data_bytes:
            with mmap.mmap(-1, min(_CHUNK, index.data_bytes)) as buffer, _address(buffer) as local, \
                    memoryview(buffer) as view:
                position = data_offset
                for batch, size in _batches(remote, len(buffer)):
                    _transfer(pid, local, batch, write=False)
                    _write_all(fd, view[:size], position)
                    position += size
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    return DiffStats(pages=index.pages, runs=len(runs), data_bytes=index.data_bytes,
                     scan_ms=(scanned - started) * 1000, copy_ms=(time.monotonic() - scanned) * 1000)


def read_index(path: Path) -> DiffIndex:
    """Read and check the header and index of the diff file ``path``."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(_HEADER.size)
            if len(raw) != _HEADER.size:
                raise VmmError(f"{path}: not a RAM diff (too short)")
            magic, version, page, base_bytes, nruns, meta_len, data_offset = _HEADER.unpack(raw)
            if magic != MAGIC or version != VERSION:
                raise VmmError(f"{path}: not a RAM diff of version {VERSION}")
            if page != PAGE:
                raise VmmError(f"{path}: made with {page}-byte pages, this host has {PAGE}")
            flat = array.array("Q")
            flat.frombytes(f.read(16 * nruns))
            if sys.byteorder != "little":
                flat.byteswap()
            meta = json.loads(f.read(meta_len))
    except (OSError, ValueError) as exc:
        raise VmmError(f"cannot read RAM diff {path}: {exc}") from exc
    runs = list(zip(flat[0::2], flat[1::2], strict=True))
    extras = [ExtraBlock(str(e["name"]), int(e["gpa"]), int(e["size"])) for e in meta["extras"]]
    index = DiffIndex(base_bytes, runs, extras, data_offset)
    if len(flat) != 2 * nruns or size != data_offset + index.data_bytes:
        raise VmmError(f"{path}: truncated RAM diff ({size} bytes, expected {data_offset + index.data_bytes})")
    if any((first + count) * PAGE > base_bytes for first, count in runs):
        raise VmmError(f"{path}: a page lies beyond the base RAM file")
    return index


def apply(pid: int, base: Path, path: Path, index: DiffIndex, extra_addresses: Sequence[int]) -> DiffStats:
    """Write the pages of diff ``path`` into ``pid`` (not yet running), which maps ``base``
    ``share=off``; ``extra_addresses`` are the host addresses of ``index.extras`` in ``pid``."""
    started = time.monotonic()
    vmas = base_mappings(pid, base)
    if not vmas:
        raise VmmError(f"pid {pid} does not map {base}")
    remote = _remote_ranges(vmas, index.runs)
    remote += [(address, extra.size) for extra, address in zip(index.extras, extra_addresses, strict=True)]
    mapped = time.monotonic()
    if index.data_bytes:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            # Private and writable only so ctypes can take its address; it is never written.
            with mmap.mmap(fd, index.data_bytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                           offset=index.data_offset) as data:
                data.madvise(mmap.MADV_WILLNEED)
                with _address(data) as local:
                    _transfer(pid, local, remote, write=True)
        finally:
            os.close(fd)
    return DiffStats(pages=index.pages, runs=len(index.runs), data_bytes=index.data_bytes,
                     scan_ms=(mapped - started) * 1000, copy_ms=(time.monotonic() - mapped) * 1000)
