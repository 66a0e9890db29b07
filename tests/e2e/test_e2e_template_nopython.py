"""``Template().from_image(...)`` of images without python3: the build puts the agent runtime bundle
(``cube_storage_cow.runtime``: base's python3.11, aiohttp, their libraries and base's own glibc
loader) under /opt/cube/runtime, the guest init runs the agent on it, and the user's processes see
the image as it is (no python3, no bundle variables).

Images made from local trees, as OCI layouts (no registry): the server's base Debian tree with
every python3 file left out (bash, glibc); a static busybox alone (no libc at all, no bash: the
SDK's ``commands.run`` runs ``/bin/bash``, so only files are checked there); a tree without
``/bin/sh``, which the build refuses."""

from __future__ import annotations

import shutil
import tarfile
import uuid
from pathlib import Path

import pytest
from cube_e2e import CubeServer, oci_layout
from e2b import BuildException, Sandbox, Template

pytestmark = pytest.mark.e2e

PYTHON_PATHS = ("usr/bin/python3", "usr/lib/python3", "usr/share/python3", "usr/share/doc/python3",
                "etc/python3", "usr/bin/py3", "usr/bin/pydoc3", "usr/bin/pygettext3")


def is_python(name: str) -> bool:
    name = name.removeprefix("./")
    return name.startswith(PYTHON_PATHS)


def debian_without_python(layout: Path, work: Path) -> None:
    """The server's base debootstrap tree with every python3 file left out, as an OCI layout."""
    tars = sorted(Path("/var/cache/cube/debootstrap").glob("bookworm-*.tar"), key=lambda p: p.stat().st_size)
    assert tars, "the e2e server builds base from a debootstrap tarball in /var/cache/cube/debootstrap"
    layer = work / "debian-nopy.tar"
    with tarfile.open(tars[0]) as src, tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as dst:
        for member in src:
            if is_python(member.name) or (member.islnk() and is_python(member.linkname)):
                continue
            dst.addfile(member, src.extractfile(member) if member.isreg() else None)
    oci_layout(layout, layer)


def busybox_only(layout: Path, work: Path) -> None:
    layer = work / "busybox.tar"
    root = work / "busybox-root"
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    for applet in ("sh", "cat", "env", "mount", "grep", "mkdir", "rm", "ln", "tr", "sleep", "hostname", "ls",
                   "chmod", "echo", "sync"):  # the build runs /bin/sync after each step
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc/os-release").write_text('NAME="busybox-only"\nID=busybox\n')
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    with tarfile.open(layer, "w") as tar:
        tar.add(root, arcname=".", filter=lambda t: (setattr(t, "uid", 0), setattr(t, "gid", 0), t)[-1])
    oci_layout(layout, layer)


def build(name: str, ref: str) -> list[str]:
    logs: list[str] = []
    Template.build(Template().from_image(ref), name, on_build_logs=lambda e: logs.append(e.message))
    return logs


def test_debian_without_python3(e2b_env: CubeServer, tmp_path: Path) -> None:
    debian_without_python(e2b_env.state_dir / "oci" / "debian-nopy", tmp_path)
    name = f"e2e-nopy-{uuid.uuid4().hex[:8]}"
    build(name, "oci:debian-nopy")
    sbx = Sandbox.create(template=name, timeout=120)
    try:
        out = sbx.commands.run("cat /etc/os-release; which python3 || echo none; ls /usr/bin/python3* 2>&1; "
                               "env | sort")
        assert "bookworm" in out.stdout and "\nnone\n" in out.stdout, out.stdout
        assert "No such file" in out.stdout, out.stdout
        for leak in ("PYTHONHOME", "PYTHONPATH", "CUBE_RUNTIME", "LD_"):
            assert leak not in out.stdout, out.stdout
        sbx.files.write("/home/user/note.txt", "written through the bundled agent")
        assert sbx.files.read("/home/user/note.txt") == "written through the bundled agent"
        assert sbx.commands.run("cat /home/user/note.txt; echo; id -un").stdout.split("\n")[:2] == [
            "written through the bundled agent", "user"]
    finally:
        sbx.kill()


def test_busybox_only_image_without_libc(e2b_env: CubeServer, tmp_path: Path) -> None:
    busybox_only(e2b_env.state_dir / "oci" / "busybox-only", tmp_path)
    name = f"e2e-bb-{uuid.uuid4().hex[:8]}"
    build(name, "oci:busybox-only")
    sbx = Sandbox.create(template=name, timeout=120)
    try:
        assert "busybox-only" in sbx.files.read("/etc/os-release")
        sbx.files.write("/home/user/hello.txt", "hi")
        assert sbx.files.read("/home/user/hello.txt") == "hi"
        assert not sbx.files.exists("/usr/bin/python3")
    finally:
        sbx.kill()


def test_an_image_without_bin_sh_is_refused(e2b_env: CubeServer, tmp_path: Path) -> None:
    root = tmp_path / "nosh"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/nonexistent\n")
    layer = tmp_path / "nosh.tar"
    with tarfile.open(layer, "w") as tar:
        tar.add(root, arcname=".")
    oci_layout(e2b_env.state_dir / "oci" / "no-shell", layer)
    with pytest.raises(BuildException, match="no /bin/sh"):
        build(f"e2e-nosh-{uuid.uuid4().hex[:8]}", "oci:no-shell")
