"""Persistent tap devices, created in the calling thread's network namespace.

The tap is created persistent and owned by root, with ``IFF_TAP | IFF_NO_PI`` and no virtio-net
header. The VMM attaches to it later, from its own process, in the same way: ``setns`` into the
slot's namespace, open ``/dev/net/tun``, ``TUNSETIFF`` with the same flags, ``setns`` back, and
pass the fd to QEMU (``-netdev tap,fd=N``).
"""

from __future__ import annotations

import fcntl
import os
import struct

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
TAP_FLAGS = IFF_TAP | IFF_NO_PI


def _ifreq(name: str, flags: int) -> bytes:
    return struct.pack("16sH22x", name.encode(), flags)


def open_tap(name: str, flags: int = TAP_FLAGS) -> int:
    """Open (creating if needed) tap ``name`` in the calling thread's namespace; return the fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, flags))
    except OSError:
        os.close(fd)
        raise
    return fd


def create_persistent_tap(name: str, owner_uid: int = 0) -> None:
    """Create a persistent tap ``name`` owned by ``owner_uid`` (it outlives this call)."""
    fd = open_tap(name)
    try:
        fcntl.ioctl(fd, TUNSETOWNER, owner_uid)
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    finally:
        os.close(fd)
