"""The guest kernel for the ``[core] kernel`` settings ``auto`` and ``stock``.

The kernel config, its fragments and the two scripts ship inside this package (``kernel/``,
package data), so an installed wheel builds the same kernel as a checkout: ``kernel/build.sh``
builds (or reuses from ``/var/cache/cube/kernel/<key>``) the Cube kernel; ``kernel/stock.sh``
prepares Debian's stock kernel + a generated initramfs, the fallback when the build is impossible.
The scripts' cache keys hash their own contents, never their location.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import structlog
from cube_core import ConfigError, Progress, TemplateBuildError

log = structlog.get_logger(__name__)

KERNEL_DIR = Path(__file__).resolve().parent / "kernel"


def resolve(setting: str, progress: Progress | None = None) -> tuple[Path, Path | None]:
    """(vmlinux, initrd or None) for ``auto`` (build/reuse the Cube kernel; if that build is
    impossible, fall back to the stock kernel) or ``stock`` (that fallback only)."""
    if setting == "stock":
        return stock_kernel(progress)
    if setting != "auto":
        raise ConfigError(f"kernel {setting!r}: the kvm VMM knows 'auto', 'stock' or a vmlinux path")
    try:
        return build_kernel(progress), None
    except (TemplateBuildError, ConfigError) as exc:
        log.warning("guest kernel build impossible; falling back to the stock kernel", error=str(exc))
        return stock_kernel(progress)


def stock_kernel(progress: Progress | None = None) -> tuple[Path, Path]:
    """Debian's stock kernel (extracted vmlinux) + a generated initramfs, by kernel/stock.sh."""
    script = KERNEL_DIR / "stock.sh"
    if progress:
        progress("preparing the stock kernel + initramfs", None)
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    if result.returncode != 0:
        raise TemplateBuildError(template="kernel", reason=f"kernel/stock.sh failed: {result.stderr[-2000:]}")
    vmlinux, initrd = result.stdout.strip().splitlines()[-1].split()
    return Path(vmlinux), Path(initrd)


def build_kernel(progress: Progress | None = None) -> Path:
    """The Cube guest kernel, built (or reused from the cache) by kernel/build.sh."""
    script = KERNEL_DIR / "build.sh"
    if not script.is_file():
        raise ConfigError(f"kernel = 'auto' needs {script}; set [core] kernel to a vmlinux path")
    last, compiled = "", 0
    with subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            last = line.strip()
            if line.lstrip().startswith(("CC ", "LD ", "AR ", "AS ")):
                compiled += 1
                if progress:
                    progress("building guest kernel", min(0.99, compiled / 1400))
    if proc.returncode != 0:
        raise TemplateBuildError(template="kernel", reason=f"kernel/build.sh failed: {last}")
    if progress:
        progress("guest kernel ready", 1.0)
    return Path(last)
