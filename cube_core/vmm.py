"""The VMM driver contract: boot, control, pause, snapshot, restore and stop VMs.

A VMM plugin returns one :class:`VmmDriver` from ``cube_vmm_driver``. The core calls its async
methods directly on the hot path. Optional capabilities raise :class:`UnsupportedOperation` unless
the driver lists them in ``capabilities`` and overrides them.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from cube_core.errors import ConfigError, UnsupportedOperation
from cube_core.models import Isolation, NicHandle, StateFile, VmHandle, VmSpec, VmState
from cube_core.storage import Progress

CAP_SNAPSHOT = "snapshot"
CAP_PAUSE = "pause"
CAP_REATTACH = "reattach"
CAP_PRIORITY = "priority"


@dataclass(frozen=True)
class VmActivity:
    """What a VMM counted of one VM's host CPU use (:meth:`VmmDriver.activity`)."""

    cpu_pct: float
    """% of one core its processes used between the driver's last two readings."""
    idle_since: float
    """Since when (``time.monotonic()`` of this process) it has been idle by the driver's threshold
    (e.g. the KVM driver's ``idle_reclaim_cpu_pct``): the reading that last found it busy, or its
    first reading."""


class VmmDriver(abc.ABC):
    """Owns VMM processes on one node."""

    capabilities: ClassVar[frozenset[str]] = frozenset()

    @property
    @abc.abstractmethod
    def isolation(self) -> Isolation:
        """What separates a guest from the host: ``kvm``, ``tcg`` (emulation; not a security
        boundary) or ``none`` (fakes)."""

    @property
    def volume_slots(self) -> int:
        """Spare block devices every VM of this driver gets for volumes (``VmSpec.volumes``; a
        snapshot keeps its count in ``VmState.volume_slots``); 0: no volumes."""
        return 0

    @property
    def guest_aslr(self) -> bool:
        """Whether this driver's guests randomize process layouts (ASLR). The node tells each
        guest when it makes it a sandbox (``personalize``). A driver turns it off where it costs
        more than it protects: under TCG every new process's code is translated again because
        its addresses are new (docs/bench.md, session 20)."""
        return True

    async def start(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Prepare the driver (find binaries, choose the accelerator). Called once."""

    async def close(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Release driver-wide resources; running VMs are left running."""

    def guest_kernel(self, setting: str, progress: Progress | None = None) -> tuple[Path, Path | None]:
        """(vmlinux, initrd or None) for a ``[core] kernel`` setting that is neither a path nor
        ``none`` (e.g. ``auto``): the VMM knows how to build or fetch its guest kernel; the core
        does not. Blocking (a build may take minutes; the core calls it in a worker thread)."""
        raise ConfigError(f"kernel {setting!r}: the {type(self).__name__} VMM provides no guest kernel; "
                          "set [core] kernel to a vmlinux path (or 'none')")

    @abc.abstractmethod
    async def boot(self, spec: VmSpec, nic: NicHandle | None) -> VmHandle:
        """Cold-boot a VM and return as soon as its process runs (not when the guest is up)."""

    @abc.abstractmethod
    async def wait_ready(self, vm: VmHandle, *, timeout: float) -> dict[str, Any]:
        """Wait until the guest agent says it is ready; return its ready event."""

    @abc.abstractmethod
    async def guest_call(self, vm: VmHandle, op: str, params: dict[str, Any] | None = None, *,
                         timeout: float = 10.0) -> dict[str, Any]:
        """Call the guest agent over the control channel (independent of guest networking)."""

    @abc.abstractmethod
    async def shutdown(self, vm: VmHandle, *, timeout: float = 10.0) -> None:
        """Stop the VM: soft then hard, idempotent, frees everything the VMM owns."""

    @abc.abstractmethod
    async def is_alive(self, vm: VmHandle) -> bool:
        """Whether the VM's process still runs."""

    async def pause(self, vm: VmHandle) -> None:
        """Stop the vCPUs; memory and processes are kept."""
        raise UnsupportedOperation(driver=type(self).__name__, operation="pause")

    async def resume(self, vm: VmHandle) -> None:
        """Continue a paused VM."""
        raise UnsupportedOperation(driver=type(self).__name__, operation="resume")

    async def snapshot(self, vm: VmHandle, target_dir: Path) -> VmState:
        """Save memory and device state into ``target_dir``; the VM keeps its run state (a running
        VM runs on, a paused one stays paused). To freeze a disk at the same point: pause,
        snapshot, freeze the disk, resume. How RAM is saved is the driver's choice; a driver may
        save a clone incrementally, relative to its template (``VmState.base_state_id`` then names
        the snapshot it needs)."""
        raise UnsupportedOperation(driver=type(self).__name__, operation="snapshot")

    async def restore(self, state: VmState, spec: VmSpec, nic: NicHandle | None) -> VmHandle:
        """Start a copy-on-write clone of ``state`` with its own disk and NIC; it runs when this
        returns. The first ``guest_call`` may include the control channel's handshake (tens of ms
        under TCG while the guest retranslates its code)."""
        raise UnsupportedOperation(driver=type(self).__name__, operation="restore")

    @abc.abstractmethod
    def state_files(self, state: VmState) -> list[StateFile]:
        """Every file a restore of ``state`` reads on another machine, except those of
        ``state.base_state_id`` (that snapshot is copied first, with its own files): the memory
        and device-state files, anything kept beside them, and the kernel and initrd (with a
        content ``key``: a node that has the same bytes needs no copy). Blocking."""

    @abc.abstractmethod
    def relocate(self, state: VmState, files: Mapping[Path, Path], base: VmState | None) -> VmState:
        """``state`` as a copy on this node: ``files`` maps every path of :meth:`state_files`
        to where it is here now; ``base`` is this node's copy of ``state.base_state_id`` (None when
        it has none). Blocking; raise :class:`VmmError` when the copy cannot be restored here."""

    async def set_priority(self, vm: VmHandle, *, background: bool) -> None:
        """Run ``vm`` at the lowest CPU priority among the node's VMs (``background``: a warm-pool
        member being prepared, which must not slow the sandboxes users wait for) or at its
        normal one again. Only where ``capabilities`` has :data:`CAP_PRIORITY`."""
        raise UnsupportedOperation(driver=type(self).__name__, operation="set_priority")

    async def activity(self, vms: Sequence[VmHandle], *, max_age_s: float) -> dict[str, VmActivity]:
        """How busy each of ``vms`` has been, by vm_id, from the host's count of its processes' CPU
        (read without waking the guest; a reading ``max_age_s`` old or more is taken again, all
        of them in one go). The driver is the one place that decides whether a VM is idle (a VMM
        that reclaims idle VMs' memory uses the same count); the node's sampler asks an idle
        sandbox's guest less often (``[core] sample_idle_interval_s``). A VM the driver cannot
        tell about (yet) is left out; the default tells nothing."""
        return {}

    async def reattach(self, vm: VmHandle) -> VmHandle:
        """Take over a VM started by an earlier process of the node agent."""
        raise UnsupportedOperation(driver=type(self).__name__, operation="reattach")
