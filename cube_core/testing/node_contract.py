"""The contract every :class:`~cube_core.nodeclient.NodeClient` passes: the node agent in this
process (``LocalNodeClient``), over HTTP (``HttpNodeClient`` to a served ``node_app``), yours.

Subclass it and provide the fixtures it names::

    class TestMyNodeClient(NodeClientContract):
        @pytest.fixture
        def node_client(self): ...    # a NodeClient to a started node agent
        @pytest.fixture
        def node_store(self): ...     # the StateStore that agent reads its records from
        @pytest.fixture
        def node_template(self): ...  # a Template ready on that node
        @pytest.fixture
        def origin_client(self): ...  # a NodeClient to another node agent (same store, own files)
        @pytest.fixture
        def origin_node(self): ...    # that other node's record (its url serves /node/v1)

The suite plays the control plane: it writes each sandbox's record (``creating``, then
``running`` with the runtime the node answered, ``paused``, ``killed``...) to ``node_store`` the
way the control plane does, and destroys every sandbox it launched. What it pins down: a launch
answers a runtime with VM, disk and network slot and the guest's boot id, and the node counts the
sandbox; exec answers the command's output; pause and resume; a snapshot of a running or paused
sandbox keeps its state; a paused sandbox written out to disk (no VM, its disk and slot kept,
no memory counted) resumes and can be destroyed; a sandbox launched from it or rolled back to it runs (same network
slot for a rollback, paused again when asked); a deleted snapshot cannot be launched and the
failed launch leaves nothing; a launch with volume mounts starts a VM (never a pool member)
and volume calls reach the node's volumes; policy and audit; the endpoint of a port; destroy
frees and is idempotent; an unknown sandbox is :class:`~cube_core.errors.SandboxNotFoundError` (with its
``sandbox_id``) for every operation, an unknown template :class:`~cube_core.errors.TemplateNotFoundError`;
a snapshot of another node is copied (its base first, each file once) and launched from, and its
deleted copy cannot be launched from any more.
Errors are compared by class and fields, so a transport must rebuild them exactly.
"""

from __future__ import annotations

import asyncio
import io
import tarfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import pytest

from cube_core import ids
from cube_core.buildspec import BuildJob, BuildPlan, BuildStatus, BuildStep, TemplateBuild
from cube_core.errors import CubeError, SandboxNotFoundError, SnapshotNotFoundError, TemplateNotFoundError
from cube_core.models import EgressRule, NetworkPolicy, Node, Sandbox, SnapshotRef, Template, VolumeMount, utcnow
from cube_core.nodeclient import Launched, LaunchRequest, NodeClient
from cube_core.state import SandboxState
from cube_core.store import StateStore
from cube_core.volumes import VolumeCall

UNKNOWN = "sbxcontractunknown00"


