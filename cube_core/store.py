"""The state store: a small repository interface and its SQLite (WAL) implementation.

Records are pydantic models kept as JSON next to the columns that queries filter on. The
PostgreSQL implementation for clusters (``cube_core.store_postgres``) satisfies the same
:class:`StateStore` interface and contract suite; :func:`open_store` picks one from ``[core]``.

The database holds secrets (envd access tokens, sandboxes' env vars, API key and access token hashes;
teams' ``/secrets`` only sealed with ``[core] secrets_key``): the file
and its WAL/SHM companions are mode 0600, the directory that holds them 0700.
"""

from __future__ import annotations

import abc
import fcntl
import hashlib
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cube_core.buildspec import TemplateBuild
from cube_core.config import CoreSettings, state_url
from cube_core.credentials import AccessToken, KeyLabel, SecretRecord
from cube_core.errors import ConfigError
from cube_core.events import EventChannel
from cube_core.models import ApiKey, Node, Sandbox, SnapshotRef, Team, Template, Volume
from cube_core.observations import LogEntry, LogLevel, MetricSample
from cube_core.recordcache import SandboxRecords
from cube_core.state import SandboxState
from cube_core.webhooks import Delivery, DeliveryStatus, Webhook

SCHEMA_VERSION = 2


def private_dir(path: Path) -> None:
    """Create ``path`` as 0700, or take group and other access away from an existing one.

    A sticky, shared directory (``/tmp``) is refused: its other users could not be shut out.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = path.stat().st_mode
    if stat.S_IMODE(mode) & 0o077:
        if mode & stat.S_ISVTX:
            raise ConfigError(f"{path} is a shared directory (sticky bit): give Cube a state_dir of its own")
        os.chmod(path, 0o700)


def private_file(path: Path) -> None:
    """Create ``path`` as 0600 if missing, and make an existing one 0600."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    os.chmod(path, 0o600)


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class SandboxTotals:
    """How many sandboxes of one (node, team, state), and the vCPUs and MiB their records hold."""

    node_id: str
    team_id: str
    state: SandboxState
    count: int
    cpu_count: int
    memory_mb: int


TOTALS_DEFAULTS: tuple[object, ...] = tuple(Sandbox.model_fields[f].default
                                            for f in ("node_id", "cpu_count", "memory_mb"))
"""A record's node, vCPUs and MiB when its JSON lacks them (as parsing it would give)."""


