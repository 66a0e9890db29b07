"""Saving a VM's device state (and RAM) and loading it into a clone, over QMP.

Template snapshots (``shared``) use ``x-ignore-shared``: the cold-booted VM's RAM is a ``share=on``
file, so the migration stream carries only device state (~50 KB, a few ms), and clones map the RAM
file ``share=off`` (``MAP_PRIVATE``: copy-on-write, pages shared in the page cache until written).

A clone (private RAM over a snapshot's RAM file) is saved as a ``diff``: its device state without
any RAM (``xen-save-devices-state``; despite the name not Xen-specific) plus the pages it changed
(:mod:`.memdiff`) plus the small RAM blocks outside the RAM file (:func:`ram_extras`). Its clones
map the same base file, get the pages written in, then load the device state through an ordinary
incoming migration (``-incoming defer``, so QEMU does not copy the kernel and firmware images into
guest RAM at start-up). That stream has no configuration section, so the loading QEMU runs with
``migration.send-configuration=off``. Only when the base file is gone is a clone saved ``full``
(RAM inside the migration stream).

QEMU 7.2 has no ``file:`` URI and ``-sandbox spawn=deny`` rules out ``exec:``, so state files are
opened here and passed to QEMU: with ``getfd`` for ``fd:<name>`` URIs, with ``add-fd`` for commands
that take a file name (``/dev/fdset/<id>``). A migration does not stop the source first: a paused
source makes every clone start paused.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import time
from pathlib import Path

import structlog
from cube_core import VmmError

from .memdiff import ExtraBlock
from .qemu import Qmp

log = structlog.get_logger(__name__)

MEMORY_FILE = "memory.ram"
DIFF_FILE = "memory.diff"
STATE_FILE = "device.state"
_FD_OUT = "cube-snapshot-out"
_FD_IN = "cube-snapshot-in"
_POLL_S = 0.002


async def _set_ignore_shared(qmp: Qmp, enabled: bool) -> None:
    await qmp.execute("migrate-set-capabilities",
                      {"capabilities": [{"capability": "x-ignore-shared", "state": enabled}]})


async def _wait_migration(qmp: Qmp, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        info = await qmp.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            return dict(info)
        if status in ("failed", "cancelled"):
            raise VmmError(f"VM {qmp.vm_id}: migration {status}: {info.get('error-desc', '')}")
        if time.monotonic() > deadline:
            await qmp.execute("migrate_cancel")
            raise VmmError(f"VM {qmp.vm_id}: saving state took more than {timeout}s")
        await asyncio.sleep(_POLL_S)


async def save_state(qmp: Qmp, state_path: Path, *, ignore_shared: bool, timeout: float) -> float:
    """Write the VM's migration stream to ``state_path``; return the save time in ms.

    When this returns the source VM is paused (QEMU's ``postmigrate``); ``cont`` resumes it.
    """
    fd = os.open(state_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        await _set_ignore_shared(qmp, ignore_shared)
        await qmp.send_fd(fd, _FD_OUT)
    finally:
        os.close(fd)
    started = time.monotonic()
    await qmp.execute("migrate", {"uri": f"fd:{_FD_OUT}"})
    await _wait_migration(qmp, timeout)
    save_ms = (time.monotonic() - started) * 1000
    await asyncio.get_running_loop().run_in_executor(None, _fsync_path, state_path)
    return save_ms


async def save_devices(qmp: Qmp, state_path: Path, *, timeout: float) -> None:
    """Write the device state of a stopped VM, without any RAM block, to ``state_path``.

    ``live: false`` keeps the block devices active: the VM goes on running afterwards.
    """
    fd = os.open(state_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        fdset = await qmp.add_fd(fd)
    finally:
        os.close(fd)
    try:
        await qmp.execute("xen-save-devices-state", {"filename": f"/dev/fdset/{fdset}", "live": False},
                          timeout=timeout)
    finally:
        await qmp.execute("remove-fd", {"fdset-id": fdset})


_RAM_RANGE = re.compile(r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, ram\): (\S+)", re.MULTILINE)
_HVA = re.compile(r"Host virtual address for 0x[0-9a-f]+ \((\S+)\) is (0x[0-9a-f]+)")


async def gpa2hva(qmp: Qmp, gpa: int) -> tuple[str, int]:
    """The RAM block name and host address of guest-physical address ``gpa``."""
    text = await qmp.hmp(f"gpa2hva {gpa:#x}")
    found = _HVA.search(text)
    if found is None:
        raise VmmError(f"VM {qmp.vm_id}: gpa2hva {gpa:#x}: {text.strip()}")
    return found.group(1), int(found.group(2), 16)


async def ram_extras(qmp: Qmp, skip: str) -> list[tuple[ExtraBlock, int]]:
    """The guest RAM outside the RAM block ``skip`` (on microvm: the BIOS block ``pc.bios``,
    mapped at 0xf0000 and below 4 GiB), with its host addresses; each block once."""
    text = await qmp.hmp("info mtree -f")
    view = next((part for part in text.split("FlatView #") if 'AS "memory",' in part), "")
    extras: list[tuple[ExtraBlock, int]] = []
    seen: set[int] = set()
    for match in _RAM_RANGE.finditer(view):
        start, end, name = int(match.group(1), 16), int(match.group(2), 16), match.group(3)
        if name == skip:
            continue
        block, address = await gpa2hva(qmp, start)
        if block != name:
            raise VmmError(f"VM {qmp.vm_id}: {start:#x} is in RAM block {block}, not {name}")
        if address not in seen:
            seen.add(address)
            extras.append((ExtraBlock(name=name, gpa=start, size=end - start + 1), address))
    return extras


async def extra_addresses(qmp: Qmp, extras: list[ExtraBlock]) -> list[int]:
    """The host addresses of saved extra blocks in another QEMU of the same machine."""
    addresses = []
    for extra in extras:
        block, address = await gpa2hva(qmp, extra.gpa)
        if block != extra.name:
            raise VmmError(f"VM {qmp.vm_id}: {extra.gpa:#x} is in RAM block {block}; the snapshot has {extra.name}")
        addresses.append(address)
    return addresses


def fsync_paths(*paths: Path) -> None:
    for path in paths:
        _fsync_path(path)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def load_state(qmp: Qmp, state_path: Path, *, ignore_shared: bool, timeout: float) -> bool:
    """Feed ``state_path`` to a QEMU started with ``-incoming defer`` and wait until it is loaded.

    Returns True when the VM runs (QMP ``RESUME`` seen), False when it was saved from a paused
    source and stays paused (the caller decides whether to ``cont``). Nothing may be sent to the
    guest (network or control channel) before it runs: packets that reach QEMU earlier are dropped.
    """
    try:
        fd = os.open(state_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise VmmError(f"VM {qmp.vm_id}: cannot open device state {state_path}: {exc.strerror}") from exc
    try:
        await _set_ignore_shared(qmp, ignore_shared)
        await qmp.send_fd(fd, _FD_IN)
    finally:
        os.close(fd)
    async with qmp.listening("RESUME") as resumed:
        await qmp.execute("migrate-incoming", {"uri": f"fd:{_FD_IN}"})
        deadline = time.monotonic() + timeout
        while True:
            try:
                await asyncio.wait_for(resumed.get(), 0.02)
                return True
            except TimeoutError:
                pass
            info = await qmp.execute("query-migrate")
            status = info.get("status")
            if status in ("failed", "cancelled"):
                raise VmmError(f"VM {qmp.vm_id}: loading {state_path} failed: {info.get('error-desc', '')}")
            if status == "completed":
                run_state = await qmp.status()
                if run_state == "running":
                    return True
                if run_state != "inmigrate":
                    return False
            if time.monotonic() > deadline:
                raise VmmError(f"VM {qmp.vm_id}: {state_path} not loaded within {timeout}s (status {status})")


_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)


def _copy_range(fin: int, fout: int, start: int, end: int) -> int:
    """Copy bytes [start, end) at the same offsets, leaving all-zero chunks as holes."""
    written = 0
    pos = start
    while pos < end:
        chunk = os.pread(fin, min(_CHUNK, end - pos), pos)
        if not chunk:
            break
        if chunk != _ZEROS[: len(chunk)]:
            os.pwrite(fout, chunk, pos)
            written += len(chunk)
        pos += len(chunk)
    return written


def copy_sparse(src: Path, dst: Path) -> int:
    """Copy ``src`` to ``dst`` keeping holes (tmpfs and ext4 answer SEEK_DATA); return bytes copied."""
    copied = 0
    tmp = dst.with_name(dst.name + ".tmp")
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        os.ftruncate(fout.fileno(), size)
        offset = 0
        while offset < size:
            try:
                data = os.lseek(fin.fileno(), offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            hole = os.lseek(fin.fileno(), data, os.SEEK_HOLE)
            copied += _copy_range(fin.fileno(), fout.fileno(), data, hole)
            offset = hole
        os.fsync(fout.fileno())
    os.replace(tmp, dst)
    return copied
