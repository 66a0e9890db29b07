"""The QEMU ``microvm`` command line and the QEMU process: spawn, QMP, identity, stop.

QEMU runs in its own session (``setsid``), so it outlives the node agent that started it and a
new node agent can take it over through its QMP socket. ``-daemonize`` is not used: it forks
after ``-sandbox spawn=deny`` is in force and QEMU dies of SIGSYS.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog
from cube_core import VOLUME_DEVICE_BYTES, VmmError
from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError, Runstate

log = structlog.get_logger(__name__)

SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
VM_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
CTL_PORT_NAME = "cube.ctl"
PR_SET_CHILD_SUBREAPER = 36
CONSOLE_ID = "console"
RAM_ID = "mem"
"""Id of the guest-RAM memory backend, and so the name of its RAM block."""
VOLUME_SERIAL = "cube-vol"
"""Serial of volume slot i: ``cube-vol<i>`` (the guest agent finds the slot by it)."""
QEMU_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}
"""The whole environment of a QEMU (jailed or not): nothing of the node agent's is inherited
(its environment may hold the secrets that ``{env=...}`` references in plugins.toml point at)."""
_spawn_lock = threading.Lock()


def check_vm_id(vm_id: str) -> str:
    """VM ids become file names and QEMU option values: keep them to a safe alphabet."""
    if not VM_ID_RE.match(vm_id):
        raise VmmError(f"invalid vm_id {vm_id!r}: use letters, digits, '_', '.', '-' (max 128)")
    return vm_id


def _opt(value: object) -> str:
    """Escape a value inside a QEMU ``key=value,...`` option (commas are doubled)."""
    return str(value).replace(",", ",,")


@dataclass(frozen=True)
class MachineSpec:
    """Everything that shapes one QEMU command line (inert; no fds are opened here)."""

    vm_id: str
    workdir: Path
    kernel: Path
    append: str
    memory_mb: int
    accel: Literal["kvm", "tcg"]
    cpu_model: str
    ram_file: Path
    ram_shared: bool
    disk_path: Path
    disk_format: str = "qcow2"
    disk_readonly: bool = False
    disk_cache: str = "writeback"
    tb_size_mb: int = 32
    pic: bool = True
    tap_fd: int | None = None
    guest_mac: str | None = None
    incoming: bool = False
    seccomp: bool = True
    initrd: Path | None = None
    """Only for kernels that need one (Debian's stock kernel); implies ``acpi``."""
    ram_readonly: bool = False
    """Open a ``share=off`` RAM file read-only (``readonly=on,rom=off``, QEMU >= 8.2): a jailed
    clone then cannot write its template's RAM file. QEMU 7.2 opens it read-write even for a
    private mapping."""
    console_ring_bytes: int = 1 << 17
    """The serial console is a ring buffer of this size inside QEMU (a power of two); nothing of
    it is written to disk unless the driver reads it (QMP ``ringbuf-read``)."""
    mem_merge: bool = True
    """``madvise(MADV_MERGEABLE)`` on guest RAM, so KSM (when the host runs it) can merge identical
    pages across VMs. QEMU's default; ``mem-merge=off`` is only written when off."""
    volume_drives: tuple[tuple[Path | None, bool], ...] = ()
    """The VM's volume slots in order: (raw image, read-only); no image: an empty slot (``null-co``,
    zeros, writes dropped). A slot is a virtio-blk device with serial ``cube-vol<i>``, after every
    other device (the guest's other devices keep their order)."""
    send_configuration: bool = True
    """Whether migration streams carry QEMU's configuration section (and one is expected on
    load). Off for a clone restored from a ``diff`` snapshot, whose device state (saved with
    ``xen-save-devices-state``) has none."""

    @property
    def acpi(self) -> bool:
        """ACPI on the microvm machine: needed by kernels without ``VIRTIO_MMIO_CMDLINE_DEVICES``
        (Debian's), which find the virtio-mmio devices through the DSDT. The Cube kernel has no
        ACPI and takes its devices from the command line that QEMU appends."""
        return self.initrd is not None

    @property
    def sock_dir(self) -> Path:
        """The only part of the work directory a jailed QEMU can write: its two sockets."""
        return self.workdir / "sock"

    @property
    def qmp_socket(self) -> Path:
        return self.sock_dir / "qmp.sock"

    @property
    def ctl_socket(self) -> Path:
        return self.sock_dir / "ctl.sock"

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.workdir / "qemu.log"


def build_argv(qemu_binary: str, m: MachineSpec) -> list[str]:
    """The full ``qemu-system-x86_64`` argv for ``m`` (the same for a boot and its clones, apart
    from ``share=`` and ``-incoming``)."""
    machine = (f"microvm,x-option-roms=off,acpi={'on' if m.acpi else 'off'},memory-backend={RAM_ID},"
               f"pic={'on' if m.pic else 'off'}" + ("" if m.mem_merge else ",mem-merge=off"))
    accel = f"tcg,tb-size={m.tb_size_mb}" if m.accel == "tcg" else "kvm"
    drive = (f"if=none,id=root,file={_opt(m.disk_path)},format={m.disk_format},cache={m.disk_cache}"
             + (",readonly=on" if m.disk_readonly else ""))
    argv = [
        qemu_binary,
        "-name", f"guest=cube-{m.vm_id}",
        "-M", machine,
        "-accel", accel,
        "-cpu", m.cpu_model,
        "-m", f"{m.memory_mb}M",
        "-smp", "1",
        "-nodefaults", "-no-user-config",
        "-display", "none",
    ]
    if m.seccomp:
        argv += ["-sandbox", SANDBOX]
    argv += [
        "-chardev", f"ringbuf,id={CONSOLE_ID},size={m.console_ring_bytes}",
        "-serial", f"chardev:{CONSOLE_ID}",
        "-kernel", str(m.kernel),
    ]
    if m.initrd is not None:
        argv += ["-initrd", str(m.initrd)]
    argv += [
        "-append", m.append,
        "-object", (f"memory-backend-file,id={RAM_ID},size={m.memory_mb}M,mem-path={_opt(m.ram_file)},"
                    f"share={'on' if m.ram_shared else 'off'}"
                    + (",readonly=on,rom=off" if m.ram_readonly and not m.ram_shared else "")),
        "-drive", drive,
        "-device", "virtio-blk-device,drive=root",
        "-device", "virtio-rng-device",
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=ctl,path={_opt(m.ctl_socket)},server=on,wait=off",
        "-device", f"virtserialport,chardev=ctl,name={CTL_PORT_NAME}",
    ]
    if m.tap_fd is not None:
        argv += ["-netdev", f"tap,id=n0,fd={m.tap_fd}",
                 "-device", f"virtio-net-device,netdev=n0,mac={m.guest_mac or '52:54:00:00:00:21'}"]
    for i, (path, readonly) in enumerate(m.volume_drives):
        backend = f"file={_opt(path)},format=raw,cache={m.disk_cache}" if path is not None else \
            f"driver=null-co,size={VOLUME_DEVICE_BYTES},read-zeroes=on"
        argv += ["-drive", f"if=none,id=vol{i},{backend}" + (",readonly=on" if readonly else ""),
                 "-device", f"virtio-blk-device,drive=vol{i},serial={VOLUME_SERIAL}{i}"]
    argv += [
        "-qmp", f"unix:{_opt(m.qmp_socket)},server=on,wait=off",
    ]
    if not m.send_configuration:
        argv += ["-global", "migration.send-configuration=off"]
    if m.incoming:
        argv += ["-incoming", "defer"]
    return argv


# -- the process -------------------------------------------------------------------------------


def spawn(argv: Sequence[str], *, log_path: Path, env: dict[str, str], pass_fds: Sequence[int] = ()) -> int:
    """Start ``argv`` in a new session with stdio on ``log_path`` and exactly ``env``; return its pid.

    Only ``pass_fds`` are inherited (they are made inheritable for the duration of the spawn,
    under a lock, so two spawns never leak each other's fds).
    """
    with _spawn_lock:
        restore = [(fd, os.get_inheritable(fd)) for fd in pass_fds]
        try:
            for fd in pass_fds:
                os.set_inheritable(fd, True)
            return os.posix_spawnp(
                argv[0], list(argv), dict(env),
                setsid=True,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, str(log_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
                    (os.POSIX_SPAWN_DUP2, 1, 2),
                ],
            )
        except OSError as exc:
            raise VmmError(f"cannot start {argv[0]}: {exc.strerror}") from exc
        finally:
            for fd, inheritable in restore:
                with contextlib.suppress(OSError):
                    os.set_inheritable(fd, inheritable)


def supports_readonly_private_ram(binary: str) -> bool:
    """Whether ``memory-backend-file`` has ``rom`` (QEMU >= 8.2), so ``readonly=on,rom=off`` maps a
    read-only file privately and writably."""
    try:
        out = subprocess.run([binary, "-object", "memory-backend-file,help"], capture_output=True,
                             text=True, timeout=10, env=QEMU_ENV, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return re.search(r"^\s*rom=", out, re.MULTILINE) is not None


def set_child_subreaper() -> None:
    """Make this process the reaper of its orphaned descendants (a jailed QEMU, whose jailer
    parent exits at once), so ``wait_exit`` can collect them."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise VmmError(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")


def reap(pid: int) -> int | None:
    """Collect ``pid`` if it is our exited child; return its wait status (None if not ours/running)."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return status if done == pid else None


def process_state(pid: int) -> str | None:
    """The ``/proc/<pid>/stat`` state letter, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie is reaped when it is our child)."""
    state = process_state(pid)
    if state in ("Z", "X"):
        reap(pid)
        return False
    return state is not None


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def is_our_qemu(pid: int, vm_id: str, workdir: Path) -> bool:
    """Whether ``pid`` is the QEMU of ``vm_id`` (pids are reused: never trust a bare number)."""
    args = cmdline(pid)
    return (bool(args) and is_running(pid) and f"guest=cube-{vm_id}" in args
            and any(str(workdir) in a for a in args))


async def wait_exit(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``pid`` to exit; reap it if it is our child. True if gone."""
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:
        pidfd = -1
    try:
        if pidfd >= 0:
            exited = loop.create_future()
            loop.add_reader(pidfd, _set_done, exited)
            try:
                await asyncio.wait_for(exited, timeout)
            except TimeoutError:
                return not is_running(pid)
            finally:
                loop.remove_reader(pidfd)
        else:
            deadline = time.monotonic() + timeout
            while is_running(pid):
                if time.monotonic() > deadline:
                    return False
                await asyncio.sleep(0.02)
        reap(pid)
        return True
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def send_signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def log_tail(path: Path, limit: int = 2000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode(errors="replace").strip()


# -- QMP ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def map_qmp_errors(vm_id: str, what: str) -> Iterator[None]:
    """Translate qemu.qmp and socket failures into ``VmmError`` at this plugin's boundary."""
    try:
        yield
    except ExecuteError as exc:
        raise VmmError(f"VM {vm_id}: {what} failed: {exc.error_class}: {exc.error.error.desc}") from exc
    except (QMPError, OSError, EOFError) as exc:
        raise VmmError(f"VM {vm_id}: {what} failed: {type(exc).__name__}: {exc}") from exc


def _reject(event: object) -> bool:
    return False


class Qmp:
    """One QMP connection to one VM (a thin, typed layer over ``qemu.qmp.QMPClient``)."""

    def __init__(self, vm_id: str, path: Path) -> None:
        self.vm_id = vm_id
        self.path = path
        self.client = QMPClient(f"cube-{vm_id}")
        # The default all-events listener would grow without bound over a VM's life: drop it.
        self.client.events.accept = _reject  # type: ignore[method-assign]

    @property
    def connected(self) -> bool:
        return self.client.runstate == Runstate.RUNNING

    async def connect(self, *, timeout: float, pid: int | None = None, qemu_log: Path | None = None) -> None:
        """Connect, retrying until the socket answers; fail fast when ``pid`` dies meanwhile."""
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            error: Exception | None = None
            if self.path.exists():  # QEMU creates it early in start-up; avoid failed connects before
                try:
                    # Bounded: a socket that already has a client accepts but never greets.
                    await asyncio.wait_for(self.client.connect(str(self.path)),
                                           max(0.05, deadline - time.monotonic()))
                    return
                except QMPError as exc:
                    error = exc
                except TimeoutError as exc:
                    raise VmmError(f"VM {self.vm_id}: QMP on {self.path} did not answer within {timeout}s "
                                   "(is another client connected?)") from exc
            if pid is not None and not is_running(pid):
                tail = log_tail(qemu_log) if qemu_log else ""
                raise VmmError(f"VM {self.vm_id}: QEMU exited during start-up: {tail}") from error
            if time.monotonic() > deadline:
                raise VmmError(f"VM {self.vm_id}: no QMP on {self.path} after {timeout}s: {error}") from error
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.005)

    async def execute(self, cmd: str, args: dict[str, Any] | None = None, *, timeout: float = 10.0) -> Any:
        with map_qmp_errors(self.vm_id, cmd):
            try:
                return await asyncio.wait_for(self.client.execute(cmd, args), timeout)
            except TimeoutError as exc:
                raise VmmError(f"VM {self.vm_id}: QMP {cmd} did not answer within {timeout}s") from exc

    async def send_fd(self, fd: int, name: str) -> None:
        """Hand ``fd`` to QEMU under ``name`` (SCM_RIGHTS + ``getfd``); our copy stays open."""
        with map_qmp_errors(self.vm_id, "getfd"):
            self.client.send_fd_scm(fd)
        await self.execute("getfd", {"fdname": name})

    async def add_fd(self, fd: int) -> int:
        """Add ``fd`` to a new fd set (SCM_RIGHTS + ``add-fd``); return its id, for paths
        ``/dev/fdset/<id>`` in commands that take a file name. Our copy stays open."""
        with map_qmp_errors(self.vm_id, "add-fd"):
            self.client.send_fd_scm(fd)
        result = await self.execute("add-fd")
        return int(result["fdset-id"])

    async def hmp(self, command: str, *, timeout: float = 10.0) -> str:
        """Run a human-monitor command (for what QMP lacks, such as ``gpa2hva``)."""
        return str(await self.execute("human-monitor-command", {"command-line": command}, timeout=timeout))

    @contextlib.asynccontextmanager
    async def listening(self, *names: str) -> AsyncIterator[EventListener]:
        """Collect the named events for the duration of the block (register before acting)."""
        listener = EventListener(names)
        with self.client.listen(listener):
            yield listener

    async def console(self, size: int) -> str:
        """Take up to ``size`` bytes from the console ring (they are removed from it)."""
        return str(await self.execute("ringbuf-read", {"device": CONSOLE_ID, "size": size, "format": "utf8"}))

    async def status(self) -> str:
        result = await self.execute("query-status")
        return str(result["status"])

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.disconnect()
