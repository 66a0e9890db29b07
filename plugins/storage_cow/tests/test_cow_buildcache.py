"""buildcache.ensure_file: the one make-once-under-a-lock step of the image build's caches (Debian
tarballs, the npm kernel tree, the Java kernel's wheel)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from cube_storage_cow import buildcache


def test_makes_a_missing_file_once_and_leaves_only_it(tmp_path: Path):
    target = tmp_path / "cache" / "npm" / "x.tar"
    calls: list[Path] = []

    def make(work: Path, out: Path) -> None:
        assert work.is_dir() and not any(work.iterdir())
        (work / "scratch").write_text("work")
        out.write_bytes(b"made")
        calls.append(work)

    assert buildcache.ensure_file(target, make, threading.Event())
    assert target.read_bytes() == b"made"
    assert not buildcache.ensure_file(target, make, threading.Event())
    assert len(calls) == 1
    assert sorted(p.name for p in target.parent.iterdir()) == [".x.tar.lock", "x.tar"]
    assert target.parent.stat().st_mode & 0o777 == 0o700


def test_a_failed_make_leaves_no_file_and_a_crashed_attempt_is_cleared(tmp_path: Path):
    target = tmp_path / "w.whl"
    leftover = tmp_path / ".w.work"  # what a killed build left behind
    leftover.mkdir()
    (leftover / "half").write_text("half")

    def fail(work: Path, out: Path) -> None:
        assert not (work / "half").exists()
        out.write_bytes(b"partial")
        raise RuntimeError("download failed")

    with pytest.raises(RuntimeError, match="download failed"):
        buildcache.ensure_file(target, fail, threading.Event())
    assert sorted(p.name for p in tmp_path.iterdir()) == [".w.whl.lock"]
