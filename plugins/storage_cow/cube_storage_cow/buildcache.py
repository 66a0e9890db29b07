"""Files an image build makes once and keeps in the host's build cache (the Debian tarballs of
:mod:`.debootstrap`, the npm kernel tree and the Java kernel's wheel of :mod:`.jupyter_kernels`).

One process makes a given file at a time (an flock on ``.<name>.lock`` beside it); it makes it in a
work directory ``.<stem>.work`` and writes it as ``.<name>.tmp``, which is fsynced and renamed into
place, so the cache only ever holds complete files. A crashed attempt's work directory is cleared by
the next one (or by :func:`.debootstrap.gc_leftovers`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

from cube_storage_cow import hostfiles, inroot
from cube_storage_cow.locks import exclusive


def ensure_file(target: Path, make: Callable[[Path, Path], None], cancel: threading.Event, *,
                remove_work: Callable[[Path], None] = inroot.remove_host_path) -> bool:
    """Make ``target`` unless it exists: ``make(work, out)`` gets an empty directory ``work`` and
    writes the file ``out``, which becomes ``target``. True if this call made it (False: it was
    there, or another process made it while this one waited for the lock). ``remove_work``
    removes a work directory (debootstrap's unmounts what it mounted inside first)."""
    if target.is_file():
        return False
    hostfiles.private_dir(target.parent)
    with exclusive(target.with_name(f".{target.name}.lock"), cancel):
        if target.is_file():
            return False
        work = target.with_name(f".{target.stem}.work")
        out = target.with_name(f".{target.name}.tmp")
        remove_work(work)  # a crashed earlier attempt (we hold the lock)
        work.mkdir(mode=0o755)
        try:
            make(work, out)
            with open(out, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(out, target)
            hostfiles.fsync_dir(target.parent)
        finally:
            remove_work(work)
            with contextlib.suppress(FileNotFoundError):
                out.unlink()
    return True
