"""Idle reclaim: page an idle VM's private memory out to RAM-backed (compressed) swap.

Most of an idle sandbox under TCG is anonymous memory it does not touch while idle: the
translation cache, QEMU's heap and thread arenas, the guest pages it wrote (private copies of its
template's RAM file). This module moves those pages to swap with ``process_madvise(MADV_PAGEOUT)``
on the QEMU process, which

- works the same under cgroup v1 and v2 (v1 has no ``memory.reclaim``; this host runs v1),
- takes only pages the process maps alone: the kernel skips a page whose map count is above one,
  so the template's RAM file pages that other clones map stay in the page cache (a cgroup-wide
  reclaim would evict those shared pages that happen to be charged to this VM),
- costs one ``/proc/<pid>/maps`` read and a few system calls per VM, no scan of anything else.

When a VM is reclaimed: a paused VM (a warm-pool member) right after its pause; a running VM once
its QEMU process used less than ``idle_reclaim_cpu_pct`` of a core over ``idle_reclaim_after_s``;
then again while it stays idle only when at least ``idle_reclaim_refault_mib`` of what went out
came back (its ``VmSwap`` dropped: the node's metrics ask, a cron-like blip), and after it has been
busy, once it is idle for a window again. One task per driver looks at all VMs every
``idle_reclaim_after_s / 2`` (one ``/proc/<pid>/stat`` read per VM, and ``/proc/<pid>/status``
for those reclaimed). Its tracker is the driver's one decision of "idle": the node's sampler asks
it (``KvmVmm.activity``), and a reading either took recently serves the other.

Swap must be RAM-backed (zram: ``scripts/zram-swap.sh``): guest memory is never written to a
disk unless ``idle_reclaim_disk_swap = true`` (docs/security.md). Without usable swap the
reclaimer stays off and says so once (and ``cube doctor`` says so).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from cube_core import VmActivity

log = structlog.get_logger(__name__)

MADV_PAGEOUT = 21
SYS_PROCESS_MADVISE = 440  # x86_64 and aarch64 (asm-generic) alike
IOV_MAX = 1024
COMPACT_EVERY_S = 60.0
"""How often the reclaimer compacts the zram swap devices (while it can reclaim into them)."""
_SKIP_NAMES = ("[vvar", "[vdso", "[vsyscall", "anon_inode:", "/dev/", "/memfd:")


@dataclass(frozen=True)
class SwapDevice:
    name: str
    """As in ``/proc/swaps``: ``/dev/zram0``, ``/swapfile``, ``/dev/sda2``."""
    kind: str
    """``partition`` or ``file``."""
    size_kib: int
    used_kib: int

    @property
    def ram_backed(self) -> bool:
        """zram keeps what is swapped out in (compressed) RAM; anything else is a disk."""
        return re.fullmatch(r"/dev/zram\d+", self.name) is not None


def swap_devices(swaps: Path = Path("/proc/swaps")) -> list[SwapDevice]:
    """The active swap areas (empty when none, or when ``/proc/swaps`` cannot be read)."""
    try:
        lines = swaps.read_text().splitlines()[1:]
    except OSError:
        return []
    found = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 4:
            found.append(SwapDevice(parts[0].replace("\\040", " "), parts[1], int(parts[2]), int(parts[3])))
    return found


def compact_zram(devices: list[SwapDevice], sys_block: Path = Path("/sys/block")) -> list[str]:
    """Compact the pools of the zram devices among ``devices`` (``/sys/block/zramN/compact``):
    zsmalloc moves compressed pages out of sparsely used pages of its size classes and frees
    those. A pool gets sparse as pages leave it (an idle VM's refaults, a VM that ends), and the
    kernel compacts it by itself only under memory pressure. Measured here with 90 idle sandboxes
    after three of them ran commands: 1 035 -> 997 MiB of RAM for the same data (-0.43 MiB per
    sandbox), in 16-18 ms; a pool that only grew has nothing to give back (docs/bench.md,
    "Session 23"). Returns the devices compacted."""
    done = []
    for device in devices:
        if not device.ram_backed:
            continue
        name = device.name.rsplit("/", 1)[1]
        try:
            (sys_block / name / "compact").write_text("1")
        except OSError as exc:
            log.debug("zram compaction failed", device=name, error=str(exc))
            continue
        done.append(name)
    return done


def usable_swap(devices: list[SwapDevice], *, allow_disk: bool) -> tuple[bool, str]:
    """Whether idle reclaim may run with these swap areas, and why (for the log and doctor)."""
    if not devices:
        return False, "no swap configured (set up zram: scripts/zram-swap.sh setup)"
    disk = [d.name for d in devices if not d.ram_backed]
    if disk and not allow_disk:
        return False, (f"disk-backed swap {', '.join(disk)}: guest memory is not written to a disk "
                       "(remove it, or set [vmm.options] idle_reclaim_disk_swap = true)")
    ram = [d for d in devices if d.ram_backed]
    size = sum(d.size_kib for d in devices) >> 10
    what = ", ".join(d.name for d in devices)
    return True, f"swap {what} ({size} MiB{', RAM-backed' if len(ram) == len(devices) else ', incl. disk'})"


@dataclass
class _VmIdle:
    cpu_s: float
    at: float
    """CPU seconds at the last reading, and when (monotonic s)."""
    span_cpu_s: float
    span_at: float
    """The reading where the current span began: busy or not is measured over at least half a window."""
    idle_since: float
    pct: float | None = None
    """% of one core used between the last two readings (None: read once only)."""
    reclaimed_at: float | None = None
    swapped_kib: int = 0
    """``VmSwap`` right after the last page-out."""


@dataclass
class IdleTracker:
    """Which VMs are idle, and which to reclaim now, from their QEMU CPU time read over time (pure
    logic). The one place that decides "this VM is idle": the node's sampler asks it too
    (:meth:`activity`, through ``VmmDriver.activity``).

    ``record`` takes each reading of a VM's CPU seconds so far. A VM is busy if it used at least
    ``cpu_pct`` % of a core over a span of at least half a window (a burst that big within a
    shorter span counts at once); ``due`` says to reclaim it once it has not been busy for
    ``window_s``, then, while it stays idle, again whenever ``refault_kib`` or more of what it
    swapped out has come back since (0: once per idle period).
    """

    window_s: float
    cpu_pct: float
    refault_kib: int = 0
    _vms: dict[str, _VmIdle] = field(default_factory=dict)

    def record(self, vm_id: str, cpu_s: float, now: float) -> None:
        state = self._vms.get(vm_id)
        if state is None or cpu_s < state.cpu_s:  # new VM, or a new process under the same id
            self._vms[vm_id] = _VmIdle(cpu_s, now, cpu_s, now, now)
            return
        if now > state.at:
            state.pct = 100 * (cpu_s - state.cpu_s) / (now - state.at)
        state.cpu_s, state.at = cpu_s, now
        used, span = cpu_s - state.span_cpu_s, now - state.span_at
        # at least half a window: two readings close together do not make a blip look busy
        if used >= self.cpu_pct / 100 * max(span, self.window_s / 2):
            state.idle_since, state.reclaimed_at = now, None
            state.span_cpu_s, state.span_at = cpu_s, now
        elif span >= self.window_s / 2:
            state.span_cpu_s, state.span_at = cpu_s, now

    def due(self, vm_id: str, now: float, swapped_kib: int | None = None) -> bool:
        """Whether to page ``vm_id`` out now (and if so, it counts as reclaimed from ``now``)."""
        state = self._vms.get(vm_id)
        if state is None or now - state.idle_since < self.window_s:
            return False
        if state.reclaimed_at is not None and (
                not self.refault_kib or swapped_kib is None or state.swapped_kib - swapped_kib < self.refault_kib):
            return False
        state.reclaimed_at = now
        return True

    def read_at(self, vm_id: str) -> float | None:
        """When ``vm_id``'s CPU was last read (None: never)."""
        state = self._vms.get(vm_id)
        return state.at if state is not None else None

    def activity(self, vm_id: str) -> VmActivity | None:
        """What the last readings say of ``vm_id`` (None: fewer than two readings)."""
        state = self._vms.get(vm_id)
        if state is None or state.pct is None:
            return None
        return VmActivity(cpu_pct=state.pct, idle_since=state.idle_since)

    def reclaimed(self, vm_id: str) -> bool:
        """Whether ``vm_id`` was paged out and has not been busy since."""
        state = self._vms.get(vm_id)
        return state is not None and state.reclaimed_at is not None

    def swapped(self, vm_id: str, kib: int) -> None:
        """``VmSwap`` of ``vm_id`` right after a page-out (what a refault is counted from)."""
        state = self._vms.get(vm_id)
        if state is not None:
            state.swapped_kib = kib

    def mark_reclaimed(self, vm_id: str, cpu_s: float, now: float) -> None:
        """A VM reclaimed outside the ticks (right after a pause)."""
        self._vms[vm_id] = _VmIdle(cpu_s, now, cpu_s, now, now, reclaimed_at=now)

    def mark_busy(self, vm_id: str) -> None:
        """A VM resumed: forget it, so it gets a whole window before the next reclaim."""
        self._vms.pop(vm_id, None)

    def forget(self, vm_id: str) -> None:
        self._vms.pop(vm_id, None)

    def known(self) -> set[str]:
        return set(self._vms)


def process_cpu_s(pid: int, proc: Path = Path("/proc")) -> float | None:
    """User + system CPU seconds of a process (all its threads), None when it is gone."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    # fields[0] is the state (field 3 of stat(5)); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pageout_ranges(maps_text: str) -> Iterator[tuple[int, int]]:
    """The address ranges of ``/proc/<pid>/maps`` worth paging out: private mappings (anonymous
    memory, the heap, private file mappings such as a clone's guest RAM and the relocated data of
    libraries), not shared ones (a template's ``share=on`` RAM) nor special ones (vdso, devices:
    ``process_madvise`` stops at the first range it refuses)."""
    for line in maps_text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 5 or parts[1][3] != "p" or parts[1][0] != "r":
            continue
        name = parts[5] if len(parts) == 6 else ""
        if name.startswith(_SKIP_NAMES):
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        yield start, end


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def pageout(pid: int, proc: Path = Path("/proc")) -> int:
    """``MADV_PAGEOUT`` every private range of ``pid``; returns the bytes of address space
    advised (not what moved: the kernel skips shared, locked and unevictable pages). Raises
    ``OSError`` when the process is gone or the call is refused."""
    ranges = list(pageout_ranges((proc / str(pid) / "maps").read_text()))
    fd = os.pidfd_open(pid)
    done = 0
    try:
        for first in range(0, len(ranges), IOV_MAX):
            batch = ranges[first:first + IOV_MAX]
            iov = (_Iovec * len(batch))(*(_Iovec(s, e - s) for s, e in batch))
            result = _libc.syscall(ctypes.c_long(SYS_PROCESS_MADVISE), ctypes.c_long(fd), iov,
                                   ctypes.c_long(len(batch)), ctypes.c_long(MADV_PAGEOUT), ctypes.c_long(0))
            if result < 0:
                err = ctypes.get_errno()
                if err == 0 or err == 12:  # ENOMEM: a range went away under us (QEMU unmapped it)
                    continue
                raise OSError(err, f"process_madvise(MADV_PAGEOUT) of pid {pid}: {os.strerror(err)}")
            done += result
    finally:
        os.close(fd)
    return done


def swapped_kib(pid: int, proc: Path = Path("/proc")) -> int:
    """``VmSwap`` of a process (KiB), 0 when unknown."""
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmSwap:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Reclaimer:
    """The node's one idle task: every ``window_s / 2`` it reads each VM's QEMU CPU time (those
    not read since: :meth:`activity` reads too, for the node's sampler) and, with ``pageouts``,
    pages out those idle for a window; :meth:`paused` pages out a VM right after its pause.
    Without ``pageouts`` (``idle_reclaim = false``) it only keeps the readings."""

    def __init__(self, vms: Callable[[], dict[str, int]], *, window_s: float, cpu_pct: float,
                 allow_disk: bool, refault_kib: int = 0, pageouts: bool = True,
                 reclaimable: Callable[[str], bool] = lambda vm_id: True, swaps: Path = Path("/proc/swaps"),
                 proc: Path = Path("/proc"), sys_block: Path = Path("/sys/block")) -> None:
        self._vms = vms
        """vm_id -> QEMU pid of the VMs running now (the driver's)."""
        self._reclaimable = reclaimable
        """Whether a VM may be paged out (the driver leaves warm-pool members warm)."""
        self.tracker = IdleTracker(window_s, cpu_pct, refault_kib)
        self.pageouts = pageouts
        self._allow_disk = allow_disk
        self._swaps = swaps
        self._proc = proc
        self._sys_block = sys_block
        self._compacted_at: float | None = None
        self.compactions = 0
        """zram compactions so far (for tests)."""
        self._lock = threading.Lock()
        """The tracker is read and written from worker threads (ticks, the sampler's reads) and the loop."""
        self._usable: bool | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self.reclaimed = 0
        """VMs paged out so far (for logs and tests)."""
        self.reads = 0
        """``/proc/<pid>/stat`` reads so far (for tests)."""

    def usable(self) -> bool:
        """Whether there is swap to reclaim into; logs when that changes (once at start)."""
        ok, why = usable_swap(swap_devices(self._swaps), allow_disk=self._allow_disk)
        if ok != self._usable:
            (log.info if ok else log.warning)("idle reclaim " + ("on" if ok else "off"), reason=why)
            self._usable = ok
        return ok

    def start(self) -> None:
        if self.pageouts:
            self.usable()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="idle-reclaim")

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._pending) if t is not None]
        self._task = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.tracker.window_s / 2)
            try:
                await loop.run_in_executor(None, self.tick)
            except Exception:  # noqa: BLE001 - a failed tick must not end the task
                log.exception("idle reclaim tick failed")

    def _read(self, vms: dict[str, int], now: float, max_age_s: float) -> None:
        """Read the CPU time of those of ``vms`` not read within ``max_age_s`` (hold the lock)."""
        for vm_id, pid in vms.items():
            at = self.tracker.read_at(vm_id)
            if at is not None and now - at < max_age_s:
                continue
            cpu = process_cpu_s(pid, self._proc)
            self.reads += 1
            if cpu is not None:
                self.tracker.record(vm_id, cpu, now)

    def activity(self, vm_ids: Collection[str], max_age_s: float, now: float | None = None) -> dict[str, VmActivity]:
        """What the tracker says of ``vm_ids`` (those it knows), read again where its last reading
        is ``max_age_s`` old or more (blocking: run it off the event loop)."""
        now = time.monotonic() if now is None else now
        vms = self._vms()
        with self._lock:
            self._read({v: vms[v] for v in vm_ids if v in vms}, now, max_age_s)
            found = {v: self.tracker.activity(v) for v in vm_ids}
        return {v: a for v, a in found.items() if a is not None}

    def tick(self, now: float | None = None) -> list[str]:
        """One pass over the VMs (blocking: run it off the event loop); returns those paged out."""
        now = time.monotonic() if now is None else now
        vms = self._vms()
        due = []
        with self._lock:
            for gone in self.tracker.known() - set(vms):
                self.tracker.forget(gone)
            # what the sampler read less than a quarter window ago is recent enough
            self._read(vms, now, self.tracker.window_s / 4)
            if not self.pageouts or not self.usable():
                return []
            for vm_id, pid in vms.items():
                if not self._reclaimable(vm_id):
                    continue
                swapped = swapped_kib(pid, self._proc) if self.tracker.reclaimed(vm_id) else None
                if self.tracker.due(vm_id, now, swapped):
                    due.append((vm_id, pid))
        paged = [vm_id for vm_id, pid in due if self._pageout(vm_id, pid, "idle")]
        if self._compacted_at is None or now - self._compacted_at >= COMPACT_EVERY_S:
            self._compacted_at = now
            if compact_zram(swap_devices(self._swaps), self._sys_block):
                self.compactions += 1
        return paged

    def mark_busy(self, vm_id: str) -> None:
        """A VM resumed (from the loop)."""
        with self._lock:
            self.tracker.mark_busy(vm_id)

    def paused(self, vm_id: str, pid: int) -> None:
        """Page out a VM that was just paused (in the background: the pause does not wait)."""
        if not self.pageouts or not self.usable():
            return

        def run() -> None:
            if self._pageout(vm_id, pid, "paused", mark=False):
                cpu, swapped = process_cpu_s(pid, self._proc) or 0.0, swapped_kib(pid, self._proc)
                with self._lock:
                    self.tracker.mark_reclaimed(vm_id, cpu, time.monotonic())
                    self.tracker.swapped(vm_id, swapped)

        task = asyncio.get_running_loop().create_task(asyncio.to_thread(run))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _pageout(self, vm_id: str, pid: int, why: str, *, mark: bool = True) -> bool:
        began = time.monotonic()
        before = swapped_kib(pid, self._proc)
        try:
            pageout(pid, self._proc)
        except OSError as exc:
            log.warning("idle reclaim failed", vm_id=vm_id, pid=pid, error=str(exc))
            return False
        self.reclaimed += 1
        after = swapped_kib(pid, self._proc)
        if mark:
            with self._lock:
                self.tracker.swapped(vm_id, after)
        log.debug("vm reclaimed", vm_id=vm_id, why=why, ms=round((time.monotonic() - began) * 1000, 1),
                  swapped_mib=round((after - before) / 1024, 1))
        return True
