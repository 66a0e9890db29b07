"""Sandbox records parsed once (cube_core.recordcache), and the SQLite store reading through it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from cube_core import recordcache
from cube_core.models import utcnow
from cube_core.recordcache import SandboxRecords
from cube_core.state import SandboxState
from cube_core.store import SqliteStore
from cube_core.testing.store_contract import sandbox


def test_a_body_read_again_is_not_parsed_again() -> None:
    records = SandboxRecords()
    body = sandbox("sb-1").model_dump_json()
    first = records.parse(body)
    assert records.parse(str(body)) is first and len(records) == 1
    changed = first.evolve(state=SandboxState.PAUSED)
    other = records.parse(changed.model_dump_json())
    assert other is not first and other == changed and len(records) == 2


def test_oldest_bodies_fall_out_beyond_twice_the_longest_list() -> None:
    records = SandboxRecords()
    bodies = [sandbox(f"sb-{i}").model_dump_json() for i in range(recordcache.MIN_ENTRIES + 10)]
    for b in bodies:
        records.parse(b)
    assert len(records) == recordcache.MIN_ENTRIES  # the 10 oldest dropped
    kept = records.parse(bodies[-1])
    assert records.parse(bodies[-1]) is kept
    parsed = records.parse_all(bodies)  # a list of 1034: room for twice that now
    assert [s.sandbox_id for s in parsed] == [f"sb-{i}" for i in range(len(bodies))]
    assert len(records) == len(bodies)


def test_the_store_returns_the_current_record_after_every_put(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "cube.db")
    try:
        sb = sandbox("sb-1")
        store.put_sandbox(sb)
        a = store.list_sandboxes()
        assert store.list_sandboxes()[0] is a[0]  # read twice, parsed once
        later = sb.evolve(end_at=utcnow() + timedelta(hours=1))
        store.put_sandbox(later)
        assert store.get_sandbox("sb-1") == later and store.list_sandboxes() == [later]
        store.put_sandbox(sb)  # back to an earlier body: that one again
        assert store.list_sandboxes() == [sb]
        store.delete_sandbox("sb-1")
        assert store.list_sandboxes() == [] and store.get_sandbox("sb-1") is None
    finally:
        store.close()
