"""The jailer: a small stdlib-only program that puts one QEMU in its jail and execs it.

Started by the driver *ahead of need* as ``python -I -S jailer.py <socket fd>`` (a spare: the
~15-40 ms of interpreter start-up are off the VM-start path), as root, in a new session. It waits
on its socket for one request: the spec of :mod:`.jail` (``marshal``: built in, no import cost)
with the VM's log fd and tap fd (SCM_RIGHTS). Then, in order:

1. join the VM's cgroups (so QEMU is limited from its first instruction);
2. ``unshare`` new mount, PID, IPC, UTS and network namespaces (QEMU needs no network: its tap
   arrives as an fd, its sockets are paths);
3. build the jail: a small tmpfs root with read-only or read-write bind mounts of exactly the
   files the VM needs at their host paths, device nodes made here (``/dev/kvm`` only under KVM),
   then ``pivot_root`` into it, detach the old root and remount the new root read-only;
4. ``fork``: the child is pid 1 of the new PID namespace. It drops every capability from the
   bounding set, clears supplementary groups (keeping only the configured ones), switches to the
   VM's uid/gid (``setresgid``/``setresuid`` clear the permitted and effective sets), sets
   ``no_new_privs`` and execs QEMU with the explicit environment of the spec;
5. the parent sends the child's host pid back on the socket and exits.

Deliberately no imports beyond the standard library and no package imports: it runs with
``-I -S`` (no site-packages, no environment variables), so nothing from the caller leaks in.
"""

from __future__ import annotations

import ctypes
import fcntl
import marshal
import os
import socket
import sys
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_PDEATHSIG = 1
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


class JailError(Exception):
    pass


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise JailError(f"{what}: {os.strerror(err)}")


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)),
           f"mount {source} on {target}")


def _bind(root: str, bind: dict[str, Any]) -> None:
    target = root + bind["dst"]
    if bind["dir"]:
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o600))
    mount(bind["src"], target, None, MS_BIND | (MS_REC if bind["dir"] else 0))
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | (0 if bind["rw"] else MS_RDONLY)
    mount(None, target, None, flags)


def build_root(spec: dict[str, Any]) -> None:
    """Steps 2-3: namespaces and the jail's root (this process ends up inside it)."""
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET), "unshare")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    root = spec["root"]
    os.makedirs(root, exist_ok=True)
    mount("cube-jail", root, "tmpfs", MS_NOSUID, "mode=0755,size=64k,nr_inodes=256")
    for bind in spec["binds"]:
        _bind(root, bind)
    for link, target in spec["symlinks"]:
        os.symlink(target, root + link)
    for device in spec["devices"]:
        path = root + device["path"]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.mknod(path, 0o020000 | device["mode"], os.makedev(device["major"], device["minor"]))
        os.chmod(path, device["mode"])
        if device["owner"]:
            os.chown(path, spec["uid"], spec["gid"])
    os.chdir(root)
    number = SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise JailError(f"pivot_root: unknown architecture {os.uname().machine}")
    _check(_libc.syscall(number, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID)


def drop_privileges(spec: dict[str, Any], last_cap: int) -> None:
    """Step 4 in the child: empty bounding set, the VM's ids, no_new_privs."""
    for cap in range(last_cap + 1):
        _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap} from the bounding set")
    os.setgroups(list(spec["groups"]))
    os.setresgid(spec["gid"], spec["gid"], spec["gid"])
    os.setresuid(spec["uid"], spec["uid"], spec["uid"])
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    if os.getuid() == 0 or os.geteuid() == 0:
        raise JailError("still root after setresuid")


def receive(sock_fd: int) -> tuple[dict[str, Any], socket.socket] | None:
    """Wait for the driver's request: the spec (``marshal``) with the fds ``[log, *pass_fds]``
    (SCM_RIGHTS). The log becomes stdout/stderr, each passed fd is moved to the number the QEMU
    command line names, the socket to a high number (it carries the pid back). None on EOF."""
    sock = socket.socket(fileno=os.dup(sock_fd))
    os.close(sock_fd)
    data = b""
    fds: list[int] = []
    while True:
        chunk, received, _, _ = socket.recv_fds(sock, 1 << 20, 16)
        fds += received
        if not chunk:
            break
        data += chunk
        if data.endswith(b"\0END"):
            break
    if not data:
        return None
    spec = marshal.loads(data[:-4])
    floor = max([100, *(int(t) + 1 for t in spec["pass_fds"])])  # above every target: no collision
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor) for fd in fds]
    for fd in fds:
        os.close(fd)
    moved = socket.socket(fileno=fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, floor))
    sock.detach()
    log, *passed = high
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    for target, fd in zip(spec["pass_fds"], passed, strict=True):
        os.dup2(fd, target)  # inheritable: QEMU gets it under this number
        os.close(fd)
    return spec, moved


def main(argv: list[str]) -> int:
    got = receive(int(argv[1]))
    if got is None:
        return 0  # the driver closed its end: a spare that was never used
    spec, sock = got
    uid, gid = int(spec["uid"]), int(spec["gid"])
    if uid <= 0 or gid <= 0:
        raise JailError(f"refusing uid {uid} / gid {gid}: a jailed QEMU never runs as root")
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    for procs in spec["cgroup_procs"]:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    build_root(spec)
    child = os.fork()
    if child == 0:
        try:
            sock.close()
            name = spec["hostname"].encode()
            _check(_libc.sethostname(name, len(name)), "sethostname")
            drop_privileges(spec, last_cap)
            keep = sorted(int(fd) for fd in spec["pass_fds"])
            for fd in keep:
                os.set_inheritable(fd, True)
            low = 3
            for fd in [*keep, 1 << 16]:
                if fd > low:
                    os.closerange(low, fd)
                low = fd + 1
            os.execve(spec["argv"][0], spec["argv"], spec["env"])
        except BaseException as exc:  # noqa: BLE001 - anything here must end the child
            sys.stderr.write(f"cube jailer: {exc}\n")
            sys.stderr.flush()
            os._exit(127)
    sock.sendall(f"{child}\n".encode())
    os._exit(0)  # no interpreter finalization (~5 ms): the driver waits for us to be reaped


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except (JailError, OSError, ValueError, KeyError, EOFError) as error:
        sys.stderr.write(f"cube jailer: {error}\n")
        sys.exit(1)
