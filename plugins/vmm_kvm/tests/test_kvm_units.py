"""Pieces of the driver that need no guest: config, command line, accelerator choice, records,
sparse copies, cgroup layout detection and the control-channel client (against a socket server)."""

from __future__ import annotations

import asyncio
import json
import os
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from cube_bench.restore import percentile
from cube_core import GuestTimeoutError, VmmError
from pydantic import ValidationError

from cube_vmm_kvm import KvmConfig, KvmPlugin, KvmVmm, detect
from cube_vmm_kvm.accel import host_tsc_khz, probe_kvm
from cube_vmm_kvm.cgroup import CgroupLayout, CgroupLimits, VmCgroup, detect_layout
from cube_vmm_kvm.control import ControlChannel, GuestCallError
from cube_vmm_kvm.persist import SnapshotRecord, VmRecord, record_from_data, restore, save, snapshot_from_data
from cube_vmm_kvm.qemu import MachineSpec, build_argv, check_vm_id
from cube_vmm_kvm.reclaim import process_cpu_s
from cube_vmm_kvm.snapshot import copy_sparse

# -- config and plugin ---------------------------------------------------------------------------


def test_config_rejects_unknown_options() -> None:
    with pytest.raises(ValidationError):
        KvmConfig.model_validate({"accel": "tcg", "no_such_option": 1})
    with pytest.raises(ValidationError):
        KvmConfig.model_validate({"accel": "hvf"})
    assert KvmConfig().pic is True  # pic=off breaks guest timers under TCG (measured)


def test_entry_point_and_plugin_wiring() -> None:
    (ep,) = [ep for ep in entry_points(group="cube.vmm") if ep.name == "kvm"]
    assert ep.load() is KvmPlugin
    plugin = KvmPlugin(KvmConfig(accel="tcg"))
    driver = plugin.cube_vmm_driver()
    assert isinstance(driver, KvmVmm)
    assert driver.isolation == "tcg"
    assert {"snapshot", "pause", "reattach"} <= driver.capabilities


# -- command line --------------------------------------------------------------------------------


def _machine(tmp_path: Path, **kw: object) -> MachineSpec:
    base: dict[str, object] = dict(
        vm_id="vm1", workdir=tmp_path / "vm1", kernel=Path("/k/vmlinux"), append="console=ttyS0 quiet",
        memory_mb=256, accel="tcg", cpu_model="qemu64,+arat", ram_file=Path("/dev/shm/cube/vm1.ram"),
        ram_shared=True, disk_path=Path("/d/vm1.qcow2"))
    base.update(kw)
    return MachineSpec(**base)  # type: ignore[arg-type]


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_argv_cold_boot(tmp_path: Path) -> None:
    argv = build_argv("qemu-system-x86_64", _machine(tmp_path))
    assert _opt(argv, "-M") == ["microvm,x-option-roms=off,acpi=off,memory-backend=mem,pic=on"]
    assert _opt(argv, "-accel") == ["tcg,tb-size=32"]
    assert _opt(argv, "-object") == ["memory-backend-file,id=mem,size=256M,mem-path=/dev/shm/cube/vm1.ram,share=on"]
    assert _opt(argv, "-sandbox") == ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    assert "-incoming" not in argv and "-netdev" not in argv and "-daemonize" not in argv
    assert "virtserialport,chardev=ctl,name=cube.ctl" in argv
    assert "virtio-rng-device" in argv
    assert _opt(argv, "-name") == ["guest=cube-vm1"]
    assert _opt(argv, "-smp") == ["1"]


def test_argv_clone_with_nic(tmp_path: Path) -> None:
    m = _machine(tmp_path, ram_shared=False, incoming=True, tap_fd=7, guest_mac="52:54:00:00:00:21", pic=False,
                 accel="kvm", cpu_model="host")
    argv = build_argv("qemu", m)
    assert _opt(argv, "-object")[0].endswith("share=off")
    assert _opt(argv, "-incoming") == ["defer"]
    assert _opt(argv, "-netdev") == ["tap,id=n0,fd=7"]  # no vnet_hdr= with fd=
    assert _opt(argv, "-device")[-1] == "virtio-net-device,netdev=n0,mac=52:54:00:00:00:21"
    assert _opt(argv, "-accel") == ["kvm"]
    assert _opt(argv, "-M")[0].endswith("pic=off")