class ControlPlane:
    """What the contract does in the control plane's place: records, then node calls."""

    def __init__(self, client: NodeClient, store: StateStore, template: Template) -> None:
        self.client = client
        self.store = store
        self.template = template
        self.launched: list[Sandbox] = []
        self.renamed: dict[str, str] = {}
        """Sandbox id -> the provisional id it was launched under (a pool member's own id)."""

    def record(self, **changes: object) -> Sandbox:
        now = utcnow()
        fields: dict[str, object] = dict(
            sandbox_id=ids.sandbox_id(), template_id=self.template.template_id, team_id="team-contract",
            state=SandboxState.CREATING, started_at=now, end_at=now + timedelta(minutes=5),
            env_vars={"CUBE_CONTRACT": "1"}, cpu_count=self.template.cpu_count, memory_mb=self.template.memory_mb,
            envd_access_token=ids.access_token(), secure=True, node_id=self.client.node_id)
        fields.update(changes)
        sandbox = Sandbox.model_validate(fields)
        self.store.put_sandbox(sandbox)
        return sandbox

    async def launch(self, snapshot: SnapshotRef | None = None, **changes: object) -> tuple[Sandbox, Launched]:
        sandbox = self.record(**changes)
        self.launched.append(sandbox)
        try:
            launched = await self.client.launch(LaunchRequest(sandbox=sandbox, snapshot=snapshot))
        except BaseException:
            self.store.put_sandbox(sandbox.evolve(state=SandboxState.ERROR, error="launch failed"))
            raise
        if launched.sandbox_id is not None and launched.sandbox_id != sandbox.sandbox_id:
            # a warm-pool member personalized at join: recorded under its id, the provisional one goes
            self.store.delete_sandbox(sandbox.sandbox_id)
            self.renamed[launched.sandbox_id] = sandbox.sandbox_id
            self.launched.remove(sandbox)
            sandbox = sandbox.evolve(sandbox_id=launched.sandbox_id, envd_access_token=launched.envd_access_token)
            self.launched.append(sandbox)
        running = sandbox.evolve(state=SandboxState.RUNNING, runtime=launched.runtime, boot_id=launched.boot_id)
        self.store.put_sandbox(running)
        return running, launched

    def move(self, sandbox: Sandbox, state: SandboxState, **changes: object) -> Sandbox:
        moved = sandbox.evolve(state=state, **changes)
        self.store.put_sandbox(moved)
        return moved

    async def destroy(self, sandbox: Sandbox) -> list[str]:
        errors = await self.client.destroy(sandbox)
        self.move(sandbox, SandboxState.KILLED, runtime={})
        return errors

    async def snapshot(self, sandbox: Sandbox) -> SnapshotRef:
        snapshot_id = "snap" + ids.sandbox_id()[:16]
        saved = await self.client.snapshot(sandbox.sandbox_id, snapshot_id)
        ref = SnapshotRef(snapshot_id=snapshot_id, template_id=sandbox.template_id, sandbox_id=sandbox.sandbox_id,
                          team_id=sandbox.team_id, vm_state=saved.vm_state, disk=saved.disk,
                          node_id=self.client.node_id)
        self.store.put_snapshot(ref)
        return ref

    async def close(self) -> None:
        for sandbox in self.launched:
            current = self.store.get_sandbox(sandbox.sandbox_id) or sandbox
            await self.client.destroy(current)
            self.store.put_sandbox(current.evolve(state=SandboxState.KILLED, runtime={}))


async def _answers(client: NodeClient, sandbox_id: str, word: str) -> None:
    reply = await client.exec(sandbox_id, ["echo", word], 60.0)
    assert reply.exit_code == 0, reply
    assert word in reply.stdout, reply


