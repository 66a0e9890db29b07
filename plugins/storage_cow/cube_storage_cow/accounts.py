"""The sandbox's ``user`` account, written straight into /etc/passwd & co of a template tree.

No ``useradd`` and no chroot: the tree may come from an untrusted image, so we never run its code.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import structlog
from cube_core import StorageError

from cube_storage_cow import inroot

log = structlog.get_logger(__name__)

USER = "user"
UID = 1000
GID = 1000
HOME = "/home/user"
SHELL = "/bin/bash"
SUDOERS = f"{USER} ALL=(ALL:ALL) NOPASSWD: ALL\n"
LAST_CHANGE_DAYS = 19_000  # fixed, so builds of the same inputs give the same files


def ensure_user(tree: Path) -> tuple[int, int]:
    """Add ``user`` (uid/gid 1000, /home/user, bash, passwordless sudo) unless present.

    Returns the (uid, gid) the account has in the tree.
    """
    passwd = _entries(tree, "/etc/passwd")
    group = _entries(tree, "/etc/group")
    existing = next((e for e in passwd if e[0] == USER), None)
    if existing is not None:
        uid, gid, home = int(existing[2]), int(existing[3]), existing[5] or HOME
        if (uid, gid) != (UID, GID):
            log.warning("template already has 'user' with other ids; kept", uid=uid, gid=gid)
    else:
        taken = [e[0] for e in passwd if len(e) > 2 and e[2] == str(UID)]
        if taken:
            raise StorageError(f"uid {UID} is already used by {taken[0]!r} in the template; "
                               f"Cube needs it for {USER!r}")
        uid, gid, home = UID, GID, HOME
        if not any(e[0] == USER for e in group):
            if any(len(e) > 2 and e[2] == str(GID) for e in group):
                raise StorageError(f"gid {GID} is already used in the template; Cube needs it for {USER!r}")
            _append(tree, "/etc/group", f"{USER}:x:{GID}:")
            _append(tree, "/etc/gshadow", f"{USER}:!::", only_if_exists=True)
        _append(tree, "/etc/passwd", f"{USER}:x:{UID}:{GID}::{HOME}:{SHELL}")
        _append(tree, "/etc/shadow", f"{USER}:*:{LAST_CHANGE_DAYS}:0:99999:7:::", only_if_exists=True)
    _make_home(tree, home, uid, gid)
    inroot.ensure_dir(tree, "/etc/sudoers.d", mode=0o755)
    inroot.write_file(tree, f"/etc/sudoers.d/{USER}", SUDOERS.encode(), mode=0o440)
    return uid, gid


def _entries(tree: Path, guest_path: str) -> list[list[str]]:
    text = inroot.read_text(tree, guest_path) or ""
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def _append(tree: Path, guest_path: str, line: str, *, only_if_exists: bool = False) -> None:
    text = inroot.read_text(tree, guest_path)
    if text is None and only_if_exists:
        return
    path = inroot.resolve_in_root(tree, guest_path)
    mode, uid, gid = 0o644, 0, 0
    if text is not None:
        st = path.stat()
        mode, uid, gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
    body = (text or "")
    if body and not body.endswith("\n"):
        body += "\n"
    inroot.write_file(tree, guest_path, (body + line + "\n").encode(errors="surrogateescape"),
                      mode=mode, uid=uid, gid=gid)


def _make_home(tree: Path, home: str, uid: int, gid: int) -> None:
    path = inroot.resolve_in_root(tree, home)
    created = not path.is_dir()
    path = inroot.ensure_dir(tree, home, mode=0o750, uid=uid, gid=gid)
    if not created:
        return
    skel = inroot.resolve_in_root(tree, "/etc/skel")
    if not skel.is_dir():
        return
    for src in skel.iterdir():
        dst = path / src.name
        if src.is_symlink() or not (src.is_file() or src.is_dir()):
            continue
        if src.is_dir():
            shutil.copytree(src, dst, symlinks=True)
        else:
            shutil.copy2(src, dst)
        for p in [dst, *(dst.rglob("*") if dst.is_dir() else [])]:
            os.chown(p, uid, gid, follow_symlinks=False)
