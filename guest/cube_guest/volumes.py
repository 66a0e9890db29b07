"""Mounting the host's volumes: each is a virtio-blk "volume slot" with serial ``cube-vol<i>``.

Every VM has its volume slots from boot (placeholders until a sandbox that mounts volumes is
restored with its volume images in them), so the kernel may hold placeholder blocks in its
page cache: they are dropped (``BLKFLSBUF``) before the slot is mounted.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from typing import Any

from .control import OpError

BLKFLSBUF = 0x1261
SERIAL_PREFIX = "cube-vol"


def slot_device(slot: int, sys_block: str = "/sys/block") -> str:
    """The ``/dev`` node of volume slot ``slot`` (found by its virtio-blk serial)."""
    wanted = f"{SERIAL_PREFIX}{slot}"
    for name in sorted(os.listdir(sys_block)):
        try:
            with open(os.path.join(sys_block, name, "serial")) as fh:
                serial = fh.read().strip()
        except OSError:
            continue
        if serial == wanted:
            return f"/dev/{name}"
    raise OpError(f"no block device with serial {wanted}: this VM has no volume slot {slot}")


def parse(req: dict[str, Any]) -> list[tuple[int, str, bool]]:
    volumes = req.get("volumes")
    if not isinstance(volumes, list) or len(volumes) > 16:
        raise OpError("'volumes' must be a list (at most 16)")
    out = []
    for item in volumes:
        if not isinstance(item, dict):
            raise OpError("each volume must be an object")
        slot, path, read_only = item.get("slot"), item.get("path"), item.get("read_only", False)
        if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < 16:
            raise OpError("'slot' must be an integer 0..15")
        if not isinstance(path, str) or not path.startswith("/") or path == "/" or "\0" in path:
            raise OpError("'path' must be an absolute path other than /")
        if not isinstance(read_only, bool):
            raise OpError("'read_only' must be a boolean")
        out.append((slot, os.path.normpath(path), read_only))
    return out


async def mount_all(volumes: list[tuple[int, str, bool]], *, system_calls: bool) -> list[str]:
    """Mount each slot at its path (``ro,noload`` when read-only); the paths mounted."""
    mounted = []
    for slot, path, read_only in volumes:
        if not system_calls:  # host test harness: nothing to mount
            mounted.append(path)
            continue
        device = slot_device(slot)
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, BLKFLSBUF, 0)
        finally:
            os.close(fd)
        os.makedirs(path, exist_ok=True)
        options = "ro,noload" if read_only else "rw"
        proc = await asyncio.create_subprocess_exec(
            "mount", "-t", "ext4", "-o", options, device, path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            detail = out.decode(errors="replace").strip()[:300]
            raise OpError(f"mount {device} at {path} failed: {detail}")
        mounted.append(path)
    return mounted