class StateStore(abc.ABC):
    """Everything the master records. Implementations must be safe to call from one event loop."""

    @abc.abstractmethod
    def put_sandbox(self, sandbox: Sandbox) -> None: ...
    @abc.abstractmethod
    def get_sandbox(self, sandbox_id: str) -> Sandbox | None: ...
    @abc.abstractmethod
    def list_sandboxes(self, *, team_id: str | None = None, states: tuple[SandboxState, ...] | None = None,
                       ends_by: datetime | None = None) -> list[Sandbox]:
        """In put order; ``ends_by``: only those whose ``end_at`` is at or before it (to the
        millisecond), chosen by the store: the reaper's scan every second parses the expired ones
        only, not every live record."""

    def sandbox_totals(self, *, team_id: str | None = None,
                       states: tuple[SandboxState, ...] | None = None) -> list[SandboxTotals]:
        """The sandboxes :meth:`list_sandboxes` would return, summed per (node, team, state):
        what a create's placement and quota checks count, without parsing every record. This
        default parses them; the stores compute it in SQL."""
        sums: dict[tuple[str, str, SandboxState], list[int]] = {}
        for sb in self.list_sandboxes(team_id=team_id, states=states):
            row = sums.setdefault((sb.node_id, sb.team_id, sb.state), [0, 0, 0])
            row[0] += 1
            row[1] += sb.cpu_count
            row[2] += sb.memory_mb
        return [SandboxTotals(node_id=k[0], team_id=k[1], state=k[2], count=v[0], cpu_count=v[1], memory_mb=v[2])
                for k, v in sums.items()]

    @abc.abstractmethod
    def delete_sandbox(self, sandbox_id: str) -> None: ...

    @abc.abstractmethod
    def put_template(self, template: Template) -> None: ...
    @abc.abstractmethod
    def get_template(self, template_id_or_alias: str) -> Template | None: ...
    @abc.abstractmethod
    def list_templates(self) -> list[Template]: ...
    @abc.abstractmethod
    def delete_template(self, template_id: str) -> None:
        """Forget the template, its aliases and its build records."""

    @abc.abstractmethod
    def put_build(self, build: TemplateBuild) -> None:
        """Record (or replace) a template build (``cube_core.buildspec``)."""

    @abc.abstractmethod
    def get_build(self, build_id: str) -> TemplateBuild | None: ...
    @abc.abstractmethod
    def list_builds(self, template_id: str) -> list[TemplateBuild]:
        """A template's builds, newest first."""

    @abc.abstractmethod
    def put_snapshot(self, snapshot: SnapshotRef) -> None: ...
    @abc.abstractmethod
    def get_snapshot(self, snapshot_id: str) -> SnapshotRef | None: ...
    @abc.abstractmethod
    def list_snapshots(self, *, team_id: str | None = None,
                       sandbox_id: str | None = None) -> list[SnapshotRef]: ...
    @abc.abstractmethod
    def delete_snapshot(self, snapshot_id: str) -> None: ...

    @abc.abstractmethod
    def put_node(self, node: Node) -> None: ...
    @abc.abstractmethod
    def list_nodes(self) -> list[Node]: ...

    @abc.abstractmethod
    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew the lease ``name`` for ``ttl_s`` seconds; True when ``holder`` has it.
        Work that one control plane among several must do alone (the reaper of deadlines and of
        nodes that stopped reporting) runs only while its lease is held. Atomic: of several
        holders asking at once, exactly one gets an expired or free lease."""

    @abc.abstractmethod
    def exclusive(self, name: str) -> AbstractContextManager[None]:
        """A critical section named ``name`` among every process sharing this store (several
        masters): placement and the quota checks of a create run in it, so two masters never
        both give away the last slot of a node or of a team's quota. Other store calls may be
        made inside it. Not re-entrant across stores; keep it short (no awaits on a node)."""

    @abc.abstractmethod
    def put_team(self, team: Team) -> None: ...
    @abc.abstractmethod
    def get_team(self, team_id: str) -> Team | None: ...
    @abc.abstractmethod
    def find_team(self, name: str) -> Team | None: ...

    @abc.abstractmethod
    def put_api_key(self, key: ApiKey) -> None: ...
    @abc.abstractmethod
    def find_api_key(self, key_hash: str) -> ApiKey | None: ...
    @abc.abstractmethod
    def list_api_keys(self, *, team_id: str | None = None) -> list[ApiKey]: ...

    # a team's secrets (sealed values), API key labels and access tokens: always by team
    @abc.abstractmethod
    def add_secret(self, secret: SecretRecord) -> bool:
        """Insert a new secret; False (nothing written) when its team has one of that name already.
        Atomic: of two adds of one name at once, exactly one succeeds."""

    @abc.abstractmethod
    def replace_secret(self, secret: SecretRecord) -> bool:
        """Overwrite the team's secret of that id (any field but id and team); False if it has none."""

    @abc.abstractmethod
    def get_secret(self, team_id: str, secret_id_or_name: str) -> SecretRecord | None: ...
    @abc.abstractmethod
    def list_secrets(self, team_id: str) -> list[SecretRecord]:
        """The team's secrets, oldest first."""

    @abc.abstractmethod
    def delete_secret(self, team_id: str, secret_id: str) -> bool: ...

    # team volumes: a name is unique within its team
    @abc.abstractmethod
    def add_volume(self, volume: Volume) -> bool:
        """Insert a new volume; False (nothing written) when its team has one of that name already.
        Atomic: of two adds of one name at once, exactly one succeeds."""

    @abc.abstractmethod
    def get_volume(self, volume_id: str) -> Volume | None: ...
    @abc.abstractmethod
    def find_volume(self, team_id: str, name: str) -> Volume | None: ...
    @abc.abstractmethod
    def list_volumes(self, *, team_id: str | None = None, node_id: str | None = None) -> list[Volume]:
        """Oldest first."""

    @abc.abstractmethod
    def delete_volume(self, volume_id: str) -> None:
        """A no-op for a missing volume."""

    @abc.abstractmethod
    def put_key_label(self, label: KeyLabel) -> None: ...
    @abc.abstractmethod
    def list_key_labels(self, team_id: str) -> list[KeyLabel]: ...

    @abc.abstractmethod
    def put_access_token(self, token: AccessToken) -> None: ...
    @abc.abstractmethod
    def list_access_tokens(self, team_id: str) -> list[AccessToken]: ...
    @abc.abstractmethod
    def delete_access_token(self, team_id: str, token_id: str) -> bool: ...

    # a team's webhooks and their deliveries (an outbox: cube_core.webhookdelivery sends them)
    @abc.abstractmethod
    def put_webhook(self, webhook: Webhook) -> None: ...
    @abc.abstractmethod
    def replace_webhook(self, webhook: Webhook) -> bool:
        """Overwrite the team's webhook of that id; False (nothing written) if it has none."""

    @abc.abstractmethod
    def get_webhook(self, team_id: str, webhook_id: str) -> Webhook | None: ...
    @abc.abstractmethod
    def list_webhooks(self, team_id: str) -> list[Webhook]:
        """The team's webhooks, oldest first."""

    @abc.abstractmethod
    def delete_webhook(self, team_id: str, webhook_id: str) -> bool:
        """Delete the team's webhook and every delivery of it; False if it has none."""

    @abc.abstractmethod
    def add_deliveries(self, deliveries: Sequence[Delivery]) -> int:
        """Record new deliveries; one whose id is recorded already is skipped (several masters
        record the same event's deliveries under the same ids). How many were new."""

    @abc.abstractmethod
    def claim_deliveries(self, holder: str, now: datetime, limit: int, lease_s: float) -> list[Delivery]:
        """Up to ``limit`` pending deliveries due at ``now`` (``next_attempt_at <= now``) that no one
        holds (or whose claim expired), oldest due first, now held by ``holder`` for ``lease_s``.
        Atomic: of several masters claiming at once, each delivery goes to one."""

    @abc.abstractmethod
    def finish_delivery(self, delivery: Delivery, holder: str) -> bool:
        """Write an attempt's outcome (status, attempts, next time) and drop the claim, only while
        ``holder`` holds it; False (nothing written) when it does not (its claim expired and another
        master took it, or its webhook was deleted)."""

    @abc.abstractmethod
    def release_deliveries(self, holder: str) -> int:
        """Drop every claim of ``holder`` (a master starting again: its old claims died with it)."""

    @abc.abstractmethod
    def list_deliveries(self, team_id: str, webhook_id: str, *, limit: int = 100) -> list[Delivery]:
        """A webhook's deliveries, newest first."""

    @abc.abstractmethod
    def prune_deliveries(self, before: datetime) -> int:
        """Drop the delivered and failed deliveries recorded before ``before``; how many went."""

    # observations: metric samples and log entries of sandboxes (cube_core.observations), kept
    # after a sandbox ends until prune_observations drops them
    @abc.abstractmethod
    def add_metric_samples(self, samples: Sequence[MetricSample]) -> None: ...
    @abc.abstractmethod
    def metric_samples(self, sandbox_id: str, *, start: datetime | None = None, end: datetime | None = None,
                       limit: int = 10_000) -> list[MetricSample]:
        """Samples of ``sandbox_id`` taken in [start, end], oldest first; the newest ``limit`` if more."""

    @abc.abstractmethod
    def team_concurrency(self, team_id: str, start: datetime, end: datetime,
                         step_s: int) -> list[tuple[datetime, int]]:
        """For each ``step_s`` slot (aligned on multiples of ``step_s`` since 1970) in [start, end] with
        samples of the team: the slot's start and how many of its sandboxes were sampled in it."""

    @abc.abstractmethod
    def add_log_entries(self, entries: Sequence[LogEntry]) -> None:
        """Store ``entries``; an entry whose (sandbox, seq) is already stored is skipped."""

    @abc.abstractmethod
    def log_entries(self, sandbox_id: str, *, cursor_ms: int | None = None, limit: int = 1000,
                    backward: bool = False, levels: tuple[LogLevel, ...] | None = None,
                    search: str | None = None) -> list[LogEntry]:
        """Entries of ``sandbox_id``: forward, from ``cursor_ms`` on, oldest first; backward, up to
        ``cursor_ms``, newest first; only ``levels`` if given, only messages containing ``search``
        (case-sensitive) if given; at most ``limit``."""

    @abc.abstractmethod
    def prune_observations(self, before: datetime) -> int:
        """Drop the samples and log entries older than ``before``; how many went."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections."""

    def event_channel(self) -> EventChannel | None:
        """What carries events to the other processes sharing this store (:mod:`cube_core.events`);
        None (the default, SQLite): one process serves, events stay in it."""
        return None


