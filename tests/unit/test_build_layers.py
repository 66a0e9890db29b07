"""The node's build-layer index (``<storage root>/build-layers.json``, :class:`LayerIndex`): which
builds use each cached layer, and which layers freeing a build frees (only those no other build's
chain uses; a layer several keys name goes when none of them has a build left)."""

from __future__ import annotations

import json
from pathlib import Path

from cube_core.builds import LayerIndex


def layer(root: Path, name: str) -> Path:
    path = root / "snapshots" / f"blayer-{name}" / "disk.qcow2"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(name)
    return path


def test_freeing_a_build_frees_only_the_layers_no_other_build_uses(tmp_path: Path) -> None:
    index = LayerIndex(tmp_path / "build-layers.json")
    a, b, c = layer(tmp_path, "a"), layer(tmp_path, "b"), layer(tmp_path, "c")
    index.put("ka", a, "tpl", 0, "v1")
    index.put("kb", b, "tpl", 1, "v1")
    assert index.use("ka", "v2") == a  # v2's first step is cached: v1's layer is in v2's chain
    index.put("kc", c, "tpl", 1, "v2")
    assert index.pop_build("v1") == [b]
    assert index.get("ka") == a and index.get("kb") is None
    assert index.pop_build("v1") == []  # idempotent
    assert index.pop_build("v2") == [c, a]  # deepest first
    assert json.loads((tmp_path / "build-layers.json").read_text()) == {}


def test_a_layer_frozen_again_stays_for_the_builds_of_the_old_one(tmp_path: Path) -> None:
    index = LayerIndex(tmp_path / "build-layers.json")
    old, new = layer(tmp_path, "old"), layer(tmp_path, "new")
    index.put("ka", old, "tpl", 0, "v1")
    index.put("ka", new, "tpl", 0, "v2")  # skip_cache: the same step frozen again
    assert index.get("ka") == new
    assert index.pop_build("v2") == [new]
    assert index.get("ka") is None
    assert index.pop_build("v1") == [old]


def test_keys_sharing_a_file_and_entries_without_builds(tmp_path: Path) -> None:
    index = LayerIndex(tmp_path / "build-layers.json")
    a = layer(tmp_path, "a")
    index.put("ka", a, "tpl", 0, "v1")
    index.put("kenv", a, "tpl", 1, "v1")  # an ENV step: no new layer, its parent's file
    index.use("ka", "v2")
    assert index.pop_build("v1") == []  # v2 still uses the file through "ka"
    assert index.pop_build("v2") == [a]
    # an entry written before builds were listed: kept (its template's deletion frees it)
    legacy = layer(tmp_path, "legacy")
    data = json.loads(index.path.read_text())
    data["klegacy"] = {"path": str(legacy), "template": "tpl", "depth": "0"}
    index.path.write_text(json.dumps(data))
    index.use("klegacy", "v3")
    assert index.pop_build("v3") == []
    assert index.get("klegacy") == legacy
    assert index.pop_template("tpl") == [legacy]
