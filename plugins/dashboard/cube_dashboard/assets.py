"""The chart library (npm's ``uplot``), fetched with the host's ``npm`` from the npm registry once
and kept under ``<cache>/npm/`` by its content hash: no JavaScript build step, nothing vendored.

``npm pack`` downloads the pinned tarball; its sha512 must equal :data:`INTEGRITY` (the registry's
``dist.integrity``) or it is refused. The two files the dashboard serves are unpacked into
``<cache>/npm/uplot-<sha512 prefix>/``; a later start finds them there and fetches nothing.
:func:`fetch` does the same for any pinned package (the e2e tests' e2b CLI).
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
    return package_dir(cache, PACKAGE, INTEGRITY)


def package_dir(cache: Path, package: str, integrity: str) -> Path:
    digest = base64.b64decode(integrity.removeprefix("sha512-")).hex()
    return cache / "npm" / f"{package.rpartition('@')[0].replace('/', '-').lstrip('@')}-{digest[:24]}"


_lock = threading.Lock()


def ensure(cache: Path) -> Path:
    """The directory holding :data:`FILES` (fetched first when missing); blocking."""
    return fetch(cache, PACKAGE, INTEGRITY, FILES, why="the dashboard's charts")


def fetch(cache: Path, package: str, integrity: str, files: dict[str, str], *, why: str) -> Path:
    """The directory holding ``files`` (name -> path in the tarball) of the npm ``package``
    (``name@version``) whose tarball has the sha512 ``integrity``, fetched first when missing;
    blocking. ``why``: what needs it, for the error without npm."""
    target = package_dir(cache, package, integrity)
    if all((target / name).is_file() for name in files):
        return target
    with _lock:
        if all((target / name).is_file() for name in files):
            return target
        npm = shutil.which("npm")
        if npm is None:
            raise AssetError(f"npm is not installed (scripts/apt-packages.txt names it): {why} need it "
                             "once, to fetch " + package)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
            env = {**os.environ, "HOME": tmp, "npm_config_update_notifier": "false"}
            out = subprocess.run([npm, "pack", package, "--pack-destination", tmp, "--silent"], cwd=tmp, env=env,
                                 capture_output=True, text=True, timeout=120)
            if out.returncode != 0:
                raise AssetError(f"npm pack {package} failed ({out.returncode}): {out.stderr.strip()[-500:]}")
            tgz = next(Path(tmp).glob("*.tgz"), None)
            if tgz is None:
                raise AssetError(f"npm pack {package} wrote no tarball")
            got = "sha512-" + base64.b64encode(hashlib.sha512(tgz.read_bytes()).digest()).decode()
            if got != integrity:
                raise AssetError(f"{package}: sha512 {got} is not the pinned {integrity}")
            staging = Path(tmp) / "out"
            staging.mkdir()
            with tarfile.open(tgz) as tar:
                for name, member in files.items():
                    source = tar.extractfile(member)
                    if source is None:
                        raise AssetError(f"{package} has no {member}")
                    (staging / name).write_bytes(source.read())
            staging.chmod(0o755)
            try:
                staging.rename(target)
            except OSError:  # another process put it there meanwhile
                if not all((target / name).is_file() for name in files):
                    raise
        log.info("npm package cached", package=package, path=str(target))
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
