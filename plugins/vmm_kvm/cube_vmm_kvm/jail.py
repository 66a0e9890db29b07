"""The QEMU jail, driver side: what goes into a VM's jail, its uid, and how the jailer is started.

The model is Firecracker's jailer: every QEMU runs as its own unprivileged uid/gid (leased from
``[vmm.options] uid_range``), with an empty capability bounding set and ``no_new_privs``, in new
mount, PID, IPC, UTS and network namespaces, with a root that holds only what the VM needs. The privileged
work (namespaces, bind mounts, device nodes, pivot_root, dropping privileges) is done by
:mod:`.jailer`, a stdlib-only program run as root just before QEMU; this module decides *what*
it does (:class:`JailSpec`) and keeps the uid leases (:class:`UidLeases`).

Every path QEMU uses is bind-mounted at its host path, so the QEMU command line is the same jailed
or not and ``/proc/<pid>/maps`` names the same files (which :mod:`.memdiff` relies on).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import marshal
import os
import socket
import stat
import struct
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cube_core import VmmError

from . import jailer, qemu
from .qemu import QEMU_ENV, MachineSpec

SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
"""Top-level names that merged-/usr hosts make symlinks into /usr (recreated in the jail)."""
LIBC_FILES = ("/etc/ld.so.cache",)
HOST_DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
QCOW2_MAGIC = b"QFI\xfb"


@dataclass(frozen=True)
class Bind:
    src: Path
    dst: Path
    rw: bool
    dir: bool = False


@dataclass(frozen=True)
class Device:
    path: Path
    major: int
    minor: int
    mode: int
    owner: bool = False
    """Owned by the VM's uid (``/dev/kvm``); else root-owned (``/dev/null`` and friends)."""


