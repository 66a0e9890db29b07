"""The state store on PostgreSQL, for a cluster: several masters share one database.

Selected by ``[core] state = "postgresql://user@host/db"`` (see :func:`cube_core.store.open_store`).
It keeps the same records as :class:`~cube_core.store.SqliteStore` (pydantic JSON next to the
columns queries filter on) and passes the same contract suite
(:class:`cube_core.testing.store_contract.StoreContract`).

Concurrency: every write is one statement or one transaction, so two masters never interleave
half a record; a re-put of an id is an upsert (``ON CONFLICT DO UPDATE``), never a read followed
by a write. A template's aliases are written in sorted order, so two transactions that share
aliases lock them in the same order and cannot deadlock.

Schema: numbered migrations, recorded in ``cube_schema_migrations``. A starting store applies the
missing ones in one transaction under a PostgreSQL advisory lock (masters starting together apply
each migration once); a database whose schema is newer than this Cube knows is refused.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from cube_core.buildspec import TemplateBuild
from cube_core.credentials import AccessToken, KeyLabel, SecretRecord
from cube_core.errors import ConfigError
from cube_core.events import EventChannel
from cube_core.models import ApiKey, Node, Sandbox, SnapshotRef, Team, Template, Volume
from cube_core.observations import LogEntry, LogLevel, MetricSample
from cube_core.recordcache import SandboxRecords
from cube_core.state import SandboxState
from cube_core.store import SandboxTotals, StateStore
from cube_core.webhooks import Delivery, DeliveryStatus, Webhook

MIGRATIONS_TABLE = "cube_schema_migrations"
# (version, what it does, SQL). Append only: a released migration is never edited.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "records: sandboxes, templates + aliases, snapshots, nodes, teams, api keys", """
CREATE SEQUENCE records_put_order;
CREATE TABLE sandboxes (
  id text PRIMARY KEY, team_id text NOT NULL, state text NOT NULL,
  put_order bigint NOT NULL DEFAULT nextval('records_put_order'), body text NOT NULL);
CREATE INDEX sandboxes_team_state ON sandboxes (team_id, state);
CREATE TABLE templates (id text PRIMARY KEY, body text NOT NULL);
CREATE TABLE template_aliases (alias text PRIMARY KEY, template_id text NOT NULL);
CREATE INDEX template_aliases_template ON template_aliases (template_id);
CREATE TABLE snapshots (
  id text PRIMARY KEY, team_id text, sandbox_id text,
  put_order bigint NOT NULL DEFAULT nextval('records_put_order'), body text NOT NULL);
CREATE INDEX snapshots_team ON snapshots (team_id);
CREATE INDEX snapshots_sandbox ON snapshots (sandbox_id);
CREATE TABLE nodes (id text PRIMARY KEY, body text NOT NULL);
CREATE TABLE teams (id text PRIMARY KEY, name text UNIQUE NOT NULL, body text NOT NULL);
CREATE TABLE api_keys (
  id text PRIMARY KEY, team_id text NOT NULL, key_hash text UNIQUE NOT NULL,
  put_order bigint NOT NULL DEFAULT nextval('records_put_order'), body text NOT NULL);
CREATE INDEX api_keys_team ON api_keys (team_id);
"""),
    (2, "leases: work one master does at a time (the reaper)", """
CREATE TABLE leases (name text PRIMARY KEY, holder text NOT NULL, until timestamptz NOT NULL);
"""),
    (3, "a team's credentials: secrets (sealed values), API key labels, access tokens", """
CREATE TABLE secrets (
  id text PRIMARY KEY, team_id text NOT NULL, name text NOT NULL,
  put_order bigint NOT NULL DEFAULT nextval('records_put_order'), body text NOT NULL,
  UNIQUE (team_id, name));
CREATE TABLE key_labels (id text PRIMARY KEY, team_id text NOT NULL, body text NOT NULL);
CREATE INDEX key_labels_team ON key_labels (team_id);
CREATE TABLE access_tokens (
  id text PRIMARY KEY, team_id text NOT NULL, token_hash text UNIQUE NOT NULL,
  put_order bigint NOT NULL DEFAULT nextval('records_put_order'), body text NOT NULL);
CREATE INDEX access_tokens_team ON access_tokens (team_id);
"""),
    (4, "observations: sandboxes' metric samples and log entries (kept for a retention)", """
CREATE TABLE sandbox_metrics (
  sandbox_id text NOT NULL, team_id text NOT NULL, at double precision NOT NULL,
  put_order bigint NOT NULL DEFAULT nextval('records_put_order'), body text NOT NULL);
