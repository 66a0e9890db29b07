"""The kvm plugin's ``cube doctor`` checks (no VM: they probe the host the way the driver does)."""

from __future__ import annotations

from pathlib import Path

from cube_vmm_kvm import KvmConfig, KvmPlugin
from cube_vmm_kvm.checks import check_cgroups, check_ksm, check_kvm, check_qemu, check_tun


def _fake_sys(tmp_path: Path, *modules: str) -> Path:
    for module in modules:
        (tmp_path / "sys" / "module" / module).mkdir(parents=True)
    (tmp_path / "dev").mkdir(exist_ok=True)
    return tmp_path


def test_doctor_checks(tmp_path: Path) -> None:
    """The VMM's doctor checks reuse the driver's own probes (accel.detect, detect_layout)."""
    pvm = check_kvm(KvmConfig(), sys_root=_fake_sys(tmp_path / "pvm", "kvm", "kvm_pvm"))
    assert pvm.status == "warn" and "nested PVM" in pvm.detail and "isolation 'tcg'" in pvm.detail
    forced = check_kvm(KvmConfig(accel="kvm"), sys_root=_fake_sys(tmp_path / "forced", "kvm_amd"))
    assert forced.status == "warn" and "warning" in forced.detail
    qemu, tcg = check_qemu("no-such-qemu-binary")
    assert qemu.status == tcg.status == "fail" and "qemu_binary" in qemu.hint
    mounts = tmp_path / "mounts"
    mounts.write_text("proc /proc proc rw 0 0\n")
    assert check_cgroups(KvmConfig(), mounts).status == "fail"  # start() would refuse too
    assert check_cgroups(KvmConfig(cgroups=False), mounts).status == "warn"
    assert check_tun(tmp_path / "no-tun").status == "fail"
    plugin = KvmPlugin(KvmConfig())
    names = [c.name for c in plugin.cube_doctor_checks()]
    assert names == ["qemu", "kvm", "tcg", "cgroups", "tun", "idle_reclaim", "ksm"]


def test_ksm_check_warns_when_guest_pages_of_all_tenants_are_merged(tmp_path: Path) -> None:
    """KSM on and guest RAM mergeable (QEMU's default) merges pages across teams: a warning with
    the two ways out; KSM off, unreadable, or ``mem_merge = false``: nothing is merged."""
    run = tmp_path / "run"
    run.write_text("1\n")
    merged = check_ksm(KvmConfig(), run)
    assert merged.status == "warn" and "mem_merge = false" in merged.hint and "side channel" in merged.detail
    assert check_ksm(KvmConfig(mem_merge=False), run).status == "ok"
    run.write_text("0\n")
    assert check_ksm(KvmConfig(), run).status == "ok"
    assert check_ksm(KvmConfig(), tmp_path / "no-ksm").status == "ok"