@dataclass(frozen=True)
class JailSpec:
    """What :mod:`.jailer` builds for one VM (inert)."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    root: Path
    hostname: str
    binds: tuple[Bind, ...]
    devices: tuple[Device, ...]
    symlinks: tuple[tuple[str, str], ...]
    cgroup_procs: tuple[Path, ...] = field(default=())

    def encode(self, argv: Sequence[str], *, pass_fds: Sequence[int]) -> bytes:
        """The jailer's request: this spec plus the command, ``marshal``-ed (the jailer runs under
        the same interpreter, so the marshal format matches)."""
        return marshal.dumps({
            "uid": self.uid, "gid": self.gid, "groups": list(self.groups), "root": str(self.root),
            "hostname": self.hostname,
            "binds": [{"src": str(b.src), "dst": str(b.dst), "rw": b.rw, "dir": b.dir} for b in self.binds],
            "devices": [{"path": str(d.path), "major": d.major, "minor": d.minor, "mode": d.mode,
                         "owner": d.owner} for d in self.devices],
            "symlinks": [list(s) for s in self.symlinks],
            "cgroup_procs": [str(p) for p in self.cgroup_procs],
            "argv": list(argv), "env": dict(QEMU_ENV), "pass_fds": list(pass_fds),
        })


class Jailer:
    """One jailer process, started ahead of need and waiting for its request (a spare).

    ``start()`` costs the driver a ``posix_spawn`` (~0.2 ms); the interpreter start-up happens in
    the background. ``run()`` sends the spec and fds and returns the jailed process's pid in *our*
    PID namespace (the jailer reports it, then exits and is reaped here). A spare the driver no
    longer needs is ended by ``close()`` (EOF on its socket)."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock

    @classmethod
    def start(cls) -> Jailer:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            argv = [sys.executable, "-I", "-S", jailer.__file__, str(theirs.fileno())]
            pid = qemu.spawn(argv, log_path=Path("/dev/null"), env={}, pass_fds=(theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return cls(pid, ours)

    def run(self, spec: JailSpec, argv: Sequence[str], log_path: Path, pass_fds: Sequence[int] = ()) -> int:
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            try:
                socket.send_fds(self.sock, [spec.encode(argv, pass_fds=pass_fds) + b"\0END"],
                                [log_fd, *pass_fds])
                self.sock.shutdown(socket.SHUT_WR)
                data = b""
                while not data.endswith(b"\n") and (chunk := self.sock.recv(64)):
                    data += chunk
            except OSError as exc:
                raise VmmError(f"{spec.hostname}: the jailer did not answer: {exc}") from exc
        finally:
            os.close(log_fd)
            self.close()
        try:
            return int(data)
        except ValueError:
            raise VmmError(f"{spec.hostname}: the jailer failed: {qemu.log_tail(log_path)}") from None

    def close(self) -> None:
        """Close our end (an unused spare exits on the EOF) and reap the jailer."""
        self.sock.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def spawn(spec: JailSpec, argv: Sequence[str], log_path: Path, pass_fds: Sequence[int] = (),
          jailer: Jailer | None = None) -> int:
    """Run ``argv`` in the jail ``spec`` (stdio on ``log_path``), through ``jailer`` (a spare) or
    a new one; return its pid in our PID namespace."""
    return (jailer or Jailer.start()).run(spec, argv, log_path, pass_fds)


def backing_chain(disk: Path, disk_format: str) -> list[Path]:
    """The backing files of a qcow2 ``disk`` (nearest first), read from the image headers."""
    chain: list[Path] = []
    current, fmt = disk, disk_format
    while fmt == "qcow2" and len(chain) < 16:
        try:
            with open(current, "rb") as f:
                header = f.read(20)
                if len(header) < 20 or header[:4] != QCOW2_MAGIC:
                    raise VmmError(f"{current} is not a qcow2 image")
                offset, size = struct.unpack(">QI", header[8:20])
                if offset == 0 or size == 0:
                    break
                f.seek(offset)
                name = f.read(size).decode()
        except OSError as exc:
            raise VmmError(f"cannot read the qcow2 header of {current}: {exc.strerror}") from exc
        backing = Path(name) if name.startswith("/") else current.parent / name
        chain.append(backing)
        with open(backing, "rb") as f:
            fmt = "qcow2" if f.read(4) == QCOW2_MAGIC else "raw"
        current = backing
    return chain


def _char_device(path: str, *, owner: bool = False) -> Device:
    st = os.stat(path)
    if not stat.S_ISCHR(st.st_mode):
        raise VmmError(f"{path} is not a character device")
    return Device(Path(path), os.major(st.st_rdev), os.minor(st.st_rdev), 0o600 if owner else 0o666, owner)


def _readable_by(path: Path, gid: int, groups: Sequence[int]) -> bool:
    st = os.stat(path)
    return bool(st.st_mode & stat.S_IROTH or (st.st_mode & stat.S_IRGRP and (st.st_gid == gid or st.st_gid in groups)))


def read_only_inputs(machine: MachineSpec) -> list[Path]:
    """The files a VM reads but must never write: kernel, initrd, the backing images of its disk."""
    inputs = [machine.kernel] + ([machine.initrd] if machine.initrd is not None else [])
    return inputs + backing_chain(machine.disk_path, machine.disk_format) + [
        path for path, readonly in machine.volume_drives if path is not None and readonly]


def grant_read(path: Path, gid: int, groups: Sequence[int], group: int) -> None:
    """Make ``path`` readable by a jailed QEMU: unless it already is, give it ``group`` with read
    (never write) access. Idempotent; its content and mtime are untouched."""
    if _readable_by(path, gid, groups):
        return
    st = os.stat(path)
    os.chown(path, -1, group)
    os.chmod(path, (stat.S_IMODE(st.st_mode) | stat.S_IRGRP) & ~stat.S_IWGRP)


def plan(machine: MachineSpec, *, qemu_binary: str, uid: int, gid: int, groups: Sequence[int], root: Path,
         cgroup_procs: Sequence[Path] = ()) -> JailSpec:
    """The jail of ``machine``: /usr and the loader cache read-only, the kernel (and initrd) and
    any backing images read-only, the VM's own disk, RAM file and socket directory read-write,
    ``/dev/kvm`` only under KVM. Read-only inputs must be readable by the VM's uid/groups."""
    binds: list[Bind] = [Bind(Path("/usr"), Path("/usr"), rw=False, dir=True)]
    links: list[tuple[str, str]] = []
    for name in SYSTEM_LINKS:
        if os.path.islink(name):
            links.append((name, os.readlink(name)))
        elif os.path.isdir(name):
            binds.append(Bind(Path(name), Path(name), rw=False, dir=True))
    binds += [Bind(Path(p), Path(p), rw=False) for p in LIBC_FILES if os.path.exists(p)]
    binary = Path(os.path.realpath(qemu_binary))
    if not binary.is_relative_to("/usr"):
        binds.append(Bind(binary, binary, rw=False))
    for path in read_only_inputs(machine):
        if not _readable_by(path, gid, groups):
            raise VmmError(f"VM {machine.vm_id}: {path} is not readable by its jailed QEMU (uid {uid}); "
                           "make it world-readable or give it the jail group")
        binds.append(Bind(path, path, rw=False))
    binds += [
        Bind(machine.disk_path, machine.disk_path, rw=not machine.disk_readonly),
        Bind(machine.ram_file, machine.ram_file, rw=machine.ram_shared or not machine.ram_readonly),
        Bind(machine.sock_dir, machine.sock_dir, rw=True, dir=True),
    ]
    binds += [Bind(path, path, rw=True) for path, readonly in machine.volume_drives
              if path is not None and not readonly]
    devices = [_char_device(p) for p in HOST_DEVICES]
    if machine.accel == "kvm":
        devices.append(_char_device("/dev/kvm", owner=True))
    return JailSpec(uid=uid, gid=gid, groups=tuple(groups), root=root, hostname=f"cube-{machine.vm_id}"[:64],
                    binds=tuple(binds), devices=tuple(devices), symlinks=tuple(links),
                    cgroup_procs=tuple(cgroup_procs))


class UidLeases:
    """Per-VM uids from ``[lo, hi]``, leased with one ``O_EXCL`` file per uid in ``lease_dir``.

    A lease names its VM's work directory; it is freed by :meth:`release` at shutdown, or found
    stale when that directory is gone (a node that died without cleaning up). Leases live on disk,
    so a restarted node agent (or a second driver on the host) never hands out a uid in use. The
    directory is meant to be shared by every node on a host: a lease appears whole (written aside,
    then hard-linked into place, which fails if the uid is taken), and replacing a stale one
    happens under an flock, so two nodes never lease the same uid.
    """

    def __init__(self, lease_dir: Path, lo: int, hi: int) -> None:
        if lo <= 0 or hi < lo:
            raise VmmError(f"invalid uid range {lo}-{hi}: it must be above 0 and not empty")
        self.lease_dir = lease_dir
        self.lo, self.hi = lo, hi

    def _path(self, uid: int) -> Path:
        return self.lease_dir / str(uid)

    def allocate(self, vm_id: str, workdir: Path) -> int:
        self.lease_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        body = json.dumps({"vm_id": vm_id, "workdir": str(workdir)}).encode()
        for uid in range(self.lo, self.hi + 1):
            path = self._path(uid)
            if self._create(path, body):
                return uid
            if not self._stale(path):
                continue
            with self._reclaim_lock():  # two processes must not both reclaim the same uid
                if not self._stale(path):
                    continue  # reclaimed by another process meanwhile
                path.unlink(missing_ok=True)
                if self._create(path, body):
                    return uid
        raise VmmError(f"no free uid in the jail range {self.lo}-{self.hi} (one per running VM)")

    def _create(self, path: Path, body: bytes) -> bool:
        """Create the lease ``path`` holding ``body``, atomically (a lease is never seen half
        written); False if it exists."""
        tmp = self.lease_dir / f".new-{os.getpid()}-{threading.get_ident()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, body)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    @contextlib.contextmanager
    def _reclaim_lock(self) -> Iterator[None]:
        """An flock on ``<lease_dir>/.reclaim`` while a stale lease is replaced. Without it, of two
        processes (nodes) that found the same stale lease, the later one could unlink the lease
        the earlier one had just written and take the same uid."""
        fd = os.open(self.lease_dir / ".reclaim", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _stale(self, path: Path) -> bool:
        try:
            owner = json.loads(path.read_text())
            return not Path(owner["workdir"]).exists()
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError):
            return True  # a torn or foreign file: never a live lease (those are written whole)

    def owner(self, uid: int) -> str | None:
        try:
            return str(json.loads(self._path(uid).read_text())["vm_id"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def release(self, uid: int, vm_id: str) -> None:
        """Free ``uid`` if ``vm_id`` holds it (idempotent)."""
        if self.owner(uid) == vm_id:
            self._path(uid).unlink(missing_ok=True)
