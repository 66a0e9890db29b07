"""Fixtures of the vmm_kvm tests: real QEMU guests (TCG on hosts without usable KVM).

Expensive things are built once per session: the guest kernel (``kernel/build.sh``, cached under
/var/cache/cube), the ``base`` rootfs image (through ``cube_storage_cow``, content-addressed),
one started ``KvmVmm`` and one template snapshot. ``CUBE_TEST_ROOTFS=/path/to/image.ext4`` uses an
existing image instead of building ``base`` (for development only).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from cube_core import RootfsRecipe
from cube_storage_cow import CowConfig, CowStorage
from kvm_helpers import CGROUP_PARENT, RUN_TOKEN, TemplateSnapshot, VmFactory, make_template

from cube_vmm_kvm import KvmConfig, KvmVmm
from cube_vmm_kvm.guest_kernel import KERNEL_DIR


@pytest.fixture(scope="session")
def guest_kernel() -> Path:
    """The guest vmlinux: built by the packaged kernel/build.sh (minutes once, then instant from the cache)."""
    result = subprocess.run(["bash", str(KERNEL_DIR / "build.sh")], capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        pytest.fail(f"kernel/build.sh failed ({result.returncode}): {result.stderr[-2000:]}")
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.is_file(), path
    return path


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def storage(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[CowStorage]:
    root = tmp_path_factory.mktemp("storage")
    driver = CowStorage(CowConfig(root=root, cache=Path("/var/cache/cube")))
    await driver.start()
    yield driver
    await driver.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def base_image(storage: CowStorage) -> Path:
    """The ``base`` template image with the real guest agent (built by cube_storage_cow)."""
    override = os.environ.get("CUBE_TEST_ROOTFS")
    if override:
        return Path(override)
    image = await storage.build_rootfs(RootfsRecipe(name="base"))
    return image.path


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def kvm_config(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[KvmConfig]:
    mem_dir = Path("/dev/shm") / f"cube-test-{RUN_TOKEN}"
    config = KvmConfig(run_dir=tmp_path_factory.mktemp("run"), mem_dir=mem_dir, cgroup_parent=CGROUP_PARENT)
    yield config
    shutil.rmtree(mem_dir, ignore_errors=True)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def kvm(kvm_config: KvmConfig) -> AsyncIterator[KvmVmm]:
    driver = KvmVmm(kvm_config)
    await driver.start()
    yield driver
    await driver.close()


@pytest_asyncio.fixture(loop_scope="session")
async def vm_factory(kvm: KvmVmm, storage: CowStorage, base_image: Path, guest_kernel: Path,
                     request: pytest.FixtureRequest) -> AsyncIterator[VmFactory]:
    factory = VmFactory(kvm, storage, base_image, guest_kernel)
    yield factory
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for vm in factory.vms:
            console = vm.workdir / "console.log"
            if console.exists():
                print(f"--- console of {vm.vm_id} ---\n{console.read_text(errors='replace')[-4000:]}")
    await factory.cleanup()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def template(kvm: KvmVmm, storage: CowStorage, base_image: Path,
                   guest_kernel: Path) -> AsyncIterator[TemplateSnapshot]:
    """The session's template: ``base`` booted once (no NIC) and snapshotted; the VM keeps running."""
    factory = VmFactory(kvm, storage, base_image, guest_kernel)
    try:
        yield await make_template(kvm, factory, "tmpl")
    finally:
        await factory.cleanup()
