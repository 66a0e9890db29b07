"""``KvmVmm.guest_kernel()``: which of the packaged kernel scripts resolves ``auto``/``stock`` (stub
scripts in a temporary kernel directory; the real build.sh and stock.sh are not run here)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cube_core import ConfigError, TemplateBuildError

from cube_vmm_kvm import KvmConfig, KvmVmm, guest_kernel


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    return path  # not executable: the driver runs the scripts through bash (wheels may drop modes)


@pytest.fixture
def kernel_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A kernel directory whose stock.sh logs its runs to ``calls`` and prints two paths (last line)."""
    root = tmp_path / "kernel"
    _script(root / "stock.sh",
            f"echo stock >> {tmp_path}/calls\necho 'preparing...'\necho '/c/stock/vmlinux /c/stock/initrd.cpio.gz'\n")
    monkeypatch.setattr(guest_kernel, "KERNEL_DIR", root)
    return root


@pytest.fixture
def kvm() -> KvmVmm:
    return KvmVmm(KvmConfig())  # not started: resolving the kernel needs no QEMU


def _calls(kernel_dir: Path) -> list[str]:
    calls = kernel_dir.parent / "calls"
    return calls.read_text().split() if calls.exists() else []


def test_the_scripts_ship_inside_the_package() -> None:
    shipped = guest_kernel.KERNEL_DIR
    assert shipped.parent == Path(guest_kernel.__file__).resolve().parent
    for name in ("build.sh", "stock.sh", "configs/microvm-x86_64.config", "configs/fragments/ci.config",
                 "configs/fragments/debug.config"):
        assert (shipped / name).is_file(), name


def test_failing_build_falls_back_to_the_stock_kernel(kernel_dir: Path, kvm: KvmVmm) -> None:
    _script(kernel_dir / "build.sh", f"echo build >> {kernel_dir.parent}/calls\necho 'no linux-source' >&2\nexit 3\n")
    steps: list[str] = []
    kernel, initrd = kvm.guest_kernel("auto", lambda step, fraction: steps.append(step))
    assert (kernel, initrd) == (Path("/c/stock/vmlinux"), Path("/c/stock/initrd.cpio.gz"))
    assert _calls(kernel_dir) == ["build", "stock"]
    assert "preparing the stock kernel + initramfs" in steps


def test_successful_build_never_runs_stock(kernel_dir: Path, kvm: KvmVmm) -> None:
    _script(kernel_dir / "build.sh",
            f"echo build >> {kernel_dir.parent}/calls\necho '  CC x.o'\necho /c/cube/vmlinux\n")
    assert kvm.guest_kernel("auto") == (Path("/c/cube/vmlinux"), None)
    assert _calls(kernel_dir) == ["build"]


def test_stock_setting_skips_the_build(kernel_dir: Path, kvm: KvmVmm) -> None:
    _script(kernel_dir / "build.sh", f"echo build >> {kernel_dir.parent}/calls\necho /c/cube/vmlinux\n")
    assert kvm.guest_kernel("stock") == (Path("/c/stock/vmlinux"), Path("/c/stock/initrd.cpio.gz"))
    assert _calls(kernel_dir) == ["stock"]


def test_failing_stock_script_is_a_build_error(kernel_dir: Path, kvm: KvmVmm) -> None:
    _script(kernel_dir / "build.sh", "exit 3\n")
    _script(kernel_dir / "stock.sh", "echo 'apt knows no linux-image-amd64' >&2\nexit 3\n")
    with pytest.raises(TemplateBuildError, match="apt knows no linux-image-amd64"):
        kvm.guest_kernel("auto")


def test_missing_build_script_falls_back_and_unknown_settings_are_refused(kernel_dir: Path, kvm: KvmVmm) -> None:
    assert kvm.guest_kernel("auto") == (Path("/c/stock/vmlinux"), Path("/c/stock/initrd.cpio.gz"))
    with pytest.raises(ConfigError, match="'auto', 'stock' or a vmlinux path"):
        kvm.guest_kernel("latest")
