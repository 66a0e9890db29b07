"""Template builds: rootfs image (storage) + guest kernel + a booted, warmed, snapshotted VM."""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from cube_core import ids
from cube_core.errors import ConfigError, TemplateBuildError
from cube_core.models import NetworkPolicy, SnapshotRef, Template, TemplateStatus, VmSpec
from cube_core.network import NetworkDriver
from cube_core.storage import Progress, RootfsRecipe, StorageDriver
from cube_core.store import StateStore
from cube_core.vmm import CAP_SNAPSHOT, VmmDriver

log = structlog.get_logger(__name__)

BUILTIN_RECIPES: dict[str, RootfsRecipe] = {
    "base": RootfsRecipe(name="base"),
    "code-interpreter-v1": RootfsRecipe(name="code-interpreter-v1", interpreter=True),
}


def guest_kernel(setting: str, vmm: VmmDriver, progress: Progress | None = None) -> tuple[Path, Path | None]:
    """Resolve the ``kernel`` setting to (vmlinux, initrd or None): a path; ``none`` (fakes boot
    nothing); ``auto`` or ``stock``: the VMM driver's to resolve (:meth:`VmmDriver.guest_kernel`; the
    kvm driver builds its kernel from files in its own package, the core knows no kernel scripts)."""
    if setting == "none":
        return Path("/dev/null"), None
    if setting in ("auto", "stock"):
        return vmm.guest_kernel(setting, progress)
    path = Path(setting)
    if not path.is_file():
        raise ConfigError(f"kernel {path} does not exist (set [core] kernel, or 'auto')")
    return path, None


