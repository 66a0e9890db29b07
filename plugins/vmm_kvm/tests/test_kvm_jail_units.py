"""The jail without a VM: QEMU's command line and environment, uid leases, what goes into a jail,
mandatory cgroup limits, and the real jailer running a small program (``sleep``) in its jail."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cube_core import ConfigError, DiskHandle, VmmError, VmSpec
from pydantic import ValidationError

from cube_vmm_kvm import KvmConfig, KvmVmm, jail
from cube_vmm_kvm import driver as driver_module
from cube_vmm_kvm.cgroup import CgroupLayout, CgroupLimits, VmCgroup
from cube_vmm_kvm.qemu import QEMU_ENV, SANDBOX, MachineSpec, build_argv, spawn, wait_exit


def _machine(tmp_path: Path, **kw: object) -> MachineSpec:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"k")
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"d")
    base: dict[str, object] = dict(
        vm_id="vm1", workdir=tmp_path / "vm1", kernel=kernel, append="console=ttyS0", memory_mb=256,
        accel="tcg", cpu_model="qemu64", ram_file=tmp_path / "vm1.ram", ram_shared=True, disk_path=disk,
        disk_format="raw")
    base.update(kw)
    return MachineSpec(**base)  # type: ignore[arg-type]


# -- command line and environment ----------------------------------------------------------------


def test_argv_console_is_a_bounded_ring_and_seccomp_denies_everything(tmp_path: Path) -> None:
    m = _machine(tmp_path, console_ring_bytes=1 << 16)
    argv = build_argv("qemu-system-x86_64", m)
    assert "ringbuf,id=console,size=65536" in argv
    assert argv[argv.index("-serial") + 1] == "chardev:console"
    assert not any(a.startswith("file:") for a in argv)  # nothing the guest writes goes to a file
    assert argv[argv.index("-sandbox") + 1] == SANDBOX
    assert SANDBOX == "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    assert "-pidfile" not in argv  # QEMU would write its namespace pid (1) into a file outside its jail
    assert f"unix:{m.workdir}/sock/qmp.sock,server=on,wait=off" in argv
    assert any(f"path={m.workdir}/sock/ctl.sock" in a for a in argv)


def test_argv_readonly_template_ram_only_for_private_mappings(tmp_path: Path) -> None:
    ram = [a for a in build_argv("q", _machine(tmp_path, ram_shared=False, ram_readonly=True))
           if a.startswith("memory-backend-file")]
    assert ram[0].endswith("share=off,readonly=on,rom=off")
    own = [a for a in build_argv("q", _machine(tmp_path, ram_shared=True, ram_readonly=True))
           if a.startswith("memory-backend-file")]
    assert ",readonly=" not in own[0]


def test_qemu_gets_only_its_minimal_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUBE_TEST_SECRET", "hunter2")
    log = tmp_path / "env.log"
    pid = spawn(["/usr/bin/env"], log_path=log, env=QEMU_ENV)
    os.waitpid(pid, 0)
    lines = set(log.read_text().splitlines())
    assert lines == {f"{k}={v}" for k, v in QEMU_ENV.items()}


# -- uid leases ----------------------------------------------------------------------------------


def test_uid_leases_are_unique_reused_and_survive_a_new_driver(tmp_path: Path) -> None:
    leases = jail.UidLeases(tmp_path / "uids", 5000, 5002)
    work = {name: tmp_path / name for name in "abcd"}
    for w in work.values():
        w.mkdir()
    a = leases.allocate("a", work["a"])
    b = leases.allocate("b", work["b"])
    assert (a, b) == (5000, 5001)
    again = jail.UidLeases(tmp_path / "uids", 5000, 5002)  # a restarted node agent
    assert again.allocate("c", work["c"]) == 5002
    with pytest.raises(VmmError, match="no free uid"):
        again.allocate("d", work["d"])
    again.release(a, "not-a")  # only its holder frees a uid
    with pytest.raises(VmmError, match="no free uid"):
        again.allocate("d", work["d"])
    again.release(a, "a")
    assert again.allocate("d", work["d"]) == a
    # A lease whose VM's work directory is gone (the node died without cleaning up) is stale.
    work["b"].rmdir()
    assert again.allocate("e", work["a"]) == b
    assert again.owner(b) == "e"


def test_uid_range_never_includes_root() -> None:
    with pytest.raises(VmmError):
        jail.UidLeases(Path("/nonexistent"), 0, 10)
    with pytest.raises(ValidationError):
        KvmConfig(uid_range=(0, 10))
    with pytest.raises(ValidationError):
        KvmConfig(uid_range=(1000, 2000), jail_group=1500)


# -- what goes into a jail -----------------------------------------------------------------------


def _binds(spec: jail.JailSpec) -> dict[str, bool]:
    return {str(b.dst): b.rw for b in spec.binds}


def test_jail_holds_only_the_vms_files(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * 4096)
    base.chmod(0o644)
    disk = tmp_path / "clone.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(disk)], check=True)
    m = _machine(tmp_path, disk_path=disk, disk_format="qcow2")
    m.kernel.chmod(0o644)
    assert jail.backing_chain(disk, "qcow2") == [base]
    spec = jail.plan(m, qemu_binary="/usr/bin/qemu-system-x86_64", uid=5000, gid=5000, groups=(4999,),
                     root=tmp_path / "root", cgroup_procs=(Path("/sys/fs/cgroup/x/cgroup.procs"),))
    binds = _binds(spec)
    assert binds == {"/usr": False, "/etc/ld.so.cache": False, str(m.kernel): False, str(base): False,
                     str(disk): True, str(m.ram_file): True, str(m.sock_dir): True}
    assert str(m.workdir) not in binds  # vm.json, argv, qemu.log stay out of QEMU's reach
    assert {str(d.path) for d in spec.devices} == {"/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"}
    assert all(not d.owner for d in spec.devices)
    kvm = jail.plan(_machine(tmp_path, accel="kvm"), qemu_binary="/usr/bin/qemu-system-x86_64", uid=5000,
                    gid=5000, groups=(), root=tmp_path / "root") if Path("/dev/kvm").exists() else None
    if kvm is not None:
        (dev_kvm,) = [d for d in kvm.devices if str(d.path) == "/dev/kvm"]
        assert dev_kvm.owner and dev_kvm.mode == 0o600
    # A template's RAM file, mapped privately: read-only where QEMU can open it read-only.
    ro = jail.plan(_machine(tmp_path, ram_shared=False, ram_readonly=True), qemu_binary="/usr/bin/qemu-system-x86_64",
                   uid=5000, gid=5000, groups=(), root=tmp_path / "root")
    assert _binds(ro)[str(tmp_path / "vm1.ram")] is False


def test_unreadable_inputs_get_the_jail_group_read_only(tmp_path: Path) -> None:
    secret = tmp_path / "image"
    secret.write_bytes(b"x")
    secret.chmod(0o600)
    m = _machine(tmp_path, kernel=secret)
    with pytest.raises(VmmError, match="not readable by its jailed QEMU"):
        jail.plan(m, qemu_binary="/usr/bin/qemu-system-x86_64", uid=5000, gid=5000, groups=(4999,), root=tmp_path)
    jail.grant_read(secret, 5000, (4999,), 4999)
    st = secret.stat()
    assert st.st_gid == 4999 and oct(st.st_mode & 0o777) == oct(0o640)
    jail.plan(m, qemu_binary="/usr/bin/qemu-system-x86_64", uid=5000, gid=5000, groups=(4999,), root=tmp_path)


# -- cgroups are mandatory -----------------------------------------------------------------------


def test_limits_that_cannot_be_set_fail_and_leave_nothing(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    layout = CgroupLayout(1, {"cpu": root, "memory": root, "pids": root})
    with pytest.raises(VmmError, match="no blkio controller"):
        VmCgroup.create(layout, "cube", "vm1", CgroupLimits(io_device=(254, 0), io_write_bps=1))
    # A plain directory is no cgroup file system: the limit files cannot be written as expected.
    (root / "cube" / "vm1").mkdir(parents=True)
    (root / "cube" / "vm1" / "cpu.cfs_period_us").mkdir()
    with pytest.raises(VmmError, match="cpu.cfs_period_us"):
        VmCgroup.create(layout, "cube", "vm1", CgroupLimits(memory_bytes=1 << 30))


async def test_a_vm_whose_cgroup_fails_does_not_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = KvmConfig(accel="tcg", run_dir=tmp_path / "run", mem_dir=tmp_path / "mem",
                       uid_lease_dir=tmp_path / "uids", jail_root=tmp_path / "jail", cgroup_parent="cube-unit")
    monkeypatch.setattr(driver_module, "detect_layout", lambda: None)
    with pytest.raises(ConfigError, match="no cgroup hierarchy"):
        await KvmVmm(config).start()
    broken = tmp_path / "not-a-cgroup"
    broken.write_text("")  # a file where the hierarchy should be: mkdir fails
    monkeypatch.setattr(driver_module, "detect_layout",
                        lambda: CgroupLayout(1, {"cpu": broken, "memory": broken, "pids": broken, "blkio": broken}))
    driver = KvmVmm(config)
    await driver.start()
    spawned: list[object] = []
    monkeypatch.setattr(jail, "spawn", lambda *a: spawned.append(a) or 1)
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"k")
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"d")
    spec = VmSpec(vm_id="nocg", kernel=kernel, memory_mb=256,
                  rootfs_disk=DiskHandle(disk_id="nocg", path=disk, format="raw"))
    with pytest.raises(VmmError, match="cgroup"):
        await driver.boot(spec, None)
    assert not spawned
    assert not (config.run_dir / "nocg").exists()
    assert not (tmp_path / "uids").exists() or not list((tmp_path / "uids").iterdir())
    await driver.close()


# -- the jailer itself ---------------------------------------------------------------------------


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


async def test_jailer_runs_a_program_unprivileged_in_its_own_namespaces(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    os.chown(out, 4321, 4321)
    spec = jail.JailSpec(uid=4321, gid=4321, groups=(), root=Path("/run/cube/jail"), hostname="cube-unit",
                         binds=(jail.Bind(Path("/usr"), Path("/usr"), rw=False, dir=True),
                                jail.Bind(out, out, rw=True, dir=True)),
                         devices=(), symlinks=(("/bin", "usr/bin"), ("/lib", "usr/lib"), ("/lib64", "usr/lib64")))
    script = f"id -u > {out}/uid; id -G > {out}/groups; ls -A / > {out}/root; hostname > {out}/host; " \
             f"touch /usr/x 2>{out}/ro; exec sleep 30"
    pid = jail.spawn(spec, ["/usr/bin/sh", "-c", script], tmp_path / "log")
    try:
        deadline = time.monotonic() + 10
        while not (out / "ro").exists() or _status(pid).get("Name") != "sleep":
            assert time.monotonic() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.05)
        status = _status(pid)
        assert (out / "uid").read_text().split() == ["4321"]
        assert (out / "groups").read_text().split() == ["4321"]
        assert set((out / "root").read_text().split()) == {"usr", "bin", "lib", "lib64", "tmp"}
        assert (out / "host").read_text().strip() == "cube-unit"
        assert "Read-only file system" in (out / "ro").read_text()
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[caps], 16) == 0, caps
        assert status["NoNewPrivs"] == "1"
        assert status["NSpid"].split() == [str(pid), "1"]
        for ns in ("mnt", "pid", "ipc", "uts", "net"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
    finally:
        os.kill(pid, signal.SIGKILL)
        await wait_exit(pid, 5)


def test_jailer_passes_only_the_minimal_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUBE_TEST_SECRET", "hunter2")
    spec = jail.JailSpec(uid=4321, gid=4321, groups=(), root=Path("/run/cube/jail"), hostname="x",
                         binds=(jail.Bind(Path("/usr"), Path("/usr"), rw=False, dir=True),),
                         devices=(), symlinks=(("/lib", "usr/lib"), ("/lib64", "usr/lib64")))
    log = tmp_path / "log"
    jail.spawn(spec, ["/usr/bin/env"], log)
    deadline = time.monotonic() + 10
    while len(log.read_text().splitlines()) < len(QEMU_ENV):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.1)
    assert set(log.read_text().splitlines()) == {f"{k}={v}" for k, v in QEMU_ENV.items()}


def test_jailer_refuses_root(tmp_path: Path) -> None:
    spec = jail.JailSpec(uid=0, gid=0, groups=(), root=Path("/run/cube/jail"), hostname="x", binds=(),
                         devices=(), symlinks=())
    with pytest.raises(VmmError, match="never runs as root"):
        jail.spawn(spec, ["/usr/bin/true"], tmp_path / "log")


def test_a_spare_jailer_passes_fds_under_their_numbers_and_an_unused_one_exits(tmp_path: Path) -> None:
    spec = jail.JailSpec(uid=4321, gid=4321, groups=(), root=Path("/run/cube/jail"), hostname="x",
                         binds=(jail.Bind(Path("/usr"), Path("/usr"), rw=False, dir=True),),
                         devices=(), symlinks=(("/bin", "usr/bin"), ("/lib", "usr/lib"), ("/lib64", "usr/lib64")))
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)  # stands for a tap fd opened by the driver
    spare = jail.Jailer.start()
    time.sleep(0.2)  # its interpreter has started: the request is served at once
    try:
        jail.spawn(spec, ["/usr/bin/python3", "-I", "-S", "-c",
                                 f"import os; os.write({write_fd}, b'through-fd-{write_fd}\\n')"], tmp_path / "log",
                   (write_fd,), jailer=spare)
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        assert pipe.read() == f"through-fd-{write_fd}\n", (tmp_path / "log").read_text()
    unused = jail.Jailer.start()
    unused.close()  # EOF: it exits and is reaped
    assert not Path(f"/proc/{unused.pid}").exists()
