"""COPY's archive for the guest (Docker's rules, owner and mode) and the layer-cache keys."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from cube_core.builds import StepFailed, copy_archive
from cube_core.buildspec import BuildStep, base_key, layer_key
from cube_core.models import Template


def upload(tmp_path: Path) -> Path:
    (tmp_path / "ctx" / "dir" / "sub").mkdir(parents=True, exist_ok=True)
    (tmp_path / "ctx" / "app.py").write_text("print(1)\n")
    (tmp_path / "ctx" / "dir" / "a.txt").write_text("a\n")
    (tmp_path / "ctx" / "dir" / "sub" / "b.txt").write_text("b\n")
    path = tmp_path / "upload.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(tmp_path / "ctx" / "app.py", arcname="app.py")
        tar.add(tmp_path / "ctx" / "dir", arcname="dir")
    return path


def members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: m for m in tar.getmembers()}


def test_a_file_into_a_directory_keeps_its_name_else_becomes_dest(tmp_path: Path) -> None:
    got = members(copy_archive(upload(tmp_path), "app.py", "/home/user/", "user", ""))
    assert list(got) == ["home/user/app.py"]
    assert got["home/user/app.py"].uname == "user" and got["home/user/app.py"].gname == "user"
    got = members(copy_archive(upload(tmp_path), "app.py", "/opt/main.py", "root:staff", "0755"))
    assert list(got) == ["opt/main.py"]
    info = got["opt/main.py"]
    assert (info.uname, info.gname, info.mode) == ("root", "staff", 0o755)


def test_a_directory_copies_its_content(tmp_path: Path) -> None:
    got = members(copy_archive(upload(tmp_path), "dir/", "/srv/site/", "user", ""))
    assert sorted(got) == ["srv/site", "srv/site/a.txt", "srv/site/sub", "srv/site/sub/b.txt"]


def test_a_missing_source_or_an_escape_fails_the_step(tmp_path: Path) -> None:
    with pytest.raises(StepFailed, match="not in the uploaded files"):
        copy_archive(upload(tmp_path), "nope.txt", "/x", "user", "")
    with pytest.raises(StepFailed):
        copy_archive(upload(tmp_path), "../../etc/passwd", "/x", "user", "")


def test_a_layer_key_changes_with_the_parent_the_step_and_the_files() -> None:
    parent = Template(template_id="base", rootfs="/images/sha256-1.ext4")
    root = base_key(parent)
    assert root != base_key(parent.model_copy(update={"rootfs": "/images/sha256-2.ext4"}))
    run = BuildStep(type="RUN", args=("echo 1",))
    assert layer_key(root, run, {}) == layer_key(root, BuildStep(type="RUN", args=("echo 1",)), {})
    assert layer_key(root, run, {}) != layer_key(root, BuildStep(type="RUN", args=("echo 2",)), {})
    assert layer_key(root, run, {}) != layer_key(layer_key(root, run, {}), run, {})
    copy = BuildStep(type="COPY", args=("a", "/b"), files_hash="a" * 64)
    assert layer_key(root, copy, {}) != layer_key(root, copy.model_copy(update={"files_hash": "b" * 64}), {})