CREATE INDEX sandbox_metrics_sandbox ON sandbox_metrics (sandbox_id, at);
CREATE INDEX sandbox_metrics_team ON sandbox_metrics (team_id, at);
CREATE INDEX sandbox_metrics_at ON sandbox_metrics (at);
CREATE TABLE sandbox_logs (
  sandbox_id text NOT NULL, seq bigint NOT NULL, at_ms bigint NOT NULL, level text NOT NULL,
  message text NOT NULL, body text NOT NULL, PRIMARY KEY (sandbox_id, seq));
CREATE INDEX sandbox_logs_sandbox ON sandbox_logs (sandbox_id, at_ms);
CREATE INDEX sandbox_logs_at ON sandbox_logs (at_ms);
"""),
    (5, "template builds from the SDK's Template builder (status, plan, log lines)", """
CREATE TABLE template_builds (
  id text PRIMARY KEY, template_id text NOT NULL, created double precision NOT NULL,
  put_order bigint NOT NULL DEFAULT nextval('records_put_order'), body text NOT NULL);
CREATE INDEX template_builds_template ON template_builds (template_id, created);
"""),
    (6, "teams' webhooks and their deliveries (an outbox claimed with FOR UPDATE SKIP LOCKED)", """
CREATE TABLE webhooks (
  id text PRIMARY KEY, team_id text NOT NULL,
  put_order bigint NOT NULL DEFAULT nextval('records_put_order'), body text NOT NULL);
CREATE INDEX webhooks_team ON webhooks (team_id);
CREATE TABLE webhook_deliveries (
  id text PRIMARY KEY, webhook_id text NOT NULL, team_id text NOT NULL, status text NOT NULL,
  next_at double precision NOT NULL, created double precision NOT NULL, claimed_by text,
  claim_until double precision, put_order bigint NOT NULL DEFAULT nextval('records_put_order'),
  body text NOT NULL);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_at);
CREATE INDEX webhook_deliveries_webhook ON webhook_deliveries (webhook_id, created);
"""),
    (7, "team volumes (name unique in its team; the node that holds each)", """
CREATE TABLE volumes (
  id text PRIMARY KEY, team_id text NOT NULL, name text NOT NULL, node_id text NOT NULL,
  put_order bigint NOT NULL DEFAULT nextval('records_put_order'), body text NOT NULL,
  UNIQUE (team_id, name));
CREATE INDEX volumes_node ON volumes (node_id);
"""),
    # PostgreSQL's JSON functions refuse a "\u0000" anywhere in the text (a record's metadata or env
    # vars may hold one), so it is read as "\u0020": valid JSON either way ("\\u0000", an escaped
    # backslash then "u0000", becomes "\\u0020"), and the three fields read hold neither.
    (8, "sandboxes: node, vCPUs and MiB as columns computed on write (the placement's sums)", """
ALTER TABLE sandboxes
  ADD COLUMN node_id text
    GENERATED ALWAYS AS (coalesce(replace(body, '\\u0000', '\\u0020')::json ->> 'node_id', 'local')) STORED,
  ADD COLUMN cpu_count bigint
    GENERATED ALWAYS AS (coalesce((replace(body, '\\u0000', '\\u0020')::json ->> 'cpu_count')::bigint, 1)) STORED,
  ADD COLUMN memory_mb bigint
    GENERATED ALWAYS AS (coalesce((replace(body, '\\u0000', '\\u0020')::json ->> 'memory_mb')::bigint, 512)) STORED;
CREATE INDEX sandboxes_totals ON sandboxes (state, team_id, node_id, cpu_count, memory_mb);
"""),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]
EVENTS_CHANNEL = "cube_events"
"""The NOTIFY channel of :class:`PostgresEvents`."""
# pg_advisory_xact_lock key: one 64-bit number for "Cube migrates this database"
MIGRATION_LOCK = int.from_bytes(hashlib.sha256(b"cube state schema").digest()[:8], "big", signed=True)
# pg_advisory_xact_lock(class, hashtext(value)) keys: "a write gives this unique value to a record"
TEAM_NAME_LOCK, KEY_HASH_LOCK, EXCLUSIVE_LOCK = 0x63756201, 0x63756202, 0x63756203
# one lock for every alias write: a put drops the aliases its template held (rows in any order)
# and takes new ones, so two puts trading aliases would otherwise lock each other's rows: deadlock
TEMPLATE_ALIASES_LOCK = 0x63756204


def _sandbox_filter(team_id: str | None, states: tuple[SandboxState, ...] | None) -> tuple[str, list[object]]:
    """The SQL after ``WHERE true`` and its arguments for a sandbox query's team and states."""
    where, args = "", list[object]()
    if team_id is not None:
        where += " AND team_id = %s"
        args.append(team_id)
    if states:
        where += " AND state = ANY(%s)"
        args.append([s.value for s in states])
    return where, args


