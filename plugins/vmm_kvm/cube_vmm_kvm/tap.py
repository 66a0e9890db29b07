"""Open a sandbox's tap device inside its network namespace and hand the fd to QEMU.

QEMU itself then needs no network privileges and stays in the host namespace (``-netdev
tap,fd=N``). ``setns`` moves only the calling thread, so the switch happens in a short-lived thread
of its own that returns to the original namespace before it ends.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import struct
import threading

from cube_core import NetworkError

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _open_here(ifname: str, vnet_hdr: bool) -> int:
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", ifname.encode(), flags))
    except OSError:
        os.close(fd)
        raise
    return fd


def _open_in_netns(netns: str, ifname: str, vnet_hdr: bool) -> int:
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                return _open_here(ifname, vnet_hdr)
            finally:
                _setns(own)
        finally:
            os.close(target)
    finally:
        os.close(own)


def open_tap(netns: str | None, ifname: str, *, vnet_hdr: bool = False) -> int:
    """Attach to tap ``ifname`` in network namespace ``netns`` (None: our own); return the fd.

    Blocking (a thread join): call it from an executor. The fd is close-on-exec; the spawn helper
    makes it inheritable for QEMU only.
    """
    if netns is None:
        try:
            return _open_here(ifname, vnet_hdr)
        except OSError as exc:
            raise NetworkError(f"cannot open tap {ifname}: {exc.strerror}") from exc
    result: list[int] = []
    errors: list[OSError] = []

    def run() -> None:
        try:
            result.append(_open_in_netns(netns, ifname, vnet_hdr))
        except OSError as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name=f"tap-{netns}", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise NetworkError(f"cannot open tap {ifname} in netns {netns}: {errors[0].strerror}") from errors[0]
    return result[0]
