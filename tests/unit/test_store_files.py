"""The state database holds secrets: its file is 0600 and its directory 0700."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cube_core.errors import ConfigError
from cube_core.store import SqliteStore


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_database_is_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = SqliteStore(state / "cube.db")
    assert mode(state) == 0o700 and mode(state / "cube.db") == 0o600
    for companion in ("cube.db-wal", "cube.db-shm"):
        assert mode(state / companion) == 0o600, companion
    store.close()


def test_existing_loose_files_are_tightened(tmp_path: Path) -> None:
    state = tmp_path / "state"
    SqliteStore(state / "cube.db").close()
    os.chmod(state, 0o755)
    for name in ("cube.db", "cube.db-wal", "cube.db-shm"):
        if (state / name).exists():
            os.chmod(state / name, 0o644)
    old_umask = os.umask(0)
    try:
        store = SqliteStore(state / "cube.db")
    finally:
        os.umask(old_umask)
    assert mode(state) == 0o700
    assert all(mode(p) == 0o600 for p in state.iterdir()), {p.name: oct(mode(p)) for p in state.iterdir()}
    store.close()


def test_shared_sticky_directory_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    with pytest.raises(ConfigError, match="shared directory"):
        SqliteStore(shared / "cube.db")
    assert mode(shared) == 0o1777  # left as it was
