"""Older template builds served by tag, with the unmodified E2B SDK on real microVMs: v1 and v2 of a
template each write their version to a file; a sandbox from ``name:v1`` restores the v1 build's
snapshot after v2 was built, one from ``name:v2`` the newest; another team's tag is "not found";
once no tag names v1 and its last sandbox is gone, the v1 snapshot's files are freed, and so are the
build layers only v1 used."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cube_e2e import CubeServer
from e2b import Sandbox, Template

pytestmark = pytest.mark.e2e


@pytest.fixture
def api(e2b_env: CubeServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=e2b_env.url, headers={"X-API-Key": e2b_env.key_a}, timeout=120) as client:
        yield client


def version(tag: str) -> Template:
    return Template().from_template("base").run_cmd(f"echo {tag} > /home/user/version")


def files_of(snapshots: Path, template_id: str, build_id: str) -> list[Path]:
    return sorted(snapshots.glob(f"tmpl-{template_id}-{build_id[:8]}-*"))


def only_used_by(storage: Path, build_id: str) -> list[Path]:
    """The build layers in the node's build-layers.json whose chain only ``build_id`` uses."""
    index = json.loads((storage / "build-layers.json").read_text())
    return sorted({Path(e["path"]) for e in index.values() if e.get("builds") == [build_id]
                   and Path(e["path"]).parent.name.startswith("blayer-")})


def test_an_older_build_by_tag_then_freed(e2b_env: CubeServer, api: httpx.Client) -> None:
    name = f"e2e-tag-{uuid.uuid4().hex[:8]}"
    snapshots = e2b_env.state_dir / "storage" / "snapshots"
    v1 = Template.build(version("v1"), f"{name}:v1")
    v2 = Template.build(version("v2"), f"{name}:v2")
    assert v1.template_id == v2.template_id and v1.build_id != v2.build_id
    assert {t.tag: t.build_id for t in Template.get_tags(name)} == {"v1": v1.build_id, "v2": v2.build_id}
    assert files_of(snapshots, v1.template_id, v1.build_id), "v1's snapshot is kept: a tag names it"
    v1_layers = only_used_by(e2b_env.state_dir / "storage", v1.build_id)
    assert v1_layers and all(p.is_file() for p in v1_layers), "v1's RUN step froze a layer"

    started = time.perf_counter()
    old = Sandbox.create(template=f"{name}:v1", timeout=300)
    old_s = time.perf_counter() - started
    try:
        started = time.perf_counter()
        new = Sandbox.create(template=f"{name}:v2", timeout=120)
        new_s = time.perf_counter() - started
        try:
            assert old.files.read("/home/user/version").strip() == "v1"
            assert new.files.read("/home/user/version").strip() == "v2"
            assert old.get_info().template_id == new.get_info().template_id == v1.template_id
        finally:
            new.kill()
        print(f"create from an older build (pool miss) {old_s:.1f}s, from the newest {new_s:.1f}s")
        theirs = api.post("/sandboxes", json={"templateID": f"{name}:v1", "timeout": 60},
                          headers={"X-API-Key": e2b_env.key_b})
        assert theirs.status_code == 404, theirs.text

        # no tag names v1 any more, but a sandbox runs from it: its files stay until it goes
        Template.remove_tags(name, "v1")
        assert not Template.exists(f"{name}:v1") and Template.exists(f"{name}:v2")
        gone = api.post("/sandboxes", json={"templateID": f"{name}:v1", "timeout": 60})
        assert gone.status_code == 404, gone.text
        time.sleep(2)  # nothing frees it meanwhile
        assert files_of(snapshots, v1.template_id, v1.build_id) and all(p.is_file() for p in v1_layers)
        assert old.commands.run("cat /home/user/version").stdout.strip() == "v1"
    finally:
        old.kill()
    deadline = time.monotonic() + 30  # the kill's event frees it (a few ms; the HTTP round trips on top)
    while files_of(snapshots, v1.template_id, v1.build_id) or any(p.exists() for p in v1_layers):
        assert time.monotonic() < deadline, "v1's snapshot or build layers were not freed after its last sandbox"
        time.sleep(0.2)
    print(f"v1 freed {time.monotonic() - deadline + 30:.2f}s after the kill returned")
    assert files_of(snapshots, v2.template_id, v2.build_id), "the build the template serves stays"

    deleted = api.delete(f"/templates/{name}")
    assert deleted.status_code == 204, deleted.text
    assert not list(snapshots.glob(f"tmpl-{v1.template_id}-*"))
