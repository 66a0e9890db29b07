"""Helpers shared by the storage_cow tests (a uniquely named module, not conftest)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[3]
STAND_IN_INIT = "#!/bin/sh\n# stand-in for guest/init/cube-init (not written yet)\nexec /bin/sh\n"


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from a sync (module- or session-scoped) fixture on a private event loop."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def copy_guest(dst: Path) -> Path:
    """A copy of the repo's guest folder; a stand-in cube-init if the real one does not exist yet."""
    shutil.copytree(REPO / "guest" / "cube_guest", dst / "cube_guest",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (dst / "init").mkdir()
    real = REPO / "guest" / "init" / "cube-init"
    if real.is_file():
        shutil.copy2(real, dst / "init" / "cube-init")
    else:
        (dst / "init" / "cube-init").write_text(STAND_IN_INIT)
    return dst


def debugfs(image: Path, request: str) -> str:
    """Run one debugfs request against an ext4 image (read-only) and return its stdout."""
    proc = subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True)
    return proc.stdout


def ext4_stat(image: Path, path: str) -> dict[str, int | str]:
    """Type, mode, uid, gid and size of ``path`` inside an ext4 image, from ``debugfs stat``."""
    out = debugfs(image, f"stat {path}")
    m = re.search(r"Type: (.+?)\s+Mode:\s+(\d+)", out)
    u = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)\s+.*?Size: (\d+)", out, re.S)
    if m is None or u is None:
        raise AssertionError(f"{path} not found in {image}: {out!r}")
    return {"type": m.group(1), "mode": int(m.group(2), 8), "uid": int(u.group(1)), "gid": int(u.group(2)),
            "size": int(u.group(3))}


def ext4_cat(image: Path, path: str) -> bytes:
    proc = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, check=True)
    return proc.stdout


def ext4_ls(image: Path, path: str) -> set[str]:
    """Names in a directory of an ext4 image (without . and ..)."""
    out = debugfs(image, f"ls -p {path}")
    names = set()
    for line in out.splitlines():
        fields = line.strip().strip("/").split("/")
        if len(fields) >= 5 and fields[4] not in (".", ".."):
            names.add(fields[4])
    return names


def fsck_clean(image: Path) -> None:
    proc = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def make_source_tree(top: Path, escape_target: Path) -> Path:
    """A small (not bootable) root tree with the traps a real one has: merged /usr, special
    modes and owners, docs to slim, and a symlink that points out of the tree."""
    for d in ("etc", "usr/bin", "usr/sbin", "usr/share/doc/pkg", "var/cache/apt/archives", "srv", "etc/skel"):
        (top / d).mkdir(parents=True, exist_ok=True)
    (top / "sbin").symlink_to("usr/sbin")
    (top / "bin").symlink_to("usr/bin")
    (top / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (top / "etc/group").write_text("root:x:0:\nshadow:x:42:\n")
    (top / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    os.chown(top / "etc/shadow", 0, 42)
    os.chmod(top / "etc/shadow", 0o640)
    (top / "etc/skel/.bashrc").write_text("# skel bashrc\n")
    (top / "usr/bin/tool").write_text("#!/bin/sh\necho tool\n")
    os.chmod(top / "usr/bin/tool", 0o4755)
    (top / "srv/data.txt").write_text("owned by 123:456\n")
    os.chown(top / "srv/data.txt", 123, 456)
    os.chmod(top / "srv/data.txt", 0o640)
    (top / "usr/share/doc/pkg/README").write_text("docs\n" * 100)
    (top / "var/cache/apt/archives/x.deb").write_bytes(b"\0" * 4096)
    # /opt -> ../../../..<escape_target>: a naive builder would install the agent on the host
    ups = "../" * (len(top.parts) + 2)
    (top / "opt").symlink_to(f"{ups}{str(escape_target).lstrip('/')}")
    # /etc/hosts -> the host's escape target file itself
    (top / "etc/hosts").symlink_to(f"{ups}{str(escape_target).lstrip('/')}/hosts-file")
    return top
