"""Memory options of the driver: ``mem_merge`` on the command line and in a real QEMU's mappings
(a QEMU started stopped, ``-S``, with no guest running: its guest RAM mapping is or is not
``MADV_MERGEABLE``, which ``/proc/<pid>/smaps`` shows as the ``mg`` VmFlag)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from cube_vmm_kvm import KvmConfig, KvmPlugin
from cube_vmm_kvm.qemu import QEMU_ENV, MachineSpec, build_argv


def _machine(tmp_path: Path, **kw: object) -> MachineSpec:
    base: dict[str, object] = dict(
        vm_id="vm1", workdir=tmp_path / "vm1", kernel=Path("/k/vmlinux"), append="console=ttyS0",
        memory_mb=64, accel="tcg", cpu_model="qemu64,+arat", ram_file=tmp_path / "vm1.ram",
        ram_shared=False, disk_path=Path("/d/vm1.qcow2"))
    base.update(kw)
    return MachineSpec(**base)  # type: ignore[arg-type]


def _machine_opt(argv: list[str]) -> str:
    return argv[argv.index("-M") + 1]


def test_mem_merge_is_qemus_default_and_written_only_when_off(tmp_path: Path) -> None:
    assert KvmConfig().mem_merge is True
    on = build_argv("qemu", _machine(tmp_path))
    off = build_argv("qemu", _machine(tmp_path, mem_merge=False))
    assert "mem-merge" not in _machine_opt(on)
    assert _machine_opt(off) == _machine_opt(on) + ",mem-merge=off"
    assert [a for a in off if a != _machine_opt(off)] == [a for a in on if a != _machine_opt(on)]


@pytest.mark.parametrize("value", [True, False])
def test_mem_merge_reaches_the_machine_spec(value: bool) -> None:
    driver = KvmPlugin(KvmConfig(accel="tcg", mem_merge=value)).cube_vmm_driver()
    assert driver._machine_extras()["mem_merge"] is value


def _ram_vmflags(pid: int, ram_file: Path) -> list[str]:
    flags: list[str] = []
    in_ram = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split()[0] if line.split() else ""
        if "-" in first and not first.endswith(":"):
            in_ram = line.rstrip().endswith(str(ram_file))
        elif in_ram and first == "VmFlags:":
            flags.extend(line.split()[1:])
    return flags


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")
@pytest.mark.parametrize("mem_merge", [True, False])
def test_mem_merge_marks_guest_ram_mergeable_in_qemu(tmp_path: Path, mem_merge: bool) -> None:
    ram = tmp_path / "vm1.ram"
    with ram.open("wb") as f:
        f.truncate(64 << 20)
    (tmp_path / "vm1" / "sock").mkdir(parents=True)
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\0" * 4096)  # never run: QEMU stays stopped (-S) and is killed
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\0" * 65536)
    argv = build_argv("qemu-system-x86_64", _machine(tmp_path, kernel=kernel, disk_path=disk, disk_format="raw",
                                                     mem_merge=mem_merge, seccomp=False))
    argv = [a for a in argv if a != "-kernel" and a != str(kernel)]
    argv[argv.index("-append"):argv.index("-append") + 2] = []
    proc = subprocess.Popen([*argv, "-S"], env=QEMU_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        flags: list[str] = []
        while time.monotonic() < deadline and proc.poll() is None:
            flags = _ram_vmflags(proc.pid, ram)
            if flags:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[0][-2000:]
        assert flags, "no mapping of the RAM file"
        assert ("mg" in flags) is mem_merge, flags
    finally:
        proc.kill()
        proc.communicate()
