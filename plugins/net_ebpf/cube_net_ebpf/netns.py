"""Named network namespaces without forking, and moving the calling thread between them.

``created`` does what ``ip netns add`` does, in-process: ``unshare(CLONE_NEWNET)`` on the calling
thread, bind-mount ``/proc/thread-self/ns/net`` onto ``/run/netns/<name>`` (so ``ip netns`` sees
it), and go back. ``setns`` moves only the calling thread, so every function here must run on a
thread Cube owns (the driver's worker threads), never on the event loop's thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator
from pathlib import Path

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_SHARED = 1 << 20
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str, target: str, fstype: str | None, flags: int) -> None:
    _check(_libc.mount(source.encode(), target.encode(),
                       fstype.encode() if fstype else None, flags, None), f"mount {target}")


def _setns(fd: int) -> None:
    _check(_libc.setns(fd, CLONE_NEWNET), "setns")


def ensure_rundir() -> None:
    """Make /run/netns a shared mount point, as ``ip netns add`` does (once per boot)."""
    NETNS_DIR.mkdir(parents=True, exist_ok=True)
    rundir = str(NETNS_DIR)
    try:
        _mount("", rundir, "none", MS_SHARED | MS_REC)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        _mount(rundir, rundir, "none", MS_BIND | MS_REC)
        _mount("", rundir, "none", MS_SHARED | MS_REC)


def path_of(name: str) -> Path:
    return NETNS_DIR / name


def current_fd() -> int:
    """An fd of the calling thread's network namespace (the caller closes it)."""
    return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


@contextlib.contextmanager
def created(name: str) -> Iterator[int]:
    """Create namespace ``name`` and keep the calling thread inside it for the block.

    Yields an fd of the namespace the thread came from (valid during the block). If the block
    raises, the namespace is removed again.
    """
    path = path_of(name)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    os.close(fd)
    origin = current_fd()
    try:
        try:
            _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        except OSError:
            path.unlink(missing_ok=True)
            raise
        try:
            _mount("/proc/thread-self/ns/net", str(path), "none", MS_BIND)
            yield origin
        except BaseException:
            _setns(origin)
            remove(name)
            raise
        _setns(origin)
    finally:
        os.close(origin)


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Keep the calling thread inside existing namespace ``name`` for the block."""
    origin = current_fd()
    try:
        target = open_fd(name)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(origin)
    finally:
        os.close(origin)


def remove(name: str) -> bool:
    """Unmount and delete ``/run/netns/<name>``; True if it existed. Idempotent."""
    path = path_of(name)
    if _libc.umount2(str(path).encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"umount {path}: {os.strerror(err)}")
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def names() -> list[str]:
    try:
        return sorted(entry.name for entry in os.scandir(NETNS_DIR))
    except FileNotFoundError:
        return []


def write_sysctl(key: str, value: str) -> None:
    """Write ``/proc/sys/<key>`` (``net/...`` keys act on the calling thread's namespace)."""
    with open(f"/proc/sys/{key}", "w") as handle:
        handle.write(value)


def read_sysctl(key: str) -> str:
    with open(f"/proc/sys/{key}") as handle:
        return handle.read().strip()


def open_fd(name: str) -> int:
    """An fd of namespace ``name`` (for ``IFLA_NET_NS_FD``); close it with :func:`close_fd`."""
    return os.open(path_of(name), os.O_RDONLY | os.O_CLOEXEC)


def close_fd(fd: int) -> None:
    os.close(fd)


def rename(old: str, new: str) -> None:
    """Give namespace ``old`` the name ``new`` (bind mount under the new name, drop the old)."""
    new_path = path_of(new)
    fd = os.open(new_path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    os.close(fd)
    try:
        _mount(str(path_of(old)), str(new_path), "none", MS_BIND)
    except OSError:
        new_path.unlink(missing_ok=True)
        raise
    remove(old)
