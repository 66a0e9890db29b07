"""Modes of what this plugin keeps on the host: nothing is readable by other host users.

Template images, sandbox disks, frozen layers and the VMM's snapshot files hold guest data, so
every directory is closed to "other"; files are owned by root:

==========================================  =======  =============================================
``<root>/``, ``images/``, ``disks/``,        0750     group may be given to a VM-runner group
``snapshots/``, ``snapshots/<id>/``
``build/``, ``build/<hash>/``                0700     untrusted trees being unpacked
``<cache>/debootstrap/``                     0700     Debian trees (device nodes, setuid files)
``images/<hash>.ext4`` and ``.json``         0440     shared read-only by every sandbox
``snapshots/<id>/disk.*`` (frozen layer)     0440     shared read-only by restored sandboxes
``disks/<owner>.qcow2|raw``                  0600     one sandbox's writable disk
==========================================  =======  =============================================

:func:`make_dir` and :func:`close_to_others` only remove "other" bits of what exists (never add,
never chown), so a VMM jail that later grants a per-VM uid or group access to its own files is
not undone by a restart. Only ``build/`` trees are forced to exactly 0700 (:func:`private_dir`).
:func:`fsync_dir` makes a rename or a new entry in a directory durable.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

DIR_MODE = 0o750
PRIVATE_DIR_MODE = 0o700
SHARED_FILE_MODE = 0o440
PRIVATE_FILE_MODE = 0o600
OTHER = stat.S_IRWXO


def make_dir(path: Path, mode: int = DIR_MODE) -> Path:
    """Create ``path`` (and missing parents, without touching existing ones) with ``mode``; an
    existing directory only loses its "other" permission bits."""
    if not _created(path, mode):
        close_to_others(path)
    return path


def private_dir(path: Path) -> Path:
    """Create ``path`` (missing parents as :func:`make_dir` would) or make it exactly 0700."""
    if not _created(path, PRIVATE_DIR_MODE):
        os.chmod(path, PRIVATE_DIR_MODE)
    return path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _created(path: Path, mode: int) -> bool:
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir(mode=mode)
        except FileExistsError:
            pass
        else:
            os.chmod(path, mode)
            return True
    return False


def close_to_others(path: Path) -> None:
    """Remove every "other" permission bit of ``path`` (a file or directory, not followed)."""
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode) or not st.st_mode & OTHER:
        return
    os.chmod(path, stat.S_IMODE(st.st_mode) & ~OTHER)