def _sandbox_filter(team_id: str | None, states: tuple[SandboxState, ...] | None) -> tuple[str, list[object]]:
    """The SQL after ``WHERE 1=1`` and its arguments for a sandbox query's team and states."""
    where, args = "", list[object]()
    if team_id is not None:
        where += " AND team_id=?"
        args.append(team_id)
    if states:
        where += f" AND state IN ({','.join('?' * len(states))})"
        args.extend(s.value for s in states)
    return where, args


# A sandbox's node, vCPUs and MiB as columns SQLite computes from the record on every write: what
# a create's placement sums (sandbox_totals), without parsing every record on each create.
_SANDBOX_COLUMNS = (
    "id TEXT PRIMARY KEY, team_id TEXT NOT NULL, state TEXT NOT NULL, "
    "node_id TEXT GENERATED ALWAYS AS (coalesce(json_extract(body, '$.node_id'), {!r})) STORED, "
    "cpu_count INTEGER GENERATED ALWAYS AS (coalesce(json_extract(body, '$.cpu_count'), {})) STORED, "
    "memory_mb INTEGER GENERATED ALWAYS AS (coalesce(json_extract(body, '$.memory_mb'), {})) STORED, "
    "body TEXT NOT NULL").format(*TOTALS_DEFAULTS)

_DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sandboxes ({sandbox_columns});
CREATE INDEX IF NOT EXISTS sandboxes_team ON sandboxes(team_id, state);
CREATE TABLE IF NOT EXISTS templates (id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS template_aliases (alias TEXT PRIMARY KEY, template_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS template_builds (
  id TEXT PRIMARY KEY, template_id TEXT NOT NULL, created REAL NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS template_builds_template ON template_builds(template_id, created);
CREATE TABLE IF NOT EXISTS snapshots (
  id TEXT PRIMARY KEY, team_id TEXT, sandbox_id TEXT, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, until REAL NOT NULL);
CREATE TABLE IF NOT EXISTS teams (id TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (
  id TEXT PRIMARY KEY, team_id TEXT NOT NULL, key_hash TEXT UNIQUE NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS secrets (
  id TEXT PRIMARY KEY, team_id TEXT NOT NULL, name TEXT NOT NULL, body TEXT NOT NULL,
  UNIQUE (team_id, name));
CREATE TABLE IF NOT EXISTS volumes (
  id TEXT PRIMARY KEY, team_id TEXT NOT NULL, name TEXT NOT NULL, node_id TEXT NOT NULL, body TEXT NOT NULL,
  UNIQUE (team_id, name));
CREATE TABLE IF NOT EXISTS key_labels (id TEXT PRIMARY KEY, team_id TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS access_tokens (
  id TEXT PRIMARY KEY, team_id TEXT NOT NULL, token_hash TEXT UNIQUE NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS webhooks (id TEXT PRIMARY KEY, team_id TEXT NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS webhooks_team ON webhooks(team_id);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
  id TEXT PRIMARY KEY, webhook_id TEXT NOT NULL, team_id TEXT NOT NULL, status TEXT NOT NULL,
  next_at REAL NOT NULL, created REAL NOT NULL, claimed_by TEXT, claim_until REAL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries(status, next_at);
CREATE INDEX IF NOT EXISTS webhook_deliveries_webhook ON webhook_deliveries(webhook_id, created);
CREATE TABLE IF NOT EXISTS sandbox_metrics (
  sandbox_id TEXT NOT NULL, team_id TEXT NOT NULL, at REAL NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS sandbox_metrics_sandbox ON sandbox_metrics(sandbox_id, at);
CREATE INDEX IF NOT EXISTS sandbox_metrics_team ON sandbox_metrics(team_id, at);
CREATE INDEX IF NOT EXISTS sandbox_metrics_at ON sandbox_metrics(at);
CREATE TABLE IF NOT EXISTS sandbox_logs (
  sandbox_id TEXT NOT NULL, seq INTEGER NOT NULL, at_ms INTEGER NOT NULL, level TEXT NOT NULL,
  message TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (sandbox_id, seq));
CREATE INDEX IF NOT EXISTS sandbox_logs_sandbox ON sandbox_logs(sandbox_id, at_ms);
CREATE INDEX IF NOT EXISTS sandbox_logs_at ON sandbox_logs(at_ms);
""".replace("{sandbox_columns}", _SANDBOX_COLUMNS)


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a database made by an older Cube to :data:`SCHEMA_VERSION` (in a transaction).

    2: the sandboxes' generated columns and the index over them. SQLite adds a stored generated
    column only with a new table, so the table is copied (rowids kept: they are the list order)."""
    columns = {row[1] for row in db.execute("PRAGMA table_xinfo(sandboxes)")}
    if "node_id" not in columns:
        db.execute("ALTER TABLE sandboxes RENAME TO sandboxes_v1")
        db.execute(f"CREATE TABLE sandboxes ({_SANDBOX_COLUMNS})")
        db.execute("INSERT INTO sandboxes(rowid, id, team_id, state, body) "
                   "SELECT rowid, id, team_id, state, body FROM sandboxes_v1")
        db.execute("DROP TABLE sandboxes_v1")  # its index goes with it
        db.execute("CREATE INDEX IF NOT EXISTS sandboxes_team ON sandboxes(team_id, state)")
    # sandbox_totals' filter and groups (1000 records: 0.27 ms with it, 1.4 without, 4.8 parsing JSON)
    db.execute("CREATE INDEX IF NOT EXISTS sandboxes_totals "
               "ON sandboxes(state, team_id, node_id, cpu_count, memory_mb)")
    db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))


class SqliteStore(StateStore):
    """SQLite in WAL mode: one file, survives restarts, readers never block the writer."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        on_disk = str(path) != ":memory:"
        if on_disk:
            private_dir(self.path.parent)
            private_file(self.path)  # SQLite gives the -wal and -shm files the database's mode
        self._lock = threading.RLock()
        self._sandboxes = SandboxRecords()
        """Parsed sandbox records, by body (:mod:`cube_core.recordcache`)."""
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        if on_disk:  # files made by an older Cube (or another umask)
            for companion in (Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
                if companion.exists():
                    os.chmod(companion, 0o600)
        with self._lock:
            self._db.executescript(_DDL)
        with self._tx() as db:
            _migrate(db)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _rows(self, sql: str, args: tuple[object, ...] = ()) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute(sql, args).fetchall()]

    # sandboxes
    def put_sandbox(self, sandbox: Sandbox) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO sandboxes(id, team_id, state, body) VALUES (?,?,?,?)",
                       (sandbox.sandbox_id, sandbox.team_id, sandbox.state.value,
                        sandbox.model_dump_json()))

    def get_sandbox(self, sandbox_id: str) -> Sandbox | None:
        rows = self._rows("SELECT body FROM sandboxes WHERE id=?", (sandbox_id,))
        return self._sandboxes.parse(rows[0]) if rows else None

    def list_sandboxes(self, *, team_id: str | None = None, states: tuple[SandboxState, ...] | None = None,
                       ends_by: datetime | None = None) -> list[Sandbox]:
        where, args = _sandbox_filter(team_id, states)
        sql = "SELECT body FROM sandboxes WHERE 1=1" + where
        if ends_by is not None:  # julianday: ISO 8601 with or without fractions, Z or an offset
            sql += " AND julianday(json_extract(body, '$.end_at')) <= julianday(?)"
            args.append(ends_by.isoformat())
        return self._sandboxes.parse_all(self._rows(sql + " ORDER BY rowid", tuple(args)))

    def sandbox_totals(self, *, team_id: str | None = None,
                       states: tuple[SandboxState, ...] | None = None) -> list[SandboxTotals]:
        where, filters = _sandbox_filter(team_id, states)
        sql = ("SELECT node_id, team_id, state, count(*), sum(cpu_count), sum(memory_mb) "
               "FROM sandboxes WHERE 1=1" + where + " GROUP BY 1, 2, 3")
        with self._lock:
            rows = self._db.execute(sql, tuple(filters)).fetchall()
        return [SandboxTotals(node_id=r[0], team_id=r[1], state=SandboxState(r[2]), count=int(r[3]),
                              cpu_count=int(r[4]), memory_mb=int(r[5])) for r in rows]

    def delete_sandbox(self, sandbox_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM sandboxes WHERE id=?", (sandbox_id,))

    # templates
    def put_template(self, template: Template) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO templates(id, body) VALUES (?,?)",
                       (template.template_id, template.model_dump_json()))
            db.execute("DELETE FROM template_aliases WHERE template_id=?", (template.template_id,))
            for alias in template.aliases:
                db.execute("INSERT OR REPLACE INTO template_aliases(alias, template_id) VALUES (?,?)",
                           (alias, template.template_id))

    def get_template(self, template_id_or_alias: str) -> Template | None:
        rows = self._rows("SELECT body FROM templates WHERE id=? OR id=(SELECT template_id FROM "
                          "template_aliases WHERE alias=?)", (template_id_or_alias, template_id_or_alias))
        return Template.model_validate_json(rows[0]) if rows else None

    def list_templates(self) -> list[Template]:
        return [Template.model_validate_json(b) for b in self._rows("SELECT body FROM templates ORDER BY id")]

    def delete_template(self, template_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM templates WHERE id=?", (template_id,))
            db.execute("DELETE FROM template_aliases WHERE template_id=?", (template_id,))
            db.execute("DELETE FROM template_builds WHERE template_id=?", (template_id,))

    # template builds
    def put_build(self, build: TemplateBuild) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO template_builds(id, template_id, created, body) VALUES (?,?,?,?)",
                       (build.build_id, build.template_id, build.created_at.timestamp(), build.model_dump_json()))

    def get_build(self, build_id: str) -> TemplateBuild | None:
        rows = self._rows("SELECT body FROM template_builds WHERE id=?", (build_id,))
        return TemplateBuild.model_validate_json(rows[0]) if rows else None

    def list_builds(self, template_id: str) -> list[TemplateBuild]:
        return [TemplateBuild.model_validate_json(b) for b in self._rows(
            "SELECT body FROM template_builds WHERE template_id=? ORDER BY created DESC, rowid DESC", (template_id,))]

    # snapshots
    def put_snapshot(self, snapshot: SnapshotRef) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO snapshots(id, team_id, sandbox_id, body) VALUES (?,?,?,?)",
                       (snapshot.snapshot_id, snapshot.team_id, snapshot.sandbox_id,
                        snapshot.model_dump_json()))

    def get_snapshot(self, snapshot_id: str) -> SnapshotRef | None:
        rows = self._rows("SELECT body FROM snapshots WHERE id=?", (snapshot_id,))
        return SnapshotRef.model_validate_json(rows[0]) if rows else None

    def list_snapshots(self, *, team_id: str | None = None,
                       sandbox_id: str | None = None) -> list[SnapshotRef]:
        sql, args = "SELECT body FROM snapshots WHERE 1=1", []
        if team_id is not None:
            sql += " AND team_id=?"
            args.append(team_id)
        if sandbox_id is not None:
            sql += " AND sandbox_id=?"
            args.append(sandbox_id)
        return [SnapshotRef.model_validate_json(b) for b in self._rows(sql + " ORDER BY rowid", tuple(args))]

    def delete_snapshot(self, snapshot_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM snapshots WHERE id=?", (snapshot_id,))

    # nodes
    def put_node(self, node: Node) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO nodes(id, body) VALUES (?,?)",
                       (node.node_id, node.model_dump_json()))

    def list_nodes(self) -> list[Node]:
        return [Node.model_validate_json(b) for b in self._rows("SELECT body FROM nodes ORDER BY id")]

    @contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        """An flock on ``<db>.<name>.lock`` (other processes and store objects on this file)
        inside this store's own lock (its threads)."""
        with self._lock:
            if str(self.path) == ":memory:":
                yield
                return
            fd = os.open(f"{self.path}.{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT INTO leases(name, holder, until) VALUES (?,?,?) ON CONFLICT(name) DO UPDATE SET "
                       "holder=excluded.holder, until=excluded.until WHERE leases.holder=excluded.holder "
                       "OR leases.until < ?", (name, holder, now + ttl_s, now))
            row = db.execute("SELECT holder FROM leases WHERE name=?", (name,)).fetchone()
        return bool(row and row[0] == holder)

    # teams and keys
    def put_team(self, team: Team) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO teams(id, name, body) VALUES (?,?,?)",
                       (team.team_id, team.name, team.model_dump_json()))

    def get_team(self, team_id: str) -> Team | None:
        rows = self._rows("SELECT body FROM teams WHERE id=?", (team_id,))
        return Team.model_validate_json(rows[0]) if rows else None

    def find_team(self, name: str) -> Team | None:
        rows = self._rows("SELECT body FROM teams WHERE name=?", (name,))
        return Team.model_validate_json(rows[0]) if rows else None

    def put_api_key(self, key: ApiKey) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO api_keys(id, team_id, key_hash, body) VALUES (?,?,?,?)",
                       (key.key_id, key.team_id, key.key_hash, key.model_dump_json()))

    def find_api_key(self, key_hash: str) -> ApiKey | None:
        rows = self._rows("SELECT body FROM api_keys WHERE key_hash=?", (key_hash,))
        return ApiKey.model_validate_json(rows[0]) if rows else None

    def list_api_keys(self, *, team_id: str | None = None) -> list[ApiKey]:
        if team_id is None:
            return [ApiKey.model_validate_json(b) for b in self._rows("SELECT body FROM api_keys ORDER BY rowid")]
        return [ApiKey.model_validate_json(b)
                for b in self._rows("SELECT body FROM api_keys WHERE team_id=? ORDER BY rowid", (team_id,))]

    # secrets, key labels, access tokens
    def add_secret(self, secret: SecretRecord) -> bool:
        with self._tx() as db:
            cur = db.execute("INSERT OR IGNORE INTO secrets(id, team_id, name, body) VALUES (?,?,?,?)",
                             (secret.secret_id, secret.team_id, secret.name, secret.model_dump_json()))
            return cur.rowcount == 1

    def replace_secret(self, secret: SecretRecord) -> bool:
        with self._tx() as db:
            cur = db.execute("UPDATE secrets SET name=?, body=? WHERE id=? AND team_id=?",
                             (secret.name, secret.model_dump_json(), secret.secret_id, secret.team_id))
            return cur.rowcount == 1

    def get_secret(self, team_id: str, secret_id_or_name: str) -> SecretRecord | None:
        rows = self._rows("SELECT body FROM secrets WHERE team_id=? AND (id=? OR name=?) ORDER BY id=? DESC",
                          (team_id, secret_id_or_name, secret_id_or_name, secret_id_or_name))
        return SecretRecord.model_validate_json(rows[0]) if rows else None

    def list_secrets(self, team_id: str) -> list[SecretRecord]:
        return [SecretRecord.model_validate_json(b)
                for b in self._rows("SELECT body FROM secrets WHERE team_id=? ORDER BY rowid", (team_id,))]

    def delete_secret(self, team_id: str, secret_id: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM secrets WHERE id=? AND team_id=?", (secret_id, team_id)).rowcount == 1

    # volumes
    def add_volume(self, volume: Volume) -> bool:
        with self._tx() as db:
            cur = db.execute("INSERT OR IGNORE INTO volumes(id, team_id, name, node_id, body) VALUES (?,?,?,?,?)",
                             (volume.volume_id, volume.team_id, volume.name, volume.node_id,
                              volume.model_dump_json()))
            return cur.rowcount == 1

    def get_volume(self, volume_id: str) -> Volume | None:
        rows = self._rows("SELECT body FROM volumes WHERE id=?", (volume_id,))
        return Volume.model_validate_json(rows[0]) if rows else None

    def find_volume(self, team_id: str, name: str) -> Volume | None:
        rows = self._rows("SELECT body FROM volumes WHERE team_id=? AND name=?", (team_id, name))
        return Volume.model_validate_json(rows[0]) if rows else None

    def list_volumes(self, *, team_id: str | None = None, node_id: str | None = None) -> list[Volume]:
        sql, args = "SELECT body FROM volumes WHERE 1=1", []
        if team_id is not None:
            sql += " AND team_id=?"
            args.append(team_id)
        if node_id is not None:
            sql += " AND node_id=?"
            args.append(node_id)
        return [Volume.model_validate_json(b) for b in self._rows(sql + " ORDER BY rowid", tuple(args))]

    def delete_volume(self, volume_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM volumes WHERE id=?", (volume_id,))

    def put_key_label(self, label: KeyLabel) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO key_labels(id, team_id, body) VALUES (?,?,?)",
                       (label.key_id, label.team_id, label.model_dump_json()))

    def list_key_labels(self, team_id: str) -> list[KeyLabel]:
        return [KeyLabel.model_validate_json(b)
                for b in self._rows("SELECT body FROM key_labels WHERE team_id=? ORDER BY id", (team_id,))]

    def put_access_token(self, token: AccessToken) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO access_tokens(id, team_id, token_hash, body) VALUES (?,?,?,?)",
                       (token.token_id, token.team_id, token.token_hash, token.model_dump_json()))

    def list_access_tokens(self, team_id: str) -> list[AccessToken]:
        return [AccessToken.model_validate_json(b)
                for b in self._rows("SELECT body FROM access_tokens WHERE team_id=? ORDER BY rowid", (team_id,))]

    def delete_access_token(self, team_id: str, token_id: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM access_tokens WHERE id=? AND team_id=?",
                              (token_id, team_id)).rowcount == 1

    # webhooks and deliveries
    def put_webhook(self, webhook: Webhook) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO webhooks(id, team_id, body) VALUES (?,?,?)",
                       (webhook.webhook_id, webhook.team_id, webhook.model_dump_json()))

    def replace_webhook(self, webhook: Webhook) -> bool:
        with self._tx() as db:
            return db.execute("UPDATE webhooks SET body=? WHERE id=? AND team_id=?",
                              (webhook.model_dump_json(), webhook.webhook_id, webhook.team_id)).rowcount == 1

    def get_webhook(self, team_id: str, webhook_id: str) -> Webhook | None:
        rows = self._rows("SELECT body FROM webhooks WHERE id=? AND team_id=?", (webhook_id, team_id))
        return Webhook.model_validate_json(rows[0]) if rows else None

    def list_webhooks(self, team_id: str) -> list[Webhook]:
        return [Webhook.model_validate_json(b)
                for b in self._rows("SELECT body FROM webhooks WHERE team_id=? ORDER BY rowid", (team_id,))]

    def delete_webhook(self, team_id: str, webhook_id: str) -> bool:
        with self._tx() as db:
            gone = db.execute("DELETE FROM webhooks WHERE id=? AND team_id=?", (webhook_id, team_id)).rowcount == 1
            if gone:
                db.execute("DELETE FROM webhook_deliveries WHERE webhook_id=?", (webhook_id,))
            return gone

    def add_deliveries(self, deliveries: Sequence[Delivery]) -> int:
        with self._tx() as db:
            return sum(db.execute(
                "INSERT OR IGNORE INTO webhook_deliveries(id, webhook_id, team_id, status, next_at, created, body) "
                "VALUES (?,?,?,?,?,?,?)",
                (d.delivery_id, d.webhook_id, d.team_id, d.status.value, d.next_attempt_at.timestamp(),
                 d.created_at.timestamp(), d.model_dump_json())).rowcount for d in deliveries)

    def claim_deliveries(self, holder: str, now: datetime, limit: int, lease_s: float) -> list[Delivery]:
        at = now.timestamp()
        with self._tx() as db:  # BEGIN IMMEDIATE: one writer at a time, across processes too
            rows = db.execute(
                "SELECT id, body FROM webhook_deliveries WHERE status=? AND next_at<=? AND "
                "(claim_until IS NULL OR claim_until<?) ORDER BY next_at, rowid LIMIT ?",
                (DeliveryStatus.PENDING.value, at, at, limit)).fetchall()
            db.executemany("UPDATE webhook_deliveries SET claimed_by=?, claim_until=? WHERE id=?",
                           [(holder, at + lease_s, row[0]) for row in rows])
        return [Delivery.model_validate_json(row[1]) for row in rows]

    def finish_delivery(self, delivery: Delivery, holder: str) -> bool:
        with self._tx() as db:
            return db.execute(
                "UPDATE webhook_deliveries SET status=?, next_at=?, body=?, claimed_by=NULL, claim_until=NULL "
                "WHERE id=? AND claimed_by=?",
                (delivery.status.value, delivery.next_attempt_at.timestamp(), delivery.model_dump_json(),
                 delivery.delivery_id, holder)).rowcount == 1

    def release_deliveries(self, holder: str) -> int:
        with self._tx() as db:
            return int(db.execute("UPDATE webhook_deliveries SET claimed_by=NULL, claim_until=NULL "
                                  "WHERE claimed_by=?", (holder,)).rowcount)

    def list_deliveries(self, team_id: str, webhook_id: str, *, limit: int = 100) -> list[Delivery]:
        return [Delivery.model_validate_json(b) for b in self._rows(
            "SELECT body FROM webhook_deliveries WHERE team_id=? AND webhook_id=? ORDER BY created DESC, rowid DESC "
            "LIMIT ?", (team_id, webhook_id, limit))]

    def prune_deliveries(self, before: datetime) -> int:
        with self._tx() as db:
            return int(db.execute("DELETE FROM webhook_deliveries WHERE status<>? AND created<?",
                                  (DeliveryStatus.PENDING.value, before.timestamp())).rowcount)

    # observations
    def add_metric_samples(self, samples: Sequence[MetricSample]) -> None:
        with self._tx() as db:
            db.executemany("INSERT INTO sandbox_metrics(sandbox_id, team_id, at, body) VALUES (?,?,?,?)",
                           [(m.sandbox_id, m.team_id, m.at.timestamp(), m.model_dump_json()) for m in samples])

    def metric_samples(self, sandbox_id: str, *, start: datetime | None = None, end: datetime | None = None,
                       limit: int = 10_000) -> list[MetricSample]:
        sql, args = "SELECT body FROM sandbox_metrics WHERE sandbox_id=?", list[object]([sandbox_id])
        if start is not None:
            sql += " AND at>=?"
            args.append(start.timestamp())
        if end is not None:
            sql += " AND at<=?"
            args.append(end.timestamp())
        rows = self._rows(sql + " ORDER BY at DESC, rowid DESC LIMIT ?", (*args, limit))
        return [MetricSample.model_validate_json(b) for b in reversed(rows)]

    def team_concurrency(self, team_id: str, start: datetime, end: datetime,
                         step_s: int) -> list[tuple[datetime, int]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT CAST(at / ? AS INTEGER) * ? AS slot, COUNT(DISTINCT sandbox_id) FROM sandbox_metrics "
                "WHERE team_id=? AND at>=? AND at<=? GROUP BY slot ORDER BY slot",
                (step_s, step_s, team_id, start.timestamp(), end.timestamp())).fetchall()
        return [(datetime.fromtimestamp(slot, UTC), int(n)) for slot, n in rows]

    def add_log_entries(self, entries: Sequence[LogEntry]) -> None:
        with self._tx() as db:
            db.executemany("INSERT OR IGNORE INTO sandbox_logs(sandbox_id, seq, at_ms, level, message, body) "
                           "VALUES (?,?,?,?,?,?)",
                           [(e.sandbox_id, e.seq, e.at_ms, e.level, e.message, e.model_dump_json()) for e in entries])

    def log_entries(self, sandbox_id: str, *, cursor_ms: int | None = None, limit: int = 1000,
                    backward: bool = False, levels: tuple[LogLevel, ...] | None = None,
                    search: str | None = None) -> list[LogEntry]:
        sql, args = "SELECT body FROM sandbox_logs WHERE sandbox_id=?", list[object]([sandbox_id])
        if cursor_ms is not None:
            sql += " AND at_ms<=?" if backward else " AND at_ms>=?"
            args.append(cursor_ms)
        if levels is not None:
            sql += f" AND level IN ({','.join('?' * len(levels))})"
            args.extend(levels)
        if search:
            sql += " AND instr(message, ?) > 0"
            args.append(search)
        order = "DESC" if backward else "ASC"
        rows = self._rows(f"{sql} ORDER BY at_ms {order}, seq {order} LIMIT ?", (*args, limit))
        return [LogEntry.model_validate_json(b) for b in rows]

    def prune_observations(self, before: datetime) -> int:
        with self._tx() as db:
            gone = db.execute("DELETE FROM sandbox_metrics WHERE at<?", (before.timestamp(),)).rowcount
            return int(gone + db.execute("DELETE FROM sandbox_logs WHERE at_ms<?",
                                         (int(before.timestamp() * 1000),)).rowcount)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_store(settings: CoreSettings) -> StateStore:
    """The store ``[core] state`` names: PostgreSQL for a URL, else SQLite at ``<state_dir>/cube.db``."""
    url = state_url(settings.state)
    if url is None:
        return SqliteStore(Path(settings.state_dir) / "cube.db")
    from cube_core.store_postgres import PostgresStore  # psycopg is imported only when configured

    return PostgresStore(url)
