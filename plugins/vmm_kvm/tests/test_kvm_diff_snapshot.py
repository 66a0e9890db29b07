"""Incremental (``diff``) snapshots of clones on real guests: only the pages a clone changed since
its template are saved, and restoring them gives back the running guest (its tmpfs files,
processes and zeroed pages), also along a chain of snapshots and in independent copies.

Under TCG on hosts without usable KVM (nested PVM here); never a faked VM.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from cube_core import VmmError
from cube_storage_cow import CowStorage
from kvm_helpers import TemplateSnapshot, VmFactory, make_template, private_bytes, sha256

from cube_vmm_kvm import KvmVmm, memdiff
from cube_vmm_kvm.memdiff import PAGE

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.asyncio(loop_scope="session")]

ZEROS_MIB = 16
NOISE = "head -c 64M /dev/urandom > /tmp/noise && rm /tmp/noise"


async def sh(driver: KvmVmm, vm, script: str, timeout: float = 60) -> dict:
    out = await driver.guest_call(vm, "exec", {"cmd": ["sh", "-c", script]}, timeout=timeout)
    assert out["exit_code"] == 0, out
    return out


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def noisy_template(kvm: KvmVmm, storage: CowStorage, base_image: Path,
                         guest_kernel: Path) -> AsyncIterator[TemplateSnapshot]:
    """A template whose free memory is full of random bytes (a file of noise written to tmpfs and
    removed before the snapshot), so that pages a clone zeroes differ from their base pages."""
    factory = VmFactory(kvm, storage, base_image, guest_kernel)
    try:
        yield await make_template(kvm, factory, "noisy", before_snapshot=NOISE)
    finally:
        await factory.cleanup()


def zero_pages_over_noise(state_memory: Path, base: Path) -> tuple[int, int]:
    """(pages of the diff that are all zeros, how many of those are not zero in the base file)."""
    index = memdiff.read_index(state_memory)
    zero = bytes(PAGE)
    zeros = over_noise = 0
    with open(state_memory, "rb") as diff, open(base, "rb") as ram:
        diff.seek(index.data_offset)
        for first, count in index.runs:
            for page in range(first, first + count):
                if diff.read(PAGE) == zero:
                    zeros += 1
                    over_noise += os.pread(ram.fileno(), PAGE, page * PAGE) != zero
    return zeros, over_noise


async def test_idle_clone_saves_only_its_changed_pages(kvm: KvmVmm, template: TemplateSnapshot,
                                                       vm_factory: VmFactory) -> None:
    clone = await vm_factory.restore(template.state, "idle", template.disk)
    await kvm.guest_call(clone, "ping", timeout=60)
    await kvm.pause(clone)
    assert clone.pid is not None
    private = private_bytes(clone.pid, template.state.memory_file)
    state, disk = await vm_factory.snapshot(clone, "idle-snap", resume=False)
    assert state.data["format"] == "diff" and state.memory_file.name == "memory.diff"
    assert state.base_state_id == template.state.state_id == state.data["base_state_id"]
    assert state.data["base_memory_file"] == str(template.state.memory_file)
    index = memdiff.read_index(state.memory_file)
    assert index.pages * PAGE == private  # exactly the pages the kernel counts as the clone's own
    assert [e.name for e in index.extras] == ["pc.bios"]
    guest_ram = state.memory_mb << 20
    assert private < guest_ram // 8, (private, guest_ram)
    assert state.memory_file.stat().st_size <= private + (1 << 20)
    assert state.device_state.stat().st_size < 100_000
    await kvm.resume(clone)

    child = await vm_factory.restore(state, "idle-child", disk)
    assert (await kvm.guest_call(child, "ping", timeout=60))["boot_id"] == template.boot_id
    assert child.pid is not None
    owned = private_bytes(child.pid, template.state.memory_file)
    assert index.pages * PAGE <= owned < index.pages * PAGE + (32 << 20)  # + what it wrote since
    assert sha256(template.state.memory_file) == template.memory_sha256


async def test_restore_keeps_tmpfs_files_processes_and_zeroed_pages(kvm: KvmVmm, noisy_template: TemplateSnapshot,
                                                                    vm_factory: VmFactory) -> None:
    t = noisy_template
    src = await vm_factory.restore(t.state, "keep", t.disk)
    out = await sh(kvm, src, "stat -f -c %T /tmp; echo hello-diff > /tmp/hello; "
                             f"dd if=/dev/zero of=/tmp/zeros bs=1M count={ZEROS_MIB} 2>/dev/null; "
                             "setsid sleep 100000 </dev/null >/dev/null 2>&1 & echo $!")
    fstype, pid = out["stdout"].split()
    assert fstype == "tmpfs"
    state, disk = await vm_factory.snapshot(src, "keep-snap")
    assert state.data["format"] == "diff" and state.base_state_id == t.state.state_id
    zeros, over_noise = zero_pages_over_noise(state.memory_file, t.state.memory_file)
    # The zeroed file travels as explicit pages, and most of them cover noise in the base file,
    # so leaving them out (holes) would restore the template's bytes instead.
    assert zeros >= (ZEROS_MIB << 20) // PAGE
    assert over_noise >= (4 << 20) // PAGE, (zeros, over_noise)

    child = await vm_factory.restore(state, "keep-child", disk)
    got = await sh(kvm, child, "cat /tmp/hello; md5sum < /tmp/zeros | cut -d' ' -f1; "
                               f"tr '\\0' ' ' < /proc/{pid}/cmdline; kill -0 {pid} && echo alive")
    hello, digest, *rest = got["stdout"].split()
    assert hello == "hello-diff"
    assert digest == hashlib.md5(bytes(ZEROS_MIB << 20)).hexdigest()
    assert rest[:3] == ["sleep", "100000", "alive"]


async def test_chain_of_diff_snapshots(kvm: KvmVmm, template: TemplateSnapshot, vm_factory: VmFactory) -> None:
    """snapshot → restore → snapshot → restore: every diff stays relative to the template."""
    first = await vm_factory.restore(template.state, "chain0", template.disk)
    await sh(kvm, first, "echo one > /tmp/one")
    s1, d1 = await vm_factory.snapshot(first, "chain-s1")
    second = await vm_factory.restore(s1, "chain1", d1)
    await sh(kvm, second, "echo two > /tmp/two && cat /tmp/one")
    s2, d2 = await vm_factory.snapshot(second, "chain-s2")
    assert s2.data["format"] == "diff"
    assert s2.base_state_id == s1.base_state_id == template.state.state_id
    assert s2.data["base_memory_file"] == str(template.state.memory_file)
    third = await vm_factory.restore(s2, "chain2", d2)
    out = await sh(kvm, third, "cat /tmp/one /tmp/two")
    assert out["stdout"].split() == ["one", "two"]
    assert (await kvm.guest_call(third, "ping", timeout=60))["boot_id"] == template.boot_id


async def test_clones_of_one_diff_snapshot_diverge_independently(kvm: KvmVmm, template: TemplateSnapshot,
                                                                 vm_factory: VmFactory) -> None:
    src = await vm_factory.restore(template.state, "fork", template.disk)
    await sh(kvm, src, "echo shared > /tmp/shared")
    state, disk = await vm_factory.snapshot(src, "fork-snap")
    diff_sha = sha256(state.memory_file)
    x = await vm_factory.restore(state, "fork-x", disk)
    y = await vm_factory.restore(state, "fork-y", disk)
    await sh(kvm, x, "echo from-x > /tmp/mine; echo x > /tmp/shared")
    await sh(kvm, y, "echo from-y > /tmp/mine")
    seen = {name: (await sh(kvm, vm, "cat /tmp/mine /tmp/shared; ls /tmp"))["stdout"].split()
            for name, vm in (("x", x), ("y", y))}
    assert seen["x"][:2] == ["from-x", "x"]
    assert seen["y"][:2] == ["from-y", "shared"]
    at_source = await sh(kvm, src, "cat /tmp/shared; test -e /tmp/mine && echo leak || echo clean")
    assert at_source["stdout"].split() == ["shared", "clean"]
    assert sha256(state.memory_file) == diff_sha  # restoring never writes the snapshot's files
    assert sha256(template.state.memory_file) == template.memory_sha256


async def test_without_its_base_file_a_clone_is_saved_full(kvm: KvmVmm, noisy_template: TemplateSnapshot,
                                                          vm_factory: VmFactory) -> None:
    """Last in this module: it moves the noisy template's RAM file away (and back)."""
    t = noisy_template
    src = await vm_factory.restore(t.state, "nobase", t.disk)
    await sh(kvm, src, "echo kept > /tmp/kept")
    s1, d1 = await vm_factory.snapshot(src, "nobase-s1")
    restored = await vm_factory.restore(s1, "nobase-1", d1)  # its QEMU runs with send-configuration=off
    away = t.state.memory_file.with_name("memory.ram.away")
    os.rename(t.state.memory_file, away)
    try:
        s2, d2 = await vm_factory.snapshot(restored, "nobase-s2")
        assert s2.data["format"] == "full" and s2.base_state_id is None
        assert s2.memory_file == s2.device_state and s2.data["config_section"] is False
        again = await vm_factory.restore(s2, "nobase-2", d2)
        assert (await sh(kvm, again, "cat /tmp/kept"))["stdout"].strip() == "kept"
        with pytest.raises(VmmError, match="gone"):
            await kvm.restore(s1, await vm_factory.spec("nobase-3", d1), None)
    finally:
        os.rename(away, t.state.memory_file)
    later = await vm_factory.restore(s1, "nobase-4", d1)  # the same file again: accepted
    assert (await sh(kvm, later, "cat /tmp/kept"))["stdout"].strip() == "kept"
