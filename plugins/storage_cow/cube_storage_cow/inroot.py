"""File operations inside a template tree that can never touch the host outside it.

Template trees come from untrusted places (OCI images, user directories) and we work on them as
root, so a symlink ``etc/hostname -> /etc/shadow`` must not make us write the host's file. Every
guest path is resolved here the way the guest kernel would resolve it under its own root:
absolute symlink targets start again at the tree's root and ``..`` stops there
(like ``openat2(RESOLVE_IN_ROOT)``).
"""

from __future__ import annotations

import collections
import os
import shutil
import stat
from pathlib import Path, PurePosixPath

from cube_core import StorageError

MAX_SYMLINKS = 40


def resolve_in_root(root: Path, guest_path: str | PurePosixPath, *, follow_final: bool = True) -> Path:
    """The host path of ``guest_path`` inside ``root``, following symlinks inside ``root`` only.

    With ``follow_final=False`` a symlink in the last component is left alone (so it can be
    replaced or removed); every parent is still resolved.
    """
    pending = collections.deque(PurePosixPath("/", guest_path).parts[1:])
    resolved: list[str] = []
    hops = 0
    while pending:
        name = pending.popleft()
        if name in ("", "."):
            continue
        if name == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, name)
        if not pending and not follow_final:
            resolved.append(name)
            break
        try:
            st = candidate.lstat()
        except FileNotFoundError:
            resolved.append(name)
            continue
        except OSError as exc:
            raise StorageError(f"cannot inspect {candidate}: {exc}") from exc
        if not stat.S_ISLNK(st.st_mode):
            resolved.append(name)
            continue
        hops += 1
        if hops > MAX_SYMLINKS:
            raise StorageError(f"too many levels of symbolic links resolving {guest_path} in {root}")
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = []
        pending.extendleft(reversed(PurePosixPath(target).parts[1 if target.startswith("/") else 0:]))
    return root.joinpath(*resolved)


def lexists(path: Path) -> bool:
    try:
        path.lstat()
    except FileNotFoundError:
        return False
    return True


def remove_host_path(path: Path) -> None:
    """Remove a file, symlink or directory tree (without following symlinks); missing is fine."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()


def remove(root: Path, guest_path: str) -> None:
    """Remove ``guest_path`` (file, symlink or whole directory) from the tree; missing is fine."""
    remove_host_path(resolve_in_root(root, guest_path, follow_final=False))


def clear_dir(root: Path, guest_path: str) -> None:
    """Empty a directory of the tree, keeping the directory itself."""
    path = resolve_in_root(root, guest_path)
    if not path.is_dir() or path.is_symlink():
        return
    for child in path.iterdir():
        remove_host_path(child)


def ensure_dir(root: Path, guest_path: str, *, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Path:
    """Create a directory (and missing parents, root-owned 0755) unless it exists; return its host path.

    ``mode``/``uid``/``gid`` apply to the last component when this call creates it.
    """
    path = resolve_in_root(root, guest_path)
    if path.is_dir():
        return path
    if lexists(path):
        remove_host_path(path)
    missing = []
    probe = path
    while not lexists(probe):
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        directory.mkdir(mode=0o755)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


def write_file(root: Path, guest_path: str, data: bytes, *, mode: int = 0o644, uid: int = 0,
               gid: int = 0) -> Path:
    """Write a regular file at ``guest_path``, replacing whatever (even a symlink) was there."""
    parent = ensure_dir(root, str(PurePosixPath(guest_path).parent))
    path = parent / PurePosixPath(guest_path).name
    remove_host_path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return path


def read_text(root: Path, guest_path: str) -> str | None:
    """The text of a regular file of the tree, or None if it is missing (or not a regular file)."""
    path = resolve_in_root(root, guest_path)
    if not path.is_file():
        return None
    return path.read_text(errors="surrogateescape")
