"""One StoreContract, every StateStore: SQLite (the default) and PostgreSQL (a real, throwaway
server from the ``postgres_server`` fixture); then what only PostgreSQL has: versioned migrations
under an advisory lock, a newer schema refused, ``[core] state`` selecting it (secret references
included), clear errors that never show the password."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from cube_core.config import CoreSettings
from cube_core.errors import ConfigError
from cube_core.store import SqliteStore, StateStore, open_store
from cube_core.store_postgres import MIGRATIONS, MIGRATIONS_TABLE, SCHEMA_VERSION, PostgresStore
from cube_core.testing.postgres import PostgresServer
from cube_core.testing.store_contract import StoreContract, full_sandbox


class TestSqliteStore(StoreContract):
    @pytest.fixture
    def store_factory(self, tmp_path: Path) -> Callable[[], StateStore]:
        return lambda: SqliteStore(tmp_path / "state" / "cube.db")


class TestPostgresStore(StoreContract):
    @pytest.fixture
    def store_factory(self, postgres_url: str) -> Callable[[], StateStore]:
        return lambda: PostgresStore(postgres_url)


def test_every_state_store_in_the_repo_runs_the_contract() -> None:
    """A new StateStore subclass must get a contract class here (else it is not known to work)."""
    import cube_core.store_postgres  # noqa: F401 - registers its subclass

    tested = {SqliteStore, PostgresStore}
    assert set(StateStore.__subclasses__()) == tested


def _versions(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute(f"SELECT version FROM {MIGRATIONS_TABLE} ORDER BY version")]


def test_migrations_are_recorded_once(postgres_url: str) -> None:
    PostgresStore(postgres_url).close()
    PostgresStore(postgres_url).close()  # a restart applies nothing twice
    assert _versions(postgres_url) == [v for v, _, _ in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))


def test_masters_starting_together_migrate_once(postgres_url: str) -> None:
    """Eight starters at once on an empty database: the advisory lock lets one migrate; none fails."""
    start = threading.Barrier(8)
    errors: list[BaseException] = []
    stores: list[PostgresStore] = []

    def starter() -> None:
        try:
            start.wait(timeout=30)
            stores.append(PostgresStore(postgres_url, min_connections=1, max_connections=2))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=starter) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for store in stores:
        store.close()
    assert not errors, errors
    assert len(stores) == 8
    assert _versions(postgres_url) == list(range(1, SCHEMA_VERSION + 1))


def test_a_failing_migration_leaves_nothing_behind(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Migrations run in one transaction: one that fails half-way is rolled back whole."""
    from cube_core import store_postgres

    PostgresStore(postgres_url).close()
    broken = (SCHEMA_VERSION + 1, "half done", "CREATE TABLE half_done (x int); SELECT * FROM no_such_table;")
    monkeypatch.setattr(store_postgres, "MIGRATIONS", (*MIGRATIONS, broken))
    monkeypatch.setattr(store_postgres, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(ConfigError, match='relation "no_such_table" does not exist'):
        PostgresStore(postgres_url)
    assert _versions(postgres_url) == list(range(1, SCHEMA_VERSION + 1))
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT to_regclass('half_done')").fetchone() == (None,)


def test_sandbox_sums_count_records_written_without_the_columns(postgres_url: str) -> None:
    """Records from before migration 8, and rows an older Cube inserts with (id, team_id, state,
    body) only (a rolling upgrade of control planes sharing the database), are summed as parsing
    them would: the columns are computed by PostgreSQL on write, from the body."""
    from cube_core import store_postgres
    from cube_core.state import SandboxState

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        old = [m for m in MIGRATIONS if m[0] < 8]
        real = store_postgres.MIGRATIONS, store_postgres.SCHEMA_VERSION
        store_postgres.MIGRATIONS, store_postgres.SCHEMA_VERSION = tuple(old), old[-1][0]
        try:
            store_postgres.migrate(conn)
        finally:
            store_postgres.MIGRATIONS, store_postgres.SCHEMA_VERSION = real
        before = full_sandbox("old").evolve(node_id="n1", cpu_count=4, memory_mb=2048)
        conn.execute("INSERT INTO sandboxes (id, team_id, state, body) VALUES (%s, %s, %s, %s)",
                     (before.sandbox_id, before.team_id, before.state.value, before.model_dump_json()))
    store = PostgresStore(postgres_url)
    try:
        later = full_sandbox("later").evolve(node_id="n2", cpu_count=2, memory_mb=512, state=SandboxState.PAUSED,
                                             metadata={"nul": "a\x00b", "escaped": "\\u0000"})
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute("INSERT INTO sandboxes (id, team_id, state, body) VALUES (%s, %s, %s, %s)",
                         (later.sandbox_id, later.team_id, later.state.value, later.model_dump_json()))
        totals = {(t.node_id, t.state, t.count, t.cpu_count, t.memory_mb) for t in store.sandbox_totals()}
        assert totals == {("n1", before.state, 1, 4, 2048), ("n2", SandboxState.PAUSED, 1, 2, 512)}
        assert set(store.sandbox_totals()) == set(StateStore.sandbox_totals(store))  # = parsing them
    finally:
        store.close()


def test_a_newer_schema_is_refused(postgres_url: str) -> None:
    store = PostgresStore(postgres_url)
    store.put_sandbox(full_sandbox())
    store.close()
    with psycopg.connect(postgres_url) as conn:
        conn.execute(f"INSERT INTO {MIGRATIONS_TABLE} (version, description) VALUES (%s, 'from the future')",
                     (SCHEMA_VERSION + 1,))
    with pytest.raises(ConfigError, match=rf"schema version {SCHEMA_VERSION + 1}, newer than this Cube knows "
                                          rf"\({SCHEMA_VERSION}\)"):
        PostgresStore(postgres_url)
    with psycopg.connect(postgres_url) as conn:  # refused without touching anything
        assert conn.execute("SELECT count(*) FROM sandboxes").fetchone() == (1,)


def test_core_state_selects_the_store(tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    default = open_store(CoreSettings(state_dir=tmp_path / "state"))
    assert isinstance(default, SqliteStore) and default.path == tmp_path / "state" / "cube.db"
    default.close()
    store = open_store(CoreSettings(state_dir=tmp_path / "unused", state=postgres_url))
    assert isinstance(store, PostgresStore)
    store.put_sandbox(full_sandbox())
    store.close()
    monkeypatch.setenv("CUBE_TEST_STATE", postgres_url)
    secret_file = tmp_path / "state-url"
    secret_file.write_text(postgres_url + "\n")
    for ref in ({"env": "CUBE_TEST_STATE"}, {"file": str(secret_file)}):
        store = open_store(CoreSettings(state_dir=tmp_path / "unused", state=ref))
        assert isinstance(store, PostgresStore) and store.get_sandbox("sbx-full") == full_sandbox(), ref
        store.close()
    assert not (tmp_path / "unused").exists()  # no SQLite file made on the side


def test_core_state_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="environment variable 'CUBE_NO_SUCH_VAR' is not set"):
        open_store(CoreSettings(state={"env": "CUBE_NO_SUCH_VAR"}))
    with pytest.raises(ConfigError, match="cannot read secret file"):
        open_store(CoreSettings(state={"file": str(tmp_path / "missing")}))
    (tmp_path / "wrong").write_text("mysql://root:hunter2@db/cube")
    with pytest.raises(ConfigError, match=r"mysql://\.\.\. is not a PostgreSQL URL") as caught:
        open_store(CoreSettings(state={"file": str(tmp_path / "wrong")}))
    assert "hunter2" not in caught.value.message


def test_unreachable_or_refused_database_is_a_config_error_without_the_password(
        postgres_server: PostgresServer) -> None:
    no_db = postgres_server.url("no_such_db").replace("cube@", "cube:hunter2@")
    with pytest.raises(ConfigError, match=r'cannot use the PostgreSQL database postgresql://cube@/.*no_such_db: '
                                          r'.*database "no_such_db" does not exist') as caught:
        PostgresStore(no_db)
    assert "hunter2" not in caught.value.message
    with pytest.raises(ConfigError, match="cannot use the PostgreSQL database postgresql://cube@127.0.0.1:1/x: "
                                          ".*(refused|failed)") as refused:
        PostgresStore("postgresql://cube:hunter2@127.0.0.1:1/x", connect_timeout=2)
    assert "hunter2" not in refused.value.message


async def test_cube_serve_and_cli_use_the_configured_database(run_cube, tmp_path: Path, postgres_url: str,
                                                              plugin_host, cube_config_factory) -> None:
    """The two places that open the store: the app (``cube serve``) and the CLI (``cube keys``)."""
    from cube_core.app import create_app
    from cube_core.testing.fakes import FAKE_CONFIG

    state_dir = tmp_path / "state"
    text = FAKE_CONFIG.format(state_dir=state_dir).replace(
        "[core]\n", '[core]\nstate = { env = "CUBE_TEST_STATE" }\n', 1)
    config = tmp_path / "plugins.toml"
    config.write_text(text)
    created = run_cube("keys", "create", "--team", "acme", "--config", str(config),
                       env={"CUBE_TEST_STATE": postgres_url})
    assert created.returncode == 0, created.stderr
    listed = run_cube("keys", "ls", "--config", str(config), env={"CUBE_TEST_STATE": postgres_url})
    assert "acme" in listed.stdout, listed.stdout + listed.stderr
    unset = run_cube("keys", "ls", "--config", str(config))  # never falls back to SQLite
    assert unset.returncode == 2 and "environment variable 'CUBE_TEST_STATE' is not set" in unset.stderr
    empty = run_cube("keys", "ls", "--config", str(config), env={"CUBE_TEST_STATE": ""})
    assert empty.returncode == 2 and "is not a PostgreSQL URL" in empty.stderr, empty.stderr

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUBE_TEST_STATE", postgres_url)
        app = create_app(plugin_host(cube_config_factory(text)), build_templates=False)
        store = app.state.service.store
        try:
            assert isinstance(store, PostgresStore)
            team = store.find_team("acme")
            assert team is not None and len(store.list_api_keys(team_id=team.team_id)) == 1
        finally:
            store.close()
    assert not (state_dir / "cube.db").exists()


def test_missing_postgresql_is_a_clear_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the server programs the fixture fails (pytest.fail with this message), never skips."""
    from cube_core.testing import postgres

    monkeypatch.setattr(postgres, "SERVER_ROOT", tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(postgres.PostgresMissingError, match=r"initdb .*bash scripts/install-host.sh"):
        postgres.PostgresServer().start()


def test_the_throwaway_server_is_stopped_and_removed() -> None:
    server = PostgresServer()
    server.start()
    directory = server.socket_dir
    with psycopg.connect(server.url()) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("",)  # unix socket only
        assert conn.execute("SHOW data_directory").fetchone() == (str(directory / "data"),)
    server.stop()
    assert not directory.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(f"postgresql://cube@/postgres?host={directory}", connect_timeout=2)