def test_argv_stock_kernel_has_initrd_and_acpi(tmp_path: Path) -> None:
    plain = build_argv("qemu", _machine(tmp_path))
    assert "-initrd" not in plain and "acpi=off" in _opt(plain, "-M")[0]
    argv = build_argv("qemu", _machine(tmp_path, initrd=Path("/k/initrd.cpio.gz")))
    assert _opt(argv, "-initrd") == ["/k/initrd.cpio.gz"]
    assert _opt(argv, "-M") == ["microvm,x-option-roms=off,acpi=on,memory-backend=mem,pic=on"]
    assert argv.index("-initrd") == argv.index("-kernel") + 2
    rest = [a.replace("acpi=on", "acpi=off") for a in argv if a not in ("-initrd", "/k/initrd.cpio.gz")]
    assert rest == plain  # nothing else changes


def test_argv_escapes_commas(tmp_path: Path) -> None:
    argv = build_argv("qemu", _machine(tmp_path, disk_path=Path("/d/a,b.qcow2")))
    assert _opt(argv, "-drive")[0].startswith("if=none,id=root,file=/d/a,,b.qcow2,format=qcow2")


def test_process_cpu_seconds() -> None:
    """What the idle tracker (KvmVmm.activity, idle reclaim) compares between readings: this process's
    CPU time grows with work; a pid that does not exist has none."""
    before = process_cpu_s(os.getpid())
    assert before is not None
    while (process_cpu_s(os.getpid()) or 0) < before + 0.05:
        sum(i * i for i in range(10_000))
    assert process_cpu_s(2 ** 22 + 1) is None  # above pid_max's ceiling: never a process


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "a,b", "-x", "x" * 200, "a b"])
def test_vm_id_is_checked(bad: str) -> None:
    with pytest.raises(VmmError):
        check_vm_id(bad)


# -- accelerator ---------------------------------------------------------------------------------


def _fake_sys(tmp_path: Path, *modules: str) -> Path:
    for module in modules:
        (tmp_path / "sys" / "module" / module).mkdir(parents=True)
    (tmp_path / "dev").mkdir(exist_ok=True)
    return tmp_path


def test_accel_auto_refuses_nested_pvm(tmp_path: Path) -> None:
    root = _fake_sys(tmp_path, "kvm", "kvm_pvm")
    report = detect("auto", sys_root=root)
    assert (report.accel, report.isolation, report.kvm_usable) == ("tcg", "tcg", False)
    assert "PVM" in report.reason and "cannot run a stock guest" in report.reason


def test_accel_auto_needs_a_usable_device(tmp_path: Path) -> None:
    root = _fake_sys(tmp_path, "kvm", "kvm_intel")  # no dev/kvm in the fake tree
    usable, why = probe_kvm(root)
    assert not usable and "cannot be opened" in why
    assert detect("auto", sys_root=root).accel == "tcg"


def test_accel_explicit_choices(tmp_path: Path) -> None:
    root = _fake_sys(tmp_path, "kvm_amd")
    assert detect("tcg", sys_root=root).isolation == "tcg"
    forced = detect("kvm", sys_root=root)
    assert forced.accel == "kvm" and "warning" in forced.reason


def test_accel_on_this_host_matches_the_modules() -> None:
    report = detect("auto")
    if Path("/sys/module/kvm_pvm").exists() or not any(
            Path(f"/sys/module/{m}").exists() for m in ("kvm_intel", "kvm_amd")):
        assert report.accel == "tcg" and report.isolation == "tcg"
    assert report.isolation == report.accel