def describe_dsn(dsn: str) -> str:
    """``dsn`` for messages and logs: user, host, port and database, never the password."""
    try:
        parts = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable PostgreSQL connection string>"
    user = f"{parts['user']}@" if parts.get("user") else ""
    host = str(parts.get("host") or "localhost")
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{host}{port}/{parts.get('dbname') or ''}"


def migrate(conn: psycopg.Connection[Any]) -> int:
    """Bring the schema to :data:`SCHEMA_VERSION`; return the version found before.

    One transaction, serialized by an advisory lock: of several masters starting at once, one
    applies the migrations and the others then find them applied.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (version integer PRIMARY KEY, "
                     "description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        row = conn.execute(f"SELECT max(version) FROM {MIGRATIONS_TABLE}").fetchone()
        found = int(row[0]) if row and row[0] is not None else 0
        if found > SCHEMA_VERSION:
            raise ConfigError(
                f"[core] state: the database {describe_dsn(conn.info.dsn)} has Cube schema version {found}, "
                f"newer than this Cube knows ({SCHEMA_VERSION}): a newer Cube migrated it; run that version "
                "(or restore a backup from before the upgrade)")
        for version, description, sql in MIGRATIONS:
            if version > found:
                conn.execute(sql)  # several statements: allowed without parameters
                conn.execute(f"INSERT INTO {MIGRATIONS_TABLE} (version, description) VALUES (%s, %s)",
                             (version, description))
    return found


class PostgresStore(StateStore):
    """PostgreSQL through a psycopg 3 connection pool; the schema is migrated on start."""

    def __init__(self, dsn: str, *, min_connections: int = 1, max_connections: int = 8,
                 connect_timeout: float = 10.0) -> None:
        self.where = describe_dsn(dsn)
        self._dsn = dsn
        self._sandboxes = SandboxRecords()
        """Parsed sandbox records, by body (:mod:`cube_core.recordcache`)."""
        try:  # one plain connection first: its error says why (refused, auth, no such database)
            with psycopg.connect(dsn, autocommit=True, connect_timeout=max(1, round(connect_timeout))) as conn:
                migrate(conn)
        except psycopg.Error as exc:
            raise ConfigError(f"[core] state: cannot use the PostgreSQL database {self.where}: "
                              f"{str(exc).strip()}") from exc
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            dsn, min_size=min_connections, max_size=max_connections, open=False, name="cube-state",
            kwargs={"autocommit": True}, check=ConnectionPool.check_connection)
        try:
            self._pool.open(wait=True, timeout=connect_timeout)
        except PoolTimeout as exc:  # reachable a moment ago: not enough connections (max_connections?)
            self._pool.close()
            raise ConfigError(f"[core] state: cannot open {min_connections} connection(s) to {self.where} "
                              f"within {connect_timeout:g} s: {exc}") from exc

    @contextmanager
    def _conn(self) -> Iterator[psycopg.Connection[Any]]:
        with self._pool.connection() as conn:
            yield conn

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Connection[Any]]:
        with self._pool.connection() as conn, conn.transaction():
            yield conn

    def _bodies(self, sql: str, args: tuple[object, ...] = ()) -> list[str]:
        with self._conn() as conn:
            return [row[0] for row in conn.execute(sql, args).fetchall()]

    def _write(self, sql: str, args: tuple[object, ...]) -> None:
        with self._conn() as conn:
            conn.execute(sql, args)

    def _replace_unique(self, lock: int, value: str, delete: str, upsert: str,
                        upsert_args: tuple[object, ...]) -> None:
        """Give the unique ``value`` to this record: delete the other record holding it, then upsert.

        One transaction under an advisory lock on ``value`` (``lock`` names the column): a
        concurrent writer of the same value waits for this one to commit, then its delete sees
        this record (each statement reads what is committed when it starts), so neither fails
        on the unique index.
        """
        with self._tx() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (lock, value))
            conn.execute(delete, (value, upsert_args[0]))
            conn.execute(upsert, upsert_args)

    # sandboxes (a re-put moves the record to the end of list order, as in SqliteStore)
    def put_sandbox(self, sandbox: Sandbox) -> None:
        self._write("INSERT INTO sandboxes (id, team_id, state, body) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (id) DO UPDATE SET team_id = EXCLUDED.team_id, state = EXCLUDED.state, "
                    "body = EXCLUDED.body, put_order = nextval('records_put_order')",
                    (sandbox.sandbox_id, sandbox.team_id, sandbox.state.value, sandbox.model_dump_json()))

    def get_sandbox(self, sandbox_id: str) -> Sandbox | None:
        rows = self._bodies("SELECT body FROM sandboxes WHERE id = %s", (sandbox_id,))
        return self._sandboxes.parse(rows[0]) if rows else None

    def list_sandboxes(self, *, team_id: str | None = None, states: tuple[SandboxState, ...] | None = None,
                       ends_by: datetime | None = None) -> list[Sandbox]:
        where, args = _sandbox_filter(team_id, states)
        sql = "SELECT body FROM sandboxes WHERE true" + where
        if ends_by is not None:
            sql += " AND (body::jsonb ->> 'end_at')::timestamptz <= %s"
            args.append(ends_by)
        return self._sandboxes.parse_all(self._bodies(sql + " ORDER BY put_order", tuple(args)))

    def sandbox_totals(self, *, team_id: str | None = None,
                       states: tuple[SandboxState, ...] | None = None) -> list[SandboxTotals]:
        where, filters = _sandbox_filter(team_id, states)
        sql = ("SELECT node_id, team_id, state, count(*), sum(cpu_count), sum(memory_mb) "
               "FROM sandboxes WHERE true" + where + " GROUP BY 1, 2, 3")
        with self._conn() as conn:
            rows = conn.execute(sql, tuple(filters)).fetchall()
        return [SandboxTotals(node_id=r[0], team_id=r[1], state=SandboxState(r[2]), count=int(r[3]),
                              cpu_count=int(r[4]), memory_mb=int(r[5])) for r in rows]

    def delete_sandbox(self, sandbox_id: str) -> None:
        self._write("DELETE FROM sandboxes WHERE id = %s", (sandbox_id,))

    # templates: an alias names one template, the one last put with it
    def put_template(self, template: Template) -> None:
        with self._tx() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (TEMPLATE_ALIASES_LOCK,))
            conn.execute("INSERT INTO templates (id, body) VALUES (%s, %s) "
                         "ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body",
                         (template.template_id, template.model_dump_json()))
            conn.execute("DELETE FROM template_aliases WHERE template_id = %s", (template.template_id,))
            for alias in sorted(set(template.aliases)):
                conn.execute("INSERT INTO template_aliases (alias, template_id) VALUES (%s, %s) "
                             "ON CONFLICT (alias) DO UPDATE SET template_id = EXCLUDED.template_id",
                             (alias, template.template_id))

    def get_template(self, template_id_or_alias: str) -> Template | None:
        rows = self._bodies(
            "SELECT body FROM templates WHERE id = %s OR id = (SELECT template_id FROM template_aliases "
            "WHERE alias = %s) ORDER BY id = %s DESC LIMIT 1",
            (template_id_or_alias, template_id_or_alias, template_id_or_alias))
        return Template.model_validate_json(rows[0]) if rows else None

    def list_templates(self) -> list[Template]:
        return [Template.model_validate_json(b)
                for b in self._bodies("SELECT body FROM templates ORDER BY id COLLATE \"C\"")]

    def delete_template(self, template_id: str) -> None:
        with self._tx() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (TEMPLATE_ALIASES_LOCK,))
            conn.execute("DELETE FROM templates WHERE id = %s", (template_id,))
            conn.execute("DELETE FROM template_aliases WHERE template_id = %s", (template_id,))
            conn.execute("DELETE FROM template_builds WHERE template_id = %s", (template_id,))

    # template builds
    def put_build(self, build: TemplateBuild) -> None:
        self._write("INSERT INTO template_builds (id, template_id, created, body) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (id) DO UPDATE SET template_id = EXCLUDED.template_id, body = EXCLUDED.body",
                    (build.build_id, build.template_id, build.created_at.timestamp(), build.model_dump_json()))

    def get_build(self, build_id: str) -> TemplateBuild | None:
        rows = self._bodies("SELECT body FROM template_builds WHERE id = %s", (build_id,))
        return TemplateBuild.model_validate_json(rows[0]) if rows else None

    def list_builds(self, template_id: str) -> list[TemplateBuild]:
        return [TemplateBuild.model_validate_json(b) for b in self._bodies(
            "SELECT body FROM template_builds WHERE template_id = %s ORDER BY created DESC, put_order DESC",
            (template_id,))]

    # snapshots
    def put_snapshot(self, snapshot: SnapshotRef) -> None:
        self._write("INSERT INTO snapshots (id, team_id, sandbox_id, body) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (id) DO UPDATE SET team_id = EXCLUDED.team_id, sandbox_id = EXCLUDED.sandbox_id, "
                    "body = EXCLUDED.body, put_order = nextval('records_put_order')",
                    (snapshot.snapshot_id, snapshot.team_id, snapshot.sandbox_id, snapshot.model_dump_json()))

    def get_snapshot(self, snapshot_id: str) -> SnapshotRef | None:
        rows = self._bodies("SELECT body FROM snapshots WHERE id = %s", (snapshot_id,))
        return SnapshotRef.model_validate_json(rows[0]) if rows else None

    def list_snapshots(self, *, team_id: str | None = None,
                       sandbox_id: str | None = None) -> list[SnapshotRef]:
        sql, args = "SELECT body FROM snapshots WHERE true", []
        if team_id is not None:
            sql += " AND team_id = %s"
            args.append(team_id)
        if sandbox_id is not None:
            sql += " AND sandbox_id = %s"
            args.append(sandbox_id)
        return [SnapshotRef.model_validate_json(b)
                for b in self._bodies(sql + " ORDER BY put_order", tuple(args))]

    def delete_snapshot(self, snapshot_id: str) -> None:
        self._write("DELETE FROM snapshots WHERE id = %s", (snapshot_id,))

    # nodes
    def put_node(self, node: Node) -> None:
        self._write("INSERT INTO nodes (id, body) VALUES (%s, %s) ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body",
                    (node.node_id, node.model_dump_json()))

    def list_nodes(self) -> list[Node]:
        return [Node.model_validate_json(b) for b in self._bodies("SELECT body FROM nodes ORDER BY id COLLATE \"C\"")]

    @contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        """A transaction-scoped advisory lock on ``name``, held on a connection of its own until
        the block ends (the block's own store calls use other pooled connections)."""
        with self._tx() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (EXCLUSIVE_LOCK, name))
            yield

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        with self._conn() as conn:
            row = conn.execute(
                "INSERT INTO leases (name, holder, until) VALUES (%s, %s, now() + make_interval(secs => %s)) "
                "ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, until = EXCLUDED.until "
                "WHERE leases.holder = EXCLUDED.holder OR leases.until < now() RETURNING holder",
                (name, holder, ttl_s)).fetchone()
        return row is not None

    # teams and keys: a name (a key hash) belongs to one record, the one last put with it
    def put_team(self, team: Team) -> None:
        self._replace_unique(
            TEAM_NAME_LOCK, team.name, "DELETE FROM teams WHERE name = %s AND id <> %s",
            "INSERT INTO teams (id, name, body) VALUES (%s, %s, %s) "
            "ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, body = EXCLUDED.body",
            (team.team_id, team.name, team.model_dump_json()))

    def get_team(self, team_id: str) -> Team | None:
        rows = self._bodies("SELECT body FROM teams WHERE id = %s", (team_id,))
        return Team.model_validate_json(rows[0]) if rows else None

    def find_team(self, name: str) -> Team | None:
        rows = self._bodies("SELECT body FROM teams WHERE name = %s", (name,))
        return Team.model_validate_json(rows[0]) if rows else None

    def put_api_key(self, key: ApiKey) -> None:
        self._replace_unique(
            KEY_HASH_LOCK, key.key_hash, "DELETE FROM api_keys WHERE key_hash = %s AND id <> %s",
            "INSERT INTO api_keys (id, team_id, key_hash, body) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (id) DO UPDATE SET team_id = EXCLUDED.team_id, key_hash = EXCLUDED.key_hash, "
            "body = EXCLUDED.body, put_order = nextval('records_put_order')",
            (key.key_id, key.team_id, key.key_hash, key.model_dump_json()))

    def find_api_key(self, key_hash: str) -> ApiKey | None:
        rows = self._bodies("SELECT body FROM api_keys WHERE key_hash = %s", (key_hash,))
        return ApiKey.model_validate_json(rows[0]) if rows else None

    def list_api_keys(self, *, team_id: str | None = None) -> list[ApiKey]:
        if team_id is None:
            return [ApiKey.model_validate_json(b) for b in self._bodies("SELECT body FROM api_keys ORDER BY put_order")]
        return [ApiKey.model_validate_json(b) for b in
                self._bodies("SELECT body FROM api_keys WHERE team_id = %s ORDER BY put_order", (team_id,))]

    # a team's secrets (a secret's name is unique within its team), key labels, access tokens
    def add_secret(self, secret: SecretRecord) -> bool:
        with self._conn() as conn:
            row = conn.execute("INSERT INTO secrets (id, team_id, name, body) VALUES (%s, %s, %s, %s) "
                               "ON CONFLICT DO NOTHING RETURNING id",
                               (secret.secret_id, secret.team_id, secret.name, secret.model_dump_json())).fetchone()
        return row is not None

    def replace_secret(self, secret: SecretRecord) -> bool:
        with self._conn() as conn:
            row = conn.execute("UPDATE secrets SET name = %s, body = %s WHERE id = %s AND team_id = %s RETURNING id",
                               (secret.name, secret.model_dump_json(), secret.secret_id, secret.team_id)).fetchone()
        return row is not None

    def get_secret(self, team_id: str, secret_id_or_name: str) -> SecretRecord | None:
        rows = self._bodies("SELECT body FROM secrets WHERE team_id = %s AND (id = %s OR name = %s) "
                            "ORDER BY id = %s DESC LIMIT 1",
                            (team_id, secret_id_or_name, secret_id_or_name, secret_id_or_name))
        return SecretRecord.model_validate_json(rows[0]) if rows else None

    def list_secrets(self, team_id: str) -> list[SecretRecord]:
        return [SecretRecord.model_validate_json(b) for b in
                self._bodies("SELECT body FROM secrets WHERE team_id = %s ORDER BY put_order", (team_id,))]

    def delete_secret(self, team_id: str, secret_id: str) -> bool:
        with self._conn() as conn:
            row = conn.execute("DELETE FROM secrets WHERE id = %s AND team_id = %s RETURNING id",
                               (secret_id, team_id)).fetchone()
        return row is not None

    # volumes
    def add_volume(self, volume: Volume) -> bool:
        with self._conn() as conn:
            row = conn.execute("INSERT INTO volumes (id, team_id, name, node_id, body) VALUES (%s, %s, %s, %s, %s) "
                               "ON CONFLICT DO NOTHING RETURNING id",
                               (volume.volume_id, volume.team_id, volume.name, volume.node_id,
                                volume.model_dump_json())).fetchone()
        return row is not None

    def get_volume(self, volume_id: str) -> Volume | None:
        rows = self._bodies("SELECT body FROM volumes WHERE id = %s", (volume_id,))
        return Volume.model_validate_json(rows[0]) if rows else None

    def find_volume(self, team_id: str, name: str) -> Volume | None:
        rows = self._bodies("SELECT body FROM volumes WHERE team_id = %s AND name = %s", (team_id, name))
        return Volume.model_validate_json(rows[0]) if rows else None

    def list_volumes(self, *, team_id: str | None = None, node_id: str | None = None) -> list[Volume]:
        sql, args = "SELECT body FROM volumes WHERE true", []
        if team_id is not None:
            sql += " AND team_id = %s"
            args.append(team_id)
        if node_id is not None:
            sql += " AND node_id = %s"
            args.append(node_id)
        return [Volume.model_validate_json(b) for b in self._bodies(sql + " ORDER BY put_order", tuple(args))]

    def delete_volume(self, volume_id: str) -> None:
        self._write("DELETE FROM volumes WHERE id = %s", (volume_id,))

    def put_key_label(self, label: KeyLabel) -> None:
        self._write("INSERT INTO key_labels (id, team_id, body) VALUES (%s, %s, %s) "
                    "ON CONFLICT (id) DO UPDATE SET team_id = EXCLUDED.team_id, body = EXCLUDED.body",
                    (label.key_id, label.team_id, label.model_dump_json()))

    def list_key_labels(self, team_id: str) -> list[KeyLabel]:
        return [KeyLabel.model_validate_json(b) for b in
                self._bodies("SELECT body FROM key_labels WHERE team_id = %s ORDER BY id COLLATE \"C\"",
                             (team_id,))]

    def put_access_token(self, token: AccessToken) -> None:
        self._write("INSERT INTO access_tokens (id, team_id, token_hash, body) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (id) DO UPDATE SET team_id = EXCLUDED.team_id, token_hash = EXCLUDED.token_hash, "
                    "body = EXCLUDED.body, put_order = nextval('records_put_order')",
                    (token.token_id, token.team_id, token.token_hash, token.model_dump_json()))

    def list_access_tokens(self, team_id: str) -> list[AccessToken]:
        return [AccessToken.model_validate_json(b) for b in
                self._bodies("SELECT body FROM access_tokens WHERE team_id = %s ORDER BY put_order", (team_id,))]

    def delete_access_token(self, team_id: str, token_id: str) -> bool:
        with self._conn() as conn:
            row = conn.execute("DELETE FROM access_tokens WHERE id = %s AND team_id = %s RETURNING id",
                               (token_id, team_id)).fetchone()
        return row is not None

    # webhooks and deliveries
    def put_webhook(self, webhook: Webhook) -> None:
        self._write("INSERT INTO webhooks (id, team_id, body) VALUES (%s, %s, %s) "
                    "ON CONFLICT (id) DO UPDATE SET team_id = EXCLUDED.team_id, body = EXCLUDED.body",
                    (webhook.webhook_id, webhook.team_id, webhook.model_dump_json()))

    def replace_webhook(self, webhook: Webhook) -> bool:
        with self._conn() as conn:
            row = conn.execute("UPDATE webhooks SET body = %s WHERE id = %s AND team_id = %s RETURNING id",
                               (webhook.model_dump_json(), webhook.webhook_id, webhook.team_id)).fetchone()
        return row is not None

    def get_webhook(self, team_id: str, webhook_id: str) -> Webhook | None:
        rows = self._bodies("SELECT body FROM webhooks WHERE id = %s AND team_id = %s", (webhook_id, team_id))
        return Webhook.model_validate_json(rows[0]) if rows else None

    def list_webhooks(self, team_id: str) -> list[Webhook]:
        return [Webhook.model_validate_json(b) for b in
                self._bodies("SELECT body FROM webhooks WHERE team_id = %s ORDER BY put_order", (team_id,))]

    def delete_webhook(self, team_id: str, webhook_id: str) -> bool:
        with self._tx() as conn:
            row = conn.execute("DELETE FROM webhooks WHERE id = %s AND team_id = %s RETURNING id",
                               (webhook_id, team_id)).fetchone()
            if row is not None:
                conn.execute("DELETE FROM webhook_deliveries WHERE webhook_id = %s", (webhook_id,))
        return row is not None

    def add_deliveries(self, deliveries: Sequence[Delivery]) -> int:
        added = 0
        with self._tx() as conn:
            for d in deliveries:
                row = conn.execute(
                    "INSERT INTO webhook_deliveries (id, webhook_id, team_id, status, next_at, created, body) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING RETURNING id",
                    (d.delivery_id, d.webhook_id, d.team_id, d.status.value, d.next_attempt_at.timestamp(),
                     d.created_at.timestamp(), d.model_dump_json())).fetchone()
                added += row is not None
        return added

    def claim_deliveries(self, holder: str, now: datetime, limit: int, lease_s: float) -> list[Delivery]:
        at = now.timestamp()
        with self._conn() as conn:  # one statement: the rows another master is claiming are skipped
            rows = conn.execute(
                "UPDATE webhook_deliveries SET claimed_by = %s, claim_until = %s WHERE id IN ("
                "SELECT id FROM webhook_deliveries WHERE status = %s AND next_at <= %s AND "
                "(claim_until IS NULL OR claim_until < %s) ORDER BY next_at, put_order LIMIT %s "
                "FOR UPDATE SKIP LOCKED) RETURNING next_at, put_order, body",
                (holder, at + lease_s, DeliveryStatus.PENDING.value, at, at, limit)).fetchall()
        return [Delivery.model_validate_json(r[2]) for r in sorted(rows, key=lambda r: (r[0], r[1]))]

    def finish_delivery(self, delivery: Delivery, holder: str) -> bool:
        with self._conn() as conn:
            row = conn.execute(
                "UPDATE webhook_deliveries SET status = %s, next_at = %s, body = %s, claimed_by = NULL, "
                "claim_until = NULL WHERE id = %s AND claimed_by = %s RETURNING id",
                (delivery.status.value, delivery.next_attempt_at.timestamp(), delivery.model_dump_json(),
                 delivery.delivery_id, holder)).fetchone()
        return row is not None

    def release_deliveries(self, holder: str) -> int:
        with self._conn() as conn:
            return int(conn.execute("UPDATE webhook_deliveries SET claimed_by = NULL, claim_until = NULL "
                                    "WHERE claimed_by = %s", (holder,)).rowcount)

    def list_deliveries(self, team_id: str, webhook_id: str, *, limit: int = 100) -> list[Delivery]:
        return [Delivery.model_validate_json(b) for b in self._bodies(
            "SELECT body FROM webhook_deliveries WHERE team_id = %s AND webhook_id = %s "
            "ORDER BY created DESC, put_order DESC LIMIT %s", (team_id, webhook_id, limit))]

    def prune_deliveries(self, before: datetime) -> int:
        with self._conn() as conn:
            return int(conn.execute("DELETE FROM webhook_deliveries WHERE status <> %s AND created < %s",
                                    (DeliveryStatus.PENDING.value, before.timestamp())).rowcount)

    # observations
    def add_metric_samples(self, samples: Sequence[MetricSample]) -> None:
        if not samples:
            return
        with self._conn() as conn, conn.cursor() as cur:
            cur.executemany("INSERT INTO sandbox_metrics (sandbox_id, team_id, at, body) VALUES (%s, %s, %s, %s)",
                            [(m.sandbox_id, m.team_id, m.at.timestamp(), m.model_dump_json()) for m in samples])

    def metric_samples(self, sandbox_id: str, *, start: datetime | None = None, end: datetime | None = None,
                       limit: int = 10_000) -> list[MetricSample]:
        sql, args = "SELECT body FROM sandbox_metrics WHERE sandbox_id = %s", list[object]([sandbox_id])
        if start is not None:
            sql += " AND at >= %s"
            args.append(start.timestamp())
        if end is not None:
            sql += " AND at <= %s"
            args.append(end.timestamp())
        rows = self._bodies(sql + " ORDER BY at DESC, put_order DESC LIMIT %s", (*args, limit))
        return [MetricSample.model_validate_json(b) for b in reversed(rows)]

    def team_concurrency(self, team_id: str, start: datetime, end: datetime,
                         step_s: int) -> list[tuple[datetime, int]]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT floor(at / %s)::bigint * %s AS slot, count(DISTINCT sandbox_id) FROM sandbox_metrics "
                "WHERE team_id = %s AND at >= %s AND at <= %s GROUP BY slot ORDER BY slot",
                (step_s, step_s, team_id, start.timestamp(), end.timestamp())).fetchall()
        return [(datetime.fromtimestamp(int(slot), UTC), int(n)) for slot, n in rows]

    def add_log_entries(self, entries: Sequence[LogEntry]) -> None:
        if not entries:
            return
        with self._conn() as conn, conn.cursor() as cur:
            cur.executemany("INSERT INTO sandbox_logs (sandbox_id, seq, at_ms, level, message, body) "
                            "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (sandbox_id, seq) DO NOTHING",
                            [(e.sandbox_id, e.seq, e.at_ms, e.level, e.message, e.model_dump_json())
                             for e in entries])

    def log_entries(self, sandbox_id: str, *, cursor_ms: int | None = None, limit: int = 1000,
                    backward: bool = False, levels: tuple[LogLevel, ...] | None = None,
                    search: str | None = None) -> list[LogEntry]:
        sql, args = "SELECT body FROM sandbox_logs WHERE sandbox_id = %s", list[object]([sandbox_id])
        if cursor_ms is not None:
            sql += " AND at_ms <= %s" if backward else " AND at_ms >= %s"
            args.append(cursor_ms)
        if levels is not None:
            sql += " AND level = ANY(%s)"
            args.append(list(levels))
        if search:
            sql += " AND strpos(message, %s) > 0"
            args.append(search)
        order = "DESC" if backward else "ASC"
        rows = self._bodies(f"{sql} ORDER BY at_ms {order}, seq {order} LIMIT %s", (*args, limit))
        return [LogEntry.model_validate_json(b) for b in rows]

    def prune_observations(self, before: datetime) -> int:
        with self._tx() as conn:
            gone = conn.execute("DELETE FROM sandbox_metrics WHERE at < %s", (before.timestamp(),)).rowcount
            return int(gone + conn.execute("DELETE FROM sandbox_logs WHERE at_ms < %s",
                                           (int(before.timestamp() * 1000),)).rowcount)

    def close(self) -> None:
        self._pool.close()

    def event_channel(self) -> PostgresEvents:
        return PostgresEvents(self._dsn)


class PostgresEvents(EventChannel):
    """Events between processes over ``NOTIFY``/``LISTEN`` on :data:`EVENTS_CHANNEL`: a connection
    of its own for each direction (a listening connection cannot come from the pool)."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._sender: psycopg.Connection[Any] | None = None

    def send(self, payload: str) -> None:
        if self._sender is None or self._sender.closed:
            self._sender = psycopg.connect(self._dsn, autocommit=True, connect_timeout=10)
        try:
            self._sender.execute("SELECT pg_notify(%s, %s)", (EVENTS_CHANNEL, payload))
        except psycopg.OperationalError:
            self._sender.close()  # reconnect on the next one
            raise

    def listen(self, deliver: Callable[[str], None], stop: threading.Event) -> None:
        with psycopg.connect(self._dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f"LISTEN {EVENTS_CHANNEL}")
            deliver("")
            while not stop.is_set():
                for notify in conn.notifies(timeout=0.5):
                    deliver(notify.payload)

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None
