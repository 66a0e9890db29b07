"""Cross-process file locks (flock), so two Cube processes never build the same artifact at once
and GC never removes an artifact another process is still writing."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from cube_storage_cow.commands import Cancelled

POLL_S = 0.2


@contextlib.contextmanager
def exclusive(path: Path, cancel: threading.Event | None = None) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if missing), waiting for other holders."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if cancel is not None and cancel.wait(POLL_S):
                    raise Cancelled(str(path)) from None
                if cancel is None:
                    time.sleep(POLL_S)
        yield
    finally:
        os.close(fd)


def is_held(path: Path) -> bool:
    """True if some process (this one included, through another descriptor) holds ``path``'s lock."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
