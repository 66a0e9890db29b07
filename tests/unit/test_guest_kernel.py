"""``guest_kernel()``: the core resolves ``none`` and paths itself and hands ``auto``/``stock`` to
the VMM driver (the core knows no kernel scripts; the kvm driver's own are tested in
plugins/vmm_kvm/tests/test_kvm_kernel_scripts.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cube_core import templates
from cube_core.errors import ConfigError
from cube_core.testing.fakes import FakeVmm


class KernelVmm(FakeVmm):
    """A VMM whose ``guest_kernel`` records the settings and progress it was handed."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[str, Any]] = []

    def guest_kernel(self, setting: str, progress: Any = None) -> tuple[Path, Path | None]:
        self.asked.append((setting, progress))
        return Path(f"/c/{setting}/vmlinux"), Path(f"/c/{setting}/initrd") if setting == "stock" else None


def test_auto_and_stock_go_to_the_vmm_driver() -> None:
    vmm = KernelVmm()
    steps: list[str] = []

    def progress(step: str, fraction: float | None) -> None:
        steps.append(step)

    assert templates.guest_kernel("auto", vmm, progress) == (Path("/c/auto/vmlinux"), None)
    assert templates.guest_kernel("stock", vmm) == (Path("/c/stock/vmlinux"), Path("/c/stock/initrd"))
    assert vmm.asked == [("auto", progress), ("stock", None)]


def test_explicit_path_and_none_never_ask_the_driver(tmp_path: Path) -> None:
    vmm = KernelVmm()
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(b"\x7fELF")
    assert templates.guest_kernel(str(vmlinux), vmm) == (vmlinux, None)
    assert templates.guest_kernel("none", vmm) == (Path("/dev/null"), None)
    with pytest.raises(ConfigError, match="does not exist"):
        templates.guest_kernel(str(tmp_path / "missing"), vmm)
    assert vmm.asked == []


def test_a_vmm_without_a_kernel_of_its_own_says_so() -> None:
    class Bare(FakeVmm):
        guest_kernel = templates.VmmDriver.guest_kernel  # the contract's default

    with pytest.raises(ConfigError, match="Bare VMM provides no guest kernel; set \\[core\\] kernel"):
        templates.guest_kernel("auto", Bare())


def test_the_fake_vmm_boots_no_kernel() -> None:
    assert templates.guest_kernel("auto", FakeVmm()) == (Path("/dev/null"), None)
