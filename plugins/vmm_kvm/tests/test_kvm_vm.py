"""Real guests: boot, isolation from the host, snapshot → copy-on-write clones, re-attach.

Under TCG on hosts without usable KVM (nested PVM here); never a faked VM.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from cube_bench.restore import restore_bench
from cube_core import GuestTimeoutError, NicHandle, VmmError
from kvm_helpers import (
    CGROUP_PARENT,
    RUN_TOKEN,
    NetnsSlots,
    TemplateSnapshot,
    VmFactory,
    entropy,
    make_template,
    sha256,
    tcp_probe,
)

from cube_vmm_kvm import KvmVmm
from cube_vmm_kvm.cgroup import detect_layout

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.asyncio(loop_scope="session")]

RANDOMNESS = "import os, random; print(os.urandom(8).hex(), random.random())"


async def sh(driver: KvmVmm, vm, script: str, timeout: float = 60) -> dict:
    return await driver.guest_call(vm, "exec", {"cmd": ["sh", "-c", script]}, timeout=timeout)


def kernel_release(vmlinux: Path) -> str:
    """The release the guest kernel was built as (from the config saved next to it)."""
    head = (vmlinux.parent / "config").read_text().splitlines()[:4]
    line = next(line for line in head if "Kernel Configuration" in line)
    return line.split()[2]  # "# Linux/x86_64 6.1.192 Kernel Configuration"


async def test_guest_runs_its_own_kernel(kvm: KvmVmm, template: TemplateSnapshot, guest_kernel: Path) -> None:
    out = await kvm.guest_call(template.vm, "exec", {"cmd": ["uname", "-r"]})
    assert out["exit_code"] == 0
    release = out["stdout"].strip()
    assert release == kernel_release(guest_kernel)
    assert release != os.uname().release
    assert template.vm.isolation == kvm.isolation == kvm.accel.isolation


async def test_guest_cannot_see_host_files_or_processes(kvm: KvmVmm, template: TemplateSnapshot,
                                                        tmp_path: Path) -> None:
    marker = Path("/var/tmp") / f"cube-host-marker-{uuid.uuid4().hex}"  # /var/tmp is on the guest's disk too
    marker.write_text("host only")
    try:
        out = await sh(kvm, template.vm, f"test -e {marker} && echo visible || echo absent; ls /var/tmp /tmp")
        assert out["exit_code"] == 0 and out["stdout"].splitlines()[0] == "absent"
        assert marker.name not in out["stdout"]
        procs = await sh(kvm, template.vm, "cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
        assert "pytest" not in procs["stdout"] and "qemu-system" not in procs["stdout"]
    finally:
        marker.unlink()


async def test_clones_are_independent_and_freed(kvm: KvmVmm, template: TemplateSnapshot,
                                                vm_factory: VmFactory) -> None:
    clones = [await vm_factory.restore(template.state, f"ind{i}", template.disk) for i in range(3)]
    for clone in clones:
        pong = await kvm.guest_call(clone, "ping", timeout=60)
        assert pong["boot_id"] == template.boot_id  # same guest, restored (not rebooted)
        assert clone.isolation == kvm.isolation
    a, b, c = clones
    wrote = await sh(kvm, a, "echo x > /tmp/m && echo y > /root/disk-mark && sync && cat /tmp/m /root/disk-mark")
    assert wrote["stdout"].split() == ["x", "y"]
    for other in (b, c):
        seen = await sh(kvm, other, "ls /tmp/m /root/disk-mark 2>&1; true")
        assert "No such file" in seen["stdout"] and seen["stdout"].count("No such file") == 2, seen
    seen_tmpl = await sh(kvm, template.vm, "test -e /tmp/m || test -e /root/disk-mark && echo leak || echo clean")
    assert seen_tmpl["stdout"].strip() == "clean"

    # Distinct entropy → distinct randomness in fresh and in long-lived interpreters.
    for i, clone in enumerate(clones):
        await kvm.guest_call(clone, "personalize", {
            "sandbox_id": f"sbx{i}", "template_id": "base", "env_vars": {}, "access_token": None,
            "hostname": f"clone{i}", "clock_ns": time.time_ns(), "entropy": entropy(), "metadata": {}}, timeout=60)
    outputs = [(await kvm.guest_call(clone, "exec", {"cmd": ["python3", "-c", RANDOMNESS]}, timeout=60))["stdout"]
               for clone in clones]
    assert len(set(outputs)) == 3, outputs
    assert len({o.split()[0] for o in outputs}) == 3 and len({o.split()[1] for o in outputs}) == 3

    # The template's files never change.
    assert sha256(template.state.memory_file) == template.memory_sha256
    assert sha256(template.state.device_state) == template.state_sha256

    # Kill frees every process, file and cgroup the clone owned (and nothing of the template).
    layout = detect_layout()
    for clone in clones:
        record = clone.data
        pid = clone.pid
        assert pid is not None and Path(f"/proc/{pid}").exists()
        cgroup_dirs = [Path(p) for p in record["cgroup_paths"].values()]
        assert cgroup_dirs and all(str(pid) in (d / "cgroup.procs").read_text().split() for d in cgroup_dirs)
        await kvm.shutdown(clone)
        assert not await kvm.is_alive(clone)
        assert not clone.workdir.exists()
        assert not any(d.exists() for d in cgroup_dirs)
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
        await kvm.shutdown(clone)  # idempotent
    assert template.state.memory_file.exists() and template.state.device_state.exists()
    assert sha256(template.state.memory_file) == template.memory_sha256
    if layout is not None:
        assert not any(list((root / CGROUP_PARENT).glob(f"ind*-{RUN_TOKEN}")) for root in layout.mounts.values())


async def test_cgroup_limits(kvm: KvmVmm, template: TemplateSnapshot, vm_factory: VmFactory) -> None:
    layout = detect_layout()
    if layout is None:
        pytest.skip("this host has no cgroup hierarchy with cpu, memory and pids")
    clone = await vm_factory.restore(template.state, "cg", template.disk)
    paths = {k: Path(v) for k, v in clone.data["cgroup_paths"].items()}
    limit = (template.state.memory_mb + kvm.config.memory_overhead_mb) << 20
    if layout.version == 2:
        assert (paths["memory"] / "memory.max").read_text().strip() == str(limit)
        assert (paths["cpu"] / "cpu.max").read_text().split() == ["100000", "100000"]
        assert (paths["pids"] / "pids.max").read_text().strip() == str(kvm.config.pids_max)
    else:
        assert int((paths["memory"] / "memory.limit_in_bytes").read_text()) == limit
        assert (paths["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "100000"
        assert (paths["cpu"] / "cpu.cfs_period_us").read_text().strip() == "100000"
        assert (paths["pids"] / "pids.max").read_text().strip() == str(kvm.config.pids_max)
    # QEMU's threads are all accounted there (and stay under the limit).
    assert 1 <= int((paths["pids"] / "pids.current").read_text()) <= kvm.config.pids_max
    # a warm-pool member is prepared in the background, and runs at its normal weight once taken
    weight = paths["cpu"] / ("cpu.weight" if layout.version == 2 else "cpu.shares")
    normal = weight.read_text().strip()
    await kvm.set_priority(clone, background=True)
    assert int(weight.read_text()) < int(normal)
    await kvm.set_priority(clone, background=False)
    assert weight.read_text().strip() == normal
    await kvm.shutdown(clone)
    assert not any(p.exists() for p in paths.values())


async def test_pause_stops_the_guest_and_resume_continues(kvm: KvmVmm, template: TemplateSnapshot,
                                                          vm_factory: VmFactory) -> None:
    clone = await vm_factory.restore(template.state, "pause", template.disk)
    before = await kvm.guest_call(clone, "ping", timeout=60)
    await kvm.pause(clone)
    with pytest.raises(GuestTimeoutError):
        await kvm.guest_call(clone, "ping", timeout=1.0)
    await kvm.resume(clone)
    after = await kvm.guest_call(clone, "ping", timeout=30)
    assert after["boot_id"] == before["boot_id"]
    assert after["uptime_s"] >= before["uptime_s"]


async def test_snapshot_of_a_clone_restores(kvm: KvmVmm, template: TemplateSnapshot, vm_factory: VmFactory,
                                            tmp_path: Path) -> None:
    """A clone is saved ``diff`` (its changed pages, see test_kvm_diff_snapshot.py); with
    ``clone_snapshot = "full"`` its whole RAM goes into the migration stream instead."""
    clone = await vm_factory.restore(template.state, "src", template.disk)
    await sh(kvm, clone, "echo from-src > /tmp/carried")
    await kvm.pause(clone)
    state = await kvm.snapshot(clone, tmp_path / "snap")
    disk = await vm_factory.storage.freeze_disk(vm_factory.disks[clone.vm_id], f"src-{RUN_TOKEN}")
    config = kvm.config
    kvm.config = config.model_copy(update={"clone_snapshot": "full"})
    try:
        full = await kvm.snapshot(clone, tmp_path / "full")
    finally:
        kvm.config = config
    await kvm.resume(clone)
    assert state.data["format"] == "diff" and state.base_state_id == template.state.state_id
    assert full.data["format"] == "full" and full.memory_file == full.device_state and full.base_state_id is None
    for name, saved in (("child", state), ("fullchild", full)):
        child = await vm_factory.restore(saved, name, disk.path)
        out = await sh(kvm, child, "cat /tmp/carried")
        assert out["stdout"].strip() == "from-src"
    await vm_factory.storage.delete_snapshot(f"src-{RUN_TOKEN}")


async def test_failed_boot_leaves_nothing_behind(kvm: KvmVmm, vm_factory: VmFactory, tmp_path: Path) -> None:
    spec = await vm_factory.spec("badkernel")
    spec = spec.model_copy(update={"kernel": tmp_path / "no-such-vmlinux"})
    with pytest.raises(VmmError, match="no-such-vmlinux"):
        handle = await kvm.boot(spec, None)
        await kvm.wait_ready(handle, timeout=30)
    assert not (kvm.config.run_dir / spec.vm_id).exists()
    assert not (kvm.config.mem_dir / f"{spec.vm_id}.ram").exists()
    layout = detect_layout()
    if layout is not None:
        assert not any((root / CGROUP_PARENT / spec.vm_id).exists() for root in layout.mounts.values())


async def test_restore_refuses_a_device_mismatch(kvm: KvmVmm, template: TemplateSnapshot,
                                                 vm_factory: VmFactory) -> None:
    nic = NicHandle(slot_id="none", netns=None, tap="cubetap-none", guest_address="169.254.0.21")
    with pytest.raises(VmmError, match="NIC"):
        await kvm.restore(template.state, await vm_factory.spec("mismatch", template.disk), nic)


async def test_driver_restart_reattaches_running_vms(kvm: KvmVmm, template: TemplateSnapshot,
                                                     vm_factory: VmFactory) -> None:
    clones = [await vm_factory.restore(template.state, f"re{i}", template.disk) for i in range(3)]
    marks = {}
    for i, clone in enumerate(clones):
        await sh(kvm, clone, f"echo mark{i} > /tmp/mark")
        marks[clone.vm_id] = f"mark{i}"
    handles = [clone.model_dump(mode="json") for clone in clones]  # what the core persists
    await kvm.close()  # the old node agent goes away; the VMs keep running

    from cube_core import VmHandle

    fresh = KvmVmm(kvm.config)
    await fresh.start()
    try:
        for saved in handles:
            handle = await fresh.reattach(VmHandle.model_validate(saved))
            assert handle.pid == saved["pid"]
            assert await fresh.is_alive(handle)
            out = await sh(fresh, handle, "cat /tmp/mark")
            assert out["stdout"].strip() == marks[handle.vm_id]
        # The reattached VMs can be paused, resumed and stopped by the new driver.
        await fresh.pause(clones[0])
        await fresh.resume(clones[0])
        assert (await fresh.guest_call(clones[0], "ping", timeout=30))["boot_id"] == template.boot_id
    finally:
        await vm_factory.cleanup(fresh)
        await fresh.close()
    # The session driver still works (its connections reopen on demand).
    assert (await kvm.guest_call(template.vm, "ping", timeout=30))["boot_id"] == template.boot_id


async def test_reattach_refuses_a_foreign_pid(kvm: KvmVmm, template: TemplateSnapshot) -> None:
    data = dict(template.vm.data)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        data["pid"] = sleeper.pid
        forged = template.vm.model_copy(update={"pid": sleeper.pid, "data": data})
        with pytest.raises(VmmError, match="not its QEMU"):
            await kvm.reattach(forged)
    finally:
        sleeper.kill()
        sleeper.wait()


async def test_restore_bench_reports_numbers(kvm: KvmVmm, template: TemplateSnapshot,
                                             vm_factory: VmFactory) -> None:
    result = await restore_bench(kvm, template.state, 2, settle_s=0.5, prefix=f"bench-{RUN_TOKEN}",
                                 spec_factory=lambda vm_id: vm_factory.spec(vm_id.removesuffix(f"-{RUN_TOKEN}"),
                                                                            template.disk))
    assert result["n"] == 2
    assert 0 < result["restore_ms_p50"] <= result["answer_ms_p50"] <= result["answer_ms_max"]
    assert result["pss_mib_median"] and result["pss_mib_median"] > 1


@pytest.mark.slow
async def test_twenty_clones(kvm: KvmVmm, template: TemplateSnapshot, vm_factory: VmFactory) -> None:
    clones = [await vm_factory.restore(template.state, f"many{i}", template.disk) for i in range(20)]
    pongs = await asyncio.gather(*(kvm.guest_call(c, "ping", timeout=120) for c in clones))
    assert all(p["boot_id"] == template.boot_id for p in pongs)
    await sh(kvm, clones[0], "echo only-here > /tmp/only")
    seen = await asyncio.gather(*(sh(kvm, c, "cat /tmp/only 2>/dev/null; true", timeout=120) for c in clones[1:]))
    assert all(s["stdout"] == "" for s in seen)
    assert sha256(template.state.memory_file) == template.memory_sha256


# -- networking: the tap opened inside the slot's namespace and passed to QEMU -------------------


@pytest.fixture
def netns_slots():
    slots = NetnsSlots()
    yield slots
    slots.cleanup()


async def test_networked_clones_reach_the_guest(kvm: KvmVmm, vm_factory: VmFactory, netns_slots: NetnsSlots) -> None:
    tmpl = await make_template(kvm, vm_factory, "ntmpl", netns_slots.make("t"))
    try:
        clones = []
        for i in range(2):
            nic = netns_slots.make(f"c{i}")
            clones.append((await vm_factory.restore(tmpl.state, f"net{i}", tmpl.disk, nic), nic))
        for clone, nic in clones:
            await kvm.guest_call(clone, "ping", timeout=60)
            assert tcp_probe(nic.netns or "", 49983) == "open"  # the guest agent's envd port
            assert tcp_probe(nic.netns or "", 9) == "refused"  # the guest kernel answers with a RST
        # The guest also reaches its gateway (the tap's address in its own namespace).
        out = await sh(kvm, clones[0][0], "cat /proc/net/route; ip -4 addr 2>/dev/null || cat /proc/net/fib_trie",
                       timeout=30)
        assert "eth0" in out["stdout"]
    finally:
        await vm_factory.storage.delete_snapshot(vm_factory.vm_id("ntmpl-snap"))


@pytest.mark.kvm
async def test_hardware_kvm_guest(kvm_config, vm_factory: VmFactory) -> None:
    """With real KVM the guest runs accelerated and reports ``kvm`` isolation (skips elsewhere)."""
    from cube_vmm_kvm import detect

    report = detect("auto")
    if not report.kvm_usable:
        pytest.skip(f"needs hardware KVM: {report.reason}")
    driver = KvmVmm(kvm_config.model_copy(update={"accel": "kvm"}))
    await driver.start()
    vm = await driver.boot(await vm_factory.spec("kvm"), None)
    try:
        await driver.wait_ready(vm, timeout=120)
        assert vm.isolation == "kvm"
        out = await driver.guest_call(vm, "exec", {"cmd": ["uname", "-r"]})
        assert out["exit_code"] == 0
    finally:
        await driver.shutdown(vm)
        await driver.close()


CHILD = """
import asyncio, sys
from cube_core import VmSpec, VmState
from cube_vmm_kvm import KvmConfig, KvmVmm

