"""The contract every :class:`~cube_core.store.StateStore` passes: SQLite, PostgreSQL, yours.

Subclass it and provide ``store_factory``: a callable that opens a store on one backing database
each time it is called (the first call finds it empty; later calls, like a restarted or a second
master, see what the others wrote)::

    class TestMyStore(StoreContract):
        @pytest.fixture
        def store_factory(self, tmp_path): return lambda: MyStore(tmp_path / "db")

The suite closes every store it opens. What it pins down, beyond "what is put comes back":
every model field round-trips exactly; a missing id reads as ``None`` and deleting it is a no-op;
a re-put replaces the record (lists hold it once, at the position of its last put); sandboxes,
snapshots and API keys are listed in the order of their last put, templates and nodes by id; an
alias, a team name and a key hash each belong to the one record last put with it; a secret's
name is unique within its team (the first add wins) and secrets, key labels and access tokens are
only ever read, changed or deleted within their team, and so are webhooks; a delivery id is
recorded once, and a due delivery is claimed by one holder at a time (also from several threads
and stores), its outcome written only by its holder; writes from one
open store are seen by another, also when they write at the same time from several threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from cube_core.buildspec import BuildLogLine, BuildPlan, BuildStatus, BuildStep, TemplateBuild
from cube_core.credentials import AccessToken, KeyLabel, SecretRecord
from cube_core.models import (
    ApiKey,
    DiskHandle,
    NetworkPolicy,
    NicHandle,
    Node,
    NodeStatus,
    Sandbox,
    SandboxRuntime,
    SnapshotRef,
    Team,
    Template,
    TemplateStatus,
    VmHandle,
    VmState,
    Volume,
    VolumeMount,
)
from cube_core.observations import LogEntry, LogLevel, MetricSample
from cube_core.state import SandboxState
from cube_core.store import SandboxTotals, StateStore
from cube_core.webhooks import Delivery, DeliveryAttempt, DeliveryStatus, Webhook

StoreFactory = Callable[[], StateStore]
T0 = datetime(2026, 12, 7, 1, 2, 3, 456789, tzinfo=UTC)


def full_sandbox(sandbox_id: str = "sbx-full", team_id: str = "team-a",
                 state: SandboxState = SandboxState.PAUSED) -> Sandbox:
    """A sandbox with every field away from its default (text that stresses encodings too)."""
    return Sandbox(
        sandbox_id=sandbox_id, template_id="tpl-code", alias="code-interpreter-v1", team_id=team_id, state=state,
        started_at=T0, end_at=T0 + timedelta(seconds=300, microseconds=1),
        metadata={"user": "Zoë ✓", "quote": "it's \"fine\"; DROP TABLE x; --", "nul": "a\x00b", "empty": ""},
        env_vars={"PATH": "/usr/bin", "MULTI": "line1\nline2", "EMOJI": "🦀"},
        cpu_count=4, memory_mb=2048, auto_pause=True, auto_pause_memory=False, auto_resume=True, timeout_s=3600,
        paused_at=T0 + timedelta(seconds=7), secure=True, envd_access_token="tok-\u00e9-123",
        network=NetworkPolicy(allow_internet_access=False, allow_out=("10.0.0.0/8", "example.com"),
                              deny_out=("0.0.0.0/0",), allow_public_traffic=False),
        node_id="node-7", isolation="tcg", boot_id="boot-42", error="guest said: \u2603",
        volume_mounts=(VolumeMount(name="data ✓", path="/mnt/data", read_only=True, volume_id="vol_1"),),
        runtime=SandboxRuntime(
            vm=VmHandle(vm_id="sbx-full", pid=1234, isolation="tcg", workdir=Path("/run/cube/vms/sbx ✓"),
                        data={"ratio": 0.1, "big": 2**62, "flags": [True, None, "x"], "n": -1.5e-7}),
            disk=DiskHandle(disk_id="sbx-full", path=Path("/var/lib/cube/disks/sbx-full.qcow2")),
            nic=NicHandle(slot_id="s7", netns="cube-s7", tap="tap0", guest_address="100.64.0.30"),
            parent_snapshot="snap-parent",
            saved=VmState(state_id="sbx-full-mem-0a1b2c", memory_file=Path("/var/lib/cube/snapshots/m ✓"),
                          device_state=Path("/var/lib/cube/snapshots/d"), memory_mb=512, kernel=Path("/k/vmlinux"),
                          isolation="tcg", data={"format": "diff"}, base_state_id="snap-tpl")))


def full_snapshot(snapshot_id: str = "snap-full", team_id: str | None = "team-a",
                  sandbox_id: str | None = "sbx-full") -> SnapshotRef:
    return SnapshotRef(
        snapshot_id=snapshot_id, template_id="tpl-code", sandbox_id=sandbox_id, parent_id="snap-parent",
        team_id=team_id, created_at=T0, vm_state=VmState(
            state_id=snapshot_id, memory_file=Path("/var/lib/cube/ram"), device_state=Path("/var/lib/cube/dev"),
            memory_mb=1 << 13, cpu_count=2, kernel=Path("/k/vmlinux"), isolation="kvm",
            data={"bytes": 1 << 33}, base_state_id="snap-tpl"),
        disk=DiskHandle(disk_id=snapshot_id, path=Path("/var/lib/cube/snap/disk"), readonly=True,
                        data={"layers": ["a", "b"]}), node_id="node-7", names=("team-a/my-snap", "latest"),
        metadata={"k": "v ✓"})


def full_template(template_id: str = "tpl-code", aliases: tuple[str, ...] = ("code-interpreter-v1", "ci")) -> Template:
    return Template(
        template_id=template_id, aliases=aliases, status=TemplateStatus.READY, kernel="/k/vmlinux",
        initrd="/k/initrd", rootfs="/r/rootfs.img", rootfs_bytes=3 << 30, interpreter=True, cpu_count=2,
        memory_mb=1024, envd_version="0.5.1", build_log="step 1\nstep 2 ✓\n", created_at=T0,
        snapshot=full_snapshot("snap-tpl", team_id=None, sandbox_id=None), team_id="team-a",
        build_id="0b5e6c1e-0000-4000-8000-00000000b001", published=True, updated_at=T0 + timedelta(hours=1))


def full_build(build_id: str = "0b5e6c1e-0000-4000-8000-00000000b001", template_id: str = "tpl-code",
               created_at: datetime = T0) -> TemplateBuild:
    plan = BuildPlan(from_template="base", from_image="e2bdev/base", force=True, start_cmd="sleep inf",
                     ready_cmd="true", steps=(BuildStep(type="COPY", args=("a", "/b", "user", "0755"),
                                                        files_hash="f" * 64, force=True),))
    return TemplateBuild(
        build_id=build_id, template_id=template_id, team_id="team-a", name="my-tpl ✓", tags=("v1", "default"),
        status=BuildStatus.ERROR, cpu_count=2, memory_mb=1024, plan=plan, node_id="node-7",
        logs=(BuildLogLine(timestamp=T0, level="error", message="exit code 7 ✓", step="1"),),
        reason="step 1 failed", reason_step="1", steps_run=1, steps_cached=2, created_at=created_at,
        finished_at=T0 + timedelta(seconds=5), snapshot=full_snapshot(f"tmpl-{template_id}", team_id=None),
        freed_at=T0 + timedelta(minutes=5))


def full_node(node_id: str = "node-7") -> Node:
    return Node(node_id=node_id, url="http://10.1.2.3:7070", cpu_total=16, memory_mb_total=65536, cpu_used=3,
                memory_mb_used=4096, sandboxes=5, sandboxes_paused=2, pool={"tpl-code": 3},
                templates=("tpl-code", "base"), disk_free_mb=12345, memory_mb_available=777, isolation="tcg",
                status=NodeStatus.DRAINING,
                heartbeat_at=T0, snapshots=("snap-copied-here",))


def full_team(team_id: str = "team-a", name: str = "Team A ✓") -> Team:
    return Team(team_id=team_id, name=name, created_at=T0)


def full_key(key_id: str = "key-1", team_id: str = "team-a", key_hash: str = "h" * 64) -> ApiKey:
    return ApiKey(key_id=key_id, team_id=team_id, key_hash=key_hash, prefix="e2b_abcdef", created_at=T0,
                  revoked=True)


def full_secret(secret_id: str = "sec_1", team_id: str = "team-a", name: str = "openai-key") -> SecretRecord:
    return SecretRecord(secret_id=secret_id, team_id=team_id, name=name, version=3,
                        metadata={"owner": "Zoë ✓", "quote": "it's \"x\"; --", "empty": ""},
                        sealed="bm9uY2UrY2lwaGVydGV4dA==", created_at=T0, updated_at=T0 + timedelta(seconds=1))


def full_token(token_id: str = "0b5e6c1e-0000-4000-8000-000000000001", team_id: str = "team-a") -> AccessToken:
    return AccessToken(token_id=token_id, team_id=team_id, name="ci ✓", token_hash="t" * 64, masked_prefix="ab",
                       masked_suffix="wxyz", length=40, created_at=T0)


def full_webhook(webhook_id: str = "wh_1", team_id: str = "team-a") -> Webhook:
    return Webhook(webhook_id=webhook_id, team_id=team_id, name="ops ✓", url="https://hooks.example.com/cube?x=1",
                   events=("sandbox.created", "sandbox.killed"), enabled=False, sealed_secret="c2VhbGVk",
                   disabled_reason="the receiver answered 410 Gone", created_at=T0,
                   updated_at=T0 + timedelta(seconds=1))


def full_delivery(delivery_id: str = "msg_1", webhook_id: str = "wh_1", team_id: str = "team-a",
                  due: datetime = T0, created_at: datetime = T0,
                  status: DeliveryStatus = DeliveryStatus.PENDING) -> Delivery:
    return Delivery(delivery_id=delivery_id, webhook_id=webhook_id, team_id=team_id, event_id="evt-1 ✓",
                    event_type="sandbox.created", payload='{"type":"sandbox.created","data":{"x":"Zoë"}}',
                    status=status, attempts=(DeliveryAttempt(at=T0, status_code=503, error="the receiver answered 503",
                                                             latency_ms=12.5),),
                    next_attempt_at=due, created_at=created_at)


def full_volume(volume_id: str = "vol_1", team_id: str = "team-a", name: str = "data",
                node_id: str = "node-7") -> Volume:
    return Volume(volume_id=volume_id, team_id=team_id, name=name, size_mb=2048, token="tok-" + volume_id,
                  node_id=node_id, created_at=T0)


def sandbox(sandbox_id: str, team_id: str = "team-a", state: SandboxState = SandboxState.RUNNING) -> Sandbox:
    return Sandbox(sandbox_id=sandbox_id, template_id="base", team_id=team_id, state=state, started_at=T0,
                   end_at=T0 + timedelta(seconds=60))


ID_FIELDS: dict[type[BaseModel], str] = {Sandbox: "sandbox_id", SnapshotRef: "snapshot_id", ApiKey: "key_id",
                                         Template: "template_id", Node: "node_id", Team: "team_id",
                                         SecretRecord: "secret_id", KeyLabel: "key_id", AccessToken: "token_id",
                                         Webhook: "webhook_id", Delivery: "delivery_id", Volume: "volume_id"}


def ids(records: Sequence[BaseModel]) -> list[str]:
    return [str(getattr(r, ID_FIELDS[type(r)])) for r in records]


def assert_every_field_set(record: BaseModel) -> None:
    """The round-trip records must set every field: a field added later is then covered too."""
    unset = set(type(record).model_fields) - record.model_fields_set
    assert not unset, f"{type(record).__name__} round-trip record leaves {unset} at the default: set them"


class StoreContract:
    """What every StateStore must do. Fixture: ``store_factory`` (see the module docstring)."""

    @pytest.fixture
    def open_store(self, store_factory: StoreFactory) -> Iterator[StoreFactory]:
        opened: list[StateStore] = []

        def open_one() -> StateStore:
            opened.append(store_factory())
            return opened[-1]

        yield open_one
        for store in reversed(opened):
            store.close()

    @pytest.fixture
    def store(self, open_store: StoreFactory) -> StateStore:
        return open_store()

    # -- sandboxes ------------------------------------------------------------------------------

    def test_sandbox_round_trips_every_field(self, store: StateStore) -> None:
        record = full_sandbox()
        assert_every_field_set(record)
        store.put_sandbox(record)
        assert store.get_sandbox(record.sandbox_id) == record
        assert store.list_sandboxes() == [record]

    def test_missing_sandbox_is_none_and_deleting_it_is_a_no_op(self, store: StateStore) -> None:
        assert store.get_sandbox("nope") is None
        store.delete_sandbox("nope")
        store.put_sandbox(sandbox("a"))
        store.delete_sandbox("nope")
        assert ids(store.list_sandboxes()) == ["a"]

    def test_sandbox_put_replaces_and_delete_removes_only_it(self, store: StateStore) -> None:
        for sid in ("a", "b", "c"):
            store.put_sandbox(sandbox(sid))
        store.put_sandbox(sandbox("a", team_id="team-b", state=SandboxState.PAUSED))
        assert ids(store.list_sandboxes()) == ["b", "c", "a"]  # order of last put
        moved = store.get_sandbox("a")
        assert moved is not None and (moved.team_id, moved.state) == ("team-b", SandboxState.PAUSED)
        assert ids(store.list_sandboxes(team_id="team-a")) == ["b", "c"]  # filters follow the new columns
        store.delete_sandbox("b")
        assert store.get_sandbox("b") is None
        assert ids(store.list_sandboxes()) == ["c", "a"]

    def test_sandbox_filters(self, store: StateStore) -> None:
        store.put_sandbox(sandbox("a1", "team-a", SandboxState.RUNNING))
        store.put_sandbox(sandbox("b1", "team-b", SandboxState.PAUSED))
        store.put_sandbox(sandbox("a2", "team-a", SandboxState.KILLED))
        store.put_sandbox(sandbox("a3", "team-a", SandboxState.PAUSED))
        assert ids(store.list_sandboxes()) == ["a1", "b1", "a2", "a3"]
        assert ids(store.list_sandboxes(team_id="team-a")) == ["a1", "a2", "a3"]
        assert ids(store.list_sandboxes(states=(SandboxState.PAUSED,))) == ["b1", "a3"]
        assert ids(store.list_sandboxes(states=(SandboxState.RUNNING, SandboxState.KILLED))) == ["a1", "a2"]
        assert ids(store.list_sandboxes(team_id="team-a", states=(SandboxState.PAUSED,))) == ["a3"]
        assert store.list_sandboxes(team_id="team-c") == []
        assert store.list_sandboxes(states=(SandboxState.ERROR,)) == []
        assert ids(store.list_sandboxes(team_id="team-b", states=None)) == ["b1"]

    def test_sandbox_totals_sum_per_node_team_and_state(self, store: StateStore) -> None:
        """The store's sums (in SQL) are what parsing every record gives (the base class's
        default), with the same filters; a re-put moves a record, a delete drops it."""
        def put(sid: str, team: str, state: SandboxState, node: str, cpu: int, mem: int) -> None:
            store.put_sandbox(sandbox(sid, team, state).evolve(node_id=node, cpu_count=cpu, memory_mb=mem))

        put("a1", "team-a", SandboxState.RUNNING, "n1", 2, 1024)
        put("a2", "team-a", SandboxState.RUNNING, "n1", 1, 512)
        put("a3", "team-a", SandboxState.PAUSED, "n1", 4, 2048)
        put("a4", "team-a", SandboxState.RUNNING, "n2", 8, 4096)
        put("b1", "team-b", SandboxState.CREATING, "n1", 1, 256)
        put("k1", "team-a", SandboxState.KILLED, "n1", 16, 8192)
        put("a2", "team-a", SandboxState.PAUSED, "n1", 1, 512)  # re-put: moves to PAUSED
        store.put_sandbox(sandbox("gone"))
        store.delete_sandbox("gone")

        def totals(**filters: Any) -> set[SandboxTotals]:
            return set(store.sandbox_totals(**filters))

        live = (SandboxState.CREATING, SandboxState.RUNNING, SandboxState.PAUSED)
        assert totals(states=live) == {
            SandboxTotals("n1", "team-a", SandboxState.RUNNING, 1, 2, 1024),
            SandboxTotals("n1", "team-a", SandboxState.PAUSED, 2, 5, 2560),
            SandboxTotals("n2", "team-a", SandboxState.RUNNING, 1, 8, 4096),
            SandboxTotals("n1", "team-b", SandboxState.CREATING, 1, 1, 256)}
        assert totals(team_id="team-b") == {SandboxTotals("n1", "team-b", SandboxState.CREATING, 1, 1, 256)}
        assert totals(team_id="team-a", states=(SandboxState.KILLED,)) == {
            SandboxTotals("n1", "team-a", SandboxState.KILLED, 1, 16, 8192)}
        assert totals(team_id="team-c") == set()
        for filters in ({}, {"states": live}, {"team_id": "team-a"}, {"team_id": "team-a", "states": live}):
            assert totals(**filters) == set(StateStore.sandbox_totals(store, **filters))  # = parsing them

    def test_sandboxes_ending_by(self, store: StateStore) -> None:
        """``ends_by`` compares instants (to the millisecond), not strings: fractions of a second,
        another UTC offset."""
        ends = {"whole": T0 + timedelta(seconds=10), "fraction": T0 + timedelta(seconds=10, microseconds=500_000),
                "later": T0 + timedelta(seconds=11), "offset": (T0 + timedelta(seconds=9)).astimezone(
                    timezone(timedelta(hours=-5)))}
        for name, end in ends.items():
            store.put_sandbox(sandbox(name).evolve(end_at=end))
        store.put_sandbox(sandbox("paused", state=SandboxState.PAUSED).evolve(end_at=T0))
        at = T0 + timedelta(seconds=10, microseconds=499_000)
        assert ids(store.list_sandboxes(ends_by=at)) == ["whole", "offset", "paused"]
        assert ids(store.list_sandboxes(states=(SandboxState.RUNNING,), ends_by=at)) == ["whole", "offset"]
        assert ids(store.list_sandboxes(ends_by=T0 + timedelta(seconds=10, microseconds=500_000))) == [
            "whole", "fraction", "offset", "paused"]
        assert store.list_sandboxes(team_id="team-b", ends_by=T0 + timedelta(days=1)) == []
        assert ids(store.list_sandboxes(ends_by=(T0 + timedelta(seconds=11)).astimezone(
            timezone(timedelta(hours=3))))) == ["whole", "fraction", "later", "offset", "paused"]

    # -- templates ------------------------------------------------------------------------------

    def test_template_round_trips_every_field(self, store: StateStore) -> None:
        record = full_template()
        assert_every_field_set(record)
        assert record.snapshot is not None
        assert_every_field_set(record.snapshot)
        store.put_template(record)
        assert store.get_template("tpl-code") == record
        assert store.get_template("code-interpreter-v1") == record
        assert store.get_template("ci") == record
        assert store.list_templates() == [record]

    def test_missing_template_is_none_and_deleting_it_is_a_no_op(self, store: StateStore) -> None:
        assert store.get_template("nope") is None
        store.delete_template("nope")
        assert store.list_templates() == []

    def test_template_aliases_follow_the_last_put(self, store: StateStore) -> None:
        store.put_template(Template(template_id="t1", aliases=("old", "shared")))
        store.put_template(Template(template_id="t1", aliases=("new", "shared")))
        assert store.get_template("old") is None
        assert ids([t for t in [store.get_template("new"), store.get_template("shared")] if t]) == ["t1", "t1"]
        store.put_template(Template(template_id="t2", aliases=("shared",)))  # the alias moves to t2
        found = store.get_template("shared")
        assert found is not None and found.template_id == "t2"
        store.delete_template("t2")
        assert store.get_template("shared") is None and store.get_template("t2") is None
        found = store.get_template("new")
        assert found is not None and found.template_id == "t1"

    def test_an_id_wins_over_another_templates_alias(self, store: StateStore) -> None:
        store.put_template(Template(template_id="base", aliases=("b",)))
        store.put_template(Template(template_id="other", aliases=("base",)))
        found = store.get_template("base")
        assert found is not None and found.template_id == "base"

    def test_templates_are_listed_by_id_and_delete_removes_only_one(self, store: StateStore) -> None:
        for tid in ("zeta", "Alpha", "beta", "alpha"):
            store.put_template(Template(template_id=tid, aliases=(f"{tid}-alias",)))
        assert ids(store.list_templates()) == ["Alpha", "alpha", "beta", "zeta"]  # bytewise
        store.delete_template("beta")
        assert ids(store.list_templates()) == ["Alpha", "alpha", "zeta"]
        assert store.get_template("beta-alias") is None
        found = store.get_template("zeta-alias")
        assert found is not None and found.template_id == "zeta"

    # -- template builds ------------------------------------------------------------------------

    def test_build_round_trips_every_field(self, store: StateStore) -> None:
        record = full_build()
        assert_every_field_set(record)
        assert record.plan is not None
        assert_every_field_set(record.plan)
        assert_every_field_set(record.plan.steps[0])
        assert_every_field_set(record.logs[0])
        store.put_build(record)
        assert store.get_build(record.build_id) == record
        assert store.list_builds("tpl-code") == [record]

    def test_builds_list_newest_first_per_template_and_a_put_replaces(self, store: StateStore) -> None:
        assert store.get_build("nope") is None and store.list_builds("tpl-code") == []
        old = full_build("b-old", created_at=T0)
        new = full_build("b-new", created_at=T0 + timedelta(minutes=1))
        store.put_build(new)
        store.put_build(old)
        store.put_build(full_build("b-other", template_id="tpl-other"))
        assert [b.build_id for b in store.list_builds("tpl-code")] == ["b-new", "b-old"]
        store.put_build(old.model_copy(update={"status": BuildStatus.READY}))
        found = store.get_build("b-old")
        assert found is not None and found.status == BuildStatus.READY
        assert [b.build_id for b in store.list_builds("tpl-code")] == ["b-new", "b-old"]
        assert [b.build_id for b in store.list_builds("tpl-other")] == ["b-other"]
        store.delete_template("tpl-code")  # its builds go with it, the others' stay
        assert store.list_builds("tpl-code") == [] and store.get_build("b-old") is None
        assert [b.build_id for b in store.list_builds("tpl-other")] == ["b-other"]

    # -- snapshots ------------------------------------------------------------------------------

    def test_snapshot_round_trips_every_field(self, store: StateStore) -> None:
        record = full_snapshot()
        assert_every_field_set(record)
        store.put_snapshot(record)
        assert store.get_snapshot(record.snapshot_id) == record
        assert store.list_snapshots() == [record]

    def test_missing_snapshot_is_none_and_deleting_it_is_a_no_op(self, store: StateStore) -> None:
        assert store.get_snapshot("nope") is None
        store.delete_snapshot("nope")
        assert store.list_snapshots() == []

    def test_snapshot_filters_put_and_delete(self, store: StateStore) -> None:
        store.put_snapshot(SnapshotRef(snapshot_id="s1", template_id="t", team_id="team-a", sandbox_id="x"))
        store.put_snapshot(SnapshotRef(snapshot_id="s2", template_id="t", team_id="team-b", sandbox_id="x"))
        store.put_snapshot(SnapshotRef(snapshot_id="s3", template_id="t"))  # a template's: no team, no sandbox
        store.put_snapshot(SnapshotRef(snapshot_id="s4", template_id="t", team_id="team-a", sandbox_id="y"))
        assert ids(store.list_snapshots()) == ["s1", "s2", "s3", "s4"]
        assert ids(store.list_snapshots(team_id="team-a")) == ["s1", "s4"]
        assert ids(store.list_snapshots(sandbox_id="x")) == ["s1", "s2"]
        assert ids(store.list_snapshots(team_id="team-a", sandbox_id="x")) == ["s1"]
        assert store.list_snapshots(team_id="team-c") == []
        store.put_snapshot(SnapshotRef(snapshot_id="s1", template_id="t", team_id="team-b", sandbox_id="y"))
        assert ids(store.list_snapshots()) == ["s2", "s3", "s4", "s1"]
        assert ids(store.list_snapshots(team_id="team-b")) == ["s2", "s1"]
        store.delete_snapshot("s2")
        assert store.get_snapshot("s2") is None
        assert ids(store.list_snapshots(sandbox_id="x")) == []

    # -- nodes ----------------------------------------------------------------------------------

    def test_node_round_trips_every_field_and_put_replaces(self, store: StateStore) -> None:
        assert store.list_nodes() == []
        record = full_node()
        assert_every_field_set(record)
        store.put_node(record)
        plain = Node(node_id="node-1", cpu_total=2, memory_mb_total=1024)
        store.put_node(plain)
        assert store.list_nodes() == [plain, record]
        updated = record.evolve(cpu_used=9, status=NodeStatus.UP)
        store.put_node(updated)
        assert store.list_nodes()[1] == updated and len(store.list_nodes()) == 2

    def test_a_lease_has_one_holder_until_it_expires(self, store: StateStore) -> None:
        assert store.acquire_lease("reaper", "master-a", ttl_s=30)
        assert store.acquire_lease("reaper", "master-a", ttl_s=30), "the holder renews"
        assert not store.acquire_lease("reaper", "master-b", ttl_s=30)
        assert store.acquire_lease("other", "master-b", ttl_s=30), "leases are per name"
        assert store.acquire_lease("short", "master-a", ttl_s=0.05)
        time.sleep(0.2)
        assert store.acquire_lease("short", "master-b", ttl_s=30), "an expired lease goes to the next asker"
        assert not store.acquire_lease("short", "master-a", ttl_s=30)

    def test_leases_race_to_one_holder(self, store: StateStore, open_store: StoreFactory) -> None:
        other_store = open_store()
        won: list[str] = []

        def ask(s: StateStore, holder: str) -> None:
            if s.acquire_lease("race", holder, ttl_s=30):
                won.append(holder)

        threads = [threading.Thread(target=ask, args=(s, f"h{i}"))
                   for i, s in enumerate([store, other_store] * 4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1

    def test_exclusive_sections_of_one_name_never_overlap(self, store: StateStore, open_store: StoreFactory) -> None:
        """Read-then-write inside ``exclusive`` from two stores (two masters) at once loses no
        update: a counter kept in a node record ends at the number of increments."""
        other_store = open_store()
        store.put_node(Node(node_id="counter", cpu_total=1, memory_mb_total=1))

        def bump(s: StateStore) -> None:
            for _ in range(10):
                with s.exclusive("placement"):
                    node = next(n for n in s.list_nodes() if n.node_id == "counter")
                    time.sleep(0.001)
                    s.put_node(node.evolve(sandboxes=node.sandboxes + 1))

        threads = [threading.Thread(target=bump, args=(s,)) for s in (store, other_store, store, other_store)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert next(n for n in store.list_nodes() if n.node_id == "counter").sandboxes == 40

    # -- teams and API keys ---------------------------------------------------------------------

    def test_team_round_trips_every_field(self, store: StateStore) -> None:
        record = full_team()
        assert_every_field_set(record)
        store.put_team(record)
        assert store.get_team("team-a") == record
        assert store.find_team("Team A ✓") == record

    def test_missing_team_is_none(self, store: StateStore) -> None:
        assert store.get_team("nope") is None and store.find_team("nope") is None
        store.put_team(full_team())
        assert store.find_team("team a ✓") is None  # names match exactly

    def test_team_name_belongs_to_one_team(self, store: StateStore) -> None:
        store.put_team(full_team("team-a", "alpha"))
        store.put_team(full_team("team-a", "alpha2"))  # a rename frees the old name
        assert store.find_team("alpha") is None
        store.put_team(full_team("team-b", "alpha"))
        store.put_team(full_team("team-c", "alpha2"))  # the name's last put wins; the other team goes
        found = store.find_team("alpha2")
        assert found is not None and found.team_id == "team-c"
        assert store.get_team("team-a") is None
        found = store.get_team("team-b")
        assert found is not None and found.name == "alpha"

    def test_api_key_round_trips_every_field(self, store: StateStore) -> None:
        record = full_key()
        assert_every_field_set(record)
        store.put_api_key(record)
        assert store.find_api_key("h" * 64) == record
        assert store.list_api_keys() == [record]
        assert store.list_api_keys(team_id="team-a") == [record]

    def test_missing_api_key_is_none(self, store: StateStore) -> None:
        assert store.find_api_key("nope") is None
        assert store.list_api_keys() == [] and store.list_api_keys(team_id="team-a") == []

    def test_api_keys_list_by_team_and_a_re_put_revokes(self, store: StateStore) -> None:
        first = ApiKey(key_id="k1", team_id="team-a", key_hash="h1", prefix="e2b_111111")
        store.put_api_key(first)
        store.put_api_key(ApiKey(key_id="k2", team_id="team-b", key_hash="h2", prefix="e2b_222222"))
        store.put_api_key(ApiKey(key_id="k3", team_id="team-a", key_hash="h3", prefix="e2b_333333"))
        assert ids(store.list_api_keys()) == ["k1", "k2", "k3"]
        assert ids(store.list_api_keys(team_id="team-a")) == ["k1", "k3"]
        assert store.list_api_keys(team_id="team-c") == []
        store.put_api_key(first.evolve(revoked=True))
        found = store.find_api_key("h1")
        assert found is not None and found.revoked
        assert ids(store.list_api_keys()) == ["k2", "k3", "k1"]
        store.put_api_key(ApiKey(key_id="k4", team_id="team-b", key_hash="h2", prefix="e2b_222222"))
        found = store.find_api_key("h2")  # a hash names one key: the last put with it
        assert found is not None and found.key_id == "k4"
        assert ids(store.list_api_keys(team_id="team-b")) == ["k4"]

    # -- team volumes ------------------------------------------------------------------------------

    def test_volume_round_trips_every_field_by_id_and_name(self, store: StateStore) -> None:
        record = full_volume()
        assert_every_field_set(record)
        assert store.add_volume(record)
        assert store.get_volume("vol_1") == record
        assert store.find_volume("team-a", "data") == record
        assert store.find_volume("team-b", "data") is None
        assert store.list_volumes(team_id="team-a") == [record] and store.list_volumes(team_id="team-b") == []

    def test_a_volume_name_is_unique_within_its_team_only(self, store: StateStore) -> None:
        assert store.add_volume(full_volume("vol_1", "team-a", "db"))
        assert not store.add_volume(full_volume("vol_2", "team-a", "db"))  # taken: nothing written
        assert store.get_volume("vol_2") is None
        assert store.add_volume(full_volume("vol_3", "team-b", "db", node_id="node-8"))
        assert store.add_volume(full_volume("vol_4", "team-a", "other"))
        assert ids(store.list_volumes(team_id="team-a")) == ["vol_1", "vol_4"]
        assert ids(store.list_volumes(node_id="node-8")) == ["vol_3"]
        assert ids(store.list_volumes()) == ["vol_1", "vol_3", "vol_4"]

    def test_delete_a_volume_frees_its_name(self, store: StateStore, open_store: StoreFactory) -> None:
        store.add_volume(full_volume("vol_1", "team-a", "db"))
        store.delete_volume("vol_1")
        store.delete_volume("vol_1")  # a no-op
        assert store.get_volume("vol_1") is None and store.find_volume("team-a", "db") is None
        assert store.add_volume(full_volume("vol_2", "team-a", "db"))
        assert open_store().find_volume("team-a", "db") == full_volume("vol_2", "team-a", "db")  # persisted

    # -- a team's secrets, key labels, access tokens: never across teams ---------------------------

    def test_secret_round_trips_every_field_by_id_and_name(self, store: StateStore) -> None:
        record = full_secret()
        assert_every_field_set(record)
        assert store.add_secret(record)
        assert store.get_secret("team-a", "sec_1") == record
        assert store.get_secret("team-a", "openai-key") == record
        assert store.list_secrets("team-a") == [record]
        assert store.get_secret("team-b", "sec_1") is None and store.get_secret("team-b", "openai-key") is None
        assert store.list_secrets("team-b") == []

    def test_a_secret_name_is_unique_within_its_team_only(self, store: StateStore) -> None:
        assert store.add_secret(full_secret("sec_1", "team-a", "db"))
        assert not store.add_secret(full_secret("sec_2", "team-a", "db"))  # taken: nothing written
        assert store.get_secret("team-a", "sec_2") is None
        assert store.add_secret(full_secret("sec_3", "team-b", "db"))  # another team may
        assert store.add_secret(full_secret("sec_4", "team-a", "other"))
        assert ids(store.list_secrets("team-a")) == ["sec_1", "sec_4"]
        assert ids(store.list_secrets("team-b")) == ["sec_3"]

    def test_replace_and_delete_a_secret_only_in_its_team(self, store: StateStore) -> None:
        store.add_secret(full_secret("sec_1", "team-a", "db"))
        store.add_secret(full_secret("sec_2", "team-a", "api"))
        newer = full_secret("sec_1", "team-a", "db").evolve(version=4, sealed="bmV3", metadata={})
        assert store.replace_secret(newer)
        assert store.get_secret("team-a", "db") == newer
        assert ids(store.list_secrets("team-a")) == ["sec_1", "sec_2"]  # creation order, not last write
        assert not store.replace_secret(newer.evolve(team_id="team-b"))  # another team's id: nothing
        assert not store.replace_secret(full_secret("sec_9", "team-a", "ghost"))
        assert store.get_secret("team-a", "ghost") is None and store.get_secret("team-b", "sec_1") is None
        assert not store.delete_secret("team-b", "sec_1")
        assert store.get_secret("team-a", "sec_1") == newer
        assert store.delete_secret("team-a", "sec_1")
        assert not store.delete_secret("team-a", "sec_1")
        assert ids(store.list_secrets("team-a")) == ["sec_2"]
        assert store.add_secret(full_secret("sec_5", "team-a", "db"))  # the name is free again

    def test_concurrent_adds_of_one_name_make_one_secret(self, store: StateStore, open_store: StoreFactory) -> None:
        stores = [store, open_store()]
        start = threading.Barrier(8)
        won: list[str] = []
        errors: list[BaseException] = []

        def add(n: int) -> None:
            try:
                start.wait(timeout=30)
                if stores[n % 2].add_secret(full_secret(f"sec_{n}", "team-a", "contested")):
                    won.append(f"sec_{n}")
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=add, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        assert len(won) == 1 and ids(store.list_secrets("team-a")) == won

    def test_key_labels_by_team_and_a_re_put_replaces(self, store: StateStore) -> None:
        label = KeyLabel(key_id="key_b", team_id="team-a", name="ci ✓", suffix="9f3a")
        assert_every_field_set(label)
        store.put_key_label(label)
        store.put_key_label(KeyLabel(key_id="key_a", team_id="team-a", name="dev", suffix="0000"))
        store.put_key_label(KeyLabel(key_id="key_c", team_id="team-b", name="x", suffix="1111"))
        assert ids(store.list_key_labels("team-a")) == ["key_a", "key_b"]  # by id
        store.put_key_label(label.evolve(name="renamed"))
        assert [x.name for x in store.list_key_labels("team-a")] == ["dev", "renamed"]
        assert ids(store.list_key_labels("team-b")) == ["key_c"] and store.list_key_labels("team-z") == []

    def test_access_tokens_round_trip_and_delete_only_in_their_team(self, store: StateStore) -> None:
        record = full_token()
        assert_every_field_set(record)
        store.put_access_token(record)
        other = full_token("0b5e6c1e-0000-4000-8000-000000000002", "team-b").evolve(token_hash="u" * 64)
        store.put_access_token(other)
        assert store.list_access_tokens("team-a") == [record]
        assert not store.delete_access_token("team-b", record.token_id)
        assert store.list_access_tokens("team-a") == [record]
        assert store.delete_access_token("team-a", record.token_id)
        assert not store.delete_access_token("team-a", record.token_id)
        assert store.list_access_tokens("team-a") == [] and store.list_access_tokens("team-b") == [other]

    # -- webhooks and their deliveries (an outbox) ----------------------------------------------

    def test_webhook_round_trips_and_is_only_seen_in_its_team(self, store: StateStore) -> None:
        record = full_webhook()
        assert_every_field_set(record)
        store.put_webhook(record)
        store.put_webhook(full_webhook("wh_2", "team-a").evolve(url="http://b.example"))
        store.put_webhook(full_webhook("wh_3", "team-b"))
        assert store.get_webhook("team-a", "wh_1") == record
        assert store.get_webhook("team-b", "wh_1") is None
        assert ids(store.list_webhooks("team-a")) == ["wh_1", "wh_2"] and ids(store.list_webhooks("team-b")) == ["wh_3"]
        changed = record.evolve(enabled=True, disabled_reason=None, events=("sandbox.paused",))
        assert store.replace_webhook(changed) and store.get_webhook("team-a", "wh_1") == changed
        assert not store.replace_webhook(changed.evolve(team_id="team-b"))  # another team's id: nothing
        assert not store.replace_webhook(full_webhook("wh_9"))
        assert ids(store.list_webhooks("team-a")) == ["wh_1", "wh_2"]  # creation order, not last write
        assert not store.delete_webhook("team-b", "wh_1")
        assert store.delete_webhook("team-a", "wh_1") and not store.delete_webhook("team-a", "wh_1")
        assert ids(store.list_webhooks("team-a")) == ["wh_2"]

    def test_delivery_round_trips_and_an_id_is_recorded_once(self, store: StateStore) -> None:
        record = full_delivery()
        assert_every_field_set(record)
        assert store.add_deliveries([record, full_delivery("msg_2", created_at=T0 + timedelta(seconds=1))]) == 2
        assert store.add_deliveries([record.evolve(payload="another master's copy"), full_delivery("msg_3")]) == 1
        assert store.list_deliveries("team-a", "wh_1")[-1] == record  # the first copy stays
        assert ids(store.list_deliveries("team-a", "wh_1")) == ["msg_2", "msg_3", "msg_1"]  # newest, then last added
        assert ids(store.list_deliveries("team-a", "wh_1", limit=1)) == ["msg_2"]  # newest first
        assert store.list_deliveries("team-b", "wh_1") == [] and store.list_deliveries("team-a", "wh_2") == []

    def test_claims_take_due_pending_unclaimed_deliveries_once(self, store: StateStore) -> None:
        store.add_deliveries([full_delivery("msg_late", due=T0 + timedelta(seconds=60)),
                              full_delivery("msg_b", due=T0 + timedelta(seconds=2)),
                              full_delivery("msg_a", due=T0 + timedelta(seconds=1)),
                              full_delivery("msg_done", status=DeliveryStatus.DELIVERED),
                              full_delivery("msg_gave_up", status=DeliveryStatus.FAILED)])
        now = T0 + timedelta(seconds=10)
        assert ids(store.claim_deliveries("master-a", now, 10, lease_s=30)) == ["msg_a", "msg_b"]  # oldest due first
        assert store.claim_deliveries("master-b", now, 10, lease_s=30) == []  # held
        assert ids(store.claim_deliveries("master-b", now + timedelta(seconds=31), 1, lease_s=30)) == ["msg_a"]
        # master-a's claim on msg_a expired and master-b took it: a's outcome is not written
        sent = full_delivery("msg_a").evolve(status=DeliveryStatus.DELIVERED)
        assert not store.finish_delivery(sent, "master-a")
        assert store.finish_delivery(sent, "master-b")
        assert not store.finish_delivery(sent, "master-b"), "the claim ends with the outcome"
        retry = full_delivery("msg_b").evolve(next_attempt_at=now + timedelta(seconds=5))
        assert store.finish_delivery(retry, "master-a")
        assert store.claim_deliveries("master-a", now, 10, lease_s=30) == []  # not due yet
        assert ids(store.claim_deliveries("master-a", now + timedelta(seconds=5), 10, lease_s=30)) == ["msg_b"]
        assert store.release_deliveries("master-a") == 1  # a restart of master-a: its claims died with it
        assert ids(store.claim_deliveries("master-c", now + timedelta(seconds=5), 10, lease_s=30)) == ["msg_b"]
        by_id = {d.delivery_id: d for d in store.list_deliveries("team-a", "wh_1")}
        assert by_id["msg_a"] == sent and by_id["msg_b"] == retry

    def test_deleting_a_webhook_drops_its_deliveries_and_prune_keeps_pending(self, store: StateStore) -> None:
        store.put_webhook(full_webhook("wh_1"))
        store.put_webhook(full_webhook("wh_2"))
        store.add_deliveries([full_delivery("msg_1", "wh_1"), full_delivery("msg_2", "wh_2"),
                              full_delivery("msg_3", "wh_2", status=DeliveryStatus.DELIVERED),
                              full_delivery("msg_4", "wh_2", status=DeliveryStatus.FAILED,
                                            created_at=T0 + timedelta(hours=2))])
        assert store.delete_webhook("team-a", "wh_1")
        assert store.list_deliveries("team-a", "wh_1") == []
        assert ids(store.claim_deliveries("m", T0 + timedelta(days=1), 10, lease_s=30)) == ["msg_2"]
        assert store.prune_deliveries(T0 + timedelta(hours=1)) == 1  # the old delivered one; pending stays
        assert sorted(ids(store.list_deliveries("team-a", "wh_2"))) == ["msg_2", "msg_4"]

    def test_concurrent_claims_give_each_delivery_to_one_holder(self, store: StateStore,
                                                                 open_store: StoreFactory) -> None:
        stores = [store, open_store()]
        store.add_deliveries([full_delivery(f"msg_{n:02}") for n in range(40)])
        start = threading.Barrier(8)
        claimed: list[str] = []
        errors: list[BaseException] = []

        def claim(n: int) -> None:
            try:
                start.wait(timeout=30)
                for _ in range(5):
                    got = stores[n % 2].claim_deliveries(f"master-{n}", T0 + timedelta(seconds=1), 3, lease_s=60)
                    claimed.extend(ids(got))
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=claim, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        assert sorted(claimed) == [f"msg_{n:02}" for n in range(40)]  # every one, none twice

    # -- several open stores (a restart; two masters) -------------------------------------------

    def test_another_store_sees_every_record(self, store: StateStore, open_store: StoreFactory) -> None:
        store.put_sandbox(full_sandbox())
        store.put_template(full_template())
        store.put_snapshot(full_snapshot())
        store.put_node(full_node())
        store.put_team(full_team())
        store.put_api_key(full_key())
        store.add_secret(full_secret())
        store.put_access_token(full_token())
        other = open_store()
        assert other.get_sandbox("sbx-full") == full_sandbox()
        assert other.get_template("ci") == full_template()
        assert other.list_snapshots(team_id="team-a") == [full_snapshot()]
        assert other.list_nodes() == [full_node()]
        assert other.find_team("Team A ✓") == full_team()
        assert other.find_api_key("h" * 64) == full_key()
        assert other.get_secret("team-a", "openai-key") == full_secret()
        assert other.list_access_tokens("team-a") == [full_token()]
        other.delete_sandbox("sbx-full")
        assert store.get_sandbox("sbx-full") is None

    def test_concurrent_writers_lose_nothing(self, store: StateStore, open_store: StoreFactory) -> None:
        """Two open stores, four threads each: distinct records all land; templates that share
        aliases, and teams that want one name, written at once, leave each alias and the name
        to exactly one record."""
        stores = [store, open_store()]
        errors: list[BaseException] = []
        start = threading.Barrier(8)

        def work(n: int) -> None:
            target = stores[n % 2]
            try:
                start.wait(timeout=30)
                for i in range(20):
                    target.put_sandbox(sandbox(f"w{n}-{i}", team_id=f"team-{n}"))
                    aliases = ("x", "y", f"own-{n}") if i % 2 else (f"own-{n}", "y", "x")  # both lock orders
                    target.put_template(Template(template_id=f"tpl-{n}", aliases=aliases))
                    target.put_api_key(ApiKey(key_id=f"k{n}-{i}", team_id=f"team-{n}", key_hash=f"h{n}-{i}",
                                              prefix="e2b_000000"))
                    target.put_team(Team(team_id=f"team-{n}", name="contested"))
            except BaseException as exc:  # reported below, with the thread's error
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert len(store.list_sandboxes()) == 160 and len(stores[1].list_api_keys()) == 160
        for n in range(8):
            assert ids(store.list_sandboxes(team_id=f"team-{n}")) == [f"w{n}-{i}" for i in range(20)]
        owners = {alias: store.get_template(alias) for alias in ("x", "y")}
        assert all(t is not None and t.template_id.startswith("tpl-") for t in owners.values()), owners
        assert ids(store.list_templates()) == [f"tpl-{n}" for n in range(8)]
        holder = store.find_team("contested")
        assert holder is not None
        assert [n for n in range(8) if store.get_team(f"team-{n}") is not None] == [int(holder.team_id[5:])]

    # -- observations: metric samples and log entries --------------------------------------------

    def test_metric_samples_by_window_oldest_first(self, store: StateStore) -> None:
        samples = [metric("sbx-m", T0 + timedelta(seconds=5 * i), cpu=float(i)) for i in range(6)]
        store.add_metric_samples(samples[3:] + samples[:3])  # stored out of order
        store.add_metric_samples([metric("sbx-other", T0)])
        store.add_metric_samples([])
        assert store.metric_samples("sbx-m") == samples  # every field round-trips
        assert store.metric_samples("sbx-m", start=T0 + timedelta(seconds=5),
                                    end=T0 + timedelta(seconds=15)) == samples[1:4]  # both ends included
        assert store.metric_samples("sbx-m", start=T0 + timedelta(seconds=26)) == []
        assert store.metric_samples("sbx-m", limit=2) == samples[4:]  # the newest, still oldest first
        assert store.metric_samples("sbx-none") == []

    def test_team_concurrency_counts_sandboxes_per_step(self, store: StateStore) -> None:
        base = datetime(2026, 12, 7, 1, 2, 0, tzinfo=UTC)  # a multiple of 10 s
        store.add_metric_samples([
            metric("a", base + timedelta(seconds=1)), metric("a", base + timedelta(seconds=4)),
            metric("b", base + timedelta(seconds=9)), metric("a", base + timedelta(seconds=12)),
            metric("c", base + timedelta(seconds=31), team_id="team-b"),
            metric("d", base + timedelta(seconds=45)),
        ])
        got = store.team_concurrency("team-a", base, base + timedelta(seconds=40), 10)
        assert got == [(base, 2), (base + timedelta(seconds=10), 1)]
        assert store.team_concurrency("team-b", base, base + timedelta(seconds=60), 10) == [
            (base + timedelta(seconds=30), 1)]
        assert store.team_concurrency("team-c", base, base + timedelta(seconds=60), 10) == []

    def test_log_entries_by_cursor_direction_level_and_search(self, store: StateStore) -> None:
        entries = [log_entry("sbx-l", i, T0 + timedelta(milliseconds=100 * i),
                             level="error" if i == 3 else "info", message=f"process {'exited' if i % 2 else 'started'}")
                   for i in range(1, 7)]
        store.add_log_entries(entries)
        store.add_log_entries(entries[:2])  # read again (a node restarted): stored once
        store.add_log_entries([log_entry("sbx-other", 1, T0)])
        assert store.log_entries("sbx-l") == entries  # every field round-trips
        cursor = entries[2].at_ms
        assert store.log_entries("sbx-l", cursor_ms=cursor) == entries[2:]
        assert store.log_entries("sbx-l", cursor_ms=cursor, limit=2) == entries[2:4]
        assert store.log_entries("sbx-l", cursor_ms=cursor, backward=True) == entries[2::-1]
        assert store.log_entries("sbx-l", backward=True, limit=2) == [entries[5], entries[4]]
        assert store.log_entries("sbx-l", levels=("warn", "error")) == [entries[2]]
        assert store.log_entries("sbx-l", search="exited") == entries[0::2]
        assert store.log_entries("sbx-l", search="Exited") == []  # case-sensitive
        assert store.log_entries("sbx-l", search="%") == []  # no wildcards
        assert store.log_entries("sbx-none") == []

    def test_prune_observations_drops_only_the_older(self, store: StateStore, open_store: StoreFactory) -> None:
        store.add_metric_samples([metric("sbx-p", T0), metric("sbx-p", T0 + timedelta(hours=2))])
        store.add_log_entries([log_entry("sbx-p", 1, T0), log_entry("sbx-p", 2, T0 + timedelta(hours=2))])
        assert store.prune_observations(T0 + timedelta(hours=1)) == 2
        other = open_store()
        assert [m.at for m in other.metric_samples("sbx-p")] == [T0 + timedelta(hours=2)]
        assert [e.seq for e in other.log_entries("sbx-p")] == [2]
        assert store.prune_observations(T0 + timedelta(hours=1)) == 0


def metric(sandbox_id: str, at: datetime, *, team_id: str = "team-a", cpu: float = 12.5) -> MetricSample:
    return MetricSample(sandbox_id=sandbox_id, team_id=team_id, at=at, cpu_count=2, cpu_used_pct=cpu,
                        mem_used=300 << 20, mem_total=(1 << 40) + 7, mem_cache=9, disk_used=1 << 30, disk_total=1 << 33)


def log_entry(sandbox_id: str, seq: int, at: datetime, *, level: LogLevel = "info",
              message: str = "process started ✓") -> LogEntry:
    return LogEntry(sandbox_id=sandbox_id, team_id="team-a", seq=seq, at=at, level=level, message=message,
                    fields={"pid": str(100 + seq), "cmd": "bash -c 'echo \"ü\"'"})
