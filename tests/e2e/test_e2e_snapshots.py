"""Snapshots and fork on real microVMs through the SDK: memory and processes are carried over,
identities are fresh, and the source keeps running."""

from __future__ import annotations

import pytest
from cube_e2e import CubeServer
from e2b import Sandbox

pytestmark = [pytest.mark.vm, pytest.mark.e2e]

RANDOM = "python3 -c 'import os; print(os.urandom(8).hex())'"


def test_snapshot_then_create_from_it(e2b_env: CubeServer) -> None:
    source = Sandbox.create(template="base", timeout=300)
    children: list[Sandbox] = []
    try:
        source.files.write("/tmp/state.txt", "before")
        source.commands.run("sleep 3600", background=True)
        snap = source.create_snapshot(name="e2e-snap")
        assert snap.snapshot_id
        source.files.write("/tmp/state.txt", "after")  # the source runs on, unaffected
        assert source.commands.run("cat /tmp/state.txt").stdout.strip() == "after"

        child = Sandbox.create(snap.snapshot_id, timeout=120)
        children.append(child)
        assert child.sandbox_id != source.sandbox_id
        assert child.files.read("/tmp/state.txt") == "before"  # memory (tmpfs) came along
        assert "sleep 3600" in child.commands.run("ps -eo args").stdout  # and the process
        assert child.commands.run(RANDOM).stdout != source.commands.run(RANDOM).stdout
        listed = [s.snapshot_id for s in Sandbox.list_snapshots(sandbox_id=source.sandbox_id).next_items()]
        assert snap.snapshot_id in listed
    finally:
        for sbx in [*children, source]:
            sbx.kill()


def test_fork(e2b_env: CubeServer) -> None:
    source = Sandbox.create(template="base", timeout=300)
    forks: list[Sandbox] = []
    try:
        source.commands.run("echo parent > /home/user/mark")
        results = source.fork(count=2, timeout=120)
        forks = [f for f in results if isinstance(f, Sandbox)]
        assert len(forks) == 2, results
        ids = {f.sandbox_id for f in forks}
        assert len(ids) == 2 and source.sandbox_id not in ids
        for f in forks:
            assert f.commands.run("cat /home/user/mark").stdout.strip() == "parent"
        forks[0].commands.run("echo changed > /home/user/mark")
        assert forks[1].commands.run("cat /home/user/mark").stdout.strip() == "parent"
        assert source.commands.run("cat /home/user/mark").stdout.strip() == "parent"
        assert forks[0].commands.run(RANDOM).stdout != forks[1].commands.run(RANDOM).stdout
    finally:
        for sbx in [*forks, source]:
            sbx.kill()
