"""Saving a VM's device state (and RAM) and loading it into a clone, over QMP migration.

Template snapshots use ``x-ignore-shared``: the cold-booted VM's RAM is a ``share=on`` file, so the
migration stream carries only device state (~50 KB, a few ms), and clones map the RAM file
``share=off`` (``MAP_PRIVATE``: copy-on-write, pages shared in the page cache until written).
A VM whose RAM is already a private mapping (a clone) is saved with its RAM in the stream
(``full``); its clones load every page.

QEMU 7.2 has no ``file:`` URI and ``-sandbox spawn=deny`` rules out ``exec:``, so the state file is
opened here and passed to QEMU with ``getfd``, then used as ``fd:<name>``. The source VM is not
stopped before saving: a paused source makes every clone start paused.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from pathlib import Path

import structlog
from cube_core import VmmError

from .qemu import Qmp

log = structlog.get_logger(__name__)

MEMORY_FILE = "memory.ram"
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