def test_host_tsc_khz(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\ncpu MHz\t\t: 2445.406\n")
    assert host_tsc_khz(cpuinfo) == 2445406
    cpuinfo.write_text("processor\t: 0\n")
    assert host_tsc_khz(cpuinfo) == 0


# -- records -------------------------------------------------------------------------------------


def _record(tmp_path: Path) -> VmRecord:
    return VmRecord(vm_id="vm1", pid=123, workdir=tmp_path, qmp_socket=tmp_path / "qmp.sock",
                    ctl_socket=tmp_path / "ctl.sock", console_log=tmp_path / "console.log",
                    ram_file=tmp_path / "vm1.ram", ram_shared=True, ram_owned=True, accel="tcg", isolation="tcg",
                    memory_mb=256, cpu_count=1, kernel=Path("/k"), append="quiet", cpu_model="qemu64",
                    pic=True, has_nic=False, cgroup_version=1, cgroup_paths={"cpu": Path("/sys/fs/cgroup/cpu/x")})


def test_record_roundtrip(tmp_path: Path) -> None:
    record = _record(tmp_path)
    assert restore(Path(save(record)).parent) == record
    assert record_from_data(json.loads(json.dumps(record.model_dump(mode="json")))) == record


def test_record_rejects_other_schema_versions(tmp_path: Path) -> None:
    data = _record(tmp_path).model_dump(mode="json")
    data["schema_version"] = 99
    with pytest.raises(VmmError, match="schema_version"):
        record_from_data(data)
    snap = SnapshotRecord(format="shared", accel="tcg", append="", cpu_model="qemu64", pic=True, has_nic=False)
    assert snapshot_from_data(snap.model_dump(mode="json")) == snap
    with pytest.raises(VmmError):
        snapshot_from_data({"schema_version": 1, "format": "weird"})


# -- sparse copy ---------------------------------------------------------------------------------


def test_copy_sparse_keeps_content_and_holes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    size = 64 << 20
    with open(src, "wb") as f:
        f.truncate(size)
        for offset in (0, 5 << 20, 40 << 20):
            f.seek(offset)
            f.write(os.urandom(300_000))
    dst = tmp_path / "dst"
    copied = copy_sparse(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_size == size
    assert dst.stat().st_blocks * 512 < 8 << 20  # holes stayed holes
    assert 900_000 <= copied <= 8 << 20


# -- cgroups -------------------------------------------------------------------------------------


def test_cgroup_layout_detection(tmp_path: Path) -> None:
    v2 = tmp_path / "unified"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    mounts = tmp_path / "mounts"
    mounts.write_text(f"cgroup2 {v2} cgroup2 rw,nosuid 0 0\n")
    layout = detect_layout(mounts)
    assert layout is not None and layout.version == 2 and set(layout.mounts.values()) == {v2}

    (v2 / "cgroup.controllers").write_text("")  # v2 mounted but its controllers are bound to v1
    mounts.write_text(f"cgroup2 {v2} cgroup2 rw 0 0\n"
                      "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0\n"
                      "cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n"
                      "cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0\n")
    layout = detect_layout(mounts)
    assert layout is not None and layout.version == 1
    assert layout.mounts == {"cpu": Path("/sys/fs/cgroup/cpu,cpuacct"), "memory": Path("/sys/fs/cgroup/memory"),
                             "pids": Path("/sys/fs/cgroup/pids")}
    mounts.write_text("proc /proc proc rw 0 0\n")
    assert detect_layout(mounts) is None


@pytest.mark.parametrize(("version", "file", "background", "normal"),
                         [(2, "cpu.weight", "1", "100"), (1, "cpu.shares", "10", "1024")])
def test_cgroup_cpu_weight_for_a_background_vm(tmp_path: Path, version: int, file: str, background: str,
                                               normal: str) -> None:
    """A warm-pool member is prepared at the lowest weight (``set_priority(background=True)``) and
    gets the configured one back when a create takes it: the cgroup file each version reads."""
    from cube_vmm_kvm.driver import BACKGROUND_CPU_WEIGHT

    group = VmCgroup(version, {"cpu": tmp_path})  # type: ignore[arg-type]
    group.set_cpu_weight(BACKGROUND_CPU_WEIGHT)
    assert (tmp_path / file).read_text() == background
    group.set_cpu_weight(100)
    assert (tmp_path / file).read_text() == normal


# -- control channel -----------------------------------------------------------------------------


class FakeAgent:
    """A unix-socket server speaking the guest side of the protocol (answers out of order)."""

    def __init__(self, path: Path, *, send_ready: bool = False, delay: dict[str, float] | None = None) -> None:
        self.path = path
        self.send_ready = send_ready
        self.delay = delay or {}
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.requests: list[dict[str, object]] = []

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        if self.send_ready:
            writer.write(b'{"event": "ready", "boot_id": "b-ready"}\n')
        # A reply for a request this connection never saw must be ignored by the host.
        writer.write(b'{"id": 999999, "ok": true}\n')
        while line := await reader.readline():
            request = json.loads(line)
            self.requests.append(request)
            asyncio.ensure_future(self._answer(writer, request))

    async def _answer(self, writer: asyncio.StreamWriter, request: dict[str, object]) -> None:
        op = str(request["op"])
        await asyncio.sleep(self.delay.get(op, 0))
        if op == "ping":
            reply: dict[str, object] = {"id": request["id"], "ok": True, "boot_id": "b1", "uptime_s": 1.0}
        elif op in ("echo", "slow"):
            reply = {"id": request["id"], "ok": True, "value": request.get("value")}
        else:
            reply = {"id": request["id"], "ok": False, "error": f"unknown op {op!r}"}
        writer.write(json.dumps(reply).encode() + b"\n")

    async def drop_clients(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers.clear()

    async def stop(self) -> None:
        await self.drop_clients()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_control_multiplexes_concurrent_calls(tmp_path: Path) -> None:
    agent = FakeAgent(tmp_path / "ctl.sock", delay={"slow": 0.3})
    await agent.start()
    channel = ControlChannel("vm1", agent.path)
    try:
        slow = asyncio.ensure_future(channel.call("slow", {"value": "late"}, timeout=5))
        fast = [asyncio.ensure_future(channel.call("echo", {"value": i}, timeout=5)) for i in range(20)]
        results = await asyncio.gather(*fast)
        assert [r["value"] for r in results] == list(range(20))
        assert not slow.done()  # answered later, out of order
        assert (await slow)["value"] == "late"
        with pytest.raises(GuestCallError, match="unknown op"):
            await channel.call("nope", timeout=5)
    finally:
        await channel.close()
        await agent.stop()


async def test_control_reconnects_after_the_connection_drops(tmp_path: Path) -> None:
    agent = FakeAgent(tmp_path / "ctl.sock", delay={"slow": 5})
    await agent.start()
    channel = ControlChannel("vm1", agent.path)
    try:
        pending = asyncio.ensure_future(channel.call("slow", timeout=10))
        await asyncio.sleep(0.1)
        await agent.drop_clients()
        with pytest.raises(VmmError, match="lost"):
            await pending
        assert (await channel.call("echo", {"value": "again"}, timeout=5))["value"] == "again"
        assert len(agent.writers) == 1  # a new connection
    finally:
        await channel.close()
        await agent.stop()


async def test_wait_ready_pings_when_the_ready_event_was_missed(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    channel = ControlChannel("vm1", path)
    waiter = asyncio.ensure_future(channel.wait_ready(timeout=10))
    await asyncio.sleep(0.3)  # the socket does not exist yet: wait_ready keeps retrying
    assert not waiter.done()
    agent = FakeAgent(path)
    await agent.start()
    try:
        ready = await waiter
        assert ready == {"event": "ready", "boot_id": "b1", "uptime_s": 1.0}
    finally:
        await channel.close()
        await agent.stop()


class ForgetfulAgent(FakeAgent):
    """Drops the first requests of each connection, like a guest port that is being reopened."""

    def __init__(self, path: Path, forget: int) -> None:
        super().__init__(path)
        self.forget = forget

    async def _answer(self, writer: asyncio.StreamWriter, request: dict[str, object]) -> None:
        if self.forget > 0:
            self.forget -= 1
            return
        await super()._answer(writer, request)


async def test_handshake_resends_lost_pings(tmp_path: Path) -> None:
    agent = ForgetfulAgent(tmp_path / "ctl.sock", forget=3)
    await agent.start()
    channel = ControlChannel("vm1", agent.path)
    try:
        reply = await channel.call("echo", {"value": 1}, timeout=5)
        assert reply["value"] == 1
        ops = [r["op"] for r in agent.requests]
        assert ops[:4] == ["ping"] * 4 and ops[-1] == "echo"
    finally:
        await channel.close()
        await agent.stop()


async def test_wait_ready_accepts_the_ready_event(tmp_path: Path) -> None:
    agent = FakeAgent(tmp_path / "ctl.sock", send_ready=True, delay={"ping": 5})
    await agent.start()
    channel = ControlChannel("vm1", agent.path)
    try:
        ready = await channel.wait_ready(timeout=10)
        assert ready["boot_id"] == "b-ready"
    finally:
        await channel.close()
        await agent.stop()


async def test_call_times_out(tmp_path: Path) -> None:
    agent = FakeAgent(tmp_path / "ctl.sock", delay={"slow": 5})
    await agent.start()
    channel = ControlChannel("vm1", agent.path)
    try:
        with pytest.raises(GuestTimeoutError):
            await channel.call("slow", timeout=0.3)
        # A guest that never answers the handshake times out too.
        mute = FakeAgent(tmp_path / "mute.sock", delay={"ping": 5})
        await mute.start()
        mute_channel = ControlChannel("vm2", mute.path)
        with pytest.raises(GuestTimeoutError):
            await mute_channel.call("echo", timeout=0.3)
        await mute_channel.close()
        await mute.stop()
    finally:
        await channel.close()
        await agent.stop()


def test_percentile() -> None:
    assert percentile([5.0], 95) == 5.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 95) == 95.0
    assert percentile([3.0, 1.0, 2.0], 100) == 3.0


def test_cgroup_v2_files(tmp_path: Path) -> None:
    """The v2 file names and values, on a stand-in tree (this host's cgroup2 has no controllers)."""
    root = tmp_path / "cg2"
    root.mkdir()
    (root / "cgroup.subtree_control").write_text("")
    (root / "cube").mkdir()
    (root / "cube" / "cgroup.subtree_control").write_text("")
    layout = CgroupLayout(2, {c: root for c in ("cpu", "memory", "pids")})
    group = VmCgroup.create(layout, "cube", "vm1", CgroupLimits(cpu_quota_us=150_000, cpu_period_us=100_000,
                                                                memory_bytes=300 << 20, pids_max=64))
    d = root / "cube" / "vm1"
    assert group.dirs == [d]
    assert (d / "cpu.max").read_text() == "150000 100000"
    assert (d / "memory.max").read_text() == str(300 << 20)
    assert (d / "pids.max").read_text() == "64"
    assert (root / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    group.apply(CgroupLimits())
    assert (d / "cpu.max").read_text() == "max 100000"
    assert (d / "memory.max").read_text() == "max"


@pytest.mark.root
def test_cgroup_on_this_host() -> None:
    """A real per-VM cgroup: limits written, a process moved in, removed after it exits."""
    layout = detect_layout()
    if layout is None:
        pytest.skip("no cgroup hierarchy with cpu, memory and pids on this host")
    import subprocess

    name = f"unit-{os.getpid()}"
    group = VmCgroup.create(layout, "cube-test", name, CgroupLimits(cpu_quota_us=50_000, memory_bytes=64 << 20,
                                                                    pids_max=32))
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        group.add_pid(sleeper.pid)
        assert sleeper.pid in group.pids()
        memory_file = "memory.max" if layout.version == 2 else "memory.limit_in_bytes"
        assert int(group.paths["memory"].joinpath(memory_file).read_text()) == 64 << 20
    finally:
        sleeper.kill()
        sleeper.wait()
    group.remove()
    assert not group.exists()
    group.remove()  # idempotent


def test_argv_volume_slots_come_last_with_their_serials(tmp_path: Path) -> None:
    from cube_core import VOLUME_DEVICE_BYTES

    m = _machine(tmp_path, tap_fd=7, volume_drives=((Path("/v/a.ext4"), False), (Path("/v/b,c.ext4"), True),
                                                    (None, False)))
    argv = build_argv("qemu", m)
    devices = _opt(argv, "-device")
    assert devices[-3:] == ["virtio-blk-device,drive=vol0,serial=cube-vol0",
                            "virtio-blk-device,drive=vol1,serial=cube-vol1",
                            "virtio-blk-device,drive=vol2,serial=cube-vol2"]
    assert devices[0] == "virtio-blk-device,drive=root"  # the root disk stays the first (vda)
    assert _opt(argv, "-drive")[1:] == ["if=none,id=vol0,file=/v/a.ext4,format=raw,cache=writeback",
                                        "if=none,id=vol1,file=/v/b,,c.ext4,format=raw,cache=writeback,readonly=on",
                                        f"if=none,id=vol2,driver=null-co,size={VOLUME_DEVICE_BYTES},read-zeroes=on"]


def test_volume_drives_fill_free_slots_with_null_placeholders(tmp_path: Path) -> None:
    from cube_core import VOLUME_DEVICE_BYTES, DiskHandle, VmmError

    from cube_vmm_kvm.driver import volume_drives

    image = tmp_path / "vol.ext4"
    with open(image, "wb") as fh:
        fh.truncate(VOLUME_DEVICE_BYTES)
    vol = DiskHandle(disk_id="v", path=image, format="raw", readonly=True)
    assert volume_drives("vm1", [vol], 3) == ((image, True), (None, False), (None, False))
    assert volume_drives("vm0", [], 2) == ((None, False), (None, False))
    assert list(tmp_path.iterdir()) == [image]  # no placeholder file: nothing for a guest to fill
    with pytest.raises(VmmError, match="2 volume slots"):
        volume_drives("vm2", [vol, vol, vol], 2)
    small = DiskHandle(disk_id="s", path=tmp_path / "small", format="raw")
    small.path.write_bytes(b"x")
    with pytest.raises(VmmError, match="not a raw"):
        volume_drives("vm3", [small], 2)


@pytest.mark.parametrize(("setting", "accel", "aslr"), [
    ("auto", "tcg", False), ("auto", "kvm", True), ("on", "tcg", True), ("off", "kvm", False)])
def test_guest_aslr_is_off_under_tcg_by_default(tmp_path: Path, setting: str, accel: str, aslr: bool) -> None:
    vmm = KvmVmm(KvmConfig.model_validate({"guest_aslr": setting}))
    vmm._accel = detect(accel, sys_root=_fake_sys(tmp_path, "kvm_intel"))
    assert vmm.guest_aslr is aslr
