"""Filesystem snapshots (``create_snapshot(mode="filesystem")``, ``"memory": false``) with the real
SDK on real microVMs: the sandbox's disk layer is frozen without its memory; a sandbox created from
it is a NEW sandbox booted fresh from that disk with the template's kernel: a file written before
the snapshot is there, a process and tmpfs content are not, and the source runs on unaffected."""

from __future__ import annotations

import time

import pytest
from cube_e2e import CubeServer
from e2b import Sandbox

pytestmark = [pytest.mark.vm, pytest.mark.e2e]


def test_a_filesystem_snapshot_boots_a_new_sandbox_from_its_disk(e2b_env: CubeServer) -> None:
    source = Sandbox.create(template="base", timeout=300)
    children: list[Sandbox] = []
    try:
        source.files.write("/home/user/kept.txt", "on disk")
        source.files.write("/tmp/in-ram.txt", "tmpfs")  # /tmp is a tmpfs in the guest
        source.commands.run("sleep 3600", background=True)
        started = time.perf_counter()
        snap = source.create_snapshot(mode="filesystem")
        taken_s = time.perf_counter() - started
        assert snap.snapshot_id
        source.files.write("/home/user/kept.txt", "after")  # the source runs on, unaffected
        assert source.commands.run("cat /home/user/kept.txt").stdout.strip() == "after"
        assert "sleep 3600" in source.commands.run("ps -eo args").stdout

        started = time.perf_counter()
        child = Sandbox.create(snap.snapshot_id, timeout=300)
        create_s = time.perf_counter() - started
        children.append(child)
        assert child.sandbox_id != source.sandbox_id
        assert child.files.read("/home/user/kept.txt") == "on disk"  # the disk as it was
        assert not child.files.exists("/tmp/in-ram.txt")  # no memory: a fresh boot
        assert "sleep 3600" not in child.commands.run("ps -eo args").stdout
        assert child.commands.run("echo fresh > /home/user/mine && cat /home/user/mine").stdout.strip() == "fresh"
        assert source.commands.run("test -e /home/user/mine || echo absent").stdout.strip() == "absent"
        listed = [s.snapshot_id for s in Sandbox.list_snapshots(sandbox_id=source.sandbox_id).next_items()]
        assert snap.snapshot_id in listed
        print(f"filesystem snapshot {taken_s:.2f}s, create from it (cold boot) {create_s:.1f}s")
    finally:
        for sbx in [*children, source]:
            sbx.kill()
    Sandbox.delete_snapshot(snap.snapshot_id)
    assert snap.snapshot_id not in [s.snapshot_id for s in Sandbox.list_snapshots().next_items()]
