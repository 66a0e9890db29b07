from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from cube_core.models import Sandbox, Template, TemplateStatus, utcnow
from cube_core.state import SandboxState
from cube_core.store import SqliteStore


def _sandbox(sid: str, team: str, state: SandboxState = SandboxState.RUNNING) -> Sandbox:
    now = utcnow()
    return Sandbox(sandbox_id=sid, template_id="base", team_id=team, state=state, started_at=now,
                   end_at=now + timedelta(seconds=60), metadata={"k": sid})


def test_everything_survives_a_reopen(tmp_path: Path) -> None:
    db = tmp_path / "cube.db"
    store = SqliteStore(db)
    store.put_sandbox(_sandbox("a1", "t1"))
    store.put_sandbox(_sandbox("b1", "t2", SandboxState.PAUSED))
    store.put_template(Template(template_id="base", aliases=("base", "b"), status=TemplateStatus.READY))
    store.close()
    again = SqliteStore(db)
    assert again.get_sandbox("a1") == _sandbox("a1", "t1").model_copy(
        update={"started_at": again.get_sandbox("a1").started_at, "end_at": again.get_sandbox("a1").end_at})
    assert [s.sandbox_id for s in again.list_sandboxes(team_id="t2")] == ["b1"]
    assert [s.sandbox_id for s in again.list_sandboxes(states=(SandboxState.PAUSED,))] == ["b1"]
    assert again.get_template("b").template_id == "base"
    assert again._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_template_aliases_are_replaced(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    store.put_template(Template(template_id="t", aliases=("old",)))
    store.put_template(Template(template_id="t", aliases=("new",)))
    assert store.get_template("old") is None
    assert store.get_template("new").template_id == "t"
    store.delete_template("t")
    assert store.get_template("t") is None and store.list_templates() == []


def test_a_version_1_database_gets_the_sandboxes_columns(tmp_path: Path) -> None:
    """A database an older Cube made (sandboxes without the node/vCPU/MiB columns): opening it
    migrates the table; the sums count the old records, their list order stays."""
    import sqlite3

    from cube_core.store import StateStore

    db = tmp_path / "state" / "cube.db"
    db.parent.mkdir(mode=0o700)
    old = sqlite3.connect(db)
    old.executescript("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                      "INSERT INTO meta VALUES ('schema_version', '1');"
                      "CREATE TABLE sandboxes (id TEXT PRIMARY KEY, team_id TEXT NOT NULL, state TEXT NOT NULL,"
                      " body TEXT NOT NULL); CREATE INDEX sandboxes_team ON sandboxes(team_id, state);")
    for sb in (_sandbox("z", "t1").evolve(node_id="n2", cpu_count=4, memory_mb=2048),
               _sandbox("a", "t1", SandboxState.PAUSED).evolve(node_id="n1", cpu_count=2, memory_mb=1024),
               _sandbox("m", "t2").evolve(node_id="n1", cpu_count=1, memory_mb=256)):
        old.execute("INSERT INTO sandboxes VALUES (?,?,?,?)", (sb.sandbox_id, sb.team_id, sb.state.value,
                                                               sb.model_dump_json()))
    old.commit()
    old.close()
    store = SqliteStore(db)
    assert [s.sandbox_id for s in store.list_sandboxes()] == ["z", "a", "m"]
    assert set(store.sandbox_totals()) == set(StateStore.sandbox_totals(store))  # = parsing them
    assert {(t.node_id, t.cpu_count, t.memory_mb) for t in store.sandbox_totals(team_id="t1")} == {
        ("n2", 4, 2048), ("n1", 2, 1024)}
    assert store._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("2",)
    store.put_sandbox(_sandbox("a", "t1").evolve(node_id="n3", cpu_count=8, memory_mb=512))  # a write after it
    assert {(t.node_id, t.state) for t in store.sandbox_totals(team_id="t1")} == {
        ("n2", SandboxState.RUNNING), ("n3", SandboxState.RUNNING)}
    store.close()
