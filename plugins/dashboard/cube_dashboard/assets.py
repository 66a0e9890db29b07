"""The chart library (npm's ``uplot``), fetched with the host's ``npm`` from the npm registry once
and kept under ``<cache>/npm/`` by its content hash: no JavaScript build step, nothing vendored.

``npm pack`` downloads the pinned tarball; its sha512 must equal :data:`INTEGRITY` (the registry's
``dist.integrity``) or it is refused. The two files the dashboard serves are unpacked into
``<cache>/npm/uplot-<sha512 prefix>/``; a later start finds them there and fetches nothing.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from pathlib import Path
from typing import Final

import structlog

log = structlog.get_logger(__name__)

PACKAGE: Final = "uplot@1.6.32"
INTEGRITY: Final = "sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGGzQm/ep3tOkyTxpiQIw=="
FILES: Final = {"uplot.js": "package/dist/uPlot.iife.min.js", "uplot.css": "package/dist/uPlot.min.css"}
"""Served name -> path in the npm tarball."""


class AssetError(RuntimeError):
    """The chart library could not be fetched or did not match its pinned hash."""


def asset_dir(cache: Path) -> Path:
    digest = base64.b64decode(INTEGRITY.removeprefix("sha512-")).hex()
    return cache / "npm" / f"uplot-{digest[:24]}"


_lock = threading.Lock()


def ensure(cache: Path) -> Path:
    """The directory holding :data:`FILES` (fetched first when missing); blocking."""
    target = asset_dir(cache)
    if all((target / name).is_file() for name in FILES):
        return target
    with _lock:
        if all((target / name).is_file() for name in FILES):
            return target
        npm = shutil.which("npm")
        if npm is None:
            raise AssetError("npm is not installed (scripts/apt-packages.txt names it): the dashboard's charts need it "
                             "once, to fetch " + PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".uplot-") as tmp:
            env = {**os.environ, "HOME": tmp, "npm_config_update_notifier": "false"}
            out = subprocess.run([npm, "pack", PACKAGE, "--pack-destination", tmp, "--silent"], cwd=tmp, env=env,
                                 capture_output=True, text=True, timeout=120)
            if out.returncode != 0:
                raise AssetError(f"npm pack {PACKAGE} failed ({out.returncode}): {out.stderr.strip()[-500:]}")
            tgz = next(Path(tmp).glob("*.tgz"), None)
            if tgz is None:
                raise AssetError(f"npm pack {PACKAGE} wrote no tarball")
            got = "sha512-" + base64.b64encode(hashlib.sha512(tgz.read_bytes()).digest()).decode()
            if got != INTEGRITY:
                raise AssetError(f"{PACKAGE}: sha512 {got} is not the pinned {INTEGRITY}")
            staging = Path(tmp) / "out"
            staging.mkdir()
            with tarfile.open(tgz) as tar:
                for name, member in FILES.items():
                    source = tar.extractfile(member)
                    if source is None:
                        raise AssetError(f"{PACKAGE} has no {member}")
                    (staging / name).write_bytes(source.read())
            staging.chmod(0o755)
            try:
                staging.rename(target)
            except OSError:  # another process put it there meanwhile
                if not all((target / name).is_file() for name in FILES):
                    raise
        log.info("chart library cached", package=PACKAGE, path=str(target))
    return target


def main(argv: list[str] | None = None) -> int:
    """``python -m cube_dashboard.assets [CACHE]``: fetch the chart library in the project's set-up
    (``make serve`` / ``make test``), so a server never fetches at its first page view."""
    args = sys.argv[1:] if argv is None else argv
    cache = Path(args[0]) if args else Path("/var/cache/cube")
    try:
        print(ensure(cache))
    except (AssetError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"[set-up] dashboard charts not cached ({exc}); the pages work without charts", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
