"""The stock-kernel fallback on real guests: Debian's kernel (extracted by kernel/stock.sh) + the
generated initramfs boots the ``base`` image, cube-init configures eth0 itself (that kernel has no
IP autoconfiguration), and snapshot → clone works with the initrd.

Under TCG on hosts without usable KVM (nested PVM here); never a faked VM. Two VMs in all.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from cube_core import VmHandle, VmmError
from cube_storage_cow import CowStorage
from kvm_helpers import NetnsSlots, TemplateSnapshot, VmFactory, make_template, tcp_probe

from cube_vmm_kvm import KvmVmm
from cube_vmm_kvm.guest_kernel import KERNEL_DIR

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]


@dataclass(frozen=True)
class StockKernel:
    vmlinux: Path
    initrd: Path

    @property
    def release(self) -> str:
        return (self.vmlinux.parent / "release").read_text().strip()


@dataclass
class StockGuest:
    factory: VmFactory
    slots: NetnsSlots
    template: TemplateSnapshot
    netns: str


@pytest.fixture(scope="session")
def stock_kernel() -> StockKernel:
    """kernel/stock.sh: ~15 s the first time (download + extract + initramfs), then from the cache."""
    result = subprocess.run(["bash", str(KERNEL_DIR / "stock.sh")], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.fail(f"kernel/stock.sh failed ({result.returncode}): {result.stderr[-2000:]}")
    vmlinux, initrd = result.stdout.strip().splitlines()[-1].split()
    kernel = StockKernel(Path(vmlinux), Path(initrd))
    assert kernel.vmlinux.is_file() and kernel.initrd.is_file()
    return kernel


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stock_guest(kvm: KvmVmm, storage: CowStorage, base_image: Path,
                      stock_kernel: StockKernel) -> AsyncIterator[StockGuest]:
    """``base`` cold-booted on the stock kernel with a NIC, then snapshotted (it keeps running)."""
    factory = VmFactory(kvm, storage, base_image, stock_kernel.vmlinux, stock_kernel.initrd)
    slots = NetnsSlots()
    try:
        nic = slots.make("stk")
        started = time.monotonic()
        template = await make_template(kvm, factory, "stock", nic)
        print(f"stock kernel: cold boot -> agent ready -> snapshot in {time.monotonic() - started:.1f} s")
        yield StockGuest(factory, slots, template, nic.netns or "")
    except BaseException:
        for vm in factory.vms:
            console = vm.workdir / "console.log"
            if console.exists():
                print(f"--- console of {vm.vm_id} ---\n{console.read_text(errors='replace')[-4000:]}")
        raise
    finally:
        await factory.cleanup()
        slots.cleanup()


async def sh(kvm: KvmVmm, vm: VmHandle, script: str) -> dict[str, Any]:
    return await kvm.guest_call(vm, "exec", {"cmd": ["sh", "-c", script]}, timeout=60)


async def test_stock_kernel_runs_debians_release(kvm: KvmVmm, stock_guest: StockGuest,
                                                 stock_kernel: StockKernel) -> None:
    vm = stock_guest.template.vm
    out = await kvm.guest_call(vm, "exec", {"cmd": ["uname", "-r"]})
    assert out["exit_code"] == 0
    assert out["stdout"].strip() == stock_kernel.release
    assert stock_kernel.release.endswith("-amd64")
    state = await sh(kvm, vm, "cat /proc/modules | cut -d' ' -f1 | sort | tr '\\n' ' '; echo; "
                              "grep ' / ' /proc/mounts; cat /proc/1/comm; readlink /proc/1/exe")
    modules, mounts, init_comm, init_exe = state["stdout"].splitlines()[:4]
    assert {"virtio_mmio", "virtio_blk", "virtio_net", "virtio_console", "ext4"} <= set(modules.split())
    assert mounts.split()[:3] == ["/dev/vda", "/", "ext4"] and mounts.split()[3].startswith("rw")
    assert init_comm == "cube-init"  # switch_root from the initramfs exec'ed the sandbox's init
    assert not init_exe.startswith("/bin/busybox")


async def test_cube_init_configures_eth0_like_the_kernel_would(kvm: KvmVmm, stock_guest: StockGuest) -> None:
    vm = stock_guest.template.vm
    out = await sh(kvm, vm, "ip -4 -o addr show dev eth0; ip route show default")
    assert "inet 169.254.0.21/30" in out["stdout"], out
    assert "default via 169.254.0.22 dev eth0" in out["stdout"], out
    # Reachable from the slot's namespace: the guest's kernel answers (RST for a closed port).
    assert tcp_probe(stock_guest.netns, 9) in ("refused", "open")


async def test_snapshot_clone_on_the_stock_kernel(kvm: KvmVmm, stock_guest: StockGuest,
                                                  stock_kernel: StockKernel) -> None:
    template = stock_guest.template
    assert template.state.initrd == stock_kernel.initrd
    nic = stock_guest.slots.make("stc")
    clone = await stock_guest.factory.restore(template.state, "stock-clone", template.disk, nic)
    pong = await kvm.guest_call(clone, "ping", timeout=60)
    assert pong["boot_id"] == template.boot_id  # restored, not rebooted
    argv = (clone.workdir / "argv").read_text().split("\0")
    assert argv[argv.index("-initrd") + 1] == str(stock_kernel.initrd)
    out = await sh(kvm, clone, "uname -r; echo clone > /tmp/who; cat /tmp/who; ip -4 -o addr show dev eth0")
    lines = out["stdout"].splitlines()
    assert lines[0] == stock_kernel.release and lines[1] == "clone"
    assert "169.254.0.21/30" in lines[2]
    assert tcp_probe(nic.netns or "", 9) in ("refused", "open")
    source = await sh(kvm, template.vm, "cat /tmp/who 2>/dev/null || echo none")
    assert source["stdout"].strip() == "none"


async def test_clone_with_another_initrd_is_refused(kvm: KvmVmm, stock_guest: StockGuest,
                                                    tmp_path: Path) -> None:
    other = tmp_path / "other.cpio.gz"
    other.write_bytes(b"not the snapshot's initramfs")
    spec = await stock_guest.factory.spec("stock-bad")
    with pytest.raises(VmmError, match="initrd"):
        await kvm.restore(stock_guest.template.state, spec.model_copy(update={"initrd": other}), None)
