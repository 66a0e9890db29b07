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