async def main():
    config, state, spec = (sys.stdin.readline() for _ in range(3))
    driver = KvmVmm(KvmConfig.model_validate_json(config))
    await driver.start()
    vm = await driver.restore(VmState.model_validate_json(state), VmSpec.model_validate_json(spec), None)
    await driver.guest_call(vm, "exec", {"cmd": ["sh", "-c", "echo from-child > /tmp/who"]}, timeout=60)
    await driver.close()
    print(vm.model_dump_json())

asyncio.run(main())
"""


async def test_vm_outlives_the_process_that_started_it(kvm: KvmVmm, template: TemplateSnapshot,
                                                       vm_factory: VmFactory) -> None:
    import sys

    from cube_core import VmHandle

    spec = await vm_factory.spec("orphan", template.disk)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    lines = "\n".join(m.model_dump_json() for m in (kvm.config, template.state, spec)) + "\n"
    out, err = await asyncio.wait_for(child.communicate(lines.encode()), 120)
    assert child.returncode == 0, err.decode()[-2000:]
    handle = VmHandle.model_validate_json(out.decode().strip().splitlines()[-1])
    vm_factory.vms.append(handle)  # shut down by the factory
    assert await kvm.is_alive(handle)  # the node-agent process that started it is gone
    handle = await kvm.reattach(handle)
    assert (await sh(kvm, handle, "cat /tmp/who"))["stdout"].strip() == "from-child"