class TemplateBuilder:
    def __init__(self, *, store: StateStore, storage: StorageDriver, vmm: VmmDriver,
                 network: NetworkDriver, kernel_setting: str) -> None:
        self.store = store
        self.storage = storage
        self.vmm = vmm
        self.network = network
        self.kernel_setting = kernel_setting
        self._locks: dict[str, asyncio.Lock] = {}
        self._kernel: asyncio.Task[tuple[Path, Path | None]] | None = None
        # Root filesystems are built one at a time, in the order asked for (the first template a
        # user needs is not slowed by the next one's debootstrap); the kernel builds beside them.
        self._rootfs_gate = asyncio.Semaphore(1)

    def kernel(self, progress: Progress | None = None) -> asyncio.Task[tuple[Path, Path | None]]:
        """The guest kernel (built or reused once per process, shared by every template build)."""
        if self._kernel is None or (self._kernel.done() and (self._kernel.cancelled()
                                                             or self._kernel.exception() is not None)):
            self._kernel = asyncio.ensure_future(
                asyncio.to_thread(guest_kernel, self.kernel_setting, self.vmm, progress))
            self._kernel.add_done_callback(_retrieve)  # a failure is raised to the builds awaiting it
        return self._kernel

    async def ensure(self, name: str, progress: Progress | None = None, *, rebuild: bool = False,
                     recipe: RootfsRecipe | None = None, kernel_progress: Progress | None = None) -> Template:
        """Return the READY template ``name``, building it first if needed (the kernel build, with
        ``kernel_progress``, overlaps the root filesystem's)."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            current = self.store.get_template(name)
            if current and current.status == TemplateStatus.READY and not rebuild and \
                    self.files_present(current) and self._slots_match(current):
                return current
            return await self._build(name, recipe or self._recipe(name), progress,
                                     kernel_progress if kernel_progress is not None else progress)

    def _recipe(self, name: str) -> RootfsRecipe:
        if name not in BUILTIN_RECIPES:
            raise TemplateBuildError(template=name, reason="no recipe; known: " + ", ".join(BUILTIN_RECIPES))
        return BUILTIN_RECIPES[name]

    def _slots_match(self, t: Template) -> bool:
        """Its snapshot's VMs have the volume slots this VMM gives VMs now (else it is rebuilt)."""
        state = t.snapshot.vm_state if t.snapshot else None
        return state is None or state.volume_slots == self.vmm.volume_slots

    @staticmethod
    def files_present(t: Template) -> bool:
        """Whether this machine has the files ``t`` is started from."""
        snap = t.snapshot
        if snap is None:
            return t.rootfs is not None and Path(t.rootfs).exists()
        if snap.vm_state is None or snap.disk is None:
            return False
        return all(p.exists() for p in (snap.vm_state.memory_file, snap.vm_state.device_state, snap.disk.path))

    async def _build(self, name: str, recipe: RootfsRecipe, progress: Progress | None,
                     kernel_progress: Progress | None) -> Template:
        template = Template(template_id=name, aliases=(name,), status=TemplateStatus.BUILDING,
                            interpreter=recipe.interpreter, memory_mb=1024 if recipe.interpreter else 512)
        self.store.put_template(template)
        try:
            kernel_task = self.kernel(kernel_progress)
            async with self._rootfs_gate:
                image = await self.storage.build_rootfs(recipe, progress)
            if not kernel_task.done() and progress:
                progress("waiting for the guest kernel", None)
            kernel, initrd = await asyncio.shield(kernel_task)
            template = template.model_copy(update={
                "kernel": str(kernel), "initrd": str(initrd) if initrd else None, "rootfs": str(image.path),
                "rootfs_bytes": image.bytes_allocated,
                "build_log": image.build_log[-20_000:]})
            snapshot = None
            if CAP_SNAPSHOT in self.vmm.capabilities:
                envd_version, snapshot = await self._snapshot(template, kernel, initrd, image.path,
                                                              image.content_hash, progress)
                template = template.model_copy(update={"envd_version": envd_version})
            template = template.model_copy(update={"status": TemplateStatus.READY, "snapshot": snapshot})
        except BaseException as exc:
            self.store.put_template(template.model_copy(update={
                "status": TemplateStatus.FAILED, "build_log": (template.build_log + f"\n{exc!r}")[-20_000:]}))
            raise
        self.store.put_template(template)
        log.info("template ready", template=name, snapshot=snapshot.snapshot_id if snapshot else None)
        return template

    async def _snapshot(self, template: Template, kernel: Path, initrd: Path | None, image: Path,
                        content_hash: str,
                        progress: Progress | None) -> tuple[str, SnapshotRef]:
        # A fresh id per build: disks of live sandboxes may still sit on an earlier snapshot.
        snapshot_id = f"tmpl-{template.template_id}-{content_hash[:12]}-{ids.short_id('')[:8]}"
        owner = f"build-{template.template_id}"
        if progress:
            progress("booting template VM", None)
        disk = await self.storage.create_disk(owner, image)
        nic = await self.network.allocate(owner, template_policy())
        vm = None
        try:
            vm = await self.vmm.boot(VmSpec(vm_id=owner, kernel=kernel, initrd=initrd, rootfs_disk=disk,
                                            memory_mb=template.memory_mb, interpreter=template.interpreter),
                                     nic)
            await self.vmm.wait_ready(vm, timeout=600.0)
            pong = await self.vmm.guest_call(vm, "ping", {}, timeout=60.0)
            envd_version = str(pong.get("envd_version") or template.envd_version)
            if progress:
                progress("saving template snapshot", None)
            state = await self.vmm.snapshot(vm, self.storage.snapshot_dir(snapshot_id))
            await self.vmm.shutdown(vm)
            vm = None
            frozen = await self.storage.freeze_disk(disk, snapshot_id)
        finally:
            if vm is not None:
                await self.vmm.shutdown(vm)
            await self.network.release(nic)
            await self.storage.delete_disk(disk)
        if progress:
            progress("template ready", 1.0)
        return envd_version, SnapshotRef(snapshot_id=snapshot_id, template_id=template.template_id,
                                         vm_state=state, disk=frozen)


def _retrieve(task: asyncio.Task[tuple[Path, Path | None]]) -> None:
    if not task.cancelled():
        task.exception()


def template_policy() -> NetworkPolicy:
    """Template VMs never talk to the outside: nothing they could fetch may end up in a snapshot."""
    return NetworkPolicy(allow_internet_access=False)