class NodeClientContract:
    """What every NodeClient (and the node agent behind it) must do. Fixtures: ``node_client``,
    ``node_store``, ``node_template``."""

    @pytest.fixture
    async def plane(self, node_client: NodeClient, node_store: StateStore,
                    node_template: Template) -> AsyncIterator[ControlPlane]:
        plane = ControlPlane(node_client, node_store, node_template)
        try:
            yield plane
        finally:
            await plane.close()

    # -- the node ----------------------------------------------------------------------------------

    async def test_status_names_the_node_and_its_ready_template(self, plane: ControlPlane) -> None:
        node = await plane.client.status()
        assert node.node_id == plane.client.node_id
        assert plane.template.template_id in node.templates
        assert node.cpu_total >= 1 and node.memory_mb_total >= 1

    # -- template builds ----------------------------------------------------------------------------

    async def test_a_template_build_runs_in_the_background_and_then_serves(self, plane: ControlPlane,
                                                                          tmp_path: Path) -> None:
        build = TemplateBuild(build_id=str(uuid.uuid4()), template_id="tb" + ids.sandbox_id()[:12],
                              team_id="team-a", name="contract-build", memory_mb=plane.template.memory_mb)
        plane.store.put_build(build)
        upload = tmp_path / "upload" / "files.tar"  # where the control plane keeps the SDK's upload
        upload.parent.mkdir()
        with tarfile.open(upload, "w") as tar:
            data = b"copied-here\n"
            info = tarfile.TarInfo("hello.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        files_hash = "c" * 64
        plan = BuildPlan(from_template=plane.template.template_id,
                         steps=(BuildStep(type="RUN", args=("echo built-here",)),
                                BuildStep(type="COPY", args=("hello.txt", "/home/user/"), files_hash=files_hash)))
        await plane.client.build_template(BuildJob(build=build, plan=plan, parent=plane.template,
                                                   files={files_hash: upload}))
        deadline = time.monotonic() + 600
        record = plane.store.get_build(build.build_id)
        while record is not None and record.status not in (BuildStatus.READY, BuildStatus.ERROR):
            assert time.monotonic() < deadline, "the build did not end"
            await asyncio.sleep(0.1)
            record = plane.store.get_build(build.build_id)
        assert record is not None and record.status == BuildStatus.READY, record
        assert record.node_id == plane.client.node_id and record.steps_run == 2
        assert any("RUN echo built-here" in line.message for line in record.logs)
        assert any("COPY hello.txt /home/user/" in line.message for line in record.logs)
        template = plane.store.get_template(build.template_id)
        assert template is not None and template.team_id == "team-a" and template.snapshot is not None
        assert build.template_id in (await plane.client.status()).templates

        # deleted: the control plane drops the record, then the node stops serving it and frees its files
        plane.store.delete_template(template.template_id)
        deleted = await plane.client.remove_template(template)
        assert template.snapshot.snapshot_id in deleted
        assert any(d.startswith("blayer-") for d in deleted), deleted
        assert build.template_id not in (await plane.client.status()).templates

    # -- launch, exec, destroy -----------------------------------------------------------------------

    async def test_launch_answers_a_runtime_and_the_node_counts_it(self, plane: ControlPlane) -> None:
        before = await plane.client.status()
        sandbox, launched = await plane.launch()
        rt = launched.runtime
        assert rt.vm is not None and rt.disk is not None and rt.nic is not None, rt
        assert launched.boot_id and launched.served_by in ("pool", "start")
        assert rt.nic.guest_address
        after = await plane.client.status()
        assert after.sandboxes == before.sandboxes + 1
        if launched.served_by == "start":  # a pool member counted already
            assert after.memory_mb_used >= before.memory_mb_used + plane.template.memory_mb
        await _answers(plane.client, sandbox.sandbox_id, "launched")

    async def test_the_launched_identity(self, plane: ControlPlane) -> None:
        """A pool member personalized at join answers its own id and access token (a secure
        sandbox keeps the token, a non-secure one has none); a started VM keeps the request's id.
        Either is reachable (once its guest applied the create message) and runs commands."""
        secure, one = await plane.launch()
        plain, two = await plane.launch(secure=False, envd_access_token=None)
        assert secure.sandbox_id != plain.sandbox_id
        assert secure.envd_access_token and plain.envd_access_token is None
        for sandbox, launched in ((secure, one), (plain, two)):
            assert launched.sandbox_id == sandbox.sandbox_id
            assert launched.envd_access_token == sandbox.envd_access_token
            provisional = plane.renamed.get(sandbox.sandbox_id)
            if provisional is not None:  # only a pool member comes with its own id
                assert launched.served_by == "pool" and plane.store.get_sandbox(provisional) is None
            assert (await plane.client.endpoint(sandbox.sandbox_id, 49983)).host
            await _answers(plane.client, sandbox.sandbox_id, "mine")

    async def test_two_launches_are_two_sandboxes(self, plane: ControlPlane) -> None:
        first, one = await plane.launch()
        second, two = await plane.launch()
        assert one.runtime.vm is not None and two.runtime.vm is not None
        assert one.runtime.vm.vm_id != two.runtime.vm.vm_id
        assert one.runtime.nic is not None and two.runtime.nic is not None
        assert one.runtime.nic.slot_id != two.runtime.nic.slot_id
        await plane.destroy(first)
        await _answers(plane.client, second.sandbox_id, "still-here")

    async def test_exec_answers_the_commands_output(self, plane: ControlPlane) -> None:
        sandbox, _ = await plane.launch()
        reply = await plane.client.exec(sandbox.sandbox_id, ["echo", "cube-contract-exec"], 60.0)
        assert reply.exit_code == 0 and "cube-contract-exec" in reply.stdout, reply

    async def test_destroy_frees_and_is_idempotent(self, plane: ControlPlane) -> None:
        before = await plane.client.status()
        sandbox, _ = await plane.launch()
        assert await plane.client.destroy(sandbox) == []
        assert await plane.client.destroy(sandbox) == []  # again: nothing left, nothing fails
        plane.move(sandbox, SandboxState.KILLED, runtime={})
        with pytest.raises(SandboxNotFoundError):
            await plane.client.pause(sandbox.sandbox_id)
        after = await plane.client.status()
        assert after.sandboxes == before.sandboxes

    async def test_destroy_of_a_sandbox_never_launched_is_a_no_op(self, plane: ControlPlane) -> None:
        assert await plane.client.destroy(plane.record()) == []

    async def test_a_launch_with_volume_mounts_and_the_volume_calls(self, plane: ControlPlane) -> None:
        """A sandbox that mounts volumes is started with them in its VM's volume slots (never a
        warm-pool member), and the volume's content is read and written through the node."""
        vid = "vol" + ids.sandbox_id()[:12]
        await plane.client.volume(VolumeCall(op="create", volume_id=vid, size_mb=16))
        try:
            await plane.client.volume(VolumeCall(op="write", volume_id=vid, path="/a.txt", data=b"node"))
            mounts = (VolumeMount(name="data", path="/mnt/data", volume_id=vid),
                      VolumeMount(name="data", path="/mnt/ro", read_only=True, volume_id=vid))
            sandbox, launched = await plane.launch(volume_mounts=mounts)
            assert launched.served_by == "start" and launched.sandbox_id == sandbox.sandbox_id
            await _answers(plane.client, sandbox.sandbox_id, "mounted")
            assert await plane.destroy(sandbox) == []
            read = await plane.client.volume(VolumeCall(op="read", volume_id=vid, path="/a.txt"))
            assert read.data == b"node"
        finally:
            await plane.client.volume(VolumeCall(op="delete", volume_id=vid))

    # -- pause, resume ---------------------------------------------------------------------------------

    async def test_pause_then_resume(self, plane: ControlPlane) -> None:
        sandbox, _ = await plane.launch()
        before = await plane.client.status()
        await plane.client.pause(sandbox.sandbox_id)
        paused = plane.move(sandbox, SandboxState.PAUSED)
        assert (await plane.client.status()).sandboxes_paused == before.sandboxes_paused + 1
        await plane.client.resume(sandbox.sandbox_id)
        plane.move(paused, SandboxState.RUNNING)
        await _answers(plane.client, sandbox.sandbox_id, "resumed")

    async def test_pause_to_disk_then_resume(self, plane: ControlPlane) -> None:
        sandbox, launched = await plane.launch()
        running = plane.move(sandbox, SandboxState.RUNNING, runtime=launched.runtime)
        await plane.client.pause(sandbox.sandbox_id)
        paused = plane.move(running, SandboxState.PAUSED)
        before = await plane.client.status()
        runtime = await plane.client.pause_to_disk(sandbox.sandbox_id)
        assert runtime.vm is None and runtime.saved is not None and runtime.on_disk
        assert runtime.disk == launched.runtime.disk and runtime.nic == launched.runtime.nic
        paused = plane.move(paused, SandboxState.PAUSED, runtime=runtime)
        assert (await plane.client.status()).memory_mb_used == before.memory_mb_used - sandbox.memory_mb
        assert await plane.client.pause_to_disk(sandbox.sandbox_id) == runtime  # once
        await plane.client.audit(sandbox.sandbox_id, 10)  # its network slot is kept
        resumed = await plane.client.resume(sandbox.sandbox_id)
        assert resumed.vm is not None and resumed.saved is None and resumed.nic == runtime.nic
        plane.move(paused, SandboxState.RUNNING, runtime=resumed)
        await _answers(plane.client, sandbox.sandbox_id, "restored-from-disk")

    async def test_drop_memory_then_resume_boots_from_the_disk(self, plane: ControlPlane) -> None:
        sandbox, launched = await plane.launch()
        running = plane.move(sandbox, SandboxState.RUNNING, runtime=launched.runtime)
        runtime = await plane.client.drop_memory(sandbox.sandbox_id)
        assert runtime.vm is None and runtime.saved is None and runtime.disk_only
        assert runtime.disk == launched.runtime.disk and runtime.nic == launched.runtime.nic
        paused = plane.move(running, SandboxState.PAUSED, runtime=runtime)
        await plane.client.audit(sandbox.sandbox_id, 10)  # its network slot is kept
        booted = await plane.client.resume(sandbox.sandbox_id)
        assert booted.vm is not None and booted.disk == runtime.disk and booted.nic == runtime.nic
        assert launched.runtime.vm is not None and booted.vm.vm_id != launched.runtime.vm.vm_id
        plane.move(paused, SandboxState.RUNNING, runtime=booted)
        await _answers(plane.client, sandbox.sandbox_id, "booted-from-disk")

    async def test_destroy_of_a_sandbox_on_disk(self, plane: ControlPlane) -> None:
        sandbox, launched = await plane.launch()
        running = plane.move(sandbox, SandboxState.RUNNING, runtime=launched.runtime)
        await plane.client.pause(sandbox.sandbox_id)
        runtime = await plane.client.pause_to_disk(sandbox.sandbox_id)
        on_disk = plane.move(running, SandboxState.PAUSED, runtime=runtime)
        assert await plane.destroy(on_disk) == []
        assert await plane.client.destroy(on_disk) == []  # idempotent

    # -- snapshots, launch from one, rollback -----------------------------------------------------------

    async def test_a_snapshot_of_another_node_is_copied_once_and_launched_here(
            self, plane: ControlPlane, origin_client: NodeClient, origin_node: Node) -> None:
        there = ControlPlane(origin_client, plane.store, plane.template)
        try:
            source, _ = await there.launch()
            first = await there.snapshot(source)
            assert first.node_id == origin_node.node_id != plane.client.node_id
            with pytest.raises(SnapshotNotFoundError):  # not copied yet
                await plane.launch(snapshot=first)
            got = await plane.client.import_snapshot(first, origin_node)
            # the snapshot's memory diffs against the origin's template snapshot: that comes first
            assert first.base_state_id is not None
            assert got.fetched == (first.base_state_id, first.snapshot_id), got
            assert got.files > 0 and got.bytes > 0
            status = await plane.client.status()
            assert {first.snapshot_id, first.base_state_id} <= set(status.snapshots)
            copy, launched = await plane.launch(snapshot=first)
            assert launched.runtime.parent_snapshot == first.snapshot_id
            await _answers(plane.client, copy.sandbox_id, "copied-here")
            again = await plane.client.import_snapshot(first, origin_node)
            assert again.fetched == () and again.bytes == 0
            # a second snapshot of the same sandbox: only its own files travel (base, layers, image stay)
            second = await there.snapshot(source)
            delta = await plane.client.import_snapshot(second, origin_node)
            assert delta.fetched == (second.snapshot_id,), delta
            assert f"layer:{first.base_state_id}" in delta.skipped
            assert delta.files < got.files
            await _answers(plane.client, (await plane.launch(snapshot=second))[0].sandbox_id, "second-copy")
            await plane.client.delete_snapshot(first.snapshot_id)
            assert first.snapshot_id not in (await plane.client.status()).snapshots
            with pytest.raises(SnapshotNotFoundError):
                await plane.launch(snapshot=first)
        finally:
            await there.close()

    async def test_snapshot_keeps_it_running_and_a_launch_from_it_runs(self, plane: ControlPlane) -> None:
        sandbox, _ = await plane.launch()
        ref = await plane.snapshot(sandbox)
        assert ref.vm_state is not None and ref.disk is not None
        await _answers(plane.client, sandbox.sandbox_id, "after-snapshot")  # resumed after the snapshot
        copy, launched = await plane.launch(snapshot=ref)
        assert launched.served_by == "start"
        assert launched.runtime.parent_snapshot == ref.snapshot_id
        assert launched.runtime.vm is not None and launched.boot_id
        await _answers(plane.client, copy.sandbox_id, "from-snapshot")
        await _answers(plane.client, sandbox.sandbox_id, "original")

    async def test_snapshot_of_a_paused_sandbox_leaves_it_paused(self, plane: ControlPlane) -> None:
        sandbox, _ = await plane.launch()
        await plane.client.pause(sandbox.sandbox_id)
        paused = plane.move(sandbox, SandboxState.PAUSED)
        ref = await plane.snapshot(paused)
        assert ref.vm_state is not None
        await plane.client.resume(sandbox.sandbox_id)
        plane.move(paused, SandboxState.RUNNING)
        await _answers(plane.client, sandbox.sandbox_id, "resumed-after-snapshot")

    async def test_rollback_restores_into_the_same_slot(self, plane: ControlPlane) -> None:
        sandbox, first = await plane.launch()
        ref = await plane.snapshot(sandbox)
        rolled = await plane.client.rollback(sandbox, ref, paused=False)
        assert rolled.runtime.vm is not None and first.runtime.vm is not None
        assert rolled.runtime.vm.vm_id != first.runtime.vm.vm_id
        assert rolled.runtime.nic == first.runtime.nic
        assert rolled.runtime.parent_snapshot == ref.snapshot_id
        assert rolled.boot_id
        plane.move(sandbox, SandboxState.RUNNING, runtime=rolled.runtime, boot_id=rolled.boot_id)
        await _answers(plane.client, sandbox.sandbox_id, "rolled-back")

    async def test_rollback_of_a_paused_sandbox_pauses_it_again(self, plane: ControlPlane) -> None:
        sandbox, _ = await plane.launch()
        ref = await plane.snapshot(sandbox)
        await plane.client.pause(sandbox.sandbox_id)
        paused = plane.move(sandbox, SandboxState.PAUSED)
        rolled = await plane.client.rollback(paused, ref, paused=True)
        paused = plane.move(paused, SandboxState.PAUSED, runtime=rolled.runtime, boot_id=rolled.boot_id)
        await plane.client.resume(sandbox.sandbox_id)
        plane.move(paused, SandboxState.RUNNING)
        await _answers(plane.client, sandbox.sandbox_id, "rolled-back-paused")

    async def test_a_deleted_snapshot_cannot_be_launched_and_the_failure_leaves_nothing(
            self, plane: ControlPlane) -> None:
        sandbox, _ = await plane.launch()
        ref = await plane.snapshot(sandbox)
        await plane.client.delete_snapshot(ref.snapshot_id)
        plane.store.delete_snapshot(ref.snapshot_id)
        before = await plane.client.status()
        with pytest.raises(CubeError):
            await plane.launch(snapshot=ref)
        failed = plane.launched[-1]
        with pytest.raises(SandboxNotFoundError):
            await plane.client.pause(failed.sandbox_id)
        assert (await plane.client.status()).sandboxes == before.sandboxes
        await _answers(plane.client, sandbox.sandbox_id, "source-unharmed")

    # -- network -----------------------------------------------------------------------------------------

    async def test_update_policy_and_audit(self, plane: ControlPlane) -> None:
        sandbox, _ = await plane.launch()
        policy = NetworkPolicy(allow_internet_access=False, allow_out=("198.18.0.1",))
        await plane.client.update_policy(sandbox.sandbox_id, policy,
                                         [EgressRule(action="deny", target="198.19.0.0/16")])
        plane.move(sandbox, SandboxState.RUNNING, network=policy)
        entries = await plane.client.audit(sandbox.sandbox_id, 10)
        assert isinstance(entries, list) and len(entries) <= 10
        assert all(isinstance(e, dict) for e in entries)

    async def test_endpoint_of_a_port(self, plane: ControlPlane) -> None:
        sandbox, launched = await plane.launch()
        assert launched.runtime.nic is not None
        endpoint = await plane.client.endpoint(sandbox.sandbox_id, 49983)
        assert endpoint.host
        if endpoint.via is None:  # straight to the guest
            assert (endpoint.host, endpoint.port) == (launched.runtime.nic.guest_address, 49983)
        else:  # through the node's edge, which is told which sandbox and port
            headers = dict(endpoint.headers)
            assert headers["x-cube-sandbox-id"] == sandbox.sandbox_id
            assert headers["x-cube-sandbox-port"] == "49983"
            assert headers.get("x-cube-cluster-token")

    # -- errors ------------------------------------------------------------------------------------------

    @pytest.mark.parametrize("operation", ["pause", "pause_to_disk", "drop_memory", "resume", "snapshot", "exec",
                                           "audit", "update_policy"])
    async def test_an_unknown_sandbox_is_not_found(self, plane: ControlPlane, operation: str) -> None:
        client = plane.client
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "pause": lambda: client.pause(UNKNOWN),
            "pause_to_disk": lambda: client.pause_to_disk(UNKNOWN),
            "drop_memory": lambda: client.drop_memory(UNKNOWN),
            "resume": lambda: client.resume(UNKNOWN),
            "snapshot": lambda: client.snapshot(UNKNOWN, "snapcontractunknown0"),
            "exec": lambda: client.exec(UNKNOWN, ["true"], 5.0),
            "audit": lambda: client.audit(UNKNOWN, 10),
            "update_policy": lambda: client.update_policy(UNKNOWN, NetworkPolicy(), []),
        }
        with pytest.raises(SandboxNotFoundError) as caught:
            await calls[operation]()
        assert type(caught.value) is SandboxNotFoundError
        assert caught.value.fields == {"sandbox_id": UNKNOWN}
        assert caught.value.message == f"sandbox {UNKNOWN} not found"

    async def test_rollback_of_an_unknown_sandbox_is_not_found(self, plane: ControlPlane) -> None:
        sandbox, _ = await plane.launch()
        ref = await plane.snapshot(sandbox)
        with pytest.raises(SandboxNotFoundError):
            await plane.client.rollback(plane.record(sandbox_id=UNKNOWN), ref, paused=False)

    async def test_launch_of_an_unknown_template_is_not_found(self, plane: ControlPlane) -> None:
        with pytest.raises(TemplateNotFoundError) as caught:
            await plane.launch(template_id="no-such-template")
        assert caught.value.fields == {"template": "no-such-template"}
