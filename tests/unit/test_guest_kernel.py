"""``guest_kernel()``: which script resolves the ``[core] kernel`` setting (stub scripts in a
temporary repo tree; the real kernel/build.sh and kernel/stock.sh are not run here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cube_core import templates
from cube_core.errors import ConfigError, TemplateBuildError


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repo tree whose stock.sh logs its runs to ``calls`` and prints two paths (last line)."""
    root = tmp_path / "repo"
    _script(root / "kernel" / "stock.sh",
            f"echo stock >> {tmp_path}/calls\necho 'preparing...'\necho '/c/stock/vmlinux /c/stock/initrd.cpio.gz'\n")
    monkeypatch.setattr(templates, "REPO_ROOT", root)
    return root


def _calls(repo: Path) -> list[str]:
    calls = repo.parent / "calls"
    return calls.read_text().split() if calls.exists() else []


def test_failing_build_falls_back_to_the_stock_kernel(repo: Path) -> None:
    _script(repo / "kernel" / "build.sh", f"echo build >> {repo.parent}/calls\necho 'no linux-source' >&2\nexit 3\n")
    steps: list[str] = []
    kernel, initrd = templates.guest_kernel("auto", lambda step, fraction: steps.append(step))
    assert (kernel, initrd) == (Path("/c/stock/vmlinux"), Path("/c/stock/initrd.cpio.gz"))
    assert _calls(repo) == ["build", "stock"]
    assert "preparing the stock kernel + initramfs" in steps


def test_successful_build_never_runs_stock(repo: Path) -> None:
    _script(repo / "kernel" / "build.sh", f"echo build >> {repo.parent}/calls\necho '  CC x.o'\necho /c/cube/vmlinux\n")
    assert templates.guest_kernel("auto") == (Path("/c/cube/vmlinux"), None)
    assert _calls(repo) == ["build"]


def test_stock_setting_skips_the_build(repo: Path) -> None:
    _script(repo / "kernel" / "build.sh", f"echo build >> {repo.parent}/calls\necho /c/cube/vmlinux\n")
    assert templates.guest_kernel("stock") == (Path("/c/stock/vmlinux"), Path("/c/stock/initrd.cpio.gz"))
    assert _calls(repo) == ["stock"]


def test_failing_stock_script_is_a_build_error(repo: Path) -> None:
    _script(repo / "kernel" / "build.sh", "exit 3\n")
    _script(repo / "kernel" / "stock.sh", "echo 'apt knows no linux-image-amd64' >&2\nexit 3\n")
    with pytest.raises(TemplateBuildError, match="apt knows no linux-image-amd64"):
        templates.guest_kernel("auto")


def test_explicit_path_and_none(repo: Path, tmp_path: Path) -> None:
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(b"\x7fELF")
    assert templates.guest_kernel(str(vmlinux)) == (vmlinux, None)
    assert templates.guest_kernel("none") == (Path("/dev/null"), None)
    with pytest.raises(ConfigError):
        templates.guest_kernel(str(tmp_path / "missing"))
    assert _calls(repo) == []
